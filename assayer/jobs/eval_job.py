"""The evaluation job: run the user's evaluator on one checkpoint version and record the outcome."""

from __future__ import annotations

import functools
import os
import time
import traceback
from typing import Any

from absl import logging
from rq import get_current_job
from rq.exceptions import AbandonedJobError
from rq.job import Job

from assayer import checkpoints, evaluator, records
from assayer.config import WatchConfig
from assayer.watches import EVALUATE_FUNCTION


class EvaluationJob(Job):
    """RQ's job, which also records an evaluation's start in the transaction in which RQ marks the job started.

    assayer's evaluation workers fetch their jobs as this class, so the record and RQ's registries turn to
    `started` together, at no round trip of their own.
    """

    @functools.cached_property
    def watch_config(self) -> WatchConfig | None:
        """The config of the watch this job evaluates for, or None for a job that is not an evaluation."""
        if self.func_name != EVALUATE_FUNCTION:
            return None
        return WatchConfig.from_json(self.args[0])

    def prepare_for_execution(self, worker_name: str, pipeline) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        if self.watch_config is not None:
            _record_start(pipeline, self.watch_config.watch_id, self.args[2], worker_name)


def evaluate(config_json: str, relative: str, version: str, step: int | None, fingerprint: str | None = None) -> Any:
    """Evaluate one checkpoint version and return what the evaluator returned.

    A checkpoint deleted before its evaluation starts (rotated away by the trainer, say), or replaced by a
    newer version, is recorded as skipped and the evaluator is not called.
    """
    job = get_current_job()
    connection = job.connection
    if isinstance(job, EvaluationJob):
        # assayer's worker parsed the config and logged the start before it forked this work horse. The start
        # is already recorded, in the transaction in which RQ marked the job started.
        config = job.watch_config
    else:
        # Another RQ worker, such as a plain `rq worker`, fetched the job as RQ's own class.
        config = WatchConfig.from_json(config_json)
        _start_here(connection, config, relative, version, job.worker_name or "")
    path = os.path.join(config.directory, relative)
    watch_id = config.watch_id
    if fingerprint is None:
        fingerprint = (connection.hget(records.record_key(watch_id, version), "fingerprint") or b"").decode()
    reason = _reason_to_skip(path, fingerprint)
    if reason is not None:
        records.update(connection, watch_id, version, state=records.SKIPPED, reason=reason, ended_at=time.time())
        logging.warning("checkpoint %s: skipped, %s (watch %s)", path, reason, watch_id)
        return None
    function = evaluator.load(config.evaluator, config.search_path)
    began = time.monotonic()
    result = function(path)
    duration = time.monotonic() - began
    if config.tensorboard_dir:
        # Written before the record is marked finished, so a finished record means its scalars exist too.
        _write_tensorboard(config, step, result, path)
    records.update(
        connection,
        watch_id,
        version,
        state=records.FINISHED,
        ended_at=time.time(),
        duration=duration,
        result=records.to_json_text(result),
    )
    logging.info("checkpoint %s: evaluated in %.1f s (watch %s)", path, duration, watch_id)
    return result


def log_start(job: EvaluationJob) -> None:
    """Log that an evaluation job starts; assayer's evaluation worker calls this before it forks the work horse."""
    config = job.watch_config
    if config is None:
        return
    path = os.path.join(config.directory, job.args[1])
    if config.max_retries and job.retries_left is not None and job.retries_left < config.max_retries:
        retry = config.max_retries - job.retries_left
        logging.info(
            "checkpoint %s: evaluation started, retry %d of %d (watch %s)",
            path,
            retry,
            config.max_retries,
            config.watch_id,
        )
    else:
        logging.info("checkpoint %s: evaluation started (watch %s)", path, config.watch_id)


def _start_here(connection, config: WatchConfig, relative: str, version: str, worker_name: str) -> None:
    """Record and log the start of an evaluation in the work horse, in one round trip of its own."""
    with connection.pipeline(transaction=False) as pipeline:
        _record_start(pipeline, config.watch_id, version, worker_name)
        attempt = int(pipeline.execute()[0])
    path = os.path.join(config.directory, relative)
    logging.info("checkpoint %s: evaluation started, attempt %d (watch %s)", path, attempt, config.watch_id)


def _record_start(pipeline, watch_id: str, version: str, worker_name: str) -> None:
    """Queue the commands that mark a record started and count the attempt; the count is the first reply."""
    key = records.record_key(watch_id, version)
    pipeline.hincrby(key, "attempts", 1)
    pipeline.hset(key, mapping={"state": records.STARTED, "started_at": repr(time.time()), "worker": worker_name})
    pipeline.hdel(key, "error", "ended_at", "duration")


def _reason_to_skip(path: str, fingerprint: str) -> str | None:
    """Return why this version can no longer be evaluated, or None when it still can."""
    current = checkpoints.describe(path)
    if current is None:
        return "deleted before its evaluation started"
    # Only a newer modification time counts. On a network filesystem this machine's view of the file can
    # lag behind the watch's, and skipping on an older time would drop a version that is never queued again.
    if fingerprint and checkpoints.modified_ns(current.fingerprint) > checkpoints.modified_ns(fingerprint):
        return "replaced by a newer version before its evaluation started; the newer version is evaluated instead"
    return None


def record_failure(job: Job, connection, exc_type, exc_value, exc_traceback) -> None:
    """Record a failed attempt: `failed` after the last one, `queued` again while retries remain.

    RQ calls this for an exception in the evaluator, a timeout, and an evaluation whose worker died.
    """
    config_json, relative, version = job.args[:3]
    config = WatchConfig.from_json(config_json)
    error = _last_line(exc_type, exc_value)
    path = os.path.join(config.directory, relative)
    if job.retries_left:
        records.update(connection, config.watch_id, version, state=records.QUEUED, error=error)
        logging.warning(
            "checkpoint %s: evaluation failed (%s), %d retries remaining (watch %s)",
            path,
            error,
            job.retries_left,
            config.watch_id,
        )
        return
    records.update(
        connection,
        config.watch_id,
        version,
        state=records.FAILED,
        error=error,
        ended_at=time.time(),
    )
    logging.error("checkpoint %s: evaluation failed: %s (watch %s)", path, error, config.watch_id)


def record_stopped(job: Job, connection) -> None:
    """Record an evaluation stopped by a shutdown as queued again, so that resuming the watch reruns it.

    RQ calls this for a job that its stop-job command stopped, which shutdown sends with `--directory DIR
    --force` and, with `--force`, to workers that assayer did not start. assayer's evaluation worker calls it
    for the job it kills on `shutdown --force`.
    """
    config_json, relative, version = job.args[:3]
    config = WatchConfig.from_json(config_json)
    records.update(
        connection, config.watch_id, version, state=records.QUEUED, error=records.STOPPED_ERROR, ended_at=None
    )
    logging.warning(
        "checkpoint %s: evaluation stopped by a forced shutdown (watch %s)",
        os.path.join(config.directory, relative),
        config.watch_id,
    )


def _last_line(exc_type, exc_value) -> str:
    if exc_type is None:
        return "failed"
    if issubclass(exc_type, AbandonedJobError):
        return "the worker running the evaluation died (AbandonedJobError)"
    lines = traceback.format_exception_only(exc_type, exc_value)
    text = "".join(lines).strip().splitlines()
    return text[-1] if text else exc_type.__name__


def _write_tensorboard(config: WatchConfig, step: int | None, result: Any, path: str) -> None:
    try:
        from assayer import tensorboard

        tensorboard.write_scalars(config.tensorboard_dir, config, step, result)
    except Exception:
        # The evaluation itself succeeded and is recorded; a broken event file must not fail it.
        logging.exception("checkpoint %s: writing TensorBoard scalars to %s failed", path, config.tensorboard_dir)
