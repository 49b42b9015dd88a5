"""`python -m assayer.shutdown`: stop assayer's watches and workers; records are kept.

By default running evaluations finish first; `--force` stops them at once. `--directory` stops only the
watches of one directory. RQ workers, queues and jobs that assayer did not create are left alone.
"""

from __future__ import annotations

from absl import flags

from assayer import flags as assayer_flags
from assayer import teardown
from assayer.connection import UnreachableError
from assayer.flags import define_redis_flags, redis_settings_from_flags, run_main

DIRECTORY = flags.DEFINE_string(
    "directory", None, "Stop only the watch of this directory and its queued evaluations; workers keep running."
)
FORCE = flags.DEFINE_boolean("force", False, "Stop running evaluations now instead of letting them finish.")
STOP_REDIS = flags.DEFINE_boolean("stop_redis", False, "Also stop the Redis server, if assayer started it.")
TIMEOUT = flags.DEFINE_float(
    "timeout", 60, "Seconds to wait for idle workers to exit and, with --force, for running evaluations to stop."
)
define_redis_flags()
flags.adopt_module_key_flags(assayer_flags)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise teardown.UsageError(f"unexpected argument {argv[1]!r}; every option is a --flag (see --helpshort)")
    if not TIMEOUT.value >= 0:
        raise teardown.UsageError(f"--timeout={TIMEOUT.value} is invalid: use 0 or more seconds")
    settings = redis_settings_from_flags()

    def out(line: str) -> None:
        print(f"shutdown: {line}", flush=True)

    try:
        client = settings.check()
    except UnreachableError:
        if STOP_REDIS.value:
            out(f"no Redis server is listening at {settings.masked}; nothing to stop")
            return
        raise
    if DIRECTORY.value:
        teardown.stop_directory(client, DIRECTORY.value, FORCE.value, TIMEOUT.value, out)
        return
    teardown.shutdown(settings, client, FORCE.value, STOP_REDIS.value, TIMEOUT.value, out)


if __name__ == "__main__":
    run_main(main)
