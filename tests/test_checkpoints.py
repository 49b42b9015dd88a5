"""Unit tests of listing checkpoints, their format rules, their steps and the settling plan, without Redis."""

from __future__ import annotations

import json
import os
import re

import pytest

from assayer import checkpoints
from assayer.checkpoints import Checkpoint
from assayer.config import DEFAULT_REGEX
from assayer.diff import Pending, Plan, plan

MTIME_NS = 1_700_000_000_000_000_000
"""A fixed modification time, in nanoseconds, set on files so that fingerprints are known in advance."""

FOLDER_REGEX = r"^.*(\.pt|checkpoint-\d+)$"


def make(path, data: bytes = b"weights", mtime_ns: int = MTIME_NS):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def scan(directory, regex: str = DEFAULT_REGEX) -> dict[str, Checkpoint]:
    return checkpoints.scan(str(directory), checkpoints.compile_filter(regex))


def file_checkpoint(size: int, mtime_ns: int = MTIME_NS) -> Checkpoint:
    return Checkpoint(f"{size}:{mtime_ns}", mtime_ns / 1e9, is_dir=False)


def test_scan_files_at_any_depth(tmp_path):
    make(tmp_path / "model_epoch1.pt", b"12345")
    make(tmp_path / "run" / "deep" / "model_epoch2.ckpt", b"123")
    make(tmp_path / "notes.txt")
    make(tmp_path / "model_epoch3.pt.bak")
    assert scan(tmp_path) == {
        "model_epoch1.pt": file_checkpoint(5),
        "run/deep/model_epoch2.ckpt": file_checkpoint(3),
    }


def test_scan_folder_is_one_checkpoint(tmp_path):
    make(tmp_path / "checkpoint-500" / "model.pt", b"1234", MTIME_NS)
    make(tmp_path / "checkpoint-500" / "sub" / "optimizer.pt", b"12", MTIME_NS + 7)
    os.utime(tmp_path / "checkpoint-500" / "sub", ns=(MTIME_NS, MTIME_NS))
    newest = MTIME_NS + 7
    assert scan(tmp_path, FOLDER_REGEX) == {
        "checkpoint-500": Checkpoint(f"d2:6:{newest}", newest / 1e9, is_dir=True),
    }


def test_scan_folder_fingerprint_changes(tmp_path):
    make(tmp_path / "checkpoint-500" / "model.pt", b"1234")
    before = scan(tmp_path, FOLDER_REGEX)["checkpoint-500"].fingerprint
    make(tmp_path / "checkpoint-500" / "model.pt", b"12345")
    after = scan(tmp_path, FOLDER_REGEX)["checkpoint-500"].fingerprint
    assert before != after


def test_scan_skips_temporary_names(tmp_path):
    for name in ["x.pt.tmp", "x.pt.partial", "x.pt.incomplete", ".hidden.pt"]:
        make(tmp_path / name)
    for folder in ["tmp-checkpoint-5", "10.orbax-checkpoint-tmp-123", ".staging"]:
        make(tmp_path / folder / "model.pt")
    make(tmp_path / "kept.pt", b"1")
    assert scan(tmp_path, r"^[^/]+$|^.*\.pt$") == {"kept.pt": file_checkpoint(1)}


def test_scan_survives_links(tmp_path):
    make(tmp_path / "model_epoch1.pt", b"1")
    (tmp_path / "loop").mkdir()
    os.symlink(tmp_path, tmp_path / "loop" / "back")
    os.symlink(tmp_path / "absent.pt", tmp_path / "dangling.pt")
    assert scan(tmp_path) == {"model_epoch1.pt": file_checkpoint(1)}


def test_scan_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "absent")


def test_missing_parts_file_is_complete(tmp_path):
    assert checkpoints.missing_parts(str(make(tmp_path / "model.pt")), None) is None


def test_missing_parts_empty_folder(tmp_path):
    assert checkpoints.missing_parts(str(tmp_path), None) == "folder is empty"


def test_missing_parts_vanished_folder(tmp_path):
    reason = checkpoints.missing_parts(str(tmp_path / "absent"), None)
    assert reason == "folder cannot be listed: No such file or directory"


def test_missing_parts_ready_marker(tmp_path):
    make(tmp_path / "_CHECKPOINT_METADATA")
    reason = checkpoints.missing_parts(str(tmp_path), "commit_success.txt")
    assert reason == "ready marker commit_success.txt not written yet"
    make(tmp_path / "commit_success.txt")
    assert checkpoints.missing_parts(str(tmp_path), "commit_success.txt") is None


def test_missing_parts_distcp_metadata(tmp_path):
    make(tmp_path / "__0_0.distcp")
    make(tmp_path / "__1_0.distcp")
    reason = checkpoints.missing_parts(str(tmp_path), None)
    assert reason == ".metadata of the distributed checkpoint not written yet"
    make(tmp_path / ".metadata")
    assert checkpoints.missing_parts(str(tmp_path), None) is None


def test_missing_parts_distcp_in_subfolder(tmp_path):
    make(tmp_path / "trainer_state.json")
    make(tmp_path / "pytorch_model_fsdp_0" / "__0_0.distcp")
    reason = checkpoints.missing_parts(str(tmp_path), None)
    assert reason == "pytorch_model_fsdp_0/: .metadata of the distributed checkpoint not written yet"
    make(tmp_path / "pytorch_model_fsdp_0" / ".metadata")
    assert checkpoints.missing_parts(str(tmp_path), None) is None


def test_missing_parts_shard_index(tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1], "c.weight": shards[1]}}
    make(tmp_path / "model.safetensors.index.json", json.dumps(index).encode())
    make(tmp_path / shards[0])
    reason = checkpoints.missing_parts(str(tmp_path), None)
    assert reason == f"model.safetensors.index.json lists shards not written yet: {shards[1]}"
    make(tmp_path / shards[1])
    assert checkpoints.missing_parts(str(tmp_path), None) is None


@pytest.mark.parametrize("content", [b'{"weight_map": {"a": "model-0', b"[]", b'{"weight_map": {"a": 1}}'])
def test_missing_parts_bad_index(tmp_path, content):
    make(tmp_path / "pytorch_model.bin.index.json", content)
    reason = checkpoints.missing_parts(str(tmp_path), None)
    expected = "pytorch_model.bin.index.json lists shards not written yet: "
    assert reason == expected + "pytorch_model.bin.index.json (unreadable or half-written)"


@pytest.mark.parametrize(
    "relative, regex, step",
    [
        ("model_epoch3.pt", DEFAULT_REGEX, 3),
        ("checkpoint-500", FOLDER_REGEX, 500),
        ("run2/global_step700", r"^.*global_step\d+$", 700),
        ("epoch=3-step=1000.ckpt", DEFAULT_REGEX, 1000),
        ("checkpoint-500.h5", r"^.*\.h5$", 500),
        ("model-300.bf16.safetensors", r"^.*\.safetensors$", 300),
        ("weights.e10.pt", DEFAULT_REGEX, 10),
        ("model.epoch3", r"^model\.epoch\d+$", 3),
        ("run7/10", r"^run\d+/\d+$", 10),
        ("run7/ckpt_40_of_100.pt", r"^run\d+/ckpt_(?P<step>\d+)_of_\d+\.pt$", 40),
        ("ckpt-last-40.pt", r"^ckpt-(?P<step>[a-z]+)-\d+\.pt$", 40),
        ("model.pt", DEFAULT_REGEX, None),
        ("best.h5", r"^.*\.h5$", None),
    ],
)
def test_step_of(relative, regex, step):
    assert checkpoints.step_of(relative, re.compile(regex)) == step


def folder_checkpoint(fingerprint: str, modified: float = 100.0) -> Checkpoint:
    return Checkpoint(fingerprint, modified, is_dir=True)


A = Checkpoint("5:1", 100.0, is_dir=False)
A2 = Checkpoint("9:2", 104.0, is_dir=False)
B = Checkpoint("7:3", 100.0, is_dir=False)


def test_plan_new_version_pending():
    assert plan({"a.pt": A}, {}, {}, now=110.0, settle_seconds=5) == Plan(pending={"a.pt": Pending("5:1", 110.0)})


def test_plan_unchanged_before_settled():
    pending = {"a.pt": Pending("5:1", 110.0)}
    result = plan({"a.pt": A}, {}, pending, now=114.9, settle_seconds=5)
    assert result == Plan(pending={"a.pt": Pending("5:1", 110.0)})


def test_plan_unchanged_when_settled():
    pending = {"a.pt": Pending("5:1", 110.0)}
    assert plan({"a.pt": A}, {}, pending, now=115.0, settle_seconds=5) == Plan(ready={"a.pt": A})


def test_plan_changed_restarts_settling():
    pending = {"a.pt": Pending("5:1", 110.0)}
    result = plan({"a.pt": A2}, {}, pending, now=115.0, settle_seconds=5)
    assert result == Plan(pending={"a.pt": Pending("9:2", 115.0)})


def test_plan_keeps_reported_flag():
    pending = {"ckpt-1": Pending("d1:5:1", 110.0, reported=True)}
    result = plan({"ckpt-1": folder_checkpoint("d1:5:1")}, {}, pending, now=112.0, settle_seconds=5)
    assert result == Plan(pending={"ckpt-1": Pending("d1:5:1", 110.0, reported=True)})


def test_plan_known_version_ignored():
    assert plan({"a.pt": A}, {"a.pt": "5:1"}, {}, now=110.0, settle_seconds=5) == Plan()


def test_plan_replaced_version_pending():
    result = plan({"a.pt": A2}, {"a.pt": "5:1"}, {}, now=110.0, settle_seconds=5)
    assert result == Plan(pending={"a.pt": Pending("9:2", 110.0)})


def test_plan_zero_settle_ready_at_once():
    assert plan({"a.pt": A}, {}, {}, now=110.0, settle_seconds=0) == Plan(ready={"a.pt": A})


def test_plan_gone_and_dropped():
    pending = {"b.pt": Pending("7:3", 110.0)}
    result = plan({}, {"a.pt": "5:1"}, pending, now=111.0, settle_seconds=5)
    assert result == Plan(gone=["a.pt"])


def test_plan_baseline_records_known():
    result = plan({"a.pt": A, "b.pt": B}, {}, {}, now=110.0, settle_seconds=5, baseline=True)
    assert result == Plan(known={"a.pt": "5:1", "b.pt": "7:3"})


def test_plan_backfill():
    listing = {"a.pt": A, "b.pt": A2}
    result = plan(listing, {"a.pt": "5:1"}, {}, now=106.0, settle_seconds=5, backfill=True)
    assert result == Plan(ready={"a.pt": A}, pending={"b.pt": Pending("9:2", 106.0)})


def test_describe_matches_scan(tmp_path):
    make(tmp_path / "model_epoch1.pt", b"abc")
    make(tmp_path / "checkpoint-5" / "weights.bin", b"abcd")
    listing = checkpoints.scan(str(tmp_path), checkpoints.compile_filter(r"^(.*\.pt|checkpoint-\d+)$"))
    for relative, checkpoint in listing.items():
        assert checkpoints.describe(str(tmp_path / relative)) == checkpoint
    assert checkpoints.describe(str(tmp_path / "gone.pt")) is None


def test_modified_ns_of_fingerprints():
    assert checkpoints.modified_ns("123:1700000000000000000") == 1700000000000000000
    assert checkpoints.modified_ns("d4:4096:1700000000000000001") == 1700000000000000001


def test_fifo_index_is_not_opened(tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors.index.json")
    assert checkpoints.missing_parts(str(folder), None) == (
        "model.safetensors.index.json lists shards not written yet: model.safetensors.index.json (not a regular file)"
    )
