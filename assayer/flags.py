"""Command-line flags and the main wrapper shared by assayer's commands."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from assayer.connection import RedisSettings
from assayer.errors import UsageError

FLAGS = flags.FLAGS

URL_ENV = "REDIS_URL"
"""Environment variable that gives the default of `--redis_url`."""

MISSING_VALUE = re.compile(r"Missing value for flag -{1,2}(?P<name>\S+)")
"""absl's message for a flag given last with no value, as in `--num_eval_workers`."""

NEGATED_WITH_VALUE = re.compile(r"(?P<argument>-{1,2}no(?P<name>[^=]+)=.*) does not take an argument", re.DOTALL)
"""absl's message for a value after a negated boolean flag, as in `--noeval_existing=1`."""


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
    if FLAGS.redis_url == "":
        raise UsageError(
            "--redis_url is empty; give a URL such as redis://localhost:6379/0, or leave the flag out to use "
            "$REDIS_URL or --redis_host and --redis_port"
        )
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
        except (flags.Error, ValueError) as error:
            # absl raises ValueError, not flags.Error, for a value after a --noflag.
            print(f"{program}: error: {describe_flag_error(error)}", file=sys.stderr)
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


def describe_flag_error(error: Exception) -> str:
    """Return absl's error for a flag value as one line: the flag, the value and what the flag expects.

    absl names the flag and the value but gives Python's reason, such as "could not convert string to
    float: 'abc'", so the expected value is described from the flag's parser instead. Errors of other
    kinds, such as an unknown flag, keep absl's text.
    """
    text = str(error)
    negated = NEGATED_WITH_VALUE.fullmatch(text)
    if negated is not None:
        name = negated["name"]
        return f"{negated['argument']}: --no{name} takes no value; write --no{name}, or --{name}=true or false"
    flag, value = _flag_and_value(error)
    expected = expected_value(flag) if flag is not None else None
    if expected is None:
        return f"{text} (see --helpshort)"
    if value is None:
        return f"--{flag.name} needs a value: expected {expected}"
    return f"--{flag.name}={value}: expected {expected}"


def _flag_and_value(error: Exception) -> tuple[flags.Flag | None, str | None]:
    """Return the flag that `error` is about and the value given to it, or None for either that is unknown."""
    text = str(error)
    missing = MISSING_VALUE.fullmatch(text)
    if missing is not None and missing["name"] in FLAGS:
        return FLAGS[missing["name"]], None
    named = re.match(r"flag --([^=]+)=", text)
    if not isinstance(error, flags.IllegalFlagValueError) or named is None or named[1] not in FLAGS:
        return None, None
    # absl raises `flag --NAME=VALUE: REASON` while it handles the parser's error, whose text is REASON.
    suffix = f": {error.__context__}"
    if error.__context__ is None or not text.endswith(suffix):
        return None, None
    return FLAGS[named[1]], text[len(named[0]) : len(text) - len(suffix)]


def expected_value(flag: flags.Flag) -> str | None:
    """Describe the values that `flag` accepts, or return None for a kind of flag not described here."""
    parser = flag.parser
    if isinstance(parser, flags.BooleanParser):
        return f"true or false, or the flag alone: --{flag.name} or --no{flag.name}"
    if isinstance(parser, flags.EnumParser):
        return "one of " + ", ".join(parser.enum_values)
    if isinstance(parser, (flags.IntegerParser, flags.FloatParser)):
        return _expected_number(flag)
    return None


def _expected_number(flag: flags.Flag) -> str:
    parser = flag.parser
    kind = "a whole number" if isinstance(parser, flags.IntegerParser) else "a number"
    # assayer's help texts give the unit first: "Seconds between ...".
    if flag.name.endswith("_seconds") or flag.help.startswith("Seconds"):
        kind += " of seconds"
    lower, upper = parser.lower_bound, parser.upper_bound
    candidates = (flag.default, lower, 1)
    example = next(number for number in candidates if isinstance(number, (int, float)) and number > 0)
    if lower is not None and upper is not None:
        kind += f" from {_format_number(lower)} to {_format_number(upper)},"
    elif lower is not None:
        kind += f" of at least {_format_number(lower)},"
    elif upper is not None:
        kind += f" of at most {_format_number(upper)},"
    return f"{kind} such as {_format_number(example)}"


def _format_number(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)
