"""Writing the scalar metrics of finished evaluations as TensorBoard event files, with tensorboardX."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from absl import logging

from assayer import records, report
from assayer.config import WatchConfig
from assayer.errors import UsageError

MISSING_MESSAGE = "--tensorboard_dir needs tensorboardX; pip install tensorboardX"

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


def check_available() -> None:
    """Raise UsageError unless tensorboardX can be imported."""
    _summary_writer_class()


def run_dir(log_dir: str, config: WatchConfig) -> str:
    """Return the run folder of a watch: its directory's basename, made file-name-safe, and its watch id."""
    basename = os.path.basename(config.directory.rstrip("/")) or "root"
    return os.path.join(log_dir, f"{_UNSAFE_CHARACTERS.sub('_', basename)}-{config.watch_id}")


def write_scalars(log_dir: str, config: WatchConfig, step: int | None, result: Any) -> None:
    """Write the scalar metrics of one evaluation result as TensorBoard scalars at `step`.

    Tags are the metric names of `report.metrics_of`, such as `eval.acc`. Each call writes a new event
    file and closes it, so any number of worker processes can write to the same run at once. Nothing
    is written when `step` is None or the result has no scalar metrics.

    NOTE: a TensorBoard without `--reload_multifile=true` polls only the newest event file of a run.
    File names sort by creation time on one host, but workers on several hosts writing to one run
    can create a file that sorts before the newest one, and such a file is read only after a restart.

    Raises:
        UsageError: tensorboardX is not installed.
    """
    if step is None:
        logging.debug("not writing TensorBoard scalars for watch %s: the checkpoint has no step", config.watch_id)
        return
    # numpy and torch scalars become plain numbers the same way as in the stored records.
    metrics = report.metrics_of(json.loads(records.to_json_text(result)))
    if not metrics:
        logging.debug("not writing TensorBoard scalars for watch %s: the result has no scalar metrics", config.watch_id)
        return
    summary_writer_class = _summary_writer_class()
    # tensorboardX names the file after the current second and the host, so the suffix keeps files of
    # calls in the same second apart. Nanoseconds first make later files sort later.
    suffix = f".{time.time_ns()}.{os.getpid()}"
    run = run_dir(log_dir, config)
    # tensorboardX checks for the folder and then creates it, which fails when another worker creates it
    # in between. Creating it here first, with exist_ok, closes that race.
    os.makedirs(run, exist_ok=True)
    writer = summary_writer_class(logdir=run, filename_suffix=suffix)
    try:
        for name, value in metrics.items():
            writer.add_scalar(name, value, global_step=step)
        writer.flush()
    finally:
        writer.close()


def _summary_writer_class():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UsageError(MISSING_MESSAGE) from None
    return SummaryWriter
