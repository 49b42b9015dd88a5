"""Measure the bytes an idle poll sends to Redis, with few and with many checkpoints known.

    python tests/benchmarks/bench_idle_bytes.py [--counts 10,10000] [--seconds 10] [--interval 1]

For each count, a fresh private redis-server, a directory of that many settled checkpoints, and one watch
(one watch worker, no evaluation worker) that records them as known on its first poll. Then nothing
changes for `--seconds`, and the server's INFO stats `total_net_input_bytes` delta over that window is
divided by the polls committed in it. That gross figure includes everything the server received: the
watch worker's RQ bookkeeping, the pool's and the scheduler's heartbeats, and this script's two reads.
The same window is measured again after `shutdown --directory` has stopped the watch but left the
workers running, and the difference between the two is the cost of the polls alone.
"""

from __future__ import annotations

import argparse
import time

import benchlib

from assayer import records
from assayer.jobs import watch_job


def measure_window(client, directory: str, seconds: float) -> tuple[int, int]:
    """Return (bytes received by Redis, polls committed) over `seconds`."""
    polls_before = benchlib.polls_committed(client, directory)
    bytes_before = benchlib.net_input_bytes(client)
    time.sleep(seconds)
    bytes_after = benchlib.net_input_bytes(client)
    return bytes_after - bytes_before, benchlib.polls_committed(client, directory) - polls_before


def measure(count: int, seconds: float, interval: float) -> dict[str, float]:
    with benchlib.redis_server() as settings, benchlib.private_state(), benchlib.scratch_folder("idle") as root:
        client = settings.connect()
        evaluator = benchlib.write_evaluator(root / "evaluators")
        directory = root / "checkpoints"
        benchlib.write_checkpoints(directory, count)
        try:
            benchlib.watch(
                settings,
                directory,
                evaluator,
                f"--polling_interval={interval:g}",
                "--num_watch_workers=1",
                "--num_eval_workers=0",
            )
            benchlib.wait_for(lambda: benchlib.polls_committed(client, directory) >= 2, 60, message="two polls")
            (watch_id,) = [config.watch_id for config, _ in records.load_watches(client)]
            known = client.hlen(watch_job.known_key(watch_id))
            assert known == count, f"{known} checkpoints known, expected {count}"
            gross_bytes, polls = measure_window(client, str(directory), seconds)
            benchlib.run_command("assayer.shutdown", f"--redis_url={settings.url}", f"--directory={directory}")
            idle_bytes, idle_polls = measure_window(client, str(directory), seconds)
            assert idle_polls == 0, f"{idle_polls} polls after the watch was stopped"
        finally:
            benchlib.stop_assayer(settings)
    return {
        "polls": polls,
        "gross": gross_bytes / polls,
        "net": (gross_bytes - idle_bytes) / polls,
        "idle_rate": idle_bytes / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,10000", help="comma-separated numbers of known checkpoints")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement window")
    parser.add_argument("--interval", type=float, default=1.0, help="--polling_interval of the watch, in seconds")
    options = parser.parse_args()

    counts = [int(text) for text in options.counts.split(",")]
    results = {count: measure(count, options.seconds, options.interval) for count in counts}
    rows = []
    for count, result in results.items():
        rows.append(
            (
                f"{count} checkpoints known",
                f"{result['gross']:.0f} B per poll in all, {result['net']:.0f} B without the workers' own "
                f"{result['idle_rate']:.0f} B/s ({result['polls']} polls in {options.seconds:g} s)",
            )
        )
    smallest, largest = results[min(counts)], results[max(counts)]
    rows.append((f"ratio {max(counts)} / {min(counts)} (gross)", f"{largest['gross'] / smallest['gross']:.2f}"))
    rows.append((f"ratio {max(counts)} / {min(counts)} (net)", f"{largest['net'] / smallest['net']:.2f}"))
    benchlib.report(rows)


if __name__ == "__main__":
    main()
