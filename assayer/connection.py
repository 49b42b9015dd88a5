"""Redis connection settings built from `--redis_url` or host and port, shown with the password masked."""

from __future__ import annotations

import dataclasses
import os
import socket
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

import redis

from assayer import state
from assayer.errors import UsageError

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""Host names that always mean this machine, where assayer may start a Redis server."""

URL_ENV = "ASSAYER_REDIS_URL"
"""Environment variable that hands the full URL, password included, to worker processes.

The environment of a process is readable only by its owner, unlike its command line."""

SCHEMES = ("redis", "rediss", "unix")
"""URL schemes that redis-py connects to: TCP, TCP with TLS, and a unix socket."""

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
            settings = cls(redis_url)
            settings.check_url()
        else:
            check_host_and_port(host, port)
            netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            settings = cls(f"redis://{netloc}/0")
        return settings.with_saved_password()

    def check_url(self) -> None:
        """Raise UsageError naming `--redis_url` when the URL cannot address a Redis server."""
        scheme, separator, _ = self.url.partition("://")
        if not separator or scheme.lower() not in SCHEMES:
            raise self._invalid("the scheme must be redis://, rediss:// or unix://, e.g. redis://localhost:6379/0")
        try:
            parts = urlsplit(self.url)
        except ValueError:
            # urlsplit rejects unmatched brackets and a bracketed host that is not an IPv6 address.
            raise self._invalid(
                "the host must be a host name, an IPv4 address or an IPv6 address in brackets, "
                "e.g. redis://[::1]:6379/0"
            ) from None
        if parts.scheme == "unix":
            self._check_socket_path(parts)
        else:
            self._check_host_port_database(parts)
        self._check_query_options()

    def _check_socket_path(self, parts: SplitResult) -> None:
        # redis-py takes the socket path from the URL's path and ignores a host, so unix://redis.sock
        # would connect to an empty path. What follows unix:// is read here as the path the user meant.
        written = unquote(parts.netloc.rpartition("@")[2] + parts.path)
        if not written:
            raise self._invalid(
                "the socket path is missing; put an absolute path after unix://, e.g. unix:///tmp/redis.sock"
            )
        if not os.path.isabs(written):
            raise self._invalid(
                f"the socket path {written} is relative; put an absolute path after unix://, "
                f"e.g. unix://{os.path.abspath(written)}"
            )

    def _check_host_port_database(self, parts: SplitResult) -> None:
        example = f"{parts.scheme}://localhost:6379/0"
        if not parts.hostname:
            raise self._invalid(f"the host is missing; put one after {parts.scheme}://, e.g. {example}")
        try:
            # None means no port, and redis-py then uses 6379. urlsplit raises ValueError for text or a port
            # above 65535, but returns 0 for :0.
            valid_port = parts.port != 0
        except ValueError:
            valid_port = False
        if not valid_port:
            raise self._invalid(f"the port must be a number between 1 and 65535, e.g. {example}")
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise self._invalid(f"the database must be a number, e.g. {example}")

    def _check_query_options(self) -> None:
        # redis-py parses the query string into connection options only when it connects: a value of the wrong
        # type raises ValueError and an unknown option raises TypeError. Building one connection, which opens
        # no socket, raises both here.
        try:
            redis.ConnectionPool.from_url(self.url).make_connection()
        except (TypeError, ValueError) as error:
            raise self._invalid(f"redis-py rejected its query options ({error}); correct or remove them") from None

    def _invalid(self, reason: str) -> UsageError:
        return UsageError(f"--redis_url={self.masked} is invalid: {reason}")

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
            if self.password is None:
                raise self._password_required() from error
            raise UsageError(
                f"Redis at {self.masked} rejected the password ({error}); put the right one in --redis_url or "
                "$REDIS_URL"
            ) from error
        except redis.ResponseError as error:
            if "DB index is out of range" in str(error):
                database = urlsplit(self.url).path.strip("/")
                raise UsageError(
                    f"Redis at {self.masked} has no database {database} ({error}); use a lower number in "
                    "--redis_url: a server has 16 databases, 0 to 15, unless its `databases` setting says otherwise"
                ) from error
            if "NOAUTH" not in str(error):
                raise UsageError(f"Redis at {self.masked} returned an error to PING: {error}") from error
            raise self._password_required() from error
        except (redis.ConnectionError, redis.TimeoutError, socket.gaierror, OSError) as error:
            raise UnreachableError(self, error) from error
        return client

    def _password_required(self) -> UsageError:
        example = self.with_password("PASSWORD").url
        return UsageError(
            f"Redis at {self.masked} requires a password, and none was given; put it in --redis_url or "
            f"$REDIS_URL, e.g. {example}"
        )

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
    """Return `text`, a Redis URL, with its password replaced by `***`; text that is not a URL is returned as is."""
    try:
        parts = urlsplit(text) if "://" in text else None
    except ValueError:
        return _mask_unparsed(text)
    if parts is None or (parts.password is None and not parts.username):
        return text
    host = parts.netloc.rsplit("@", 1)[-1]
    # `redis://:PASSWORD@host` masks to `redis://:***@host`, so that putting the password back gives a valid URL.
    user = f"{parts.username or ''}:" if parts.password is not None else ""
    return urlunsplit((parts.scheme, f"{user}***@{host}", parts.path, parts.query, parts.fragment))


def _mask_unparsed(url: str) -> str:
    # A URL that urlsplit rejects may still contain a password: mask everything before the last @.
    scheme, separator, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0] + ":" if ":" in credentials else ""
    return f"{scheme}{separator}{user}***@{host}"


def check_host_and_port(host: str, port: int) -> None:
    """Raise UsageError naming `--redis_host` or `--redis_port` when the value cannot be part of a URL."""
    if not host or any(character in host for character in "/@?#[] "):
        raise UsageError(
            f"--redis_host={host} is invalid: use a host name or IP address without brackets, e.g. localhost or ::1"
        )
    if not 0 < port < 65536:
        raise UsageError(f"--redis_port={port} is invalid: use a TCP port between 1 and 65535")


def password_file(settings: RedisSettings):
    """Return the file that keeps the password of the server assayer starts at this address."""
    return state.state_dir() / "redis" / settings.server_key / "password"


def settings_from_environment() -> RedisSettings:
    """Return the settings handed to this process by its parent through `ASSAYER_REDIS_URL`."""
    url = os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"{URL_ENV} is not set; worker pools are started by python -m assayer.watch")
    return RedisSettings(url)
