"""assayer's own RQ workers: the worker classes, and pools of them that outlive the watch command.

Workers are named `assayer-watch-*` and `assayer-eval-*` so that shutdown can tell them from other RQ
workers on the same Redis. A pool runs as a process of its own (`python -m assayer.pool`), in a new
session so that closing the terminal does not stop it, and replaces workers that die.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
from absl import logging
from rq import SimpleWorker, Worker
from rq.job import Job
from rq.worker import BaseWorker

from assayer import records, state
from assayer.connection import RedisSettings
from assayer.jobs import eval_job  # Imported here so that every forked work horse has it already.

WORKER_PREFIX = "assayer-"
POOLS_KEY = records.PREFIX + "pools"
"""Set of the names of running pools; each has a hash `assayer:pool:NAME` that expires unless renewed."""

POOL_TTL = 30
"""Seconds a pool's record lives without renewal; the pool renews it every second."""

MAINTENANCE_SECONDS = 30
"""How often assayer's workers clean RQ's registries, which retries or fails evaluations of dead workers."""

RECONNECT_MAX_SECONDS = 10.0
"""Maximum pause between a worker's attempts to reach Redis again; RQ 3.0's own maximum is 60 s."""

REDIS_DOWN_LOG_SECONDS = 60.0
"""While Redis stays unreachable, a worker logs the failure of its command channel at most this often."""

WATCH, EVALUATION = "watch", "eval"


def pool_key(name: str) -> str:
    return f"{records.PREFIX}pool:{name}"


def stop_key(name: str) -> str:
    """String key that requests a pool to stop: `warm` lets running evaluations finish, `force` does not."""
    return f"{records.PREFIX}pool:{name}:stop"


def worker_name(role: str, name: str | None) -> str:
    """Return the name a worker registers under: role, host and a unique suffix, after `assayer-`."""
    return f"{WORKER_PREFIX}{role}-{socket.gethostname()}-{(name or uuid.uuid4().hex)[:10]}"


class AssayerWorker(BaseWorker):
    """Base of assayer's two worker classes, with quick reconnection to Redis and a prompt exit.

    A worker of RQ 3.0 with redis-py 8 can take a minute to exit. Its `unsubscribe()` sends UNSUBSCRIBE
    before it stops the command channel's thread, so that thread may already be back in a read that waits
    up to 60 s, and it then joins the thread without a timeout. Stopping the thread first lets the
    UNSUBSCRIBE reply end the read.
    """

    max_connection_wait_time = RECONNECT_MAX_SECONDS

    def __init__(self, queues, name: str | None = None, **kwargs):
        kwargs.setdefault("maintenance_interval", MAINTENANCE_SECONDS)
        super().__init__(queues, name=name, **kwargs)
        self._channel_failing_since: float | None = None
        self._channel_logged_at = 0.0

    def unsubscribe(self) -> None:
        if not self.pubsub_thread:
            return
        self.pubsub_thread.stop(timeout=0)
        try:
            self.pubsub.unsubscribe()
        except redis.RedisError as error:
            logging.debug("worker %s: unsubscribing failed: %s", self.name, error)
        self.pubsub_thread.join(timeout=1)
        self.pubsub.close()

    def _pubsub_exception_handler(self, exc: Exception, pubsub, pubsub_thread) -> None:
        if not isinstance(exc, redis.ConnectionError):
            logging.warning("worker %s: command channel stopped: %s", self.name, exc)
            raise exc
        now = time.monotonic()
        if self._channel_failing_since is None:
            self._channel_failing_since = now
        if now - self._channel_logged_at >= REDIS_DOWN_LOG_SECONDS:
            self._channel_logged_at = now
            logging.warning(
                "worker %s: command channel cannot reach Redis for %.0f s (%s); retrying every 2 s",
                self.name,
                now - self._channel_failing_since,
                exc,
            )
        time.sleep(2.0)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        super().heartbeat(timeout, pipeline)
        if pipeline is None:
            # This heartbeat reached Redis, so the command channel's next outage is logged at once.
            self._channel_failing_since = None
            self._channel_logged_at = 0.0


class WatchWorker(AssayerWorker, SimpleWorker):
    """Runs poll jobs in its own process: a poll is short, trusted code, so a fork per poll is waste."""

    def __init__(self, queues, name: str | None = None, **kwargs):
        super().__init__(queues, name=worker_name(WATCH, name), **kwargs)


class EvaluationWorker(AssayerWorker, Worker):
    """Runs each evaluation in a forked work horse, so the memory an evaluator used is freed after it."""

    job_class = eval_job.EvaluationJob

    def __init__(self, queues, name: str | None = None, job_class=None, **kwargs):
        if job_class is Job:
            job_class = None  # `rq worker --worker-class` passes RQ's default job class, which would replace ours.
        super().__init__(queues, name=worker_name(EVALUATION, name), job_class=job_class, **kwargs)

    def execute_job(self, job, queue):
        if isinstance(job, eval_job.EvaluationJob):
            # Logged before the fork: a new work horse copies each memory page it first touches, and its first
            # log line measured about six times slower than this one.
            eval_job.log_start(job)
        super().execute_job(job, queue)

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        if os.WIFSIGNALED(ret_val):
            reason = f"the evaluation process was killed by {signal.Signals(os.WTERMSIG(ret_val)).name}"
        else:
            reason = f"the evaluation process exited with status {os.waitstatus_to_exitcode(ret_val)}"
        try:
            eval_job.record_failure(job, self.connection, EvaluationKilled, EvaluationKilled(reason), None)
        except Exception:
            logging.exception("worker %s: recording the failure of job %s failed", self.name, job.id)

    def request_force_stop(self, signum, frame):
        """Stop now, killing a running evaluation, and leave its job stopped and its record queued again.

        Without this the job would stay `started` until RQ's maintenance found it abandoned, and then count
        as a failure of the evaluator.
        """
        execution = self.execution if self.horse_pid else None
        try:
            super().request_force_stop(signum, frame)
        except SystemExit:
            if execution is not None:
                self._stop_interrupted(execution)
            raise

    def _stop_interrupted(self, execution) -> None:
        try:
            job = self.job_class.fetch(execution.job_id, connection=self.connection, serializer=self.serializer)
            queue = self.queue_class(job.origin, connection=self.connection, serializer=self.serializer)
            self._stopped_job_id = job.id
            self.handle_job_failure(job, queue, exc_string="stopped by a forced shutdown", execution=execution)
            eval_job.record_stopped(job, self.connection)
        except Exception:
            logging.exception("worker %s: recording the stop of job %s failed", self.name, execution.job_id)


class EvaluationKilled(Exception):
    """The work horse running an evaluation ended without reporting back."""


def is_assayer_worker(name: str) -> bool:
    return name.startswith(WORKER_PREFIX)


def start_pool(settings: RedisSettings, role: str, queue: str, count: int, working_dir: str) -> tuple[int, Path]:
    """Start a detached pool of `count` workers on `queue`; return its pid and log file.

    The Redis URL, password included, travels in the environment, never on the command line where
    any user of the machine could read it.
    """
    log_path = state.log_dir() / f"{role}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    environment = dict(os.environ, **settings.environment())
    package_parent = str(Path(__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, environment.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "assayer.pool", f"--role={role}", f"--queue={queue}", f"--num_workers={count}"]
    with open(log_path, "ab") as log, open(os.devnull, "rb") as stdin:
        process = subprocess.Popen(
            command,
            stdin=stdin,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=working_dir,
            env=environment,
            start_new_session=True,
        )
    return process.pid, log_path


def running_pools(connection: redis.Redis) -> dict[str, dict]:
    """Return the live pools by name, dropping names whose record expired (a pool killed with SIGKILL)."""
    names = sorted(member.decode() for member in connection.smembers(POOLS_KEY))
    with connection.pipeline(transaction=False) as pipeline:
        for name in names:
            pipeline.get(pool_key(name))
        values = pipeline.execute()
    pools = {}
    for name, value in zip(names, values):
        if value is None:
            connection.srem(POOLS_KEY, name)
        else:
            pools[name] = json.loads(value)
    return pools


def assayer_workers(connection: redis.Redis) -> list[Worker]:
    """Return the registered workers whose names mark them as assayer's."""
    return [worker for worker in Worker.all(connection=connection) if is_assayer_worker(worker.name)]
