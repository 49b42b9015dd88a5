"""Time from dequeue to an evaluator's first line: assayer's evaluation job against a plain RQ job.

    python tests/benchmarks/bench_eval_overhead.py [--jobs 150] [--rounds 2]

Both sides run the same trivial function, whose first line notes `time.time()`, on a forking worker.
The reference is plain `rq.Worker` running a job that calls the function by its module path. The
measured side is assayer's `EvaluationWorker` running `assayer.jobs.eval_job.evaluate`, which records
the start, loads the evaluator from its file and calls it. Its jobs and records are queued by the
poll's own code. Each worker runs in its own process, which imports what an assayer pool process
imports, sets up absl logging as the pool does, and notes when `dequeue_job_and_maintain_ttl` returns
each job. The jobs are queued before the worker starts, so it runs them back to back in burst mode.
Rounds alternate plain and assayer workers, so a load that comes and goes on the machine hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import benchlib
from rq import Queue

from assayer import checkpoints, records
from assayer.config import WatchConfig
from assayer.jobs import watch_job

EVALUATOR_SOURCE = """import os
import time


def note_start(checkpoint_path):
    started = time.time()
    with open(os.environ["FIRST_LINE_LOG"], "a") as log:
        log.write(f"{checkpoint_path}\\t{started!r}\\n")
"""

PLAIN, ASSAYER = "plain", "assayer"


def run_worker(kind: str, url: str, queue_name: str, dequeue_log: str) -> None:
    """Run one burst worker of `kind` on `queue_name` and write each job's dequeue time to `dequeue_log`."""
    import redis
    from rq import Worker

    from assayer import pool, workers  # noqa: F401 (what a pool process has imported before it forks workers)

    base = workers.EvaluationWorker if kind == ASSAYER else Worker
    dequeued: dict[str, float] = {}

    class TimedWorker(base):
        def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            if result is not None:
                dequeued[result[0].id] = time.time()
            return result

    TimedWorker([queue_name], connection=redis.Redis.from_url(url)).work(burst=True, logging_level="INFO")
    Path(dequeue_log).write_text(json.dumps(dequeued))


def enqueue_plain(client, queue_name: str, paths: list[Path]) -> dict[str, str]:
    queue = Queue(queue_name, connection=client)
    return {queue.enqueue("first_line_eval.note_start", str(path)).id: str(path) for path in paths}


def enqueue_assayer(client, queue_name: str, paths: list[Path], evaluator: str) -> dict[str, str]:
    """Queue evaluation jobs and their records through the poll's own code, and map job ids to paths."""
    directory = paths[0].parent
    config = WatchConfig(directory=str(directory), evaluator=evaluator, eval_queue=queue_name)
    listing = checkpoints.scan(str(directory), checkpoints.compile_filter(config.regex))
    new_versions = []
    for step, path in enumerate(paths):
        relative = path.name
        version = records.version_of(relative, listing[relative].fingerprint)
        new_versions.append((relative, listing[relative], version, step))
    with client.pipeline() as pipeline:
        pipeline.multi()  # As in a poll's commit: RQ's enqueue_job expects a pipeline in MULTI mode.
        watch_job._enqueue_evaluations(client, pipeline, config, new_versions)
        pipeline.execute()
    return {
        records.eval_job_id(config.watch_id, version): str(directory / relative)
        for relative, _, version, _ in new_versions
    }


def measure(kind: str, settings, root: Path, paths: list[Path], evaluator: str, label: str) -> list[float]:
    """Run one round of `kind` jobs and return each job's seconds from dequeue to the evaluator's first line."""
    client = settings.connect()
    queue_name = f"bench-{label}"
    if kind == PLAIN:
        jobs = enqueue_plain(client, queue_name, paths)
    else:
        jobs = enqueue_assayer(client, queue_name, paths, evaluator)
    first_line_log = root / f"first-line-{label}.tsv"
    dequeue_log = root / f"dequeued-{label}.json"
    environment = dict(os.environ, FIRST_LINE_LOG=str(first_line_log))
    environment["PYTHONPATH"] = os.pathsep.join([str(root / "evaluators"), str(benchlib.REPO)])
    worker_log = root / f"worker-{label}.log"
    with open(worker_log, "wb") as log:
        command = [sys.executable, __file__, "--worker", kind, "--url", settings.url, "--queue", queue_name]
        subprocess.run(command + ["--dequeue_log", str(dequeue_log)], env=environment, stderr=log, check=True)
    dequeued = json.loads(dequeue_log.read_text())
    lines = first_line_log.read_text().splitlines() if first_line_log.exists() else []
    first_lines = dict(line.split("\t") for line in lines)
    missing = [job_id for job_id, path in jobs.items() if path not in first_lines or job_id not in dequeued]
    if missing:
        tail = "\n".join(worker_log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{len(missing)} {kind} jobs did not reach the evaluator, e.g. {missing[0]}:\n{tail}")
    return [float(first_lines[path]) - dequeued[job_id] for job_id, path in jobs.items()]


def milliseconds(values: list[float]) -> str:
    return (
        f"median {benchlib.median(values) * 1000:.2f} ms, p10 {benchlib.percentile(values, 0.1) * 1000:.2f} ms, "
        f"p90 {benchlib.percentile(values, 0.9) * 1000:.2f} ms ({len(values)} jobs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=150, help="jobs per worker per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running a plain and an assayer worker")
    parser.add_argument("--worker", choices=[PLAIN, ASSAYER], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--dequeue_log", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        from absl import app

        app.run(lambda argv: run_worker(options.worker, options.url, options.queue, options.dequeue_log), [__file__])
        return

    latencies: dict[str, list[float]] = {PLAIN: [], ASSAYER: []}
    with benchlib.redis_server() as settings, benchlib.private_state(), benchlib.scratch_folder("overhead") as root:
        (root / "evaluators").mkdir()
        (root / "evaluators" / "first_line_eval.py").write_text(EVALUATOR_SOURCE)
        evaluator = f"{root / 'evaluators' / 'first_line_eval.py'}:note_start"
        for round_index in range(options.rounds):
            for kind in (PLAIN, ASSAYER):
                label = f"{kind}-{round_index}"
                paths = benchlib.write_checkpoints(root / f"checkpoints-{label}", options.jobs)
                latencies[kind] += measure(kind, settings, root, paths, evaluator, label)

    plain, assayer = benchlib.median(latencies[PLAIN]), benchlib.median(latencies[ASSAYER])
    benchlib.report(
        [
            ("plain rq.Worker + plain job (reference)", milliseconds(latencies[PLAIN])),
            ("EvaluationWorker + eval job", milliseconds(latencies[ASSAYER])),
            ("difference of medians", f"{(assayer - plain) * 1000:.2f} ms"),
            ("ratio of medians", f"{assayer / plain:.2f} (target at most 1.2)"),
        ]
    )


if __name__ == "__main__":
    main()
