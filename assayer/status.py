"""Show every watch and the evaluation record of each checkpoint: `python -m assayer.status`."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import redis
from absl import flags

from assayer import flags as assayer_flags
from assayer import records, report
from assayer.config import WatchConfig
from assayer.connection import RedisSettings
from assayer.errors import UsageError

FLAGS = flags.FLAGS

assayer_flags.define_redis_flags()
# Lists the Redis flags in --help, which otherwise shows only the flags defined in this module.
flags.adopt_module_key_flags(assayer_flags)
flags.DEFINE_string("directory", None, "Show only the watches of this checkpoint directory.")
flags.DEFINE_enum("format", "table", report.FORMATS, "Output format: an aligned text table, JSON or CSV.")
flags.DEFINE_boolean("follow", False, "Redraw the table every --interval seconds until Ctrl+C.")
flags.DEFINE_float("interval", 5.0, "Seconds between redraws with --follow.", lower_bound=0.1)
flags.DEFINE_string(
    "plot", None, "Also write a PNG to this path with one panel per scalar metric, plotted against step."
)

CLEAR_SCREEN = "\x1b[H\x1b[2J"
"""ANSI escape codes that move the cursor home and clear the terminal."""


def main(argv: Sequence[str]) -> None:
    """Check the flags, connect to Redis and print the watches once or, with `--follow`, until Ctrl+C."""
    if len(argv) > 1:
        raise UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}; pass options as --flag=value")
    if FLAGS.follow and FLAGS.format != "table":
        raise UsageError(f"--follow redraws a table and cannot be used with --format={FLAGS.format}")
    settings = assayer_flags.redis_settings_from_flags()
    connection = settings.check()
    if FLAGS.follow:
        follow(connection, settings, FLAGS.directory, FLAGS.interval, FLAGS.plot)
    else:
        show(connection, settings, FLAGS.directory, FLAGS.format, FLAGS.plot)


def show(
    connection: redis.Redis,
    settings: RedisSettings,
    directory: str | None,
    output_format: str,
    plot_path: str | None,
) -> None:
    """Print the watches once in `output_format`, and write the plot when `plot_path` is given.

    Messages that are not data go to stderr with the JSON and CSV formats, so that stdout stays parseable.
    """
    watches = load(connection, settings, directory)
    messages = sys.stdout if output_format == "table" else sys.stderr
    if output_format != "table" or watches:
        sys.stdout.write(report.render(watches, output_format))
    if not watches:
        print(no_watches_message(settings), file=messages)
        return
    if plot_path:
        print(write_plot(watches, plot_path), file=messages)


def follow(
    connection: redis.Redis,
    settings: RedisSettings,
    directory: str | None,
    interval: float,
    plot_path: str | None,
) -> None:
    """Redraw the table every `interval` seconds until Ctrl+C, clearing the screen if stdout is a terminal."""
    clear = sys.stdout.isatty()
    try:
        while True:
            frame = follow_frame(connection, settings, directory, interval, plot_path)
            _write_frame(sys.stdout, frame, clear)
            time.sleep(interval)
    except KeyboardInterrupt:
        return


def follow_frame(
    connection: redis.Redis,
    settings: RedisSettings,
    directory: str | None,
    interval: float,
    plot_path: str | None,
) -> str:
    """Return one redraw of `--follow`: a line naming the server and the time, then the tables."""
    watches = load(connection, settings, directory)
    lines = [
        f"{settings.masked}  {time.strftime('%Y-%m-%d %H:%M:%S')}  every {interval:g}s, Ctrl+C to stop",
        "",
    ]
    if not watches:
        lines.append(no_watches_message(settings))
        return "\n".join(lines) + "\n"
    lines.append(report.format_table(watches))
    if plot_path:
        lines.append(write_plot(watches, plot_path))
    return "\n".join(lines) + "\n"


def _write_frame(stream: TextIO, frame: str, clear: bool) -> None:
    stream.write(CLEAR_SCREEN + frame if clear else frame + "\n")
    stream.flush()


def load(connection: redis.Redis, settings: RedisSettings, directory: str | None) -> list[report.WatchRecords]:
    """Read the watches and their records from Redis, only those of `directory` when it is given.

    Raises:
        UsageError: no watch has `directory`, or the connection to Redis failed.
    """
    try:
        watches = records.load_watches(connection)
        if directory is not None:
            watches = select_directory(watches, directory, settings)
        return [
            report.WatchRecords(config, status, records.load_all(connection, config.watch_id))
            for config, status in watches
        ]
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise UsageError(f"reading from Redis at {settings.masked} failed: {error}") from error


def select_directory(
    watches: list[tuple[WatchConfig, dict[str, str]]], directory: str, settings: RedisSettings
) -> list[tuple[WatchConfig, dict[str, str]]]:
    """Return the watches of `directory`, comparing absolute normalized paths with symbolic links resolved.

    Raises:
        UsageError: no watch has that directory; the message lists the directories that have one.
    """
    requested = os.path.abspath(os.path.expanduser(directory))
    selected = [
        (config, status)
        for config, status in watches
        if os.path.normpath(config.directory) == requested
        or os.path.realpath(config.directory) == os.path.realpath(requested)
    ]
    if selected:
        return selected
    known = sorted({report.display_text(config.directory) for config, _ in watches})
    raise UsageError(
        f"--directory={report.display_text(requested)}: no watch found on {settings.masked}; "
        f"watched directories: {', '.join(known) if known else 'none'}"
    )


def write_plot(watches: list[report.WatchRecords], path: str) -> str:
    """Write the plot of the watches' metrics to `path` and return a line saying where.

    Raises:
        UsageError: matplotlib is missing or the file cannot be written.
    """
    target = os.path.abspath(os.path.expanduser(path))
    try:
        metrics = report.plot(watches, target)
    except OSError as error:
        raise UsageError(f"writing --plot={target} failed: {error.strerror or error}") from error
    if not metrics:
        return f"no scalar metrics with a step to plot yet; {target} not written"
    return f"plot of {len(metrics)} metrics written to {target}"


def no_watches_message(settings: RedisSettings) -> str:
    """Return the line printed when Redis has no watches, saying how to start one."""
    return f"no watches on {settings.masked}; start one with python -m assayer.watch"


if __name__ == "__main__":
    assayer_flags.run_main(main)
