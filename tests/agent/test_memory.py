"""agent.runtime.memory (the memory budget's pure core) and agent.runtime.process (its adapter).

Tables of cases: the estimate from a manifest, who is evicted (least recently used, unpinned,
as few as needed) or why a load is refused, the ledger's books through reserve, settle, cancel
and drop, and which versions are pinned.
"""

from __future__ import annotations

import pytest

from agent.package.manifest import Manifest, ModelFile, TensorSpec
from agent.runtime.memory import (
    ACTIVATION_FACTOR,
    MIB,
    SESSION_OVERHEAD_BYTES,
    WEIGHT_FACTOR,
    Charge,
    MemoryLedger,
    Resident,
    choose,
    estimate,
    pins,
    row_bytes,
)


def manifest(size: int, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Manifest:
    return Manifest("m", 1, ModelFile("model.onnx", "0" * 64, size), tuple(inputs), tuple(outputs))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(TensorSpec("x", "FP32", (-1, 4)), 16, id="fp32-row"),
        pytest.param(TensorSpec("x", "FP32", (-1, 3, 224, 224)), 4 * 3 * 224 * 224, id="image"),
        pytest.param(TensorSpec("x", "INT64", (-1,)), 8, id="scalar-per-row"),
        pytest.param(TensorSpec("x", "UINT8", (-1, -1, 10)), 10, id="variable-dim-counts-1"),
        pytest.param(TensorSpec("x", "FP16", (-1, 8)), 16, id="fp16"),
        pytest.param(TensorSpec("x", "BYTES", (-1, 2)), 128, id="bytes-guessed"),
        pytest.param(TensorSpec("x", "FP32", ()), 4, id="no-shape"),
    ],
)
def test_row_bytes(spec: TensorSpec, expected: int) -> None:
    assert row_bytes(spec) == expected


def test_estimate_adds_weights_session_and_the_largest_batch() -> None:
    m = manifest(
        10 * MIB,
        [TensorSpec("x", "FP32", (-1, 256))],
        [TensorSpec("y", "FP32", (-1, 10)), TensorSpec("label", "INT64", (-1,))],
    )
    e = estimate(m, max_batch_size=64)
    assert e.weights == int(10 * MIB * WEIGHT_FACTOR)
    assert e.session == SESSION_OVERHEAD_BYTES
    assert e.activations == int((256 * 4 + 10 * 4 + 8) * 64 * ACTIVATION_FACTOR)
    assert e.total == e.weights + e.session + e.activations
    assert estimate(m, max_batch_size=1).activations < e.activations
    assert e.to_json()["total_mb"] == round(e.total / MIB, 1)


def r(name: str, version: int, charge_mb: float, last_used: float, pinned_by: str | None = None) -> Resident:
    return Resident((name, version), int(charge_mb * MIB), last_used, pinned_by)


# (budget MiB, used MiB, needed MiB, residents) -> (fits, evicted keys, words in the reason)
CHOOSE_CASES = [
    pytest.param(0, 900, 500, [], True, [], [], id="no-budget-always-fits"),
    pytest.param(100, 40, 60, [], True, [], [], id="exactly-fits"),
    pytest.param(
        100, 40, 61, [], False, [], ["needs ~61.0 MiB", "40.0 of 100.0 MiB", "60.0 free"], id="one-over"
    ),
    pytest.param(
        100,
        90,
        20,
        [r("a", 1, 20, 5.0, "default version"), r("b", 1, 15, 9.0)],
        True,
        [("b", 1)],
        ["evicting least recently used b v1"],
        id="evict-the-unpinned-one",
    ),
    pytest.param(
        100,
        90,
        20,
        [r("b", 1, 15, 9.0), r("b", 2, 15, 3.0), r("c", 1, 15, 1.0)],
        True,
        [("c", 1)],
        ["c v1"],
        id="least-recently-used-first-and-only-as-many-as-needed",
    ),
    pytest.param(
        100,
        95,
        30,
        [r("b", 1, 10, 2.0), r("c", 1, 10, 1.0), r("d", 1, 10, 3.0)],
        True,
        [("c", 1), ("b", 1), ("d", 1)],
        [],
        id="several-evicted-in-lru-order",
    ),
    pytest.param(
        100,
        90,
        40,
        [r("a", 1, 50, 0.0, "default version"), r("b", 1, 10, 1.0)],
        False,
        [],
        ["10.0 more if every unpinned version were unloaded", "runtime.memory_budget_mb"],
        id="eviction-not-enough-refuses-and-evicts-nothing",
    ),
    pytest.param(
        100,
        90,
        40,
        [
            r("a", 1, 50, 0.0, "default version"),
            r("a", 2, 50, 0.0, "on probation"),
            r("x", 3, 50, 0.0, "experiment arm"),
            r("c", 1, 50, 0.0, "committed"),
        ],
        False,
        [],
        ["10.0 free)"],
        id="pinned-never-evicted",
    ),
]


@pytest.mark.parametrize(("budget", "used", "needed", "residents", "fits", "evicted", "words"), CHOOSE_CASES)
def test_choose(
    budget: int,
    used: int,
    needed: int,
    residents: list[Resident],
    fits: bool,
    evicted: list[tuple[str, int]],
    words: list[str],
) -> None:
    d = choose("new v9", budget * MIB, used * MIB, needed * MIB, residents)
    assert d.fits is fits
    assert list(d.evict) == evicted
    for word in words:
        assert word in d.reason
    if not fits:
        assert d.reason.startswith("memory budget: new v9 needs")


def test_ledger_books() -> None:
    ledger = MemoryLedger(budget=100 * MIB, baseline=30 * MIB)
    assert ledger.used() == 30 * MIB
    ledger.reserve(("a", 1), 20 * MIB)  # being loaded: its estimate is held
    assert ledger.used() == 50 * MIB
    assert ledger.status()["loading_mb"] == 20.0
    ledger.settle(("a", 1), 20 * MIB, 35 * MIB)  # measured above the estimate: believed
    assert ledger.used() == 65 * MIB
    ledger.reserve(("b", 1), 10 * MIB)
    ledger.cancel(("b", 1))  # the load failed: its room is free again
    assert ledger.used() == 65 * MIB
    ledger.cancel(("a", 1))  # a loaded version is not a reservation: cancel keeps it
    assert ledger.used() == 65 * MIB
    ledger.settle(("c", 1), 20 * MIB, 2 * MIB)  # measured below the estimate (malloc reuse): estimate
    assert ledger.used() == 85 * MIB
    assert ledger.used(without=[("a", 1)]) == 50 * MIB
    ledger.drop(("a", 1))
    assert ledger.used() == 50 * MIB
    status = ledger.status(rss=77 * MIB)
    assert status == {
        "budget_mb": 100.0,
        "used_mb": 50.0,
        "free_mb": 50.0,
        "baseline_mb": 30.0,
        "loading_mb": 0.0,
        "refused": 0,
        "evicted": 0,
        "rss_mb": 77.0,
    }
    assert MemoryLedger(budget=0).status()["budget_mb"] is None


def test_ledger_decide_leaves_out_the_version_itself_and_the_versions_set_aside() -> None:
    ledger = MemoryLedger(budget=100 * MIB, baseline=20 * MIB)
    ledger.settle(("m", 1), 40 * MIB, None)
    ledger.settle(("m", 2), 40 * MIB, None)
    residents = [r("m", 1, 40, 1.0, "committed"), r("m", 2, 40, 2.0, "default version")]
    assert not ledger.decide(("m", 3), 40 * MIB, residents).fits
    # as if the committed version were unloaded first: the candidate fits beside the default
    d = ledger.decide(("m", 3), 40 * MIB, residents, without=[("m", 1)])
    assert d.fits and d.evict == ()
    # a version already reserved is not counted twice against itself
    ledger.reserve(("m", 3), 10 * MIB)
    assert ledger.decide(("m", 3), 10 * MIB, residents).used == 100 * MIB


@pytest.mark.parametrize(
    ("defaults", "arms", "held", "expected"),
    [
        pytest.param({"a": 1, "b": None}, {}, {}, {("a", 1): "default version"}, id="defaults"),
        pytest.param(
            {"a": 2}, {"a": 3}, {}, {("a", 2): "default version", ("a", 3): "experiment arm"}, id="arm"
        ),
        pytest.param(
            {"a": 2},
            {},
            {("a", 1): "committed", ("a", 2): "on probation"},
            {("a", 1): "committed", ("a", 2): "on probation"},
            id="updater-holds-win",
        ),
    ],
)
def test_pins(
    defaults: dict[str, int | None],
    arms: dict[str, int],
    held: dict[tuple[str, int], str],
    expected: dict[tuple[str, int], str],
) -> None:
    assert pins(defaults, arms, held) == expected


def test_charge_is_the_larger_of_estimate_and_measured() -> None:
    assert Charge(10).bytes == 10
    assert Charge(10, 3).bytes == 10
    assert Charge(10, 30).bytes == 30


def test_process_adapter_reads_rss_and_starts_the_runtime() -> None:
    from agent.runtime.process import read_rss_bytes, start_runtime

    before = read_rss_bytes()
    assert before is not None and before > 10 * MIB
    start_runtime()  # the embedded warm-up model still loads and answers
    after = read_rss_bytes()
    assert after is not None and after >= before - MIB


def test_warm_up_model_is_what_onnx_helper_makes() -> None:
    from onnx import TensorProto, helper

    from agent.runtime.process import _WARM_UP_MODEL

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "w", [x], [y])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name=""
    )
    assert model.SerializeToString() == _WARM_UP_MODEL


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        pytest.param(
            {"memory_budget_mb": -1}, "runtime.memory_budget_mb: must not be negative", id="negative"
        ),
        pytest.param({"memory_budget_mb": 1.5}, "runtime.memory_budget_mb: expected an integer", id="float"),
        pytest.param(
            {"memory_budget_mb": "1G"}, "runtime.memory_budget_mb: expected an integer", id="string"
        ),
    ],
)
def test_config_refuses_a_bad_budget(doc: dict[str, object], message: str) -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config({"runtime": doc})


def test_config_budget_defaults_to_none() -> None:
    from agent.config import parse_config

    assert parse_config({}).runtime.memory_budget_mb == 0
    assert parse_config({"runtime": {"memory_budget_mb": 256}}).runtime.memory_budget_mb == 256
