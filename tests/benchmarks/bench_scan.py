"""Time a poll's listing of a large checkpoint tree against `find DIR` on the same tree.

    python tests/benchmarks/bench_scan.py [--files 100000] [--checkpoints 200] [--repeats 15] [--layout files]

With `--layout files` the tree is a training run's output: `--checkpoints` checkpoint files in
`checkpoints/`, and the rest of `--files` spread as 100 sample files per folder over `runs/run*/samples*/`.
With `--layout folders` every file is one of 100 shards of a folder checkpoint `checkpoints/step*.ckpt/`,
which a poll fingerprints by the size and modification time of each file in it. Both listings run with a warm
page cache, interleaved. The minimums are the headline figures, because other load on the machine
only ever adds time; the medians are printed too. `find` runs as a child process writing to
/dev/null, so its time includes about a millisecond to start the process.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import benchlib

from assayer import checkpoints, diff
from assayer.config import DEFAULT_REGEX

FILES_PER_FOLDER = 100
FOLDERS_PER_RUN = 20


def build_folder_checkpoints(root: Path, files: int) -> int:
    """Write `files` empty files as shards of folder checkpoints `checkpoints/step{N}.ckpt/` and count those."""
    count = 0
    for first in range(0, files, FILES_PER_FOLDER):
        folder = root / "checkpoints" / f"step{count}.ckpt"
        folder.mkdir(parents=True)
        for shard in range(min(FILES_PER_FOLDER, files - first)):
            (folder / f"shard_{shard}.bin").touch()
        count += 1
    return count


def build_tree(root: Path, files: int, checkpoint_count: int) -> None:
    """Write `files` empty files under `root`, `checkpoint_count` of them checkpoints."""
    benchlib.write_checkpoints(root / "checkpoints", checkpoint_count)
    others = files - checkpoint_count
    for folder_index in range(0, others, FILES_PER_FOLDER):
        folder_number = folder_index // FILES_PER_FOLDER
        folder = root / "runs" / f"run{folder_number // FOLDERS_PER_RUN}" / f"samples{folder_number % FOLDERS_PER_RUN}"
        folder.mkdir(parents=True)
        for file_index in range(min(FILES_PER_FOLDER, others - folder_index)):
            (folder / f"sample_{file_index}.json").touch()


def time_once(function) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="files in the tree, checkpoints included")
    parser.add_argument("--checkpoints", type=int, default=200, help="checkpoint files among them")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each listing")
    parser.add_argument(
        "--layout",
        choices=["files", "folders"],
        default="files",
        help="files: checkpoint files among sample files; folders: every file is a shard of a folder checkpoint",
    )
    options = parser.parse_args()

    pattern = checkpoints.compile_filter(DEFAULT_REGEX)
    with benchlib.scratch_folder("scan") as root:
        began = time.perf_counter()
        if options.layout == "folders":
            checkpoint_count = build_folder_checkpoints(root, options.files)
        else:
            checkpoint_count = options.checkpoints
            build_tree(root, options.files, checkpoint_count)
        build_seconds = time.perf_counter() - began

        def scan():
            return checkpoints.scan(str(root), pattern)

        def scan_and_digest():
            return diff.digest(scan())

        def find():
            subprocess.run(["find", str(root)], stdout=subprocess.DEVNULL, check=True)

        def find_with_stat():
            subprocess.run(["find", str(root), "-printf", "%s %T@\\n"], stdout=subprocess.DEVNULL, check=True)

        found = scan()
        assert len(found) == checkpoint_count, f"scan found {len(found)} checkpoints, expected {checkpoint_count}"
        functions = {"scan": scan, "scan_and_digest": scan_and_digest, "find": find, "find_with_stat": find_with_stat}
        for function in functions.values():
            function()  # Warm the page cache and the dentry cache.
        times: dict[str, list[float]] = {name: [] for name in functions}
        for _ in range(options.repeats):
            for name, function in functions.items():
                times[name].append(time_once(function))

    kind = "folder checkpoints of 100 files" if options.layout == "folders" else "checkpoint files"
    fastest = {name: min(values) for name, values in times.items()}
    medians = {name: benchlib.median(values) for name, values in times.items()}

    def timing(name: str) -> str:
        return f"min {fastest[name] * 1000:.1f} ms, median {medians[name] * 1000:.1f} ms of {options.repeats}"

    def ratio(name: str, reference: str) -> str:
        by_minimum = fastest[name] / fastest[reference]
        return f"{by_minimum:.2f} of the minimums, {medians[name] / medians[reference]:.2f} of the medians"

    benchlib.report(
        [
            ("tree", f"{options.files} files, {checkpoint_count} {kind}, built in {build_seconds:.1f} s"),
            ("find DIR (reference)", timing("find")),
            ("checkpoints.scan", timing("scan")),
            ("scan + digest", timing("scan_and_digest")),
            ("find DIR -printf '%s %T@'", timing("find_with_stat") + ", stats every file"),
            ("ratio scan / find", ratio("scan", "find") + " (target at most 1.5)"),
            ("ratio scan + digest / find", ratio("scan_and_digest", "find")),
            ("ratio scan / find with stat", ratio("scan", "find_with_stat")),
        ]
    )


if __name__ == "__main__":
    main()
