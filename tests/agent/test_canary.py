"""agent.update.canary: buckets as the architecture states them, the hub's assignment document.

The bucket values are computed again here, independently, from hashlib; the hub's own
`in_canary` must agree with the agent's on every device, or a canary would route the wrong ones.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.errors import AssignmentError, UpdateError
from agent.update import Assignment, VersionRef, bucket, choose, in_canary
from hub.registry import deployments
from hub.registry.records import Deployment, VersionInfo


def expected_bucket(salt: str, device_id: str) -> int:
    digest = hashlib.sha256(f"{salt}{device_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100  # the first 8 hex digits are the first 4 bytes


@pytest.mark.parametrize(
    ("salt", "device_id", "value"),
    [
        ("", "dev-001", 89),
        ("s", "", 15),
        ("0123456789abcdef0123456789abcdef", "dev-001", 58),
        ("0123456789abcdef0123456789abcdef", "dev-002", 59),
        ("salt", "dev-\u00fc", 92),  # UTF-8, not ASCII, encodes the id
        ("~!@#$%^&*()", "cabinet-17/rack-3", 9),
        ("a" * 128, "x" * 64, 42),
    ],
    ids=["no-salt", "no-id", "hex-salt-1", "hex-salt-2", "non-ascii-id", "punctuation", "long"],
)
def test_bucket_matches_the_contract(salt: str, device_id: str, value: int) -> None:
    # `value` was computed once from the contract's formula; expected_bucket computes it again
    # another way (the first 4 bytes of the digest are its first 8 hex digits).
    assert expected_bucket(salt, device_id) == value
    assert bucket(salt, device_id) == value


@pytest.mark.parametrize(
    ("percent", "candidate"),
    [(0, False), (100, True)],
    ids=["zero-percent-nobody", "hundred-percent-everybody"],
)
def test_in_canary_edges(percent: int, candidate: bool) -> None:
    assert all(in_canary("salt", f"dev-{i}", percent) is candidate for i in range(500))


@pytest.mark.parametrize("percent", [1, 10, 25, 50, 90], ids=lambda p: f"{p}pct")
def test_distribution_is_close_to_percent(percent: int) -> None:
    ids = [f"dev-{i:05d}" for i in range(10_000)]
    share = sum(in_canary("a1b2c3", d, percent) for d in ids) / len(ids)
    assert abs(share - percent / 100) < 0.02


def test_ramping_with_the_same_salt_keeps_the_first_devices_inside() -> None:
    ids = [f"dev-{i}" for i in range(2000)]
    at_10 = {d for d in ids if in_canary("keep", d, 10)}
    at_50 = {d for d in ids if in_canary("keep", d, 50)}
    assert at_10 <= at_50 and len(at_10) < len(at_50)


def test_the_hub_agrees_on_random_devices() -> None:
    rng = random.Random(5)
    for _ in range(1000):
        salt = (
            deployments.new_salt()
            if rng.random() < 0.5
            else "".join(rng.choices("abcxyz019-_", k=rng.randint(1, 40)))
        )
        device_id = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789-_.", k=rng.randint(1, 32)))
        percent = rng.randint(0, 100)
        assert in_canary(salt, device_id, percent) is deployments.in_canary(salt, device_id, percent)


# ---- the assignment document ----------------------------------------------------------------


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def version_info(version: int) -> VersionInfo:
    return VersionInfo(
        model="iris",
        version=version,
        manifest=None,  # type: ignore[arg-type]  # not part of the document
        manifest_sha256=sha(f"manifest {version}"),
        manifest_size=100,
        model_sha256=sha(f"model {version}"),
        model_size=1000,
        created=datetime(2026, 1, 1, tzinfo=UTC),
    )


def hub_document(candidate: int | None = 3, percent: int = 10, serial: int = 7) -> bytes:
    """The bytes the hub signs, made by the hub's own code."""
    dep = Deployment(
        id=serial,
        group="default",
        model="iris",
        stable=2,
        candidate=candidate,
        percent=percent,
        salt="0123456789abcdef",
        previous_stable=1,
        metadata_version=None,
        created=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        created_by="op",
    )
    return deployments.assignment_document(
        dep, version_info(2), version_info(candidate) if candidate is not None else None
    )


def test_parse_the_hubs_document() -> None:
    a = Assignment.parse(hub_document())
    assert (a.group, a.model, a.serial, a.percent, a.salt) == ("default", "iris", 7, 10, "0123456789abcdef")
    assert a.stable.version == 2 and a.stable.sha256 == sha("model 2")
    assert a.stable.manifest == "models/iris/2/manifest.json" and a.stable.model == "models/iris/2/model.onnx"
    assert a.stable.manifest_sha256 == sha("manifest 2")
    assert a.candidate is not None and a.candidate.version == 3
    assert a.created == "2026-01-02T03:04:05Z"
    assert Assignment.parse(json.loads(hub_document())) == a  # the decoded object works too
    assert Assignment.parse(hub_document().decode()) == a


def test_parse_without_candidate() -> None:
    a = Assignment.parse(hub_document(candidate=None, percent=0))
    assert a.candidate is None
    assert choose(a, "dev-1").role == "stable"


def test_choose_routes_by_bucket() -> None:
    a = Assignment.parse(hub_document(percent=30))
    for i in range(300):
        device = f"dev-{i}"
        choice = choose(a, device)
        assert choice.bucket == bucket(a.salt, device)
        if deployments.in_canary(a.salt, device, 30):
            assert (choice.role, choice.version.version) == ("candidate", 3)
        else:
            assert (choice.role, choice.version.version) == ("stable", 2)
        assert choice.ref == VersionRef("iris", choice.version.version, choice.version.sha256)


def test_choose_needs_a_device_id() -> None:
    with pytest.raises(ValueError, match="device_id"):
        choose(Assignment.parse(hub_document()), "")


def test_group_is_checked_when_given() -> None:
    assert Assignment.parse(hub_document(), group="default").group == "default"
    with pytest.raises(AssignmentError, match="group 'default', this device is in 'lab'"):
        Assignment.parse(hub_document(), group="lab")


def test_unknown_keys_are_ignored() -> None:
    doc = json.loads(hub_document())
    doc["rollout_note"] = "added by a newer hub"
    doc["stable"]["size"] = 1000
    assert Assignment.parse(doc) == Assignment.parse(hub_document())


def edit(path: str, value: Any) -> dict[str, Any]:
    """The hub's document with one field replaced (value DELETE removes it)."""
    doc: dict[str, Any] = json.loads(hub_document())
    *parents, key = path.split(".")
    target = doc
    for p in parents:
        target = target[p]
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    return doc


DELETE = object()
MALFORMED: list[tuple[str, Any, Any, str]] = [
    ("not-json", None, b"{", "not valid JSON"),
    ("not-utf8", None, b"\xff\xff\xff", "not valid JSON"),
    ("nan", None, b'{"percent": NaN}', "not valid JSON"),
    ("array", None, b"[]", "must be a JSON object"),
    ("other-format", "format", "outpost-assignment/2", "format 'outpost-assignment/2' is not supported"),
    ("no-format", "format", DELETE, "format None"),
    ("group-missing", "group", DELETE, "group is missing"),
    ("group-bad-name", "group", "../etc", "group '../etc' is not a valid name"),
    ("model-not-string", "model", 5, "model must be a string"),
    ("serial-bool", "serial", True, "serial must be an integer"),
    ("serial-negative", "serial", -1, "serial must be at least 0"),
    ("stable-missing", "stable", DELETE, "stable is missing"),
    ("stable-null", "stable", None, "stable must be an object"),
    ("stable-version-zero", "stable.version", 0, "stable.version must be at least 1"),
    ("stable-sha-upper", "stable.sha256", sha("x").upper(), "stable.sha256 must be 64 lowercase hex"),
    ("stable-sha-short", "stable.sha256", "abc", "stable.sha256 must be 64"),
    ("manifest-sha-missing", "stable.manifest_sha256", DELETE, "stable.manifest_sha256 is missing"),
    ("model-elsewhere", "stable.model", "models/other/2/model.onnx", "not a file under models/iris/2/"),
    ("model-other-version", "stable.model", "models/iris/1/model.onnx", "not a file under models/iris/2/"),
    ("model-deeper", "stable.manifest", "models/iris/2/x/manifest.json", "not a file under"),
    ("model-dir", "stable.manifest", "models/iris/2/", "not a file under"),
    ("candidate-missing", "candidate", DELETE, "candidate is missing"),
    ("candidate-a-list", "candidate", [], "candidate must be an object"),
    (
        "candidate-is-stable",
        "candidate",
        json.loads(hub_document())["stable"],
        "the candidate is the stable version",
    ),
    ("percent-over", "percent", 101, "percent must be 0..100"),
    ("percent-float", "percent", 10.0, "percent must be an integer"),
    ("salt-space", "salt", "a b", "salt must be"),
    ("salt-empty", "salt", "", "salt must be"),
    ("created-number", "created", 5, "created must be a string"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_documents_are_refused(path: str | None, value: Any, message: str) -> None:
    doc = value if path is None else edit(path, value)
    with pytest.raises(AssignmentError, match=re.escape(message)) as info:
        Assignment.parse(doc)
    assert isinstance(info.value, UpdateError)


def test_percent_without_candidate_is_refused() -> None:
    doc = json.loads(hub_document(candidate=None, percent=0))
    doc["percent"] = 20
    with pytest.raises(AssignmentError, match="percent is 20 but there is no candidate"):
        Assignment.parse(doc)


# -- experiments ------------------------------------------------------------------------------


def with_experiment(experiment: Any, percent: int = 100) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(hub_document(percent=percent))
    doc["experiment"] = experiment
    return doc


def test_an_experiment_keeps_the_stable_version_and_names_the_arm() -> None:
    a = Assignment.parse(with_experiment({"mode": "ab", "weight": 30}, percent=50))
    assert a.experiment is not None and (a.experiment.mode, a.experiment.weight) == ("ab", 30)
    inside = outside = 0
    for i in range(200):
        choice = choose(a, f"dev-{i}")
        assert choice.role == "stable" and choice.version.version == 2  # the life cycle's target
        if deployments.in_canary(a.salt, f"dev-{i}", 50):
            inside += 1
            assert choice.experiment == a.experiment and choice.arm is not None and choice.arm.version == 3
            assert choice.arm_ref == VersionRef("iris", 3, sha("model 3"))
        else:
            outside += 1
            assert choice.experiment is None and choice.arm is None
    assert inside and outside
    shadow = Assignment.parse(with_experiment({"mode": "shadow", "sample": 100}))
    assert shadow.experiment is not None and (shadow.experiment.mode, shadow.experiment.sample) == (
        "shadow",
        100,
    )
    assert Assignment.parse(with_experiment(None)).experiment is None


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        ({"mode": "ab", "weight": 0}, "weight must be at least 1"),
        ({"mode": "ab", "weight": 100}, "weight must be 1..99"),
        ({"mode": "ab"}, "weight"),
        ({"mode": "shadow", "sample": 101}, "sample must be 1..100"),
        ({"mode": "canary"}, "mode must be 'ab' or 'shadow'"),
        ("ab", "experiment must be an object"),
    ],
)
def test_malformed_experiments_are_refused(experiment: Any, message: str) -> None:
    with pytest.raises(AssignmentError, match=message):
        Assignment.parse(with_experiment(experiment))


def test_an_experiment_needs_a_candidate() -> None:
    doc: dict[str, Any] = json.loads(hub_document(candidate=None, percent=0))
    doc["experiment"] = {"mode": "shadow", "sample": 10}
    with pytest.raises(AssignmentError, match="needs a candidate"):
        Assignment.parse(doc)


def test_ab_arm_is_sticky_by_key_and_close_to_the_weight() -> None:
    from agent.update.canary import ab_arm

    for key in ("user-1", "user-2", "order/77"):
        first = ab_arm("salt", key, 30, 0.0)
        assert all(ab_arm("salt", key, 30, random.random()) == first for _ in range(50))
    keyed = sum(ab_arm("salt", f"user-{i}", 30, 0.0) for i in range(4000)) / 4000
    drawn = sum(ab_arm("salt", None, 30, random.Random(i).random()) for i in range(4000)) / 4000
    assert abs(keyed - 0.30) < 0.03 and abs(drawn - 0.30) < 0.03
