"""Tests of `python -m assayer.status`, run as a user runs it against a real Redis."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, run_command

from assayer import records
from assayer.config import WatchConfig

NOW = 2_000_000.0
REPO = Path(__file__).resolve().parent.parent


def register(connection, config: WatchConfig) -> None:
    connection.sadd(records.WATCHES_KEY, config.watch_id)
    connection.hset(
        records.watch_key(config.watch_id),
        mapping={"config": config.to_json(), "state": "active", "polled_at": repr(NOW)},
    )


def add_record(connection, config: WatchConfig, relative: str, step: int | None, **fields) -> None:
    """Store a queued record for `relative`, then set `fields` on it, storing a `result` as JSON."""
    version = records.version_of(relative, "1:1")
    with connection.pipeline() as pipeline:
        records.add(pipeline, config.watch_id, version, records.new_record(config, relative, "1:1", step, NOW))
        pipeline.execute()
    if "result" in fields:
        fields["result"] = records.to_json_text(fields["result"])
    if fields:
        records.update(connection, config.watch_id, version, **fields)


@pytest.fixture
def watches(connection, tmp_path) -> tuple[WatchConfig, WatchConfig]:
    """Two watches in real folders: exp1 with three checkpoints, exp2 with one."""
    exp1 = WatchConfig(directory=str(tmp_path / "exp1" / "ckpts"), evaluator="/runs/eval.py:evaluate")
    exp2 = WatchConfig(directory=str(tmp_path / "exp2" / "ckpts"), evaluator="/runs/eval.py:evaluate")
    for config in (exp1, exp2):
        os.makedirs(config.directory)
        register(connection, config)
    finished = {"state": records.FINISHED, "duration": 3.0}
    add_record(connection, exp1, "ckpt_100.pt", 100, result={"acc": 0.8, "loss": 0.5}, **finished)
    add_record(connection, exp1, "ckpt_200.pt", 200, result={"acc": 0.9, "loss": 0.4}, **finished)
    add_record(connection, exp1, "ckpt_300.pt", 300, state=records.FAILED, error="KeyError: 'model'")
    add_record(connection, exp2, "ckpt_50.pt", 50, result={"acc": 0.7, "bleu": 21.5}, **finished)
    return exp1, exp2


def status(settings, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_command("assayer.status", f"--redis_url={settings.url}", *args, **kwargs)


def test_table_output(settings, watches):
    exp1, exp2 = watches

    result = status(settings)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"watch {exp1.directory}  evaluator /runs/eval.py:evaluate  2 finished, 1 failed  (")
    assert lines[1:5] == [
        "step  name         state     duration   acc  loss  note",
        " 100  ckpt_100.pt  finished      3.0s  0.8   0.5",
        " 200  ckpt_200.pt  finished      3.0s  0.9*  0.4*",
        " 300  ckpt_300.pt  failed           -    -     -   KeyError: 'model'",
    ]
    assert lines[5] == ""
    assert lines[6].startswith(f"watch {exp2.directory}  evaluator /runs/eval.py:evaluate  1 finished  (")
    assert lines[7:] == [
        "step  name        state     duration   acc   bleu  note",
        "  50  ckpt_50.pt  finished      3.0s  0.7*  21.5*",
    ]


def test_json_output(settings, watches):
    exp1, exp2 = watches

    result = status(settings, "--format=json")

    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert [watch["directory"] for watch in output] == [exp1.directory, exp2.directory]
    assert [watch["counts"] for watch in output] == [{"finished": 2, "failed": 1}, {"finished": 1}]
    assert output[0]["best"] == {"acc": 0.9, "loss": 0.4}
    assert [record["metrics"] for record in output[0]["records"]] == [
        {"acc": 0.8, "loss": 0.5},
        {"acc": 0.9, "loss": 0.4},
        {},
    ]


def test_csv_output(settings, watches):
    exp1, exp2 = watches

    result = status(settings, "--format=csv")

    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(row["directory"], row["name"], row["state"]) for row in rows] == [
        (exp1.directory, "ckpt_100.pt", "finished"),
        (exp1.directory, "ckpt_200.pt", "finished"),
        (exp1.directory, "ckpt_300.pt", "failed"),
        (exp2.directory, "ckpt_50.pt", "finished"),
    ]
    assert rows[3] == {
        "directory": exp2.directory,
        "evaluator": "/runs/eval.py:evaluate",
        "step": "50",
        "name": "ckpt_50.pt",
        "state": "finished",
        "duration": "3.0",
        "error": "",
        "reason": "",
        "acc": "0.7",
        "loss": "",
        "bleu": "21.5",
    }


@pytest.mark.parametrize("spelling", ["{dir}", "{dir}/", "{dir}/../ckpts", "exp1/ckpts", "link"])
def test_directory_filter(settings, watches, tmp_path, spelling):
    exp1, _ = watches
    (tmp_path / "link").symlink_to(exp1.directory)

    result = status(settings, f"--directory={spelling.format(dir=exp1.directory)}", "--format=json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert [watch["directory"] for watch in json.loads(result.stdout)] == [exp1.directory]


def test_unknown_directory(settings, watches, tmp_path):
    exp1, exp2 = watches

    result = status(settings, f"--directory={tmp_path}/nope/")

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"status: error: --directory={tmp_path}/nope: no watch found on {settings.url}; "
        f"watched directories: {exp1.directory}, {exp2.directory}\n"
    )


def test_unreachable_redis(state_home):
    port = free_port()

    result = run_command("assayer.status", f"--redis_url=redis://127.0.0.1:{port}/0")

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"status: error: cannot reach Redis at redis://127.0.0.1:{port}/0 (")
    assert result.stderr.endswith("; start a Redis server there or point --redis_url at one\n")
    assert len(result.stderr.splitlines()) == 1


def test_invalid_redis_url(state_home):
    result = run_command("assayer.status", "--redis_url=http://127.0.0.1:1/0")

    assert result.returncode == 1
    assert result.stderr == (
        "status: error: --redis_url=http://127.0.0.1:1/0 is invalid: the scheme must be redis://, rediss:// "
        "or unix://, e.g. redis://localhost:6379/0\n"
    )


def test_redis_url_from_environment(settings, watches):
    result = run_command("assayer.status", "--format=json", env={"REDIS_URL": settings.url})

    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 2


def test_no_watches(settings):
    table = status(settings)
    as_json = status(settings, "--format=json")

    assert table.returncode == 0
    assert table.stdout == f"no watches on {settings.url}; start one with python -m assayer.watch\n"
    assert as_json.returncode == 0
    assert as_json.stdout == "[]\n"
    assert as_json.stderr.endswith(f"no watches on {settings.url}; start one with python -m assayer.watch\n")


def test_rejects_positional_arguments(settings):
    result = status(settings, "extra")

    assert result.returncode == 1
    assert result.stderr == "status: error: unexpected positional arguments: extra; pass options as --flag=value\n"


def test_follow_rejects_json(settings):
    result = status(settings, "--follow", "--format=json")

    assert result.returncode == 1
    assert result.stderr == "status: error: --follow redraws a table and cannot be used with --format=json\n"


def test_help_lists_redis_flags():
    # absl exits with status 1 after printing --help.
    result = run_command("assayer.status", "--help")

    assert "--redis_url" in result.stdout
    assert "--redis_port" in result.stdout


def png_size(path: Path) -> tuple[int, int]:
    """Return the width and height in a PNG's IHDR chunk after checking its signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_written(settings, watches, tmp_path):
    path = tmp_path / "plots" / "metrics.png"
    path.parent.mkdir()

    result = status(settings, f"--plot={path}")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"plot of 3 metrics written to {path}"
    # Three panels in one row of 5 x 3.5 inches each, at 100 dpi.
    assert png_size(path) == (1500, 350)


def test_plot_message_on_stderr_with_csv(settings, watches, tmp_path):
    path = tmp_path / "metrics.png"

    result = status(settings, f"--plot={path}", "--format=csv")

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == f"plot of 3 metrics written to {path}"
    assert len(list(csv.DictReader(io.StringIO(result.stdout)))) == 4


def test_plot_into_missing_folder(settings, watches, tmp_path):
    path = tmp_path / "missing" / "metrics.png"

    result = status(settings, f"--plot={path}")

    assert result.returncode == 1
    assert result.stderr == f"status: error: writing --plot={path} failed: No such file or directory\n"


@pytest.mark.timeout(60)
def test_follow_redraws_until_interrupted(settings, watches):
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "assayer.status", f"--redis_url={settings.url}", "--follow", "--interval=0.2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    headers = 0
    output = []
    # Two frames prove a redraw. Because stdout is a pipe, the frames follow each other without clearing.
    while headers < 2:
        line = process.stdout.readline()
        assert line, f"status --follow ended early: {process.stderr.read()}"
        output.append(line)
        headers += line.startswith(f"{settings.url}  ") and line.rstrip().endswith("every 0.2s, Ctrl+C to stop")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)

    assert process.returncode == 0
    assert "Traceback" not in stderr
    assert "\x1b[2J" not in "".join(output) + stdout
    assert any(line.startswith(" 200  ckpt_200.pt  finished") for line in output)
