"""The quick start: examples/digits/run.sh trains, evaluates every checkpoint, reports and shuts down."""

from __future__ import annotations

import json
import os
import re
import subprocess

from conftest import REPO


def test_digits_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    environment = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    environment.update(DIGITS_RUN_DIR=str(run_dir), DIGITS_EPOCHS="3")
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "digits" / "run.sh")],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    rows = re.findall(
        r"^\s+(\d)\s+model_epoch\d\.ckpt\s+finished\s+\S+\s+([\d.]+)\*?\s+([\d.]+)\*?", result.stdout, re.M
    )
    assert [step for step, _, _ in rows] == ["1", "2", "3"]
    for name in ("model_epoch1", "model_epoch2", "model_epoch3"):
        evaluation = json.loads((run_dir / "evals" / f"{name}.json").read_text())
        assert 0.8 < evaluation["accuracy"] <= 1.0
    assert (run_dir / "metrics.png").read_bytes().startswith(b"\x89PNG")

    started = [int(pid) for pid in re.findall(r"\(pool pid (\d+),", result.stdout)]
    server = re.search(r"stopped redis-server at .* \(pid (\d+)\)", result.stdout)
    assert len(started) == 2
    assert server is not None
    for pid in started + [int(server.group(1))]:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} still runs"
    assert "secret" not in result.stdout
