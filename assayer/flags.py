"""Command-line flags and the main wrapper shared by assayer's commands."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from assayer.connection import RedisSettings
from assayer.errors import UsageError

FLAGS = flags.FLAGS

URL_ENV = "REDIS_URL"
"""Environment variable that gives the default of `--redis_url`."""


def define_redis_flags() -> None:
    """Define `--redis_url`, `--redis_host` and `--redis_port`. Calling it again does nothing."""
    if "redis_url" in FLAGS:
        return
    # The default stays None rather than $REDIS_URL, so that --help never prints a password.
    flags.DEFINE_string(
        "redis_url",
        None,
        "Redis URL: redis://[:PASSWORD@]HOST:PORT/DB, rediss://... for TLS, or unix:///path/redis.sock. "
        f"Overrides --redis_host and --redis_port. Default: ${URL_ENV} when it is set.",
    )
    flags.DEFINE_string("redis_host", "localhost", "Redis host name, used when no Redis URL is given.")
    flags.DEFINE_integer("redis_port", 6379, "Redis TCP port, used when no Redis URL is given.")


def redis_settings_from_flags() -> RedisSettings:
    """Build Redis settings from the parsed flags, falling back to `$REDIS_URL` when `--redis_url` is unset.

    Raises:
        UsageError: the URL or port is invalid.
    """
    url = FLAGS.redis_url if FLAGS.redis_url is not None else os.environ.get(URL_ENV)
    return RedisSettings.from_flags(url, FLAGS.redis_host, FLAGS.redis_port)


def run_main(main: Callable[[Sequence[str]], int | None]) -> None:
    """Run `main` with absl's `app.run`, reporting a UsageError as one line on stderr and exit status 1.

    The line reads `PROGRAM: error: MESSAGE`, where PROGRAM is the last part of `main`'s module name,
    such as `status` for `python -m assayer.status`.
    """
    program = program_name(main)

    def main_reporting_usage_errors(argv: Sequence[str]) -> int | None:
        try:
            return main(argv)
        except UsageError as error:
            print(f"{program}: error: {error}", file=sys.stderr)
            return 1

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            remaining = FLAGS(argv)
        except flags.Error as error:
            print(f"{program}: error: {error} (see --helpshort)", file=sys.stderr)
            sys.exit(1)
        if not FLAGS["verbosity"].present:
            # The commands talk to the user in plain lines on stdout; their logs are for --verbosity=0.
            logging.set_verbosity(logging.WARNING)
        return remaining

    app.run(main_reporting_usage_errors, flags_parser=parse_flags)


def program_name(main: Callable) -> str:
    """Return the last part of the module name of `main`, also when `python -m` runs it as `__main__`."""
    module = sys.modules.get(main.__module__)
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None else main.__module__
    if name == "__main__":
        name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return name.rsplit(".", 1)[-1]
