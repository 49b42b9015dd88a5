"""Tables, JSON, CSV and plots of watches and their evaluation records.

Everything here is a pure function of data already read from Redis, except `plot`, which writes a file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import numbers
import os
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from assayer import records as records_module
from assayer.config import WatchConfig
from assayer.errors import UsageError

FORMATS = ("table", "json", "csv")

LOWER_IS_BETTER_WORDS = frozenset({"loss", "error", "err", "perplexity", "ppl", "wer", "cer", "mse", "mae", "rmse"})
"""Words that make a metric lower-is-better when they appear in its name as a whole word."""

STATE_ORDER = (
    records_module.FINISHED,
    records_module.FAILED,
    records_module.SKIPPED,
    records_module.STARTED,
    records_module.QUEUED,
)
"""The order of the per-state counts in a table header."""

TABLE_COLUMNS = ("step", "name", "state", "duration", "note")
CSV_COLUMNS = ("directory", "evaluator", "step", "name", "state", "duration", "error", "reason")
METRIC_PREFIX = "metric."
"""Prefix given to a metric whose name equals one of the fixed columns of a table or CSV."""

_WORD_BOUNDARY = re.compile(r"[^a-zA-Z]+|(?<=[a-z])(?=[A-Z])")


@dataclasses.dataclass(frozen=True)
class WatchRecords:
    """One watch as read from Redis: its config, its status fields and its evaluation records."""

    config: WatchConfig
    status: dict[str, str]
    records: list[dict[str, Any]]


def metrics_of(result: Any) -> dict[str, float | int]:
    """Return the scalar metrics in an evaluator's result, keyed by metric name.

    Numbers are metrics, and booleans become 1 and 0. Nested dicts flatten with dots, so that
    `{"eval": {"acc": 0.9}}` gives `eval.acc`. A result that is a bare number is one metric named
    `result`. Strings, lists, None and non-finite numbers are not metrics.

    NOTE: `records.to_json_text` stores NaN and infinities as the strings `'nan'` and `'inf'`, so a
    diverged loss read back from Redis shows as missing rather than as NaN.
    """
    if isinstance(result, dict):
        metrics: dict[str, float | int] = {}
        _flatten(result, "", metrics)
        return metrics
    value = _scalar(result)
    return {} if value is None else {"result": value}


def _flatten(values: dict, prefix: str, metrics: dict[str, float | int]) -> None:
    for key, item in values.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            _flatten(item, name + ".", metrics)
            continue
        value = _scalar(item)
        if value is not None:
            metrics[name] = value


def _scalar(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return None


def lower_is_better(metric: str) -> bool:
    """Return whether a smaller value of `metric` is the better one.

    A metric is lower-is-better when its name contains one of the words loss, error, err, perplexity,
    ppl, wer, cer, mse, mae or rmse, in any case and optionally with a plural `s` or `es`. Words are
    separated by anything that is not a letter (`.`, `_`, `-`, digits, spaces) and by a change from a
    lowercase to an uppercase letter: `val_loss`, `eval.wer`, `top1_err` and `valLoss` are
    lower-is-better, while `answer_acc` and `power` are not. Every other metric is higher-is-better.
    """
    for word in _WORD_BOUNDARY.split(metric):
        word = word.lower()
        if word in LOWER_IS_BETTER_WORDS or word.removesuffix("s") in LOWER_IS_BETTER_WORDS:
            return True
        if word.endswith("es") and word[:-2] in LOWER_IS_BETTER_WORDS:
            return True
    return False


def sort_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the records sorted by step and then by name. Records without a step come last, sorted by name."""
    return sorted(records, key=lambda record: (record.get("step") is None, record.get("step") or 0, record["name"]))


def count_states(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Count the records in each state, ordered as `STATE_ORDER` and then unknown states, without zeros."""
    counts: dict[str, int] = {}
    for record in records:
        state = record.get("state", "unknown")
        counts[state] = counts.get(state, 0) + 1
    known = {state: counts[state] for state in STATE_ORDER if state in counts}
    unknown = {state: counts[state] for state in sorted(counts) if state not in known}
    return {**known, **unknown}


def metric_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Return the names of every scalar metric in the records' results, in order of first appearance."""
    names: dict[str, None] = {}
    for record in records:
        for name in metrics_of(record.get("result")):
            names.setdefault(name, None)
    return list(names)


def best_values(records: Iterable[dict[str, Any]]) -> dict[str, float | int]:
    """Return the best value of each metric over the records, by the rule of `lower_is_better`."""
    best: dict[str, float | int] = {}
    for record in records:
        for name, value in metrics_of(record.get("result")).items():
            if name not in best:
                best[name] = value
            elif lower_is_better(name):
                best[name] = min(best[name], value)
            else:
                best[name] = max(best[name], value)
    return best


def display_text(text: str) -> str:
    """Return `text` unchanged when it prints on one line, else its Python repr with quotes and escapes.

    Newlines, tabs, other control characters and the lone surrogates of undecodable file names are
    escaped this way, so that every name stays on its own row of a table.
    """
    return text if text.isprintable() else repr(text)


def render(watches: Sequence[WatchRecords], output_format: str, now: float | None = None) -> str:
    """Format the watches as `table`, `json` or `csv` text, ending with a newline."""
    if output_format == "table":
        return format_table(watches, now)
    if output_format == "json":
        return format_json(watches)
    if output_format == "csv":
        return format_csv(watches)
    raise ValueError(f"unknown output format {output_format!r}; expected one of {', '.join(FORMATS)}")


def format_table(watches: Sequence[WatchRecords], now: float | None = None) -> str:
    """Format each watch as a header line and an aligned table, with blank lines between watches.

    `now` is the Unix time that "polled 3s ago" is measured from, by default the current time.
    """
    now = time.time() if now is None else now
    return "\n".join(_format_watch_table(watch, now) for watch in watches)


def _format_watch_table(watch: WatchRecords, now: float) -> str:
    lines = [_header_line(watch, now)]
    if not watch.records:
        return lines[0] + "\n"
    records = sort_records(watch.records)
    metrics = metric_names(records)
    best = best_values(records)
    metric_headers = [display_text(name) for name in _metric_columns(metrics, TABLE_COLUMNS)]
    headers = ["step", "name", "state", "duration", *metric_headers, "note"]
    rows = [_table_row(record, metrics, best, now) for record in records]
    lines.extend(_align([headers, *rows], right_aligned={0, 3, *range(4, 4 + len(metrics))}))
    return "\n".join(lines) + "\n"


def _header_line(watch: WatchRecords, now: float) -> str:
    counts = count_states(watch.records)
    summary = ", ".join(f"{count} {state}" for state, count in counts.items()) or "no checkpoints yet"
    directory = display_text(watch.config.directory)
    line = f"watch {directory}  evaluator {display_text(watch.config.evaluator)}  {summary}"
    status = _status_text(watch.status, now)
    return f"{line}  ({status})" if status else line


def _status_text(status: dict[str, str], now: float) -> str:
    parts = [display_text(status["state"])] if status.get("state") else []
    polled_at = _float_or_none(status.get("polled_at"))
    if polled_at is not None:
        parts.append(f"polled {format_duration(max(0.0, now - polled_at))} ago")
    return ", ".join(parts)


def _table_row(record: dict[str, Any], metrics: list[str], best: dict[str, float | int], now: float) -> list[str]:
    values = metrics_of(record.get("result"))
    cells = [
        str(record["step"]) if "step" in record else "-",
        display_text(record["name"]),
        display_text(record.get("state", "unknown")),
        "-" if duration_of(record) is None else format_duration(duration_of(record)),
    ]
    for name in metrics:
        if name not in values:
            cells.append("- ")
            continue
        mark = "*" if values[name] == best[name] else " "
        cells.append(format_number(values[name]) + mark)
    cells.append(_note(record, now))
    return cells


def _note(record: dict[str, Any], now: float) -> str:
    state = record.get("state")
    if state == records_module.FAILED:
        error = display_text(record.get("error", ""))
        attempts = record.get("attempts", 0)
        return f"{error} (after {attempts} attempts)" if attempts > 1 else error
    if state == records_module.SKIPPED:
        return display_text(record.get("reason", ""))
    if state == records_module.QUEUED and record.get("error") == records_module.STOPPED_ERROR:
        return display_text(record["error"])  # A stop is not a failed attempt.
    if state == records_module.QUEUED and record.get("error"):
        return f"attempt {record.get('attempts', 0)} failed, queued for a retry: {display_text(record['error'])}"
    if state == records_module.STARTED and "started_at" in record:
        running = f"running for {format_duration(max(0.0, now - record['started_at']))}"
        return f"{running} on {display_text(record['worker'])}" if record.get("worker") else running
    return ""


def _align(rows: list[list[str]], right_aligned: set[int]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    last = len(widths) - 1
    lines = []
    for row in rows:
        cells = []
        for column, cell in enumerate(row):
            if column == last:
                cells.append(cell)
            elif column in right_aligned:
                cells.append(cell.rjust(widths[column]))
            else:
                cells.append(cell.ljust(widths[column]))
        lines.append("  ".join(cells).rstrip())
    return lines


def duration_of(record: dict[str, Any]) -> float | None:
    """Return the seconds an evaluation took, or None when it has not ended or the evaluator never ran.

    A finished record stores its duration. A failed one has none, so it is taken from its start and end times.
    A skipped one has start and end times too, of the job that found the checkpoint gone, but no duration.
    """
    if record.get("state") == records_module.SKIPPED:
        return None
    if "duration" in record:
        return record["duration"]
    if "started_at" in record and "ended_at" in record:
        return max(0.0, record["ended_at"] - record["started_at"])
    return None


def format_duration(seconds: float) -> str:
    """Format seconds as `12.3s` under a minute, `4m05s` under an hour, `2h07m` under a day, else `3d04h`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_number(value: float | int) -> str:
    """Format a metric value with up to six significant digits. Integers print in full."""
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def format_json(watches: Sequence[WatchRecords]) -> str:
    """Format the watches as a JSON list.

    Each watch has its config fields, `watch_id`, `status`, `counts` per state, `best` value per metric
    and `records`. Each record has its stored fields, including the raw `result`, and `metrics`.
    """
    return json.dumps([_watch_json(watch) for watch in watches], indent=2) + "\n"


def _watch_json(watch: WatchRecords) -> dict[str, Any]:
    records = sort_records(watch.records)
    return {
        "watch_id": watch.config.watch_id,
        **dataclasses.asdict(watch.config),
        "status": _status_json(watch.status),
        "counts": count_states(records),
        "best": best_values(records),
        "records": [{**record, "metrics": metrics_of(record.get("result"))} for record in records],
    }


def _status_json(status: dict[str, str]) -> dict[str, Any]:
    fields: dict[str, Any] = dict(status)
    for name, value in status.items():
        if name.endswith("_at"):
            number = _float_or_none(value)
            fields[name] = value if number is None else number
    return fields


def format_csv(watches: Sequence[WatchRecords]) -> str:
    """Format every record of every watch as CSV with one header row.

    The columns are `directory`, `evaluator`, `step`, `name`, `state`, `duration` in seconds, `error`,
    `reason`, then one column per metric over all watches. A metric named like one of those columns
    gets the prefix `metric.`. Empty cells mean the value is missing.
    """
    metrics = metric_names(record for watch in watches for record in watch.records)
    columns = _metric_columns(metrics, CSV_COLUMNS)
    output = io.StringIO()
    writer = csv.writer(output, lineterminator="\n")
    writer.writerow([_encodable(column) for column in (*CSV_COLUMNS, *columns)])
    for watch in watches:
        for record in sort_records(watch.records):
            writer.writerow(_csv_row(watch.config, record, metrics))
    return output.getvalue()


def _csv_row(config: WatchConfig, record: dict[str, Any], metrics: list[str]) -> list[str]:
    values = metrics_of(record.get("result"))
    row = [
        config.directory,
        config.evaluator,
        record.get("step", ""),
        record["name"],
        record.get("state", ""),
        "" if duration_of(record) is None else repr(duration_of(record)),
        record.get("error", ""),
        record.get("reason", ""),
    ]
    row.extend(repr(values[name]) if name in values else "" for name in metrics)
    return [_encodable(str(cell)) for cell in row]


def _metric_columns(metrics: list[str], reserved: Sequence[str]) -> list[str]:
    return [METRIC_PREFIX + name if name in reserved else name for name in metrics]


def _encodable(text: str) -> str:
    # Directories that are not valid UTF-8 come back from the config JSON as lone surrogates,
    # which no UTF-8 stream can write.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def plot(watches: Sequence[WatchRecords], path: str) -> list[str]:
    """Save a PNG with one panel per scalar metric, step on the x axis and one line per watch.

    Records without a step are left out. Returns the names of the metrics plotted. When there are none,
    no file is written and the list is empty.

    Raises:
        UsageError: matplotlib is not installed.
    """
    figure, metrics = metrics_figure(watches)
    if figure is not None:
        figure.savefig(path, format="png", dpi=100)
    return metrics


def metrics_figure(watches: Sequence[WatchRecords]) -> tuple[Any, list[str]]:
    """Return the matplotlib Figure that `plot` saves and the metrics it shows; no Figure when there are none.

    Raises:
        UsageError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib; pip install matplotlib") from None
    series = {watch.config.watch_id: _series(watch) for watch in watches}
    metrics = metric_names(record for watch in watches for record in watch.records if "step" in record)
    if not metrics:
        return None, []
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    # A Figure made directly, without pyplot, renders with the Agg backend and leaves global state alone.
    figure = Figure(figsize=(5 * columns, 3.5 * rows), layout="constrained")
    labels = _plot_labels([watch.config for watch in watches])
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(rows, columns, index + 1)
        _draw_panel(axes, metric, watches, series, labels)
    return figure, metrics


def _series(watch: WatchRecords) -> dict[str, tuple[list[int], list[float]]]:
    points: dict[str, tuple[list[int], list[float]]] = {}
    for record in sort_records(record for record in watch.records if "step" in record):
        for name, value in metrics_of(record.get("result")).items():
            steps, values = points.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(value)
    return points


def _draw_panel(axes, metric: str, watches, series, labels: dict[str, str]) -> None:
    from matplotlib.ticker import MaxNLocator

    for index, watch in enumerate(watches):
        watch_id = watch.config.watch_id
        if metric in series[watch_id]:
            steps, values = series[watch_id][metric]
            # Colors follow the watch rather than the panel, so that a watch looks the same in every panel.
            axes.plot(steps, values, marker="o", color=f"C{index % 10}", label=labels[watch_id])
    direction = "lower is better" if lower_is_better(metric) else "higher is better"
    axes.set_title(f"{display_text(metric)} ({direction})")
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # Steps are whole numbers; so are their ticks.
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")


def _plot_labels(configs: list[WatchConfig]) -> dict[str, str]:
    """Label each watch by the last two parts of its directory, adding the evaluator where labels repeat."""
    short = {config.watch_id: _last_components(config.directory) for config in configs}
    repeated = {label for label in short.values() if list(short.values()).count(label) > 1}
    labels = {}
    for config in configs:
        label = short[config.watch_id]
        if label in repeated:
            label = f"{label} ({display_text(config.evaluator.rsplit('/', 1)[-1])})"
        labels[config.watch_id] = label
    return labels


def _last_components(directory: str) -> str:
    parts = [part for part in os.path.normpath(directory).split(os.sep) if part]
    return display_text("/".join(parts[-2:]) or directory)
