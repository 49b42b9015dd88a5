"""The chain of poll jobs behind each watch: starting, resuming, stopping, and reviving it.

A watch's hash contains a `token`, the id of the one poll job allowed to carry its chain on. Every change
to the chain happens in a Redis transaction that watches that hash, so of two jobs racing to schedule a
successor (a revived chain and a late link of the old one, say) only the token holder can; the other
finds itself stale and ends. That is what keeps a watch from ever running as two chains.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import redis
from absl import logging
from rq import Queue, Worker
from rq.callbacks import Callback
from rq.job import Job, JobStatus, Retry

from assayer import records
from assayer.config import WatchConfig

ACTIVE, STOPPED = "active", "stopped"
POLL_FUNCTION = "assayer.jobs.watch_job.poll"
EVALUATE_FUNCTION = "assayer.jobs.eval_job.evaluate"
RECORD_FAILURE_FUNCTION = "assayer.jobs.eval_job.record_failure"
RECORD_STOPPED_FUNCTION = "assayer.jobs.eval_job.record_stopped"
LINK_PREFIX = "assayer-watch-"

MIN_STALE_SECONDS = 15.0
"""A chain whose last poll is older than this (or 3 polling intervals, if longer) is revived."""

RETRY_BASE_SECONDS = 5
RETRY_MAX_SECONDS = 600
"""Pauses before the retries of a failed evaluation: 5 s, 10 s, 20 s, ... at most 10 min."""

LIVE_JOB_STATES = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.STARTED, JobStatus.DEFERRED)
_WAITING_STATUSES = (JobStatus.QUEUED.value.encode(), JobStatus.SCHEDULED.value.encode())


def link_id(watch_id: str, sequence: int) -> str:
    return f"{LINK_PREFIX}{watch_id}-{sequence}"


def watch_of_link(job_id: str) -> str | None:
    """Return the watch id in a poll job's id, or None when `job_id` is not a poll job's."""
    if not job_id.startswith(LINK_PREFIX):
        return None
    watch_id, _, sequence = job_id[len(LINK_PREFIX) :].rpartition("-")
    return watch_id if watch_id and sequence.isdigit() else None


def stale_after(config: WatchConfig) -> float:
    """Seconds without a poll after which a chain counts as lost."""
    return max(3 * config.polling_interval, MIN_STALE_SECONDS)


def start(connection: redis.Redis, config: WatchConfig, eval_existing: bool) -> str:
    """Start or resume the watch and return `started`, `resumed` or `running`.

    The config is stored in every case, so that a changed polling interval or timeout takes effect on the
    next poll. A chain that is still alive is left alone; otherwise a new one is seeded. `eval_existing`
    makes the next poll evaluate every checkpoint present, except versions that already have a record.
    """
    key = records.watch_key(config.watch_id)
    queue = Queue(config.watch_queue, connection=connection)
    with connection.pipeline() as pipeline:
        while True:
            try:
                pipeline.watch(key)
                state, token, polled_at, sequence = pipeline.hmget(key, "state", "token", "polled_at", "seq")
                alive = state == ACTIVE.encode() and _recent(polled_at, config)
                waiting_link = None if alive else _waiting_link(pipeline, token)
                pipeline.multi()
                pipeline.hset(key, mapping={"config": config.to_json(), "state": ACTIVE})
                pipeline.sadd(records.WATCHES_KEY, config.watch_id)
                if eval_existing:
                    pipeline.hset(key, "backfill", "1")
                if not alive:
                    _drop_link(pipeline, queue, waiting_link)
                    _seed(connection, pipeline, config, int(sequence or 0) + 1, first=sequence is None)
                pipeline.execute()
                break
            except redis.WatchError:
                continue
    if alive:
        return "running"
    requeue_interrupted(connection, config)
    return "resumed" if sequence is not None else "started"


def stop(connection: redis.Redis, config: WatchConfig) -> int:
    """Stop the watch's chain and remove its queued jobs; return how many evaluations were removed.

    Setting the state invalidates the token, so a poll that is running now cannot schedule a successor
    or enqueue evaluations. Records of removed evaluations stay `queued` and are queued again on resume.
    """
    watch_id = config.watch_id
    connection.hset(records.watch_key(watch_id), mapping={"state": STOPPED, "token": ""})
    remove_jobs(connection, config.watch_queue, f"{LINK_PREFIX}{watch_id}-")
    removed = remove_jobs(connection, config.eval_queue, f"assayer-eval-{watch_id}-")
    logging.info("watch %s: stopped (%s), %d queued evaluations removed", watch_id, config.directory, removed)
    return removed


def remove_jobs(connection: redis.Redis, queue_name: str, prefix: str) -> int:
    """Delete the jobs whose id starts with `prefix` from a queue and its scheduled job registry."""
    queue = Queue(queue_name, connection=connection)
    queued = [job_id for job_id in queue.get_job_ids() if job_id.startswith(prefix)]
    scheduled = [job_id for job_id in queue.scheduled_job_registry.get_job_ids() if job_id.startswith(prefix)]
    with connection.pipeline() as pipeline:
        for job_id in queued:
            queue.remove(job_id, pipeline=pipeline)
        for job_id in scheduled:
            queue.scheduled_job_registry.remove(job_id, pipeline=pipeline)
        for job_id in queued + scheduled:
            pipeline.delete(Job.key_for(job_id))
        pipeline.execute()
    return len(queued) + len(scheduled)


def revive_stale(connection: redis.Redis) -> list[str]:
    """Seed a new chain for every active watch whose polls have stopped; return their ids.

    A chain is lost when a watch worker dies in the middle of a poll, when a poll fails before it
    schedules its successor (Redis unreachable, say), or when Redis restarts from a snapshot taken while a
    link was queued. The old token is replaced, so a late link of the old chain ends on its own.
    """
    revived = []
    for config, fields in records.load_watches(connection):
        if fields.get("state") != ACTIVE or _recent(fields.get("polled_at"), config):
            continue
        token = fields.get("token")
        # NOTE: only a worker on this machine can be checked. A slow poll on another machine is therefore
        # revived like a lost one, and it ends without committing while the new link polls again.
        if token and _runs_on_live_local_worker(connection, token):
            logging.log_every_n_seconds(
                logging.INFO,
                "watch %s: poll %s has run past %.0f s; waiting for it (%s)",
                60,
                config.watch_id,
                token,
                stale_after(config),
                config.directory,
            )
            continue
        if _reseed(connection, config, lambda token, polled_at: not _recent(polled_at, config)):
            logging.warning(
                "watch %s: no poll for %.0f s, chain revived (%s)",
                config.watch_id,
                stale_after(config),
                config.directory,
            )
            revived.append(config.watch_id)
    return revived


def recover_lost_link(connection: redis.Redis, job_id: str) -> bool:
    """Clean up after poll job `job_id`, whose worker died running it; return whether its chain was revived.

    The job is deleted, which takes it out of the started job registry. If it still held its watch's
    token, a new chain is seeded at once instead of after the chain goes stale.
    """
    watch_id = watch_of_link(job_id)
    if watch_id is None:
        return False
    raw = connection.hget(records.watch_key(watch_id), "config")
    config = WatchConfig.from_json(raw) if raw is not None else None
    revived = config is not None and _reseed(connection, config, lambda token, polled_at: token == job_id.encode())
    job = _fetch(connection, job_id)
    if job is not None:
        job.delete()
    if revived:
        logging.warning(
            "watch %s: the worker running poll %s died; chain revived (%s)", watch_id, job_id, config.directory
        )
    return revived


def requeue_interrupted(connection: redis.Redis, config: WatchConfig) -> int:
    """Enqueue again the evaluations that are recorded as queued or started but whose job is gone."""
    queue = Queue(config.eval_queue, connection=connection)
    count = 0
    interrupted = sorted(
        records.load_all(connection, config.watch_id),
        key=lambda record: (record.get("step") is None, record.get("step") or 0, record["name"]),
    )
    for record in interrupted:
        if record["state"] not in (records.QUEUED, records.STARTED):
            continue
        job = _fetch(connection, record["job_id"])
        if job is not None and job.get_status(refresh=False) in LIVE_JOB_STATES:
            continue
        if job is not None:
            job.delete()
        relative = record["name"]
        version = records.version_of(relative, record["fingerprint"])
        records.update(connection, config.watch_id, version, state=records.QUEUED, enqueued_at=time.time())
        arguments = evaluation_job_arguments(config, relative, version, record.get("step"), record["fingerprint"])
        queue.enqueue_job(queue.create_job(**arguments))
        count += 1
    if count:
        logging.info("watch %s: %d interrupted evaluations queued again", config.watch_id, count)
    return count


def evaluation_job_arguments(
    config: WatchConfig, relative: str, version: str, step: int | None, fingerprint: str | None = None
) -> dict:
    """Return the arguments of `Queue.create_job` for one evaluation, shared by every way of enqueueing it."""
    retry = None
    if config.max_retries > 0:
        pauses = [min(RETRY_BASE_SECONDS * 2**attempt, RETRY_MAX_SECONDS) for attempt in range(config.max_retries)]
        retry = Retry(max=config.max_retries, interval=pauses)
    return {
        "func": EVALUATE_FUNCTION,
        "args": (config.to_json(), relative, version, step, fingerprint),
        "job_id": records.eval_job_id(config.watch_id, version),
        "description": f"evaluate {relative!r} of watch {config.directory} with {config.evaluator}",
        "timeout": config.eval_timeout or -1,
        "retry": retry,
        "on_failure": Callback(RECORD_FAILURE_FUNCTION),
        "on_stopped": Callback(RECORD_STOPPED_FUNCTION),
    }


def link_arguments(config: WatchConfig, token: str) -> dict:
    """Return the arguments of `Queue.create_job` for one poll of the watch."""
    return {
        "func": POLL_FUNCTION,
        "args": (config.watch_id, token),
        "job_id": token,
        "description": f"poll {config.directory} for watch {config.watch_id}",
        "result_ttl": 0,
        "failure_ttl": 24 * 3600,
        "timeout": max(600, int(10 * config.polling_interval)),
    }


def schedule_link(connection: redis.Redis, pipeline, config: WatchConfig, token: str, delay: float) -> None:
    """Queue, on a pipeline in MULTI mode, the poll job `token` to run after `delay` seconds."""
    queue = Queue(config.watch_queue, connection=connection)
    job = queue.create_job(**link_arguments(config, token))
    if delay <= 0:
        queue.enqueue_job(job, pipeline=pipeline)
    else:
        queue.schedule_job(job, datetime.now(timezone.utc) + timedelta(seconds=delay), pipeline=pipeline)


def _seed(connection: redis.Redis, pipeline, config: WatchConfig, sequence: int, first: bool) -> None:
    token = link_id(config.watch_id, sequence)
    fields = {"token": token, "seq": sequence, "polled_at": repr(time.time())}
    if first:
        fields["created_at"] = repr(time.time())
    pipeline.hset(records.watch_key(config.watch_id), mapping=fields)
    schedule_link(connection, pipeline, config, token, delay=0)


def _reseed(connection: redis.Redis, config: WatchConfig, is_lost: Callable[[bytes | None, bytes | None], bool]):
    """Seed a new chain if the watch is active and `is_lost(token, polled_at)` is true; return whether it did."""
    key = records.watch_key(config.watch_id)
    queue = Queue(config.watch_queue, connection=connection)
    with connection.pipeline() as pipeline:
        try:
            pipeline.watch(key)
            state, token, polled_at, sequence = pipeline.hmget(key, "state", "token", "polled_at", "seq")
            if state != ACTIVE.encode() or not is_lost(token, polled_at):
                pipeline.unwatch()
                return False
            waiting_link = _waiting_link(pipeline, token)
            pipeline.multi()
            _drop_link(pipeline, queue, waiting_link)
            _seed(connection, pipeline, config, int(sequence or 0) + 1, first=False)
            pipeline.execute()
            return True
        except redis.WatchError:
            return False


def _waiting_link(pipeline, token: bytes | None) -> str | None:
    """Return the poll job `token` if it waits in the queue or the scheduled job registry.

    Called before MULTI. The job is watched too, so that a worker taking it meanwhile aborts the transaction.
    """
    if not token:
        return None
    job_key = Job.key_for(token.decode())
    pipeline.watch(job_key)
    status = pipeline.hget(job_key, "status")
    return token.decode() if status in _WAITING_STATUSES else None


def _drop_link(pipeline, queue: Queue, job_id: str | None) -> None:
    """Delete a waiting poll job that a new chain replaces, so that it does not run just to find itself stale."""
    if job_id is None:
        return
    queue.remove(job_id, pipeline=pipeline)
    queue.scheduled_job_registry.remove(job_id, pipeline=pipeline)
    pipeline.delete(Job.key_for(job_id))


def _runs_on_live_local_worker(connection: redis.Redis, job_id: str) -> bool:
    """Return whether job `job_id` runs on a worker whose process on this machine is alive."""
    status, worker_name = connection.hmget(Job.key_for(job_id), "status", "worker_name")
    if status != JobStatus.STARTED.value.encode() or not worker_name:
        return False
    worker_key = Worker.redis_worker_namespace_prefix + worker_name.decode()
    hostname, pid = connection.hmget(worker_key, "hostname", "pid")
    if hostname is None or hostname.decode() != socket.gethostname() or not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _recent(polled_at: bytes | str | None, config: WatchConfig) -> bool:
    return polled_at is not None and time.time() - float(polled_at) < stale_after(config)


def _fetch(connection: redis.Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=connection)
    except Exception:  # NoSuchJobError, or a job whose data no longer unpickles.
        return None
