"""The work of `python -m assayer.shutdown`: stopping watches, then assayer's workers, then maybe Redis."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import redis
from absl import logging
from rq import Queue, Worker
from rq.command import send_shutdown_command, send_stop_job_command
from rq.job import Job, JobStatus
from rq.worker import WorkerStatus

from assayer import records, server, watches, workers
from assayer.config import WatchConfig
from assayer.connection import RedisSettings
from assayer.errors import UsageError
from assayer.text import plural

Output = Callable[[str], None]

_STOPPING_POOLS: set[tuple[str, int]] = set()
"""Pools on this machine asked to stop by this process, as (host, pid)."""

STOP_REQUEST_TTL = 600
"""Seconds a stop request waits for a pool to read it; a pool reads it within a second when running."""


def stop_directory(client: redis.Redis, directory: str, force: bool, timeout: float, out: Output) -> None:
    """Stop the watches of one directory and their queued evaluations; leave workers and other watches."""
    path = os.path.abspath(os.path.expanduser(directory))
    known = records.load_watches(client)
    targets = [config for config, _ in known if config.directory == path]
    if not targets:
        listed = ", ".join(sorted({config.directory for config, _ in known})) or "none"
        raise UsageError(f"--directory={directory}: no watch of {path} on this Redis; watched directories: {listed}")
    running = []
    for config in targets:
        removed = watches.stop(client, config)
        out(
            f"stopped watch {config.watch_id} of {path} ({config.evaluator}); "
            f"{plural(removed, 'queued evaluation')} removed"
        )
        running += _running_evaluations(client, [config])
    if force:
        for job in running:
            send_stop_job_command(client, job.id)
        _report_forced(client, running, time.monotonic() + timeout, out)
    else:
        _report_running(running, f"python -m assayer.shutdown --directory {path} --force stops them now", out)


def shutdown(
    settings: RedisSettings, client: redis.Redis, force: bool, stop_redis: bool, timeout: float, out: Output
) -> None:
    """Stop every watch, then assayer's workers, and with `stop_redis` the server assayer started.

    With `force`, evaluations that run on RQ workers assayer did not start are stopped too, through RQ's
    stop-job command. Those workers themselves keep running, and the output lists them.
    """
    deadline = time.monotonic() + timeout
    known = records.load_watches(client)
    configs = [config for config, _ in known]
    active = [config for config, fields in known if fields.get("state") == watches.ACTIVE]
    removed = sum(watches.stop(client, config) for config in active)
    out(
        f"stopped {plural(len(active), 'watch')}; {plural(removed, 'queued evaluation')} removed (queued again "
        "when a watch resumes)"
    )
    running = _running_evaluations(client, configs)
    ours = [job for job in running if workers.is_assayer_worker(job.worker_name or "")]
    theirs = [job for job in running if job not in ours]
    before = len(workers.assayer_workers(client))
    if force:
        for job in theirs:
            send_stop_job_command(client, job.id)
    _request_worker_stop(client, force, deadline)
    remaining = _wait_for_workers(client, timeout, allow_busy=not force)
    busy = {job.worker_name for job in ours}
    stuck = sorted(name for name in remaining if force or name not in busy)
    if stuck:
        out(f"{plural(len(stuck), 'assayer worker')} did not stop within {timeout:g} s: {', '.join(stuck)}")
    elif not remaining:
        out(f"stopped {plural(before, 'assayer worker')}; none is running now")
    if force:
        _report_forced(client, running, deadline, out)
    else:
        hint = "python -m assayer.shutdown --force stops them now"
        _report_running(ours, f"their workers exit afterwards; {hint}", out)
        _report_running(theirs, f"on workers that assayer did not start; {hint}", out)
    _report_other_workers(client, configs, out)
    if stop_redis:
        _stop_redis(settings, out, busy=bool(remaining) or (bool(theirs) and not force))


def _request_worker_stop(client: redis.Redis, force: bool, deadline: float) -> None:
    mode = "force" if force else "warm"
    pools = workers.running_pools(client)
    _STOPPING_POOLS.update(
        (pool["host"], pool["pid"]) for pool in pools.values() if pool.get("host") == socket.gethostname()
    )
    for name in pools:
        client.set(workers.stop_key(name), mode, ex=STOP_REQUEST_TTL)
    in_pools = {name for pool in pools.values() for name in pool.get("workers", [])}
    _forget_dead_workers(client)
    stopping_jobs = {}
    for worker in workers.assayer_workers(client):
        if worker.name in in_pools:
            continue  # Its pool stops it, and would replace it if it stopped on its own.
        # A worker started by hand with `rq worker -w assayer.workers...` gets RQ's own commands. Stopping
        # its job, rather than killing its work horse, records the evaluation as stopped, not failed.
        job_id = worker.get_current_job_id() if force and worker.get_state() == WorkerStatus.BUSY else None
        if job_id is None:
            send_shutdown_command(client, worker.name)
        else:
            send_stop_job_command(client, job_id)
            stopping_jobs[worker.name] = job_id
    _shut_down_after_stops(client, stopping_jobs, deadline)
    logging.info("shutdown: %s stop requested from %d pools", mode, len(pools))


def _shut_down_after_stops(client: redis.Redis, stopping_jobs: dict[str, str], deadline: float) -> None:
    """Send each worker its shutdown command once RQ has stopped its job, or at the deadline.

    Sent at once, the shutdown command can interrupt the worker while it records the stopped job, and the
    evaluation's record then stays `started`.
    """
    while stopping_jobs:
        names = list(stopping_jobs)
        jobs = Job.fetch_many([stopping_jobs[name] for name in names], connection=client)
        for name, job in zip(names, jobs):
            if job is None or job.get_status(refresh=False) != JobStatus.STARTED or time.monotonic() > deadline:
                send_shutdown_command(client, name)
                del stopping_jobs[name]
        if stopping_jobs:
            time.sleep(0.1)


def _wait_for_workers(client: redis.Redis, timeout: float, allow_busy: bool) -> list[str]:
    """Wait until assayer's workers and pools have exited, except those still finishing an evaluation.

    Returns the names of the workers still registered at the end.
    """
    deadline = time.monotonic() + timeout
    host = socket.gethostname()
    while True:
        _forget_dead_workers(client)
        registered = workers.assayer_workers(client)
        busy = {worker.name for worker in registered if allow_busy and worker.get_state() == WorkerStatus.BUSY}
        waiting = [worker.name for worker in registered if worker.name not in busy]
        finishing_pools = set()
        for name, pool in workers.running_pools(client).items():
            if busy.intersection(pool.get("workers", [])):
                finishing_pools.add((pool.get("host"), pool.get("pid")))
            else:
                waiting.append(name)
        # A pool removes its record just before it exits; on this machine, wait for the exit itself.
        waiting += [
            str(pid)
            for pid in _local_pool_pids(client, host)
            if (host, pid) not in finishing_pools and _process_exists(pid)
        ]
        if not waiting or time.monotonic() > deadline:
            return [worker.name for worker in registered]
        time.sleep(0.2)


def _local_pool_pids(client: redis.Redis, host: str) -> list[int]:
    return [pid for pool_host, pid in _STOPPING_POOLS if pool_host == host]


def _forget_dead_workers(client: redis.Redis) -> None:
    """Drop the registrations of assayer workers on this machine whose process is gone (killed, say)."""
    host = socket.gethostname()
    for worker in workers.assayer_workers(client):
        if worker.hostname == host and worker.pid and not _process_exists(worker.pid):
            logging.info("shutdown: worker %s (pid %d) is gone; removing its registration", worker.name, worker.pid)
            worker.register_death()


def _running_evaluations(client: redis.Redis, configs: list[WatchConfig]) -> list:
    jobs = []
    for config in configs:
        prefix = f"assayer-eval-{config.watch_id}-"
        registry = Queue(config.eval_queue, connection=client).started_job_registry
        job_ids = [job_id for job_id in registry.get_job_ids() if job_id.startswith(prefix)]
        jobs.extend(job for job in Job.fetch_many(job_ids, connection=client) if job is not None)
    return jobs


def _report_running(running: list, note: str, out: Output) -> None:
    if not running:
        return
    out(f"{plural(len(running), 'evaluation')} still running and will finish ({note}):")
    for job in running:
        started = job.started_at.timestamp() if job.started_at else time.time()
        out(f"  {job.description} (running for {time.time() - started:.0f} s on {job.worker_name})")


def _report_forced(client: redis.Redis, running: list, deadline: float, out: Output) -> None:
    """Wait until the running evaluations asked to stop have left `started`, then report how each one ended.

    An evaluation can finish between the listing and the stop; it is reported as finished, not stopped.
    """
    while True:
        states = _record_states(client, running)
        if records.STARTED not in states.values() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    stopped = [job for job in running if states[job.id] == records.QUEUED]
    ended = [job for job in running if states[job.id] not in (records.QUEUED, records.STARTED)]
    still = [job for job in running if states[job.id] == records.STARTED]
    if stopped:
        out(f"stopped {plural(len(stopped), 'running evaluation')}, each queued again for when its watch resumes:")
        for job in stopped:
            out(f"  {job.description}")
    if ended:
        out(f"{plural(len(ended), 'evaluation')} ended before the stop reached it:")
        for job in ended:
            out(f"  {job.description} ({states[job.id] or 'record removed'})")
    if still:
        out(f"{plural(len(still), 'evaluation')} asked to stop, still running:")
        for job in still:
            out(f"  {job.description} (on {job.worker_name})")


def _record_states(client: redis.Redis, jobs: list[Job]) -> dict[str, str | None]:
    """Return the state of each evaluation job's record by job id, None where the record is gone."""
    with client.pipeline(transaction=False) as pipeline:
        for job in jobs:
            config_json, _, version = job.args[:3]
            pipeline.hget(records.record_key(WatchConfig.from_json(config_json).watch_id, version), "state")
        states = pipeline.execute()
    return {job.id: state.decode() if state is not None else None for job, state in zip(jobs, states)}


def _report_other_workers(client: redis.Redis, configs: list[WatchConfig], out: Output) -> None:
    """List the RQ workers that assayer did not start but that serve the watches' evaluation queues."""
    queues = {config.eval_queue for config in configs}
    others = [
        worker
        for worker in Worker.all(connection=client)
        if not workers.is_assayer_worker(worker.name) and queues.intersection(worker.queue_names())
    ]
    if not others:
        return
    served = sorted({queue for worker in others for queue in worker.queue_names() if queue in queues})
    out(
        f"{plural(len(others), 'RQ worker')} that assayer did not start, on queue {', '.join(served)}, left running; "
        "stop each where it runs (Ctrl-C, or kill PID on its host):"
    )
    for worker in others:
        out(f"  {worker.name} (pid {worker.pid} on {worker.hostname})")


def _stop_redis(settings: RedisSettings, out: Output, busy: bool) -> None:
    if busy:
        out(
            f"Redis at {settings.masked} left running: evaluations still need it; run "
            "python -m assayer.shutdown --stop_redis again once they finish, or add --force"
        )
        return
    pid = server.stop_server(settings)
    if pid is None:
        out(f"Redis at {settings.masked} was not started by assayer; left running")
    else:
        out(f"stopped redis-server at {settings.masked} (pid {pid}); its data stays in {server.server_dir(settings)}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
