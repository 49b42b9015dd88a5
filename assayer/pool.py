"""Process that keeps a pool of assayer's RQ workers running: `python -m assayer.pool`.

The watch command starts it; users need not. It renews its record in Redis every second, obeys stop
requests from `python -m assayer.shutdown` (which may run on another machine), replaces workers that
die, and, for watch pools, revives the chains of watches whose polls have stopped.
"""

from __future__ import annotations

import json
import os
import socket
import time

import redis
from absl import app, flags, logging
from rq.worker_pool import WorkerPool

from assayer import watches, workers
from assayer.connection import settings_from_environment

ROLE = flags.DEFINE_enum("role", None, [workers.WATCH, workers.EVALUATION], "Which jobs the workers run.")
QUEUE = flags.DEFINE_string("queue", None, "Queue the workers take jobs from.")
NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Number of worker processes.", lower_bound=1)

REVIVE_SECONDS = 5.0
"""How often a watch pool looks for watches whose chain of polls was lost."""

FORCE_GRACE_SECONDS = 1.5
"""Pause between the two stop signals of a forced stop; RQ ignores a second signal within 1 s."""


class AssayerPool(WorkerPool):
    """An RQ worker pool that also keeps a record in Redis and takes stop requests from there."""

    def __init__(self, role: str, queue: str, count: int, connection: redis.Redis):
        worker_class = workers.WatchWorker if role == workers.WATCH else workers.EvaluationWorker
        super().__init__([queue], connection=connection, num_workers=count, worker_class=worker_class)
        self.role = role
        self.name = f"{workers.WORKER_PREFIX}pool-{role}-{socket.gethostname()}-{os.getpid()}"
        self._record = {"role": role, "queue": queue, "host": socket.gethostname(), "pid": os.getpid()}
        self._last_revive = 0.0
        self._redis_failing = False

    def check_workers(self, respawn: bool = True) -> None:
        # Read stop requests before replacing dead workers: a worker forked an instant before it is
        # signalled has not installed RQ's signal handlers yet and would not stop.
        try:
            self._tend()
            if self._redis_failing:
                logging.info("pool %s: Redis answers again", self.name)
            self._redis_failing = False
        except redis.RedisError as error:
            if not self._redis_failing:
                logging.warning("pool %s: Redis unreachable (%s); retrying every second", self.name, error)
            self._redis_failing = True
        if self.status != self.Status.STOPPED:
            super().check_workers(respawn=respawn)

    def _tend(self) -> None:
        record = dict(self._record, workers=[workers.worker_name(self.role, name) for name in self.worker_dict])
        with self.connection.pipeline() as pipeline:
            pipeline.set(workers.pool_key(self.name), json.dumps(record), ex=workers.POOL_TTL)
            pipeline.sadd(workers.POOLS_KEY, self.name)
            pipeline.get(workers.stop_key(self.name))
            request = pipeline.execute()[-1]
        if request is not None:
            self._stop(request.decode())
            return
        if self.role == workers.WATCH and time.monotonic() - self._last_revive > REVIVE_SECONDS:
            self._last_revive = time.monotonic()
            watches.revive_stale(self.connection)

    def _stop(self, mode: str) -> None:
        logging.info("pool %s: %s stop requested", self.name, mode)
        self.request_stop()
        if mode == "force":
            time.sleep(FORCE_GRACE_SECONDS)
            self.stop_workers()

    def unregister(self) -> None:
        with self.connection.pipeline() as pipeline:
            pipeline.delete(workers.pool_key(self.name), workers.stop_key(self.name))
            pipeline.srem(workers.POOLS_KEY, self.name)
            pipeline.execute()


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
