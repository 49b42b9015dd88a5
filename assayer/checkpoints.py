"""Listing a checkpoint tree, fingerprinting checkpoints, and the rules that decide when one is complete."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from stat import S_ISDIR

from absl import logging

TEMPORARY_SUFFIXES = (".tmp", ".partial", ".incomplete")
TEMPORARY_PREFIXES = (".", "tmp-checkpoint-")
TEMPORARY_INFIX = ".orbax-checkpoint-tmp"
"""Names that writers use while a checkpoint is unfinished, never evaluated and never descended into.

Hidden names cover editors' and rsync's partial files; `tmp-checkpoint-*` is Hugging Face Trainer's
staging folder; `*.orbax-checkpoint-tmp*` is Orbax's, renamed to the step's name once complete."""

EXTENSIONS = re.compile(r"(\.([A-Za-z]+|h5|hdf5|pt2|bf16|fp16|fp32|fp8|int4|int8))+$", re.IGNORECASE)
"""File extensions at the end of a path, such as `.h5`, `.pt2` or `.bf16.safetensors`, whose digits are not a step.

Only these digit-carrying extensions are cut, so the step of `model.epoch3` or `weights.e10.pt` is still found."""

DISTCP_SUFFIX = ".distcp"
DISTCP_METADATA = ".metadata"
SHARD_INDEX_SUFFIX = ".index.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint as one listing saw it.

    `fingerprint` changes whenever the content is likely to have changed: size and modification time
    in nanoseconds for a file; number of files, total size and newest modification time for a folder.
    """

    fingerprint: str
    modified: float
    is_dir: bool


def compile_filter(regex: str) -> re.Pattern[str]:
    """Compile `--regex_filter`; `.` also matches a newline, since file names may contain one."""
    return re.compile(regex, re.DOTALL)


def scan(directory: str, pattern: re.Pattern[str]) -> dict[str, Checkpoint]:
    """List the checkpoints under `directory`, keyed by their `/`-separated path relative to it.

    The tree is walked once with `os.scandir`. A folder whose relative path matches is one checkpoint and
    is not searched for more. Symbolic links to folders are not followed, so a link loop cannot trap the
    walk. Entries that vanish or cannot be read while the walk runs are left out of this listing.

    Raises:
        FileNotFoundError: `directory` does not exist.
    """
    found: dict[str, Checkpoint] = {}
    match = pattern.match
    folders = [("", directory)]
    while folders:
        prefix, folder = folders.pop()
        try:
            # Reading a folder whole, then looping, measured faster than looping over the open iterator.
            with os.scandir(folder) as iterator:
                entries = list(iterator)
        except OSError as error:
            if folder == directory:
                raise
            logging.debug("scan %s: skipping unreadable folder %s: %s", directory, folder, error)
            continue
        # This loop runs once per entry of the tree, so it calls as few functions as it can.
        for entry in entries:
            name = entry.name
            relative = prefix + name
            matched = match(relative)
            if not matched:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue  # Most entries end here: files that are not checkpoints.
                except OSError:
                    continue
            if name.startswith(TEMPORARY_PREFIXES) or name.endswith(TEMPORARY_SUFFIXES) or TEMPORARY_INFIX in name:
                continue
            if not matched:
                folders.append((relative + "/", entry.path))
                continue
            checkpoint = _describe(entry)
            if checkpoint is not None:
                found[relative] = checkpoint
    return found


def missing_parts(path: str, ready_marker: str | None) -> str | None:
    """Return what a folder checkpoint still lacks by its format's own rules, or None when it is complete.

    `ready_marker` names a file written last into the checkpoint folder (Orbax's `commit_success.txt`,
    say). In the folder and in every folder below it, torch.distributed.checkpoint writes `.metadata`
    after its `*.distcp` shards, and a sharded Hugging Face checkpoint lists its shards in
    `*.index.json`. A file checkpoint has no such rules. A folder that cannot be listed (it vanished,
    say) is not complete.
    """
    try:
        names = set(os.listdir(path))
    except NotADirectoryError:
        return None
    except OSError as error:
        return f"folder cannot be listed: {error.strerror or error}"
    if not names:
        return "folder is empty"
    if ready_marker and ready_marker not in names:
        return f"ready marker {ready_marker} not written yet"
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        missing = _missing_in_folder(folder, set(files) | set(subfolders))
        if missing:
            where = os.path.relpath(folder, path)
            return missing if where == "." else f"{where}/: {missing}"
    return None


def step_of(relative: str, pattern: re.Pattern[str]) -> int | None:
    """Return the training step in a checkpoint's relative path.

    That is the regex's named group `step` when it has one and it captured digits, else the last integer
    in the path once the file extensions are cut off (`model_epoch3.pt` is 3, `run2/checkpoint-500` is
    500, `checkpoint-500.h5` is 500), else None.
    """
    if "step" in pattern.groupindex:
        match = pattern.match(relative)
        captured = match.group("step") if match else None
        if captured and captured.isdigit():
            return int(captured)
    numbers = re.findall(r"\d+", EXTENSIONS.sub("", relative))
    return int(numbers[-1]) if numbers else None


def describe(path: str) -> Checkpoint | None:
    """Return the checkpoint at `path` as a listing would see it now, or None when it is gone."""
    try:
        stat = os.stat(path)
        if S_ISDIR(stat.st_mode):
            return _describe_folder(path)
    except OSError:
        return None
    return Checkpoint(f"{stat.st_size}:{stat.st_mtime_ns}", stat.st_mtime, is_dir=False)


def modified_ns(fingerprint: str) -> int:
    """Return the newest modification time, in nanoseconds, that a fingerprint records."""
    return int(fingerprint.rsplit(":", 1)[-1])


def _describe(entry: os.DirEntry) -> Checkpoint | None:
    try:
        if entry.is_dir():
            return _describe_folder(entry.path)
        stat = entry.stat()
    except OSError:
        # Vanished, a dangling link, or a link loop: nothing to evaluate in this listing.
        return None
    return Checkpoint(f"{stat.st_size}:{stat.st_mtime_ns}", stat.st_mtime, is_dir=False)


def _describe_folder(path: str) -> Checkpoint:
    count = size = newest = 0
    folders = [path]
    while folders:
        folder = folders.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    stat = entry.stat(follow_symlinks=False)
                    is_folder = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                newest = max(newest, stat.st_mtime_ns)
                if is_folder:
                    folders.append(entry.path)
                else:
                    count += 1
                    size += stat.st_size
    return Checkpoint(f"d{count}:{size}:{newest}", newest / 1e9, is_dir=True)


def _missing_in_folder(folder: str, names: set[str]) -> str | None:
    """Return what one folder of a checkpoint lacks by the distributed-checkpoint and shard-index rules."""
    if DISTCP_METADATA not in names and any(name.endswith(DISTCP_SUFFIX) for name in names):
        return f"{DISTCP_METADATA} of the distributed checkpoint not written yet"
    for index in sorted(name for name in names if name.endswith(SHARD_INDEX_SUFFIX)):
        missing = _missing_shards(os.path.join(folder, index))
        if missing:
            return f"{index} lists shards not written yet: {', '.join(missing[:3])}"
    return None


def _missing_shards(index_path: str) -> list[str]:
    if not os.path.isfile(index_path):
        # Opening a FIFO or a device under that name would block the poll.
        return [f"{os.path.basename(index_path)} (not a regular file)"]
    try:
        with open(index_path) as file:
            weight_map = json.load(file).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, AttributeError, TypeError):
        shards = None
    if shards is None or not all(isinstance(shard, str) for shard in shards):
        return [f"{os.path.basename(index_path)} (unreadable or half-written)"]
    folder = os.path.dirname(index_path)
    return [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]
