"""Evaluation records: one Redis hash per checkpoint version, kept without expiry under `assayer:`."""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import redis

from assayer.config import WatchConfig

PREFIX = "assayer:"
WATCHES_KEY = PREFIX + "watches"
"""Set of the ids of every watch ever started on this Redis."""

QUEUED, STARTED, FINISHED, FAILED, SKIPPED = "queued", "started", "finished", "failed", "skipped"
STATES = (QUEUED, STARTED, FINISHED, FAILED, SKIPPED)

STOPPED_ERROR = "stopped by a forced shutdown; evaluated again when the watch resumes"
"""The error of a record whose evaluation a forced shutdown stopped; the record is queued again."""

FLOAT_FIELDS = ("enqueued_at", "started_at", "ended_at", "duration")
INT_FIELDS = ("step", "attempts")


def watch_key(watch_id: str) -> str:
    """Hash of one watch: its config, chain state and liveness."""
    return f"{PREFIX}watch:{watch_id}"


def index_key(watch_id: str) -> str:
    """Sorted set of a watch's record versions, scored by enqueue time."""
    return f"{PREFIX}watch:{watch_id}:records"


def record_key(watch_id: str, version: str) -> str:
    return f"{PREFIX}record:{watch_id}:{version}"


def version_of(relative: str, fingerprint: str) -> str:
    """Name one version of a checkpoint: its relative path and its fingerprint when it settled."""
    identity = relative.encode("utf-8", "surrogateescape") + b"\0" + fingerprint.encode()
    return hashlib.sha1(identity).hexdigest()[:16]


def eval_job_id(watch_id: str, version: str) -> str:
    """The RQ job id of a version's evaluation; the same version always maps to the same job."""
    return f"assayer-eval-{watch_id}-{version}"


def new_record(config: WatchConfig, relative: str, fingerprint: str, step: int | None, now: float) -> dict[str, str]:
    """Return the fields of a freshly queued record."""
    fields = {
        "watch": config.watch_id,
        "path": _text(config.directory.rstrip("/") + "/" + relative),
        "name": _text(relative),
        "fingerprint": fingerprint,
        "state": QUEUED,
        "enqueued_at": repr(now),
        "attempts": "0",
        "job_id": eval_job_id(config.watch_id, version_of(relative, fingerprint)),
    }
    if step is not None:
        fields["step"] = str(step)
    return fields


def add(pipeline: redis.client.Pipeline, watch_id: str, version: str, fields: dict[str, str]) -> None:
    """Queue the writes that store a new record and index it under its watch."""
    pipeline.hset(record_key(watch_id, version), mapping=fields)
    pipeline.zadd(index_key(watch_id), {version: float(fields["enqueued_at"])})


def update(connection: redis.Redis, watch_id: str, version: str, **fields: Any) -> None:
    """Set fields of an existing record; None values remove the field."""
    key = record_key(watch_id, version)
    present = {name: _encode(value) for name, value in fields.items() if value is not None}
    absent = [name for name, value in fields.items() if value is None]
    with connection.pipeline() as pipeline:
        if present:
            pipeline.hset(key, mapping=present)
        if absent:
            pipeline.hdel(key, *absent)
        pipeline.execute()


def load(connection: redis.Redis, watch_id: str, version: str) -> dict[str, Any] | None:
    raw = connection.hgetall(record_key(watch_id, version))
    return decode(raw) if raw else None


def load_all(connection: redis.Redis, watch_id: str) -> list[dict[str, Any]]:
    """Return every record of a watch, decoded, in the order they were queued."""
    versions = connection.zrange(index_key(watch_id), 0, -1)
    with connection.pipeline(transaction=False) as pipeline:
        for version in versions:
            pipeline.hgetall(record_key(watch_id, version.decode()))
        rows = pipeline.execute()
    return [decode(raw) for raw in rows if raw]


def load_watches(connection: redis.Redis) -> list[tuple[WatchConfig, dict[str, str]]]:
    """Return every known watch as its config and its status fields, sorted by directory."""
    watch_ids = sorted(member.decode() for member in connection.smembers(WATCHES_KEY))
    with connection.pipeline(transaction=False) as pipeline:
        for watch_id in watch_ids:
            pipeline.hgetall(watch_key(watch_id))
        rows = pipeline.execute()
    watches = []
    for raw in rows:
        if b"config" not in raw:
            continue
        fields = {key.decode(): value.decode(errors="replace") for key, value in raw.items()}
        watches.append((WatchConfig.from_json(fields.pop("config")), fields))
    return sorted(watches, key=lambda item: (item[0].directory, item[0].evaluator))


def decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
    """Turn a record hash into Python values: numbers for times and counts, the parsed result."""
    record: dict[str, Any] = {key.decode(): value.decode("utf-8", "replace") for key, value in raw.items()}
    for name in FLOAT_FIELDS:
        if name in record:
            record[name] = float(record[name])
    for name in INT_FIELDS:
        if name in record:
            record[name] = int(record[name])
    if "result" in record:
        record["result"] = json.loads(record["result"])
    return record


def to_json_text(value: Any) -> str:
    """Serialize an evaluator's return value as JSON, turning numpy and torch scalars and arrays into numbers.

    A value that still cannot be serialized is stored as its repr, a JSON string.
    """
    try:
        return json.dumps(_plain(value), allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(repr(value))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist") and callable(value.tolist):
        # numpy scalars and arrays, torch tensors: tolist() returns Python numbers or lists of them.
        return _plain(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        return _plain(value.item())
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _encode(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _text(value: str) -> str:
    # File names that are not valid UTF-8 reach Python as lone surrogates, which Redis cannot store.
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def now() -> float:
    return time.time()
