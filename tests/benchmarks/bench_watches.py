"""Measure how close to their polling interval one watch worker keeps many watched directories.

    python tests/benchmarks/bench_watches.py [--watches 40] [--interval 1] [--seconds 200]

The first watch command starts one watch worker; every other one passes `--num_watch_workers 0
--num_eval_workers 0` and so joins the worker that already runs. A poll's time is the `polled_at` field
that it writes to its watch's hash when it commits, read every 20 ms. A gap is the time between two
consecutive polls of the same watch. The reference is one watch alone on the same worker, observed for
10 s first in the same run.

RQ's scheduler (rq 3.0) stores due times in whole seconds and moves due jobs to the queue once per loop
of a little over a second, so where its loop falls within the second drifts by several milliseconds each
second. The polls due in one loop run one after another on the worker, and the ones that start after
the next whole second can wait one loop more. Whether a window sees that depends on where the drift is,
so a short window can miss it; in the runs recorded in README.md, 200 s covered at least one full turn.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import benchlib
import redis

from assayer import records, workers

SAMPLE_SECONDS = 0.02
LONG_GAP = 1.5
"""Gaps longer than this many polling intervals are counted on their own."""


def observe_gaps(client: redis.Redis, watch_ids: list[str], seconds: float) -> tuple[list[float], int]:
    """Sample every watch's last poll time for `seconds` and return the gaps seen and the polls missed.

    A poll is missed by the sampler when the sequence number grew by more than one between two samples.
    """
    last: dict[str, tuple[int, float]] = {}
    gaps: list[float] = []
    missed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with client.pipeline(transaction=False) as pipeline:
            for watch_id in watch_ids:
                pipeline.hmget(records.watch_key(watch_id), "seq", "polled_at")
            rows = pipeline.execute()
        for watch_id, (sequence, polled_at) in zip(watch_ids, rows):
            current = (int(sequence), float(polled_at))
            earlier = last.get(watch_id)
            if earlier is not None and current[0] != earlier[0]:
                if current[0] == earlier[0] + 1:
                    gaps.append(current[1] - earlier[1])
                else:
                    missed += current[0] - earlier[0] - 1
            last[watch_id] = current
        time.sleep(SAMPLE_SECONDS)
    return gaps, missed


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_polls(client: redis.Redis, directories: list[Path], polls: int) -> None:
    def all_polled() -> bool:
        return all(benchlib.polls_committed(client, folder) >= polls for folder in directories)

    benchlib.wait_for(all_polled, 60, message=f"{polls} polls of every watch")


def summarize(gaps: list[float], interval: float) -> str:
    long_gaps = sum(gap > LONG_GAP * interval for gap in gaps)
    return (
        f"{len(gaps)} gaps: median {benchlib.median(gaps):.3f} s, p99 {benchlib.percentile(gaps, 0.99):.3f} s, "
        f"min {min(gaps):.3f} s, max {max(gaps):.3f} s = {max(gaps) / interval:.2f} x interval; "
        f"{long_gaps} ({100 * long_gaps / len(gaps):.1f} %) over {LONG_GAP:g} x interval"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watches", type=int, default=40, help="watched directories")
    parser.add_argument("--interval", type=float, default=1.0, help="--polling_interval of every watch, in seconds")
    parser.add_argument("--seconds", type=float, default=200.0, help="length of the observation window of all watches")
    options = parser.parse_args()

    with benchlib.redis_server() as settings, benchlib.private_state(), benchlib.scratch_folder("watches") as root:
        client = settings.connect()
        evaluator = benchlib.write_evaluator(root / "evaluators")
        directories = [root / f"experiment{index}" for index in range(options.watches)]
        for folder in directories:
            benchlib.write_checkpoints(folder, 3)
        interval = f"--polling_interval={options.interval:g}"
        try:
            benchlib.watch(
                settings, directories[0], evaluator, interval, "--num_watch_workers=1", "--num_eval_workers=0"
            )
            wait_for_polls(client, directories[:1], 2)
            (watch_worker,) = workers.assayer_workers(client)
            alone, _ = observe_gaps(client, [config.watch_id for config, _ in records.load_watches(client)], 10)

            began = time.monotonic()
            for folder in directories[1:]:
                benchlib.watch(settings, folder, evaluator, interval, "--num_watch_workers=0", "--num_eval_workers=0")
            start_seconds = time.monotonic() - began
            wait_for_polls(client, directories, 2)
            watch_ids = [config.watch_id for config, _ in records.load_watches(client)]
            cpu_before = cpu_seconds(watch_worker.pid)
            gaps, missed = observe_gaps(client, watch_ids, options.seconds)
            busy = (cpu_seconds(watch_worker.pid) - cpu_before) / options.seconds
        finally:
            benchlib.stop_assayer(settings)

    benchlib.report(
        [
            ("setup", f"{options.watches} watches, one watch worker, --polling_interval {options.interval:g}"),
            ("each later watch command", f"{start_seconds / max(1, options.watches - 1):.2f} s"),
            ("one watch alone (reference)", summarize(alone, options.interval)),
            (f"{options.watches} watches", summarize(gaps, options.interval)),
            ("polls missed by the sampler", str(missed)),
            ("watch worker CPU", f"{busy * 100:.0f} % of one core"),
            ("ratio worst gap / interval", f"{max(gaps) / options.interval:.2f}"),
            ("ratio worst gap / reference worst gap", f"{max(gaps) / max(alone):.2f}"),
        ]
    )


if __name__ == "__main__":
    main()
