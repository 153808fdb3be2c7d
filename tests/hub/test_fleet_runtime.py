"""What each model runs on, from a device's retained state (hub.fleet.runtime), and where the
operator sees it: `outpost fleet` and the dashboard's fleet page."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from hub.dashboard import views
from hub.fleet.runtime import hardware_text, provider_name, runs_on
from hub.fleet.store import DeviceInfo
from hub.hub_commands import fleet_line

# As agent.daemon sends it (_refresh_state): providers best first, a variant only for packages with variants.
STATE: dict[str, Any] = {
    "versions": {"wine": 3, "cam": 1},
    "providers": {"wine": ["CPUExecutionProvider"], "cam": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
    "variants": {"wine": "int8"},
    "hardware": ["avx2", "x86_64"],
}


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (STATE, {"cam": "on CUDA+CPU", "wine": "int8 on CPU"}),
        ({"variants": {"wine": "fp16"}}, {"wine": "fp16"}),  # providers not known: the variant alone
        ({"versions": {"wine": 1}}, {}),  # an agent older than these keys: nothing, not a guess
        ({"providers": "CPU", "variants": ["int8"]}, {}),  # malformed: ignored
        ({"providers": {"wine": []}}, {}),
    ],
)
def test_runs_on_names_each_models_variant_and_providers(
    state: dict[str, Any], expected: dict[str, str]
) -> None:
    assert runs_on(state) == expected


def test_provider_and_hardware_names() -> None:
    assert provider_name("OpenVINOExecutionProvider") == "OpenVINO"
    assert provider_name("SomethingElse") == "SomethingElse"
    assert provider_name("ExecutionProvider") == "ExecutionProvider"
    assert hardware_text(STATE) == "avx2, x86_64"
    assert hardware_text({"hardware": "x86_64"}) == ""


def test_outpost_fleet_and_the_dashboard_show_it() -> None:
    seen = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    device = DeviceInfo("dev-1", "lab", True, 1, seen, 10, STATE)
    line = fleet_line(device.to_json())
    assert line.endswith("runs cam: on CUDA+CPU; wine: int8 on CPU"), line
    old = DeviceInfo("dev-2", "lab", True, 1, seen, 10, {"versions": {"wine": 1}})
    assert "runs" not in fleet_line(old.to_json())
    view = views.fleet_view([device, old], [], seen)
    assert [(d.runs, d.hardware) for d in view.devices] == [
        ("cam: on CUDA+CPU; wine: int8 on CPU", "avx2, x86_64"),
        (views.DASH, ""),
    ]
