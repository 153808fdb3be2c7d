"""The fleet simulator works end to end: a hub, a Mosquitto and ~50 simulated devices, a few seconds.

Proves the tool (make bench-fleet) still runs against the current hub, not its numbers: every
poll is answered, every acknowledged summary and drift message is stored once, every device
fetches the deployment it was given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import fleet_sim
from tests.support.broker import mosquitto_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (make sysdeps)"),
]


def test_a_small_fleet_polls_publishes_and_takes_a_deployment(tmp_path: Path) -> None:
    results = fleet_sim.main(["--quick", "--groups", "2", "--out", str(tmp_path)])

    polls = results["polls"]
    assert polls["polls_per_s"] > 0 and polls["errors"] == 0
    assert set(polls["statuses"]) == {"404", "304"}  # the root probe, the unchanged timestamp

    ingest = results["ingest"]
    expected = ingest["devices"] * 4 * 2  # --quick: 4 windows of a summary and a drift each
    assert ingest["messages_acked"] == expected and ingest["windows_rows"] == expected
    assert ingest["lost"] == 0 and ingest["duplicates"] == 0 and ingest["unexpected"] == 0
    assert ingest["bytes_per_message"]["database"] > 1000  # a summary is ~2 kB of JSON

    prop = results["propagation"]
    assert prop["updated"] == prop["devices"] == 50 and not prop["errors"]
    assert prop["assignment_s"]["p100"] is not None

    assert json.loads((tmp_path / "fleet.json").read_text())["ingest"]["lost"] == 0
    assert "deployment to 99 %" in (tmp_path / "fleet.md").read_text()
