"""Time `--eval_existing` over many existing checkpoints against plain `Queue.enqueue_many` calls.

    python tests/benchmarks/bench_backfill.py [--checkpoints 10000] [--batch 1000]

The watch command runs with one watch worker and `--num_eval_workers 0`, so nothing drains the
evaluation queue. The clock starts when the command starts and stops when every evaluation job is in
the queue and every record exists. The first poll counts as started when its job enters the watch
queue's started job registry, which is sampled every 5 ms. The reference, in the same run and on the
same Redis, enqueues as many jobs of the same function with the same arguments through
`Queue.enqueue_many`, `--batch` jobs a call.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import benchlib
from rq import Queue
from rq.registry import StartedJobRegistry

from assayer import records
from assayer.config import WatchConfig

SAMPLE_SECONDS = 0.005
TIMEOUT_SECONDS = 300


def time_backfill(settings, directory, evaluator: str, count: int) -> dict[str, float]:
    """Run the watch command with `--eval_existing` and return the times of its phases, from its start."""
    client = settings.connect()
    evaluation_queue = Queue("evaluation", connection=client)
    started_polls = StartedJobRegistry("watch", connection=client)
    command = [sys.executable, "-m", "assayer.watch", f"--redis_url={settings.url}", f"--directory={directory}"]
    command += [f"--evaluator={evaluator}", "--eval_existing", "--num_watch_workers=1", "--num_eval_workers=0"]
    began = time.monotonic()
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=benchlib.REPO,
        env=benchlib.command_environment(),
    )
    times: dict[str, float] = {}
    while time.monotonic() - began < TIMEOUT_SECONDS:
        now = time.monotonic() - began
        if "command" not in times and process.poll() is not None:
            times["command"] = now
            if process.returncode != 0:
                raise RuntimeError(f"the watch command failed: {process.stderr.read().decode()}")
        if "poll_started" not in times and started_polls.count:
            times["poll_started"] = now
        if evaluation_queue.count >= count:
            watch_id = records.load_watches(client)[0][0].watch_id
            if client.zcard(records.index_key(watch_id)) >= count:
                times["all_queued"] = now
                break
        time.sleep(SAMPLE_SECONDS)
    else:
        raise TimeoutError(f"{evaluation_queue.count} of {count} evaluations queued after {TIMEOUT_SECONDS} s")
    process.wait(TIMEOUT_SECONDS)
    times.setdefault("command", time.monotonic() - began)
    return times


def time_enqueue_many(settings, directory, evaluator: str, count: int, batch: int) -> float:
    """Enqueue `count` evaluation jobs with plain `Queue.enqueue_many` calls and return the seconds taken."""
    client = settings.connect()
    queue = Queue("plain-reference", connection=client)
    config_json = WatchConfig(directory=str(directory), evaluator=evaluator).to_json()
    began = time.monotonic()
    for first in range(0, count, batch):
        jobs = [
            Queue.prepare_data(
                "assayer.jobs.eval_job.evaluate",
                args=(config_json, f"model_step{step}.pt", f"{step:016x}", step),
                job_id=f"plain-{step}",
                description=f"evaluate model_step{step}.pt",
                timeout=-1,
            )
            for step in range(first, min(count, first + batch))
        ]
        queue.enqueue_many(jobs)
    seconds = time.monotonic() - began
    assert queue.count == count, f"{queue.count} plain jobs queued, expected {count}"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=10_000, help="checkpoints present before the watch")
    parser.add_argument("--batch", type=int, default=1000, help="jobs per Queue.enqueue_many call")
    options = parser.parse_args()
    count = options.checkpoints

    with benchlib.redis_server() as settings, benchlib.private_state(), benchlib.scratch_folder("backfill") as root:
        evaluator = benchlib.write_evaluator(root / "evaluators")
        directory = root / "checkpoints"
        benchlib.write_checkpoints(directory, count)
        try:
            times = time_backfill(settings, directory, evaluator, count)
        finally:
            benchlib.stop_assayer(settings)
        plain_seconds = time_enqueue_many(settings, directory, evaluator, count, options.batch)

    poll_seconds = times["all_queued"] - times["poll_started"]
    plain_rate = count / plain_seconds
    benchlib.report(
        [
            ("checkpoints", f"{count}, --eval_existing, --num_eval_workers 0"),
            ("watch command returned", f"{times['command']:.2f} s after its start"),
            ("first poll started", f"{times['poll_started']:.2f} s after the command started"),
            ("all queued", f"{times['all_queued']:.2f} s after the command started"),
            ("first poll", f"{poll_seconds:.2f} s = {count / poll_seconds:.0f} enqueues/s"),
            ("end to end", f"{count / times['all_queued']:.0f} enqueues/s"),
            (f"Queue.enqueue_many, {options.batch} a call (reference)", f"{plain_seconds:.2f} s = {plain_rate:.0f}/s"),
            ("ratio poll rate / reference rate", f"{count / poll_seconds / plain_rate:.2f}"),
            ("ratio end-to-end rate / reference rate", f"{count / times['all_queued'] / plain_rate:.2f}"),
        ]
    )


if __name__ == "__main__":
    main()
