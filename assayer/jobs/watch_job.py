"""The poll job: list a watch's directory, queue evaluations of settled new versions, schedule the next poll."""

from __future__ import annotations

import dataclasses
import os
import time

import redis
from absl import logging
from rq import Queue, get_current_job

from assayer import checkpoints, records, watches
from assayer.config import WatchConfig
from assayer.diff import Pending, Plan, digest, plan

LOG_EVERY_N_MISSING = 60
"""A missing watch directory is logged on the first poll that misses it and every this many polls after."""


def known_key(watch_id: str) -> str:
    """Hash of relative path to fingerprint of every checkpoint the watch has handled."""
    return f"{records.PREFIX}watch:{watch_id}:known"


def pending_key(watch_id: str) -> str:
    """Hash of relative path to the JSON of a `Pending` version that is still settling."""
    return f"{records.PREFIX}watch:{watch_id}:pending"


@dataclasses.dataclass
class Survey:
    """The findings of one poll, written back in one transaction."""

    plan: Plan | None = None
    listing_digest: str | None = None
    new_versions: list[tuple[str, checkpoints.Checkpoint, str, int | None]] = dataclasses.field(default_factory=list)
    missing_polls: int = 0
    full: bool = False


def poll(watch_id: str, token: str) -> None:
    """Run one poll of the watch, if `token` is still the job allowed to carry its chain on."""
    job = get_current_job()
    connection = job.connection
    started = time.time()
    # RQ's scheduler releases due jobs about once a second and stores due times in whole seconds. Counting
    # the interval from when this job was queued, not from when it started behind the polls queued with
    # it, keeps a poll that starts late in a second from slipping one more second.
    queued_at = job.enqueued_at.timestamp() if job.enqueued_at else started
    with connection.pipeline(transaction=False) as pipeline:
        pipeline.hmget(records.watch_key(watch_id), "config", "state", "token", "digest", "backfill", "missing")
        pipeline.hgetall(pending_key(watch_id))
        (config_json, state, current, last_digest, backfill, missing), pending_raw = pipeline.execute()
    if state != watches.ACTIVE.encode() or current != token.encode():
        logging.debug("watch %s: link %s is stale, ending it", watch_id, token)
        return
    config = WatchConfig.from_json(config_json)
    pending = {_relative(key): Pending.loads(value) for key, value in pending_raw.items()}
    try:
        survey = _survey(connection, config, last_digest, backfill == b"1", int(missing or 0), pending, started)
    except Exception:
        # Whatever went wrong in this poll, the chain must go on: the next poll starts from the same state.
        logging.exception("watch %s: poll of %s failed; polling again", watch_id, config.directory)
        survey = Survey()
    _commit(connection, config, token, survey, queued_at)


def _survey(
    connection: redis.Redis,
    config: WatchConfig,
    last_digest: bytes | None,
    backfill: bool,
    missing: int,
    pending: dict[str, Pending],
    now: float,
) -> Survey:
    pattern = checkpoints.compile_filter(config.regex)
    try:
        listing = checkpoints.scan(config.directory, pattern)
    except FileNotFoundError:
        if missing % LOG_EVERY_N_MISSING == 0:
            logging.warning("watch %s: directory %s does not exist; watching on", config.watch_id, config.directory)
        survey = Survey(missing_polls=missing + 1)
        if last_digest is None:
            # The first poll found no folder: everything that appears in it later is new.
            survey.plan, survey.listing_digest = Plan(), digest({})
        return survey
    if missing:
        logging.info("watch %s: directory %s exists now", config.watch_id, config.directory)
    listing_digest = digest(listing)
    survey = Survey(listing_digest=listing_digest)
    if listing_digest.encode() == last_digest and not backfill:
        # Nothing was added, removed or changed: only the versions still settling need a look.
        subset = {relative: listing[relative] for relative in pending if relative in listing}
        survey.plan = plan(subset, {}, pending, now, config.settle_seconds)
    else:
        survey.full = True
        known = {
            _relative(key): value.decode() for key, value in connection.hgetall(known_key(config.watch_id)).items()
        }
        baseline = last_digest is None and not backfill
        survey.plan = plan(listing, known, pending, now, config.settle_seconds, baseline, backfill)
    _hold_incomplete(config, survey.plan, pending)
    survey.new_versions = _unrecorded(connection, config, survey.plan, pattern)
    return survey


def _hold_incomplete(config: WatchConfig, result: Plan, pending: dict[str, Pending]) -> None:
    """Move settled folder checkpoints that their format marks as incomplete back to pending."""
    for relative, checkpoint in list(result.ready.items()):
        if not checkpoint.is_dir:
            continue
        missing = checkpoints.missing_parts(os.path.join(config.directory, relative), config.ready_marker)
        if missing is None:
            continue
        del result.ready[relative]
        result.pending[relative] = Pending(checkpoint.fingerprint, time.time() - config.settle_seconds, True)
        earlier = pending.get(relative)
        if earlier is None or not earlier.reported or earlier.fingerprint != checkpoint.fingerprint:
            logging.info("watch %s: %r settled but is not complete: %s", config.watch_id, relative, missing)


def _unrecorded(connection, config: WatchConfig, result: Plan, pattern):
    """Return the ready versions that have no record yet, in step order, as (path, checkpoint, version, step)."""
    candidates = [
        (relative, checkpoint, records.version_of(relative, checkpoint.fingerprint))
        for relative, checkpoint in result.ready.items()
    ]
    with connection.pipeline(transaction=False) as pipeline:
        for _, _, version in candidates:
            pipeline.exists(records.record_key(config.watch_id, version))
        exists = pipeline.execute()
    new = [
        (relative, checkpoint, version, checkpoints.step_of(relative, pattern))
        for (relative, checkpoint, version), found in zip(candidates, exists)
        if not found
    ]
    new.sort(key=lambda item: (item[3] is None, item[3] or 0, item[0]))
    return new


def _commit(connection: redis.Redis, config: WatchConfig, token: str, survey: Survey, queued_at: float) -> None:
    """Write the poll's outcome, queue its evaluations and schedule the next poll, if still the token holder."""
    key = records.watch_key(config.watch_id)
    with connection.pipeline() as pipeline:
        try:
            pipeline.watch(key)
            current, sequence = pipeline.hmget(key, "token", "seq")
            if current != token.encode():
                pipeline.unwatch()
                logging.info("watch %s: stopped or revived during the poll; ending link %s", config.watch_id, token)
                return
            pipeline.multi()
            _write_survey(connection, pipeline, config, survey)
            next_token = watches.link_id(config.watch_id, int(sequence) + 1)
            pipeline.hset(key, mapping={"token": next_token, "seq": int(sequence) + 1, "polled_at": repr(time.time())})
            delay = queued_at + config.polling_interval - time.time()
            watches.schedule_link(connection, pipeline, config, next_token, delay)
            pipeline.execute()
        except redis.WatchError:
            logging.info("watch %s: stopped or revived during the poll; ending link %s", config.watch_id, token)
            return
    if survey.new_versions:
        logging.info(
            "watch %s: %d new checkpoints queued for evaluation in %s: %s",
            config.watch_id,
            len(survey.new_versions),
            config.directory,
            ", ".join(repr(item[0]) for item in survey.new_versions[:5]),
        )


def _write_survey(connection, pipeline, config: WatchConfig, survey: Survey) -> None:
    watch_id = config.watch_id
    key = records.watch_key(watch_id)
    pipeline.hset(key, "missing", survey.missing_polls)
    result = survey.plan
    if result is None:
        return
    pipeline.hset(key, "digest", survey.listing_digest)
    pipeline.hdel(key, "backfill")
    known_updates = dict(result.known)
    known_updates.update({relative: checkpoint.fingerprint for relative, checkpoint in result.ready.items()})
    if known_updates:
        pipeline.hset(known_key(watch_id), mapping={_key(rel): fp for rel, fp in known_updates.items()})
    if result.gone:
        pipeline.hdel(known_key(watch_id), *[_key(relative) for relative in result.gone])
    pipeline.delete(pending_key(watch_id))
    if result.pending:
        pipeline.hset(pending_key(watch_id), mapping={_key(rel): item.dumps() for rel, item in result.pending.items()})
    _enqueue_evaluations(connection, pipeline, config, survey.new_versions)


def _enqueue_evaluations(connection, pipeline, config: WatchConfig, new_versions) -> None:
    queue = Queue(config.eval_queue, connection=connection)
    now = time.time()
    for relative, checkpoint, version, step in new_versions:
        records.add(
            pipeline, config.watch_id, version, records.new_record(config, relative, checkpoint.fingerprint, step, now)
        )
        arguments = watches.evaluation_job_arguments(config, relative, version, step, checkpoint.fingerprint)
        job = queue.create_job(**arguments)
        queue.enqueue_job(job, pipeline=pipeline)


def _key(relative: str) -> bytes:
    return relative.encode("utf-8", "surrogateescape")


def _relative(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")
