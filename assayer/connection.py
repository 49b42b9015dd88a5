"""Redis connection settings built from `--redis_url` or host and port, shown with the password masked."""

from __future__ import annotations

import dataclasses
import os
import socket
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis

from assayer import state
from assayer.errors import UsageError

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""Host names that always mean this machine, where assayer may start a Redis server."""

URL_ENV = "ASSAYER_REDIS_URL"
"""Environment variable that hands the full URL, password included, to worker processes.

The environment of a process is readable only by its owner, unlike its command line."""

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a TCP connection to Redis before calling it unreachable."""


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """The address of a Redis server as a URL: `redis://`, `rediss://` or `unix://`, with password and db."""

    url: str

    @classmethod
    def from_flags(cls, redis_url: str | None, host: str, port: int) -> RedisSettings:
        """Build settings from `--redis_url` when given, else from `--redis_host` and `--redis_port`."""
        if redis_url:
            scheme = urlsplit(redis_url).scheme
            if scheme not in ("redis", "rediss", "unix"):
                raise UsageError(
                    f"--redis_url={mask(redis_url)} is invalid: the scheme must be redis://, rediss:// "
                    "or unix://, e.g. redis://localhost:6379/0"
                )
            settings = cls(redis_url)
            settings.check_url()
        else:
            if not 0 < port < 65536:
                raise UsageError(f"--redis_port={port} is invalid: use a TCP port between 1 and 65535")
            netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            settings = cls(f"redis://{netloc}/0")
        return settings.with_saved_password()

    def check_url(self) -> None:
        """Raise UsageError naming `--redis_url` when its port or database number is invalid."""
        parts = urlsplit(self.url)
        try:
            parts.port
        except ValueError:
            raise UsageError(
                f"--redis_url={self.masked} is invalid: the port must be a number, e.g. redis://localhost:6379/0"
            ) from None
        database = parts.path.strip("/") if parts.scheme != "unix" else ""
        if database and not database.isdigit():
            raise UsageError(
                f"--redis_url={self.masked} is invalid: the database must be a number, e.g. redis://localhost:6379/0"
            )

    @property
    def masked(self) -> str:
        """The URL with any password replaced by `***`, safe to print and log."""
        return mask(self.url)

    @property
    def is_unix_socket(self) -> bool:
        return urlsplit(self.url).scheme == "unix"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "localhost"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 6379

    @property
    def socket_path(self) -> str:
        return unquote(urlsplit(self.url).path)

    @property
    def password(self) -> str | None:
        parts = urlsplit(self.url)
        if parts.password is not None:
            return unquote(parts.password)
        if parts.username and parts.scheme != "unix":
            # redis://secret@host is how many tools write a password-only URL.
            return unquote(parts.username)
        return None

    @property
    def is_local(self) -> bool:
        """Whether the server would run on this machine, so that assayer may start it."""
        return self.is_unix_socket or self.host in LOCAL_HOSTS

    @property
    def server_key(self) -> str:
        """A file-name-safe name of the local address, used for the server's state folder."""
        if self.is_unix_socket:
            return "unix-" + self.socket_path.strip("/").replace("/", "-")
        return f"tcp-{self.port}"

    def with_password(self, password: str) -> RedisSettings:
        """Return these settings with `password` set in the URL."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f":{quote(password, safe='')}@{host}"
        if parts.port:
            netloc += f":{parts.port}"
        return RedisSettings(urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)))

    def without_password(self) -> RedisSettings:
        """Return these settings with no user name or password in the URL."""
        parts = urlsplit(self.url)
        host = parts.netloc.rsplit("@", 1)[-1]
        query = f"?{parts.query}" if parts.query else ""
        return RedisSettings(f"{parts.scheme}://{host}{parts.path}{query}")

    def with_saved_password(self) -> RedisSettings:
        """Add the password of a server that assayer started at this local address, if there is one."""
        if self.password is not None or not self.is_local:
            return self
        path = password_file(self)
        if not path.exists():
            return self
        return self.with_password(path.read_text().strip())

    def connect(self) -> redis.Redis:
        """Return a client for these settings without contacting the server."""
        return redis.Redis.from_url(self.url, socket_connect_timeout=CONNECT_TIMEOUT, health_check_interval=30)

    def check(self) -> redis.Redis:
        """Return a client after checking that the server responds to PING, or raise UsageError saying why not."""
        client = self.connect()
        try:
            client.ping()
        except redis.AuthenticationError as error:
            raise UsageError(
                f"Redis at {self.masked} rejected the password ({error}); put the right one in --redis_url"
            ) from error
        except redis.ResponseError as error:
            if "NOAUTH" not in str(error):
                raise UsageError(f"Redis at {self.masked} returned an error to PING: {error}") from error
            raise UsageError(
                f"Redis at {self.masked} requires a password; give it in --redis_url, "
                "e.g. redis://:PASSWORD@host:6379/0"
            ) from error
        except (redis.ConnectionError, redis.TimeoutError, socket.gaierror, OSError) as error:
            raise UnreachableError(self, error) from error
        return client

    def environment(self) -> dict[str, str]:
        """Return the environment variables that hand these settings to a child process."""
        return {URL_ENV: self.url}


class UnreachableError(UsageError):
    """No Redis server is listening at the address."""

    def __init__(self, settings: RedisSettings, error: BaseException):
        reason = str(error).strip() or type(error).__name__
        super().__init__(
            f"cannot reach Redis at {settings.masked} ({mask(reason)}); start a Redis server there or point "
            "--redis_url at one"
        )
        self.settings = settings


def mask(text: str) -> str:
    """Replace the password in a Redis URL inside `text` with `***`."""
    parts = urlsplit(text) if "://" in text else None
    if parts is None or (parts.password is None and not parts.username):
        return text
    host = parts.netloc.rsplit("@", 1)[-1]
    user = f"{parts.username}:" if parts.password is not None and parts.username else ""
    return urlunsplit((parts.scheme, f"{user}***@{host}", parts.path, parts.query, parts.fragment))


def password_file(settings: RedisSettings):
    """Return the file that keeps the password of the server assayer starts at this address."""
    return state.state_dir() / "redis" / settings.server_key / "password"


def settings_from_environment() -> RedisSettings:
    """Return the settings handed to this process by its parent through `ASSAYER_REDIS_URL`."""
    url = os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"{URL_ENV} is not set; worker pools are started by python -m assayer.watch")
    return RedisSettings(url)
