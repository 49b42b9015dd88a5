"""`python -m assayer.watch`: evaluate every new checkpoint in a directory on RQ workers.

Checks the flags and the evaluator, connects to Redis (starting a local server if none is listening),
starts or resumes the watch, starts the requested worker pools, and returns. The workers keep running.
"""

from __future__ import annotations

import os

from absl import flags, logging

from assayer import control
from assayer import flags as assayer_flags
from assayer.config import DEFAULT_REGEX, WatchConfig
from assayer.evaluator import normalize
from assayer.flags import define_redis_flags, redis_settings_from_flags, run_main

DIRECTORY = flags.DEFINE_string("directory", None, "Checkpoint folder to watch; it need not exist yet.")
EVALUATOR = flags.DEFINE_string(
    "evaluator", None, "Function that takes one checkpoint path: path/to/file.py:function or package.module.function."
)
REGEX_FILTER = flags.DEFINE_string(
    "regex_filter",
    DEFAULT_REGEX,
    "Which paths are checkpoints: re.match against the path relative to --directory, /-separated, in every "
    "subfolder. A matching folder is one checkpoint.",
)
NUM_EVAL_WORKERS = flags.DEFINE_integer(
    "num_eval_workers", 5, "Evaluation workers this command starts; 0 relies on workers started elsewhere."
)
NUM_WATCH_WORKERS = flags.DEFINE_integer(
    "num_watch_workers", 1, "Watch workers this command starts; 0 relies on workers started elsewhere."
)
POLLING_INTERVAL = flags.DEFINE_float("polling_interval", 5, "Seconds between two listings of the directory.")
EVAL_EXISTING = flags.DEFINE_boolean(
    "eval_existing", False, "Also evaluate the checkpoints already there when the watch starts."
)
WATCH_QUEUE_NAME = flags.DEFINE_string("watch_queue_name", "watch", "RQ queue of the poll jobs.")
EVAL_QUEUE_NAME = flags.DEFINE_string("eval_queue_name", "evaluation", "RQ queue of the evaluation jobs.")
LAUNCH_REDIS = flags.DEFINE_boolean(
    "launch_redis",
    True,
    "When no server is listening at a local Redis address, start redis-server there: loopback only, with a "
    "password and append-only persistence in the state folder.",
)
SETTLE_SECONDS = flags.DEFINE_float(
    "settle_seconds",
    None,
    "A checkpoint is ready once its size and modification time have not changed for this many seconds. "
    "Default: the polling interval.",
)
READY_MARKER = flags.DEFINE_string(
    "ready_marker",
    None,
    "File name that must exist inside a folder checkpoint before it is ready, e.g. commit_success.txt.",
)
EVAL_TIMEOUT = flags.DEFINE_integer(
    "eval_timeout", 0, "Seconds an evaluation may run before it is stopped and marked failed; 0 means no limit."
)
MAX_RETRIES = flags.DEFINE_integer(
    "max_retries", 0, "Times a failed evaluation is retried, after pauses of 5 s, 10 s, 20 s, ... (at most 10 min)."
)
TENSORBOARD_DIR = flags.DEFINE_string(
    "tensorboard_dir", None, "Write each evaluation's scalar metrics there as TensorBoard scalars, one run per watch."
)
define_redis_flags()
flags.adopt_module_key_flags(assayer_flags)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise control.UsageError(f"unexpected argument {argv[1]!r}; every option is a --flag (see --helpshort)")
    working_dir = os.getcwd()
    for name, flag in (("--directory", DIRECTORY), ("--evaluator", EVALUATOR)):
        if not flag.value:
            raise control.UsageError(f"{name} is required (see --helpshort)")
    config = WatchConfig(
        directory=os.path.abspath(os.path.expanduser(DIRECTORY.value)),
        evaluator=normalize(EVALUATOR.value, working_dir),
        regex=REGEX_FILTER.value,
        polling_interval=POLLING_INTERVAL.value,
        settle_seconds=POLLING_INTERVAL.value if SETTLE_SECONDS.value is None else SETTLE_SECONDS.value,
        ready_marker=READY_MARKER.value,
        eval_timeout=EVAL_TIMEOUT.value,
        max_retries=MAX_RETRIES.value,
        watch_queue=WATCH_QUEUE_NAME.value,
        eval_queue=EVAL_QUEUE_NAME.value,
        search_path=working_dir,
        tensorboard_dir=os.path.abspath(TENSORBOARD_DIR.value) if TENSORBOARD_DIR.value else None,
    )
    settings = redis_settings_from_flags()
    logging.info("watch %s: starting on %s", config.watch_id, settings.masked)
    control.start_watch(
        config,
        settings,
        EVAL_EXISTING.value,
        NUM_WATCH_WORKERS.value,
        NUM_EVAL_WORKERS.value,
        LAUNCH_REDIS.value,
        out=lambda line: print(f"watch: {line}", flush=True),
    )


if __name__ == "__main__":
    run_main(main)
