"""The work of the watch command, as plain functions of plain values."""

from __future__ import annotations

import math
import os
import re
import shlex
import time
from collections.abc import Callable

import redis
from rq import Queue

from assayer import checkpoints, evaluator, records, server, watches, workers
from assayer.config import WatchConfig
from assayer.connection import RedisSettings, UnreachableError, password_file
from assayer.errors import UsageError
from assayer.text import plural

DEFAULT_URL = "redis://localhost:6379/0"
"""The URL that the Redis flags' defaults stand for, which needs no flag in a hint."""

Output = Callable[[str], None]

POOL_START_TIMEOUT = 20.0
"""Seconds a new worker pool gets to register in Redis before the watch command reports it as failed."""


def check_config(config: WatchConfig, num_watch_workers: int, num_eval_workers: int) -> None:
    """Raise UsageError naming the first flag whose value cannot work."""
    if not config.directory:
        raise UsageError("--directory is required: the folder where training writes its checkpoints")
    if os.path.exists(config.directory) and not os.path.isdir(config.directory):
        raise UsageError(f"--directory={config.directory} is a file; pass the folder that contains the checkpoints")
    if not config.regex:
        raise UsageError("--regex_filter is empty, so every file and folder would be a checkpoint; pass a pattern")
    try:
        checkpoints.compile_filter(config.regex)
    except re.error as error:
        raise UsageError(f"--regex_filter={config.regex} is not a valid regular expression: {error}") from None
    positive = {"--polling_interval": config.polling_interval}
    not_negative = {
        "--settle_seconds": config.settle_seconds,
        "--eval_timeout": config.eval_timeout,
        "--max_retries": config.max_retries,
        "--num_watch_workers": num_watch_workers,
        "--num_eval_workers": num_eval_workers,
    }
    for flag, value in positive.items():
        if not 0 < value < math.inf:
            raise UsageError(f"{flag}={value} is invalid: use a number of seconds greater than 0")
    for flag, value in not_negative.items():
        if not 0 <= value < math.inf:
            raise UsageError(f"{flag}={value} is invalid: use 0 or more")
    if config.ready_marker is not None and ("/" in config.ready_marker or not config.ready_marker):
        raise UsageError(f"--ready_marker={config.ready_marker} is invalid: use a file name such as commit_success.txt")
    if not config.watch_queue or not config.eval_queue or config.watch_queue == config.eval_queue:
        raise UsageError(
            f"--watch_queue_name={config.watch_queue} and --eval_queue_name={config.eval_queue} must be two "
            "different, non-empty names"
        )
    evaluator.load(config.evaluator, config.search_path)
    if config.tensorboard_dir:
        from assayer import tensorboard

        tensorboard.check_available()


def connect(settings: RedisSettings, launch_redis: bool, out: Output) -> tuple[RedisSettings, redis.Redis]:
    """Return settings and a client of a server that responds, starting a local server when allowed and needed."""
    try:
        return settings, settings.check()
    except UnreachableError as error:
        if settings.is_local and not launch_redis:
            if not settings.is_unix_socket and server.tcp_port_taken(settings):
                raise UsageError(
                    f"{server.not_redis_reason(settings)}; point --redis_url or --redis_port at your Redis server"
                ) from None
            raise UsageError(f"{error}, or leave --launch_redis on so that assayer starts one") from None
        if not settings.is_local:
            raise
    started = server.start_server(settings)
    out(
        f"started redis-server at {started.masked}, listening on this machine only, "
        f"data in {server.server_dir(settings)}; stop it with python -m assayer.shutdown --stop_redis"
        f"{redis_flags_hint(started)}"
    )
    return started, started.check()


def start_watch(
    config: WatchConfig,
    settings: RedisSettings,
    eval_existing: bool,
    num_watch_workers: int,
    num_eval_workers: int,
    launch_redis: bool,
    out: Output,
) -> None:
    """Check everything, then start or resume the watch and its worker pools, and return."""
    check_config(config, num_watch_workers, num_eval_workers)
    settings, client = connect(settings, launch_redis, out)
    previous = client.hget(records.watch_key(config.watch_id), "config")
    outcome = watches.start(client, config, eval_existing)
    _describe_directory(config, eval_existing, outcome, out)

    # RQ lists a queue once a job was enqueued on it; register both now so `rq info` shows them at once.
    for name in (config.watch_queue, config.eval_queue):
        client.sadd(Queue.redis_queues_keys, Queue(name, connection=client).key)
    verb = {"started": "watching", "resumed": "resumed watching", "running": "already watching"}[outcome]
    out(
        f"{verb} {config.directory} with {config.evaluator}, polling every {config.polling_interval:g} s "
        f"(watch {config.watch_id})"
    )
    if outcome == "running" and previous is not None and WatchConfig.from_json(previous) != config:
        out("settings of the running watch updated; they apply from its next poll")

    working_dir = os.getcwd()
    for role, queue, count in (
        (workers.WATCH, config.watch_queue, num_watch_workers),
        (workers.EVALUATION, config.eval_queue, num_eval_workers),
    ):
        if count:
            _start_pool(client, settings, role, queue, count, working_dir, out)

    if not num_watch_workers and not _serving(client, config.watch_queue):
        out(f"warning: no worker serves queue {config.watch_queue!r} yet; polls wait until one starts")
    url, note = url_for_shell(settings)
    if not num_eval_workers and not _serving(client, config.eval_queue):
        # rq reads its URL from RQ_REDIS_URL, where the process list does not show the password.
        out(
            f"warning: no worker serves queue {config.eval_queue!r} yet; evaluations wait until one starts, "
            f"e.g. RQ_REDIS_URL={url} rq worker {shlex.quote(config.eval_queue)} -w assayer.workers.EvaluationWorker"
            f"{note}"
        )

    out(f"monitor: rq info --url {url}{note}")
    redis_flags = redis_flags_hint(settings)
    out(f"results: python -m assayer.status{redis_flags}    stop: python -m assayer.shutdown{redis_flags}")


def redis_flags_hint(settings: RedisSettings) -> str:
    """Return the flags that point another assayer command at this server, without a password, or ''.

    A password that assayer saved for a local server is found again by every command, so it is left out.
    """
    if settings.password is None:
        plain = settings.url
    elif _password_is_saved(settings):
        plain = settings.without_password().url
    else:
        return f" --redis_url {shlex.quote(settings.masked)} (with your password in place of ***)"
    return "" if plain == DEFAULT_URL else f" --redis_url {shlex.quote(plain)}"


def url_for_shell(settings: RedisSettings) -> tuple[str, str]:
    """Return a shell word for the URL that never prints a password, and a note to show after the command.

    The shell reads a password that assayer saved from its file. Any other password shows as `***`, and the
    note explains where the password goes.
    """
    if settings.password is None:
        return shlex.quote(settings.url), ""
    if _password_is_saved(settings):
        saved = password_file(settings)
        plain = RedisSettings(settings.url).with_password("PASSWORD").url
        head, tail = plain.split("PASSWORD", 1)
        return f'"{head}$(cat {shlex.quote(str(saved))}){tail}"', ""
    return shlex.quote(settings.masked), "  (with your password in place of ***)"


def _password_is_saved(settings: RedisSettings) -> bool:
    """Return whether the password in `settings` is the one assayer saved for a server it started there."""
    saved = password_file(settings)
    return saved.exists() and saved.read_text().strip() == settings.password


def _describe_directory(config: WatchConfig, eval_existing: bool, outcome: str, out: Output) -> None:
    if not os.path.isdir(config.directory):
        out(
            f"{config.directory} does not exist yet; watching it anyway, and checkpoints are evaluated once "
            "training creates them"
        )
        return
    present = len(checkpoints.scan(config.directory, checkpoints.compile_filter(config.regex)))
    if present and eval_existing:
        found = plural(present, "checkpoint")
        out(f"already present, and evaluated unless they have a record (--eval_existing): {found}")
    elif present and outcome == "started":
        out(
            f"already present, and left alone on a new watch: {plural(present, 'checkpoint')}; pass "
            "--eval_existing to evaluate them too"
        )


def _start_pool(client, settings, role: str, queue: str, count: int, working_dir: str, out: Output) -> None:
    before = set(workers.running_pools(client))
    pid, log_path = workers.start_pool(settings, role, queue, count, working_dir)
    deadline = time.monotonic() + POOL_START_TIMEOUT
    while not any(name not in before and pool["pid"] == pid for name, pool in workers.running_pools(client).items()):
        if time.monotonic() > deadline or not _alive(pid):
            raise UsageError(f"the {role} worker pool (pid {pid}) failed to start; see {log_path}")
        time.sleep(0.1)
    kind = "watch" if role == workers.WATCH else "evaluation"
    out(f"started {count} {kind} worker{'s' if count > 1 else ''} on queue {queue!r} (pool pid {pid}, log {log_path})")


def _serving(client: redis.Redis, queue: str) -> bool:
    from rq import Worker

    return any(queue in worker.queue_names() for worker in Worker.all(connection=client))


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        finished = 0
    if finished == pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
