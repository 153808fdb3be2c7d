"""agent.monitor.report, .feedback and .service: drift messages, scoring labels, and the run-time
monitor that batches observations, closes windows and publishes them.

The service is driven here through a stand-in for a loaded version (name, version, manifest,
session input specs: all the monitor reads), with real numpy arrays as inputs and outputs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agent.config import MonitorConfig
from agent.errors import NotFound, RequestError
from agent.metrics import VersionMetrics
from agent.monitor.drift import DriftDetector, binned_ks, chi_square
from agent.monitor.feedback import FeedbackError, PredictionBook, score
from agent.monitor.report import drift_message, window_tests
from agent.monitor.service import FLUSH_REQUESTS, Monitor
from agent.monitor.summary import WindowSummary, merge
from agent.package.manifest import TensorSpec
from agent.runtime.batcher import Batcher
from hub.packager import profile as hub_profile

RNG_SEED = 20261127
FEATURES = ("f0", "f1", "f2")


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def reference(seed: int = RNG_SEED, n: int = 2000) -> tuple[np.ndarray, dict[str, Any]]:
    """A reference sample and its profile, built by the packager's own code."""
    x = np.random.default_rng(seed).normal(size=(n, len(FEATURES)))
    features = []
    for i, name in enumerate(FEATURES):
        edges = hub_profile.bin_edges(x[:, i])
        features.append(
            {
                "name": name,
                "kind": "numeric",
                "bin_edges": edges,
                "counts": hub_profile.bin_counts(edges, x[:, i]),
                "missing": 0,
            }
        )
    classes = (x[:, 0] > 0).astype(np.int64)
    prediction = {"kind": "classification", "labels": ["0", "1"], "counts": np.bincount(classes).tolist()}
    return x, {"n": n, "features": features, "prediction": prediction}


X_REF, PROFILE = reference()


def loaded(profile: dict[str, Any] = PROFILE, task: str = "classification", version: int = 1) -> Any:
    manifest = SimpleNamespace(reference_profile=profile, labels=("0", "1"), task=task, features=FEATURES)
    session = SimpleNamespace(
        inputs=(TensorSpec("x", "FP32", (-1, len(FEATURES))),),
        outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2))),
    )
    batcher = Batcher(lambda inputs: {}, None, enabled=False, max_batch_rows=1)  # only its observer is used
    metrics = VersionMetrics("m", str(version))
    return SimpleNamespace(
        name="m",
        version=version,
        manifest=manifest,
        session=session,
        batcher=batcher,
        metrics=metrics,
        monitor=None,
        cache=None,
    )


def answer(x: np.ndarray) -> dict[str, np.ndarray]:
    """What the model stand-in predicts: class 1 when f0 > 0."""
    label = (x[:, 0] > 0).astype(np.int64)
    return {"label": label, "probabilities": np.stack([1.0 - label, label.astype(np.float64)], axis=1)}


class Published(list[tuple[str, dict[str, Any]]]):
    def __call__(self, kind: str, body: Any) -> None:
        self.append((kind, dict(body)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [b for k, b in self if k == kind]


def monitor(**overrides: Any) -> tuple[Monitor, Clock, Published]:
    clock = Clock()
    config = MonitorConfig(**{"window_s": 60.0, "drift_min_rows": 100, **overrides})
    mon = Monitor(config, clock)
    out = Published()
    mon.publish = out
    return mon, clock, out


def feed(
    lv: Any, x: np.ndarray, rows_per_request: int = 1, ids: str | None = "r", batch: int = 1
) -> list[str]:
    """Requests as the agent serves them: each answer's latency recorded, then every `batch` of
    them handed to the batcher's observer as one onnxruntime call (its concatenated arrays)."""
    requests = []
    for i in range(0, len(x), rows_per_request):
        requests.append((x[i : i + rows_per_request].astype(np.float32), f"{ids}{i}" if ids else None))
    for j in range(0, len(requests), batch):
        group = requests[j : j + batch]
        for _ in group:
            lv.metrics.answered(0.0004)  # what the response path does for every answer
        merged = np.concatenate([chunk for chunk, _ in group])
        lv.batcher.observer(
            [item(chunk, pid) for chunk, pid in group],
            [answer(chunk) for chunk, _ in group],
            ({"x": merged}, answer(merged)),
        )
    return [pid for _, pid in requests if pid]


def item(chunk: np.ndarray, pid: str | None) -> Any:
    """A request as the batcher holds it (agent.runtime.batcher.BatchItem)."""
    ticket = SimpleNamespace(prediction_id=pid, prediction_seq=-1)  # an id the client chose
    return SimpleNamespace(ticket=ticket, size=len(chunk), inputs={"x": chunk})


def odd(lv: Any, exc: BaseException | None = None) -> None:
    """One request whose input has 7 features (or that failed with `exc`), run alone."""
    x = np.zeros((1, 7), np.float32)
    if exc is None:
        lv.metrics.answered(0.001)
    else:
        lv.monitor.record_failure()
    outcome = exc if exc is not None else answer(x)
    arrays = None if exc is not None else ({"x": x}, answer(x))
    lv.batcher.observer([item(x, "odd")], [outcome], arrays)


# -- report ------------------------------------------------------------------------------------


def window_of(x: np.ndarray, clock: Clock | None = None) -> dict[str, Any]:
    w = WindowSummary(
        "m", 1, PROFILE, labels=("0", "1"), task="classification", window_seconds=60, clock=clock
    )
    w.observe_batch(x, answer(x), [0.001] * len(x), 0)
    return w.close(1_700_000_060.0)


def test_window_tests_match_the_statistics_on_the_same_counts() -> None:
    x = np.random.default_rng(1).normal(size=(500, 3))
    window = window_of(x)
    features, prediction = window_tests(window, PROFILE)
    assert [t["name"] for t in features] == list(FEATURES)
    for t, f, ref in zip(features, window["features"], PROFILE["features"], strict=True):
        d, p = binned_ks(ref["counts"], f["counts"])
        assert t["test"] == "ks"
        assert t["statistic"] == pytest.approx(d, rel=1e-5)
        assert t["p_value"] == pytest.approx(p, rel=1e-5)
    assert prediction is not None and prediction["test"] == "chi2"
    stat, _dof, p = chi_square([*PROFILE["prediction"]["counts"], 0], [*window["prediction"]["counts"], 0])
    assert prediction["statistic"] == pytest.approx(stat, rel=1e-5)
    assert prediction["p_value"] == pytest.approx(p, rel=1e-5)


def test_window_tests_refuse_a_window_of_another_layout() -> None:
    window = window_of(np.zeros((10, 3)))
    window["features"][1]["name"] = "other"
    with pytest.raises(ValueError, match="reference profile"):
        window_tests(window, PROFILE)
    window = window_of(np.zeros((10, 3)))
    window["features"][0]["counts"].append(0)
    with pytest.raises(ValueError, match="bins"):
        window_tests(window, PROFILE)


def test_drift_message_needs_k_windows_in_a_row_and_names_the_feature() -> None:
    detector = DriftDetector(alpha=0.05, k=2)
    rng = np.random.default_rng(2)
    shifted = rng.normal(size=(1000, 3))
    shifted[:, 1] += 0.5
    first = drift_message(window_of(shifted), PROFILE, detector)
    assert first["schema"] == "outpost-drift/1"
    assert first["drifted"] == ["f1"] and not first["alert"]
    assert [f["drifted"] for f in first["features"]] == [False, True, False]
    second = drift_message(window_of(shifted), PROFILE, detector)
    assert second["alert"] and second["alerting"] == ["f1"] and second["streak"] == 2
    calm = drift_message(window_of(rng.normal(size=(1000, 3))), PROFILE, detector)
    assert not calm["alert"] and calm["drifted"] == [] and calm["streak"] == 0


def test_prediction_drift_is_tested_apart_from_a_feature_called_prediction() -> None:
    detector = DriftDetector(alpha=0.05, k=1)
    x = np.random.default_rng(3).normal(size=(1000, 3))
    x[:, 0] += 1.0  # moves f0 and, through it, the predicted classes
    msg = drift_message(window_of(x), PROFILE, detector)
    assert msg["prediction"]["drifted"] is True
    assert "prediction" in msg["drifted"] and "f0" in msg["drifted"]
    assert msg["alerting"] == sorted(msg["alerting"]) or "prediction" in msg["alerting"]


# -- feedback ----------------------------------------------------------------------------------


def test_prediction_book_is_bounded_and_forgets_the_oldest() -> None:
    book: PredictionBook[str] = PredictionBook(3)
    for i in range(5):
        book.add(f"id{i}", "v1", i)
    assert len(book) == 3 and book.forgotten == 2
    assert book.take("id0") is None and book.take("id1") is None
    found = book.take("id4")
    assert found is not None and (found.owner, found.prediction) == ("v1", 4)
    assert book.take("id4") is None  # one label per prediction
    book.restore(found)  # ... unless the label was refused
    assert book.take("id4") is not None
    book.add("id2", "v2", 9)  # a reused id means the newest prediction
    found = book.take("id2")
    assert found is not None and (found.owner, found.prediction) == ("v2", 9)
    book.add("x", "gone", 1)
    assert book.drop_owner("gone") == 1 and book.take("x") is None
    off: PredictionBook[str] = PredictionBook(0)
    off.add("a", "v", 1)
    assert len(off) == 0 and off.take("a") is None


def test_prediction_book_keeps_batches_with_rows_per_id() -> None:
    book: PredictionBook[str] = PredictionBook(100)
    offsets = np.array([0, 2, 3, 6])
    book.add_batch("v", np.array([1, 0, 0, 1, 1, 0]), offsets, names=["a", None, "c"])
    found = book.take("c")
    assert found is not None and found.prediction == (1, 1, 0)
    found = book.take("a")
    assert found is not None and found.prediction == (1, 0)
    for i in range(40):  # batches of 3: the oldest batches go once 100 are newer
        book.add_batch("v", np.array([0, 1, 2]), names=[f"b{i}-{j}" for j in range(3)])
    assert 100 <= len(book) < 103 and book.take("b0-0") is None and book.take("b39-2") is not None


def test_prediction_book_files_the_agents_own_ids_by_their_counter() -> None:
    book: PredictionBook[str] = PredictionBook(100, own_prefix="1a2b3c4d-")
    seqs = np.array([0x10, -1, 0x12])  # the middle request came with the client's own id
    book.add_batch("v", np.array([2, 0, 1]), seqs=seqs, names=[None, "order-9", None])
    found = book.take("1a2b3c4d-12")
    assert found is not None and found.prediction == 1 and isinstance(found.prediction, int)
    assert book.take("1a2b3c4d-12") is None  # labelled already
    found = book.take("order-9")
    assert found is not None and found.prediction == 0
    assert book.take("1a2b3c4d-11") is None and book.take("1a2b3c4d-zz") is None
    assert book.take("ffffffff-10") is None  # another boot's prefix: not this book's counter
    found = book.take("1a2b3c4d-10")
    assert found is not None and found.prediction == 2
    book.restore(found)
    assert book.take("1a2b3c4d-10") is not None


@pytest.mark.parametrize(
    "asked",
    ["1a2b3c4d--1", "1a2b3c4d-+12", "1a2b3c4d-0x12", "1a2b3c4d-012", "1a2b3c4d- 12", "1a2b3c4d-1_2"],
    ids=["minus-one", "plus", "0x", "leading-zero", "space", "underscore"],
)
def test_prediction_book_takes_only_the_ids_it_gave_out(asked: str) -> None:
    """Ids that int(..., 16) reads as a counter but the app never wrote: "-1" would have matched
    every client-chosen id (filed as -1), the others another prediction of the agent's."""
    book: PredictionBook[str] = PredictionBook(100, own_prefix="1a2b3c4d-")
    book.add_batch("v", np.array([2, 0]), seqs=np.array([0x12, -1]), names=[None, "order-9"])
    assert book.take(asked) is None
    assert book.take("order-9") is not None and book.take("1a2b3c4d-12") is not None


def test_prediction_book_finds_a_client_id_that_looks_like_the_agents() -> None:
    book: PredictionBook[str] = PredictionBook(100, own_prefix="1a2b3c4d-")
    book.add_batch("v", np.array([2, 0]), seqs=np.array([0x12, -1]), names=[None, "1a2b3c4d-ab"])
    found = book.take("1a2b3c4d-ab")  # a client reusing an id it was given, say
    assert found is not None and found.prediction == 0


@pytest.mark.parametrize(
    ("prediction", "label", "labelled", "correct"),
    [
        (1, "1", 1, 1),
        (1, 1, 1, 1),
        (1, 1.0, 1, 1),
        (0, "1", 1, 0),
        (-1, "0", 1, 0),  # a class outside the labels is simply wrong
        ((0, 1, 1), ["0", "0", "1"], 3, 2),
    ],
)
def test_score_classification(prediction: Any, label: Any, labelled: int, correct: int) -> None:
    s = score("classification", ("0", "1"), prediction, label)
    assert (s.labelled, s.correct) == (labelled, correct)


def test_score_regression_sums_errors_and_skips_nan_predictions() -> None:
    s = score("regression", (), (1.0, 2.0, math.nan), [1.5, 0.0, 3.0])
    assert s.labelled == 2
    assert s.abs_error == pytest.approx(2.5) and s.sq_error == pytest.approx(4.25)


@pytest.mark.parametrize(
    ("kind", "prediction", "label", "match"),
    [
        ("classification", 1, "cat", "not one of the model's labels"),
        ("classification", 1, True, "string or a number"),
        ("classification", (0, 1), "0", "list of 2 labels"),
        ("classification", (0, 1), ["0"], "list of 2 labels"),
        ("regression", 1.0, "x", "finite number"),
        ("regression", 1.0, math.inf, "finite number"),
        ("other", 1.0, 1.0, "nothing to score"),
    ],
)
def test_score_refuses_labels_that_do_not_fit(kind: str, prediction: Any, label: Any, match: str) -> None:
    with pytest.raises(FeedbackError, match=match):
        score(kind, ("0", "1"), prediction, label)


# -- service -----------------------------------------------------------------------------------


def test_batched_counts_equal_one_at_a_time_counts() -> None:
    mon, clock, out = monitor()
    lv = loaded()
    mon.attach(lv)
    x = np.random.default_rng(4).normal(size=(700, 3))
    feed(lv, x[:300], rows_per_request=1)
    feed(lv, x[300:], rows_per_request=4, ids="b", batch=8)
    odd(lv, RuntimeError("the model failed"))
    clock.t += 61
    mon.tick()
    (summary,) = out.of("summary")
    one = WindowSummary(
        "m", 1, PROFILE, labels=("0", "1"), task="classification", window_seconds=60, clock=Clock()
    )
    for row in x.astype(np.float32):
        one.observe(row[None, :], answer(row[None, :]), 0.0004, True)
    one.observe(None, None, 0.001, False)
    expected = one.close(clock.t)
    assert summary["requests"] == 300 + 100 + 1 and expected["requests"] == 701
    for key in ("errors", "rows", "features", "prediction"):
        assert summary[key] == expected[key], key
    assert sum(summary["latency"]["counts"]) == 400  # the answers; the failure has no latency
    assert summary["latency"]["counts"][-1] == 0 and summary["errors"] == 1
    assert summary["latency"]["sum_us"] == 400 * 400  # 400 answers of 0.4 ms
    assert summary["start"] == 1_700_000_000.0 and summary["end"] == clock.t


def test_windows_close_on_time_idle_ones_publish_nothing_and_drift_follows_the_summary() -> None:
    mon, clock, out = monitor(window_s=10.0)
    lv = loaded()
    mon.attach(lv)
    clock.t += 11
    mon.tick()
    assert out == []  # no traffic: nothing said
    feed(lv, np.random.default_rng(5).normal(size=(150, 3)))
    mon.tick()
    assert out == []  # not due yet
    clock.t += 10
    mon.tick()
    assert [k for k, _ in out] == ["summary", "drift"]
    assert out.of("drift")[0]["rows"] == 150
    feed(lv, np.random.default_rng(6).normal(size=(50, 3)), ids="c")  # below drift_min_rows
    clock.t += 10
    mon.tick()
    assert [k for k, _ in out] == ["summary", "drift", "summary"]


def test_window_requests_closes_exactly_at_the_count() -> None:
    mon, _clock, out = monitor(window_requests=100)
    lv = loaded()
    mon.attach(lv)
    feed(lv, np.random.default_rng(7).normal(size=(FLUSH_REQUESTS * 2 + 30, 3)))
    sizes = [s["requests"] for s in out.of("summary")]
    assert sizes == [100] * 5
    mon.close_all()
    assert [s["requests"] for s in out.of("summary")] == [100] * 5 + [FLUSH_REQUESTS * 2 + 30 - 500]
    total = out.of("summary")[0]
    for s in out.of("summary")[1:]:
        total = merge(total, s)
    assert total["rows"] == FLUSH_REQUESTS * 2 + 30 and total["windows"] == 6


def test_feedback_scores_against_what_was_predicted_and_goes_in_the_window() -> None:
    mon, clock, out = monitor()
    lv = loaded()
    mon.attach(lv)
    x = np.array([[1.0, 0, 0], [-1.0, 0, 0], [2.0, 0, 0]])
    ids = feed(lv, x)  # predicted 1, 0, 1; not flushed yet: feedback must find pending ids
    assert mon.feedback(ids[0], "1") == {
        "id": ids[0],
        "model": "m",
        "version": 1,
        "labelled": 1,
        "correct": 1,
    }
    assert mon.feedback(ids[1], 1)["correct"] == 0
    with pytest.raises(NotFound, match="already labelled"):
        mon.feedback(ids[0], "1")
    with pytest.raises(RequestError, match="not one of the model's labels"):
        mon.feedback(ids[2], "cat")
    assert mon.feedback(ids[2], "1")["correct"] == 1  # the bad label did not use the id up
    with pytest.raises(NotFound):
        mon.feedback("never-issued", "1")
    with pytest.raises(RequestError, match="non-empty string"):
        mon.feedback(17, "1")
    clock.t += 61
    mon.tick()
    assert out.of("summary")[0]["feedback"] == {"labelled": 3, "correct": 2}


def test_feedback_scores_a_shadow_copy_still_waiting_to_be_counted() -> None:
    """The stable version's batch was counted (it reached FLUSH_REQUESTS) while the candidate's
    shadow copy of the same request still waits in its own pending batches: the label scores both."""
    mon, _clock, _out = monitor()
    stable, candidate = loaded(version=1), loaded(version=2)
    mon.attach(stable)
    mon.attach(candidate)
    x = np.random.default_rng(3).normal(size=(FLUSH_REQUESTS, 3))
    ids = feed(stable, x, batch=FLUSH_REQUESTS)  # counted: in the book now
    copy = x[:1].astype(np.float32)  # filed as app.py files a shadow copy; not counted yet
    candidate.metrics.answered(0.0004)
    candidate.batcher.observer([item(copy, f"{ids[0]}~shadow")], [answer(copy)], ({"x": copy}, answer(copy)))
    scored = mon.feedback(ids[0], "1")
    assert scored["version"] == 1 and scored["shadow"]["version"] == 2


def test_multi_row_predictions_take_one_label_per_row() -> None:
    mon, _clock, _out = monitor()
    lv = loaded()
    mon.attach(lv)
    (pid,) = feed(lv, np.array([[1.0, 0, 0], [-1.0, 0, 0]]), rows_per_request=2)
    with pytest.raises(RequestError, match="list of 2"):
        mon.feedback(pid, "1")
    assert mon.feedback(pid, ["1", "1"])["correct"] == 1


def test_unloading_publishes_the_open_window_and_forgets_its_ids() -> None:
    mon, _clock, out = monitor()
    lv = loaded()
    mon.attach(lv)
    ids = feed(lv, np.random.default_rng(8).normal(size=(10, 3)))
    mon.detach(lv)
    assert lv.monitor is None
    assert out.of("summary")[0]["requests"] == 10
    with pytest.raises(NotFound):
        mon.feedback(ids[0], "1")


def test_a_failing_publish_or_a_bad_batch_never_reaches_the_caller() -> None:
    mon, clock, _out = monitor()

    def refuse(kind: str, body: Any) -> None:
        raise OSError("disk full")

    mon.publish = refuse
    lv = loaded()
    mon.attach(lv)
    feed(lv, np.random.default_rng(9).normal(size=(5, 3)))
    odd(lv)
    clock.t += 61
    mon.tick()  # the odd-shaped input spoils the flush; only its batch is left out, and counted
    assert mon.unpublished == 1  # the summary the disk refused
    status = mon.status()["versions"][0]
    assert status["errors"] == 1  # only the odd request is left out of the counts
    assert status["windows_published"] == 1


def test_an_odd_request_leaves_the_rest_of_its_batch_counted() -> None:
    mon, clock, out = monitor()
    lv = loaded()
    mon.attach(lv)
    feed(lv, np.random.default_rng(11).normal(size=(5, 3)))
    odd(lv)
    clock.t += 61
    mon.tick()
    summary = out.of("summary")[0]
    assert summary["requests"] == 6 and summary["rows"] == 5  # answered, but its rows not counted


def test_a_profile_that_does_not_fit_the_inputs_keeps_predictions_only() -> None:
    bad = {**PROFILE, "features": PROFILE["features"][:2]}
    mon, clock, out = monitor()
    lv = loaded(profile=bad)
    mon.attach(lv)
    feed(lv, np.random.default_rng(10).normal(size=(200, 3)))
    clock.t += 61
    mon.tick()
    summary = out.of("summary")[0]
    assert summary["features"] == [] and summary["rows"] == 200
    assert sum(summary["prediction"]["counts"]) == 200
    assert out.of("drift")[0]["features"] == [] and out.of("drift")[0]["prediction"] is not None
