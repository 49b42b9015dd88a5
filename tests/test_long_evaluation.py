"""Evaluations may take hours: a job must not inherit RQ's default timeout of 180 s."""

from __future__ import annotations

import pytest
from conftest import LONG_EVALUATION_SECONDS, wait_for

from assayer import records


@pytest.mark.runs_last
def test_evaluation_outlasts_default_timeout(long_evaluation):
    settings, started = long_evaluation
    connection = settings.connect()

    def finished():
        rows = [
            row
            for config, _ in records.load_watches(connection)
            for row in records.load_all(connection, config.watch_id)
        ]
        return [row for row in rows if row["state"] in (records.FINISHED, records.FAILED)]

    rows = wait_for(finished, LONG_EVALUATION_SECONDS + 60, interval=1, message="the long evaluation")
    assert rows[0]["state"] == records.FINISHED
    assert rows[0]["result"]["seconds"] >= LONG_EVALUATION_SECONDS
    assert rows[0]["duration"] > 180
