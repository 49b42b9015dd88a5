"""Process that keeps a pool of assayer's RQ workers running: `python -m assayer.pool`.

The watch command starts it; users need not. Every second it renews its record in Redis, obeys stop
requests from `python -m assayer.shutdown` (which may run on another machine), moves due scheduled jobs
of its queue into the queue, and replaces workers that died. A watch pool also revives the chains of
watches whose polls have stopped.

The pool, not its workers, runs RQ's scheduler. A worker's scheduler is a child process, which keeps
running after a SIGKILL of the worker until something kills it too. A scheduler that dies keeps RQ's
scheduler lock for about a minute, during which no scheduled poll runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time

import redis
from absl import app, flags, logging
from rq import Worker
from rq.scheduler import RQScheduler
from rq.worker_pool import WorkerData, WorkerPool

from assayer import watches, workers
from assayer.connection import settings_from_environment

ROLE = flags.DEFINE_enum("role", None, [workers.WATCH, workers.EVALUATION], "Which jobs the workers run.")
QUEUE = flags.DEFINE_string("queue", None, "Queue the workers take jobs from.")
NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Number of worker processes.", lower_bound=1)

REVIVE_SECONDS = 5.0
"""How often a watch pool looks for watches whose chain of polls was lost."""

FORCE_GRACE_SECONDS = 1.5
"""Pause between the two stop signals of a forced stop; RQ ignores a second signal within 1 s."""

ERROR_LOG_SECONDS = 60.0
"""A pool logs an unexpected error of its every-second duties at most this often."""

WARM, FORCE = "warm", "force"


class AssayerPool(WorkerPool):
    """An RQ worker pool that also keeps a record in Redis, takes stop requests from there, and schedules."""

    def __init__(self, role: str, queue: str, count: int, connection: redis.Redis):
        worker_class = workers.WatchWorker if role == workers.WATCH else workers.EvaluationWorker
        super().__init__([queue], connection=connection, num_workers=count, worker_class=worker_class)
        self.role = role
        self.name = f"{workers.WORKER_PREFIX}pool-{role}-{socket.gethostname()}-{os.getpid()}"
        self._record = {"role": role, "queue": queue, "host": socket.gethostname(), "pid": os.getpid()}
        self._scheduler = RQScheduler([queue], connection=connection)
        self._last_revive = 0.0
        self._redis_failing = False
        self._stop_mode: str | None = None
        self._first_signal_at = 0.0
        self._dead_workers: set[str] = set()
        self._error_logged_at = -ERROR_LOG_SECONDS

    def check_workers(self, respawn: bool = True) -> None:
        # Read stop requests before replacing dead workers: a worker forked an instant before it is
        # signalled has not installed RQ's signal handlers yet and would not stop.
        self._tend_safely()
        if self.status != self.Status.STOPPED:
            # A worker started while Redis is down fails at once, so no replacement starts until Redis is back.
            super().check_workers(respawn=respawn and not self._redis_failing)

    def all_workers_have_stopped(self) -> bool:
        # RQ's loop calls this every second while the workers finish their jobs after a stop request,
        # so the record stays fresh and a forced stop can follow a warm one.
        self._tend_safely()
        return super().all_workers_have_stopped()

    def handle_dead_worker(self, worker_data: WorkerData) -> None:
        super().handle_dead_worker(worker_data)
        self._dead_workers.add(workers.worker_name(self.role, worker_data.name))

    def get_worker_process(self, name: str, burst: bool, _sleep: float = 0, logging_level: str = "INFO"):
        del burst, _sleep  # A pool's workers run until stopped, and the pool schedules for them.
        return multiprocessing.get_context("fork").Process(
            target=run_worker,
            args=(name, self._queue_names, self._connection_class, self._pool_class, self._pool_kwargs),
            kwargs={"worker_class": self.worker_class, "logging_level": logging_level},
            name=f"Worker {name} (pool {self.name})",
        )

    def _tend_safely(self) -> None:
        try:
            self._tend()
        except redis.RedisError as error:
            if not self._redis_failing:
                logging.warning("pool %s: Redis unreachable (%s); retrying every second", self.name, error)
            self._redis_failing = True
            return
        except Exception:
            # The pool must outlive a bad record in Redis: its workers and its other duties depend on it.
            if time.monotonic() - self._error_logged_at >= ERROR_LOG_SECONDS:
                self._error_logged_at = time.monotonic()
                logging.exception("pool %s: tending failed; retrying every second", self.name)
            return
        if self._redis_failing:
            logging.info("pool %s: Redis answers again", self.name)
        self._redis_failing = False

    def _tend(self) -> None:
        record = dict(self._record, workers=[workers.worker_name(self.role, name) for name in self.worker_dict])
        with self.connection.pipeline() as pipeline:
            pipeline.set(workers.pool_key(self.name), json.dumps(record), ex=workers.POOL_TTL)
            pipeline.sadd(workers.POOLS_KEY, self.name)
            pipeline.get(workers.stop_key(self.name))
            request = pipeline.execute()[-1]
        if request is not None:
            self._stop(request.decode())
        self._forget_dead_workers()
        if self._stop_mode is not None:
            return
        if self._scheduler.acquire_locks():
            self._scheduler.enqueue_scheduled_jobs()
        if self.role == workers.WATCH and time.monotonic() - self._last_revive > REVIVE_SECONDS:
            self._last_revive = time.monotonic()
            watches.revive_stale(self.connection)

    def _forget_dead_workers(self) -> None:
        """Remove the registrations of workers that died without removing them, and revive their polls."""
        for name in sorted(self._dead_workers):
            try:
                forget_worker(self.connection, name, self.name)
            except redis.RedisError:
                raise  # Tried again on the next tick.
            except Exception:
                logging.exception("pool %s: removing the registration of dead worker %s failed", self.name, name)
            self._dead_workers.discard(name)

    def _stop(self, mode: str) -> None:
        """Act on a stop request: the first one stops the workers, and `force` after `warm` escalates."""
        if mode == self._stop_mode or self._stop_mode == FORCE:
            return
        logging.info("pool %s: %s stop requested", self.name, mode)
        if self._stop_mode is None:
            self._scheduler.release_locks()
            self._first_signal_at = time.monotonic()
            self.request_stop()
        self._stop_mode = mode
        if mode != FORCE:
            return
        # Idle workers exit on the first signal; only the ones still running need the second.
        deadline = self._first_signal_at + FORCE_GRACE_SECONDS
        while time.monotonic() < deadline and self._running_workers():
            time.sleep(0.05)
        for worker_data in self._running_workers():
            self.stop_worker(worker_data)

    def _running_workers(self) -> list[WorkerData]:
        # is_alive() reaps a worker that exited, so its pid, free for reuse, is never signalled.
        return [worker_data for worker_data in self.worker_dict.values() if worker_data.process.is_alive()]

    def unregister(self) -> None:
        self._scheduler.release_locks()
        with self.connection.pipeline() as pipeline:
            pipeline.delete(workers.pool_key(self.name), workers.stop_key(self.name))
            pipeline.srem(workers.POOLS_KEY, self.name)
            pipeline.execute()


def forget_worker(connection: redis.Redis, name: str, pool_name: str) -> None:
    """Register the death of worker `name` if it died without doing so (SIGKILL, say).

    A poll that the worker was running may still have its watch's token. Its chain is then revived at once
    instead of after the chain goes stale.
    """
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=connection)
    if worker is None or worker.death_date is not None:
        return
    running = [execution.job_id for execution in worker.get_current_executions(refresh=True)]
    logging.warning(
        "pool %s: worker %s died without unregistering, running %s; removing it",
        pool_name,
        name,
        ", ".join(running) or "nothing",
    )
    worker.register_death()
    for job_id in running:
        watches.recover_lost_link(connection, job_id)


def run_worker(name, queue_names, connection_class, pool_class, pool_kwargs, worker_class, logging_level) -> None:
    """Run one worker of a pool in this forked process, without a scheduler of its own."""
    connection = connection_class(connection_pool=redis.ConnectionPool(connection_class=pool_class, **pool_kwargs))
    try:
        worker = worker_class(queue_names, name=name, connection=connection)
    except redis.ConnectionError as error:
        # Redis went away between the pool's last check and this start; the pool tries again once it is back.
        logging.warning("worker %s: not started, Redis is unreachable (%s)", name, error)
        raise SystemExit(1) from None
    worker.work(logging_level=logging_level, with_scheduler=False)


def main(argv: list[str]) -> None:
    del argv
    settings = settings_from_environment()
    pool = AssayerPool(ROLE.value, QUEUE.value, NUM_WORKERS.value, settings.connect())
    logging.info("pool %s: starting %d workers on queue %s", pool.name, NUM_WORKERS.value, QUEUE.value)
    try:
        pool.start(logging_level="INFO")
    finally:
        try:
            pool.unregister()
        except redis.RedisError as error:
            logging.warning("pool %s: could not remove its record: %s", pool.name, error)
        logging.info("pool %s: stopped", pool.name)


if __name__ == "__main__":
    flags.mark_flags_as_required(["role", "queue"])
    app.run(main)
