"""Tests of the table, JSON, CSV and plot views of evaluation records read back from a real Redis."""

from __future__ import annotations

import csv
import io
import json
import sys

import numpy as np
import pytest

from assayer import records, report
from assayer.config import WatchConfig
from assayer.errors import UsageError

NOW = 2_000_000.0
"""The Unix time the tables are drawn at, so that ages in them are fixed."""

EXP1 = WatchConfig(directory="/runs/exp1/ckpts", evaluator="/runs/eval.py:evaluate")
EXP2 = WatchConfig(directory="/runs/exp2/ckpts", evaluator="/runs/eval.py:evaluate")


def register(connection, config: WatchConfig, state: str = "active", polled_at: float = NOW - 4) -> None:
    connection.sadd(records.WATCHES_KEY, config.watch_id)
    fields = {"config": config.to_json(), "state": state, "polled_at": repr(polled_at)}
    connection.hset(records.watch_key(config.watch_id), mapping=fields)


def add_record(connection, config: WatchConfig, relative: str, step: int | None, **fields) -> str:
    """Store a queued record for `relative`, then set `fields` on it, storing a `result` as JSON."""
    fingerprint = f"{len(relative)}:1"
    version = records.version_of(relative, fingerprint)
    with connection.pipeline() as pipeline:
        records.add(pipeline, config.watch_id, version, records.new_record(config, relative, fingerprint, step, NOW))
        pipeline.execute()
    if "result" in fields:
        fields["result"] = records.to_json_text(fields["result"])
    if fields:
        records.update(connection, config.watch_id, version, **fields)
    return version


def load(connection) -> list[report.WatchRecords]:
    return [
        report.WatchRecords(config, status, records.load_all(connection, config.watch_id))
        for config, status in records.load_watches(connection)
    ]


def add_exp1(connection) -> None:
    """Store a watch with two finished, one failed, one skipped and one queued checkpoint."""
    register(connection, EXP1)
    finished = {"state": records.FINISHED, "started_at": NOW - 100, "ended_at": NOW - 90}
    add_record(
        connection, EXP1, "ckpt_200.pt", 200, result={"acc": 0.9, "eval": {"loss": 0.3}}, duration=12.34, **finished
    )
    add_record(
        connection, EXP1, "ckpt_20.pt", 20, result={"acc": 0.8, "eval": {"loss": 0.5}}, duration=75.0, **finished
    )
    add_record(
        connection, EXP1, "ckpt_300.pt", 300, state=records.FAILED, error="ValueError: bad shape",
        started_at=NOW - 50, ended_at=NOW - 48, attempts=1,
    )  # fmt: skip
    add_record(
        connection, EXP1, "final.pt", None, state=records.SKIPPED, reason="deleted before its evaluation started",
        started_at=NOW - 30, ended_at=NOW - 29, attempts=1,
    )  # fmt: skip
    add_record(connection, EXP1, "ckpt_400.pt", 400)


# Metrics


def test_metrics_of_flattens_nested_dicts():
    result = {"eval": {"acc": 0.9, "deep": {"f1": 1}}, "ok": True, "note": "fine", "curve": [1, 2], "none": None}

    assert report.metrics_of(result) == {"eval.acc": 0.9, "eval.deep.f1": 1, "ok": 1}


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (3.5, {"result": 3.5}),
        (7, {"result": 7}),
        (False, {"result": 0}),
        ("<Tensor object at 0x1>", {}),
        ([0.1, 0.2], {}),
        (None, {}),
        ({}, {}),
    ],
)
def test_metrics_of_bare_values(result, expected):
    assert report.metrics_of(result) == expected


def test_metrics_of_numpy_scalars():
    result = {"acc": np.float32(0.5), "count": np.int64(3), "eval": {"mse": np.float64(0.25)}}

    assert report.metrics_of(result) == {"acc": 0.5, "count": 3, "eval.mse": 0.25}


def test_metrics_of_numpy_scalars_stored_in_redis(connection):
    register(connection, EXP1)
    result = {"acc": np.float32(0.5), "count": np.int64(3), "flag": np.bool_(True), "eval": {"mse": np.float64(0.25)}}
    add_record(connection, EXP1, "ckpt_1.pt", 1, state=records.FINISHED, result=result)

    [watch] = load(connection)

    assert report.metrics_of(watch.records[0]["result"]) == {"acc": 0.5, "count": 3, "flag": 1, "eval.mse": 0.25}


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("loss", True),
        ("val_loss", True),
        ("eval.loss", True),
        ("valLoss", True),
        ("train-losses", True),
        ("top1_err", True),
        ("error_rate", True),
        ("eval.wer", True),
        ("CER", True),
        ("perplexity", True),
        ("ppl", True),
        ("mse", True),
        ("mae", True),
        ("rmse", True),
        ("acc", False),
        ("result", False),
        ("answer_acc", False),
        ("power", False),
        ("inferred_f1", False),
    ],
)
def test_lower_is_better(metric, expected):
    assert report.lower_is_better(metric) is expected


def test_best_values_by_direction():
    rows = [{"result": {"acc": 0.8, "loss": 0.5}}, {"result": {"acc": 0.9, "loss": 0.7}}, {"result": None}]

    assert report.best_values(rows) == {"acc": 0.9, "loss": 0.5}


def test_sort_records_by_number_then_name():
    rows = [{"name": "b.pt"}, {"name": "x100.pt", "step": 100}, {"name": "a.pt"}, {"name": "x20.pt", "step": 20}]

    assert [row["name"] for row in report.sort_records(rows)] == ["x20.pt", "x100.pt", "a.pt", "b.pt"]


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.04, "0.0s"), (12.34, "12.3s"), (75, "1m15s"), (7260, "2h01m"), (2 * 86400 + 3 * 3600, "2d03h")],
)
def test_format_duration(seconds, expected):
    assert report.format_duration(seconds) == expected


# Table


def test_table_rows_sorted_with_best_marks(connection):
    add_exp1(connection)

    table = report.format_table(load(connection), now=NOW)

    assert table.splitlines() == [
        "watch /runs/exp1/ckpts  evaluator /runs/eval.py:evaluate  2 finished, 1 failed, 1 skipped, 1 queued"
        "  (active, polled 4.0s ago)",
        "step  name         state     duration   acc  eval.loss  note",
        "  20  ckpt_20.pt   finished     1m15s  0.8        0.5",
        " 200  ckpt_200.pt  finished     12.3s  0.9*       0.3*",
        " 300  ckpt_300.pt  failed        2.0s    -          -   ValueError: bad shape",
        " 400  ckpt_400.pt  queued           -    -          -",
        "   -  final.pt     skipped          -    -          -   deleted before its evaluation started",
    ]


def test_table_notes_for_retries_and_running(connection):
    register(connection, EXP1)
    add_record(
        connection, EXP1, "a_1.pt", 1, state=records.FAILED, error="RuntimeError: CUDA out of memory", attempts=3
    )
    add_record(connection, EXP1, "a_2.pt", 2, state=records.QUEUED, error="OSError: disk full", attempts=1)
    add_record(connection, EXP1, "a_3.pt", 3, state=records.STARTED, started_at=NOW - 30, worker="gpu-host.4242")
    add_record(connection, EXP1, "a_4.pt", 4, state=records.QUEUED, error=records.STOPPED_ERROR, attempts=1)

    lines = report.format_table(load(connection), now=NOW).splitlines()

    assert lines[2:] == [
        "   1  a_1.pt  failed          -  RuntimeError: CUDA out of memory (after 3 attempts)",
        "   2  a_2.pt  queued          -  attempt 1 failed, queued for a retry: OSError: disk full",
        "   3  a_3.pt  started         -  running for 30.0s on gpu-host.4242",
        "   4  a_4.pt  queued          -  stopped by a forced shutdown; evaluated again when the watch resumes",
    ]


def test_table_ties_all_marked_best(connection):
    register(connection, EXP1)
    add_record(connection, EXP1, "a_1.pt", 1, state=records.FINISHED, result={"loss": 0.5})
    add_record(connection, EXP1, "a_2.pt", 2, state=records.FINISHED, result={"loss": 0.5})
    add_record(connection, EXP1, "a_3.pt", 3, state=records.FINISHED, result={"loss": 0.75})

    lines = report.format_table(load(connection), now=NOW).splitlines()

    assert [line.split()[-1] for line in lines[2:]] == ["0.5*", "0.5*", "0.75"]


def test_table_bare_number_result(connection):
    register(connection, EXP1)
    add_record(connection, EXP1, "a_1.pt", 1, state=records.FINISHED, result=0.25, duration=1.0)
    add_record(connection, EXP1, "a_2.pt", 2, state=records.FINISHED, result="not a number", duration=1.0)

    lines = report.format_table(load(connection), now=NOW).splitlines()

    assert lines[1:] == [
        "step  name    state     duration  result  note",
        "   1  a_1.pt  finished      1.0s   0.25*",
        "   2  a_2.pt  finished      1.0s      -",
    ]


def test_table_escapes_odd_names(connection):
    odd = WatchConfig(directory="/runs/odd\ndir\udcff", evaluator="/runs/eval.py:evaluate")
    register(connection, odd)
    add_record(connection, odd, "line\nbreak_1.pt", 1, state=records.FINISHED, result={"a\tb": 1.0})
    add_record(connection, odd, "tab\there_2.pt", 2, state=records.SKIPPED, reason="gone\nreally")

    lines = report.format_table(load(connection), now=NOW).splitlines()

    assert len(lines) == 4
    assert lines[0].startswith("watch '/runs/odd\\ndir\\udcff'  evaluator /runs/eval.py:evaluate  ")
    assert lines[1] == "step  name                state     duration  'a\\tb'  note"
    assert lines[2] == "   1  'line\\nbreak_1.pt'  finished         -      1*"
    assert lines[3] == "   2  'tab\\there_2.pt'    skipped          -      -   'gone\\nreally'"


def test_table_metric_named_like_column(connection):
    register(connection, EXP1)
    add_record(connection, EXP1, "a_1.pt", 1, state=records.FINISHED, result={"step": 10, "name": 2})

    lines = report.format_table(load(connection), now=NOW).splitlines()

    assert lines[1] == "step  name    state     duration  metric.step  metric.name  note"


def test_table_several_watches(connection):
    add_exp1(connection)
    register(connection, EXP2, state="stopped")

    lines = report.format_table(load(connection), now=NOW).splitlines()

    assert lines[-2:] == [
        "",
        "watch /runs/exp2/ckpts  evaluator /runs/eval.py:evaluate  no checkpoints yet  (stopped, polled 4.0s ago)",
    ]


# JSON


def test_json_watch_fields_and_records(connection):
    add_exp1(connection)
    [watch] = load(connection)

    [output] = json.loads(report.format_json([watch]))

    assert output["watch_id"] == EXP1.watch_id
    assert output["directory"] == "/runs/exp1/ckpts"
    assert output["evaluator"] == "/runs/eval.py:evaluate"
    assert output["regex"] == EXP1.regex
    assert output["status"] == {"state": "active", "polled_at": NOW - 4}
    assert output["counts"] == {"finished": 2, "failed": 1, "skipped": 1, "queued": 1}
    assert output["best"] == {"acc": 0.9, "eval.loss": 0.3}
    assert [record["name"] for record in output["records"]] == [
        "ckpt_20.pt",
        "ckpt_200.pt",
        "ckpt_300.pt",
        "ckpt_400.pt",
        "final.pt",
    ]


def test_json_record_has_result_and_metrics(connection):
    add_exp1(connection)
    [watch] = load(connection)
    version = records.version_of("ckpt_200.pt", "11:1")

    [output] = json.loads(report.format_json([watch]))

    assert output["records"][1] == {
        "watch": EXP1.watch_id,
        "path": "/runs/exp1/ckpts/ckpt_200.pt",
        "name": "ckpt_200.pt",
        "fingerprint": "11:1",
        "state": "finished",
        "enqueued_at": NOW,
        "started_at": NOW - 100,
        "ended_at": NOW - 90,
        "duration": 12.34,
        "attempts": 0,
        "job_id": records.eval_job_id(EXP1.watch_id, version),
        "step": 200,
        "result": {"acc": 0.9, "eval": {"loss": 0.3}},
        "metrics": {"acc": 0.9, "eval.loss": 0.3},
    }


def test_json_failed_record(connection):
    add_exp1(connection)
    [watch] = load(connection)

    [output] = json.loads(report.format_json([watch]))

    failed = output["records"][2]
    assert failed["state"] == "failed"
    assert failed["error"] == "ValueError: bad shape"
    assert failed["metrics"] == {}
    assert "result" not in failed


def test_json_escapes_odd_names(connection):
    odd = WatchConfig(directory="/runs/odd\ndir\udcff", evaluator="/runs/eval.py:evaluate")
    register(connection, odd)
    add_record(connection, odd, "line\nbreak_1.pt", 1)

    text = report.format_json(load(connection))
    [output] = json.loads(text)

    assert text.isascii()
    assert output["directory"] == "/runs/odd\ndir\udcff"
    assert output["records"][0]["name"] == "line\nbreak_1.pt"


# CSV


def test_csv_rows(connection):
    add_exp1(connection)
    register(connection, EXP2)
    add_record(connection, EXP2, "ckpt_5.pt", 5, state=records.FINISHED, result={"f1": 0.5}, duration=2.5)

    rows = list(csv.DictReader(io.StringIO(report.format_csv(load(connection)))))

    exp1 = {"directory": "/runs/exp1/ckpts", "evaluator": "/runs/eval.py:evaluate"}
    empty = {"duration": "", "error": "", "reason": "", "acc": "", "eval.loss": "", "f1": ""}
    assert rows == [
        {**exp1, **empty, "step": "20", "name": "ckpt_20.pt", "state": "finished", "duration": "75.0",
         "acc": "0.8", "eval.loss": "0.5"},
        {**exp1, **empty, "step": "200", "name": "ckpt_200.pt", "state": "finished", "duration": "12.34",
         "acc": "0.9", "eval.loss": "0.3"},
        {**exp1, **empty, "step": "300", "name": "ckpt_300.pt", "state": "failed", "duration": "2.0",
         "error": "ValueError: bad shape"},
        {**exp1, **empty, "step": "400", "name": "ckpt_400.pt", "state": "queued"},
        {**exp1, **empty, "step": "", "name": "final.pt", "state": "skipped",
         "reason": "deleted before its evaluation started"},
        {**empty, "directory": "/runs/exp2/ckpts", "evaluator": "/runs/eval.py:evaluate", "step": "5",
         "name": "ckpt_5.pt", "state": "finished", "duration": "2.5", "f1": "0.5"},
    ]  # fmt: skip


def test_csv_header(connection):
    add_exp1(connection)

    header = report.format_csv(load(connection)).splitlines()[0]

    assert header == "directory,evaluator,step,name,state,duration,error,reason,acc,eval.loss"


def test_csv_odd_names_and_clashing_metrics(connection):
    odd = WatchConfig(directory="/runs/odd,dir\udcff", evaluator="/runs/eval.py:evaluate")
    register(connection, odd)
    add_record(connection, odd, 'line\nbreak "1".pt', 1, state=records.FINISHED, result={"state": 1.5})

    text = report.format_csv(load(connection))
    rows = list(csv.DictReader(io.StringIO(text)))

    assert len(rows) == 1
    assert rows[0]["directory"] == "/runs/odd,dir\ufffd"
    assert rows[0]["name"] == 'line\nbreak "1".pt'
    assert rows[0]["state"] == "finished"
    assert rows[0]["metric.state"] == "1.5"


def test_csv_without_watches():
    assert report.format_csv([]) == "directory,evaluator,step,name,state,duration,error,reason\n"


# Plot


def test_plot_one_panel_per_metric(connection, tmp_path):
    add_exp1(connection)
    register(connection, EXP2)
    add_record(connection, EXP2, "ckpt_5.pt", 5, state=records.FINISHED, result={"f1": 0.5, "acc": 0.7})
    path = tmp_path / "metrics.png"

    metrics = report.plot(load(connection), str(path))

    assert metrics == ["acc", "eval.loss", "f1"]
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_ticks_whole_steps(connection):
    register(connection, EXP1)
    for epoch in (1, 2, 3):
        add_record(connection, EXP1, f"epoch{epoch}.pt", epoch, state=records.FINISHED, result={"acc": epoch / 4})

    figure, metrics = report.metrics_figure(load(connection))

    assert metrics == ["acc"]
    ticks = list(figure.axes[0].get_xticks())
    assert ticks
    assert all(tick == int(tick) for tick in ticks)


def test_plot_without_stepped_metrics(connection, tmp_path):
    register(connection, EXP1)
    add_record(connection, EXP1, "final.pt", None, state=records.FINISHED, result={"acc": 0.9})
    path = tmp_path / "metrics.png"

    assert report.plot(load(connection), str(path)) == []
    assert not path.exists()


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)

    with pytest.raises(UsageError) as raised:
        report.plot([], str(tmp_path / "metrics.png"))

    assert str(raised.value) == "--plot needs matplotlib; pip install matplotlib"


def test_render_rejects_unknown_format():
    with pytest.raises(ValueError, match="unknown output format 'xml'"):
        report.render([], "xml")
