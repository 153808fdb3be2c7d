"""Execution providers: the pure choice, and real onnxruntime sessions falling back to CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from agent.runtime.providers import CPU, choose_providers, provider_tag
from agent.runtime.session import OrtSession, SessionOptions, available_providers
from tests.support.packages import affine_package

CUDA = "CUDAExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
XNNPACK = "XnnpackExecutionProvider"


@pytest.mark.parametrize(
    ("preferred", "available", "providers", "reasons"),
    [
        pytest.param([CPU], [CPU], (CPU,), (), id="cpu-only"),
        pytest.param([CUDA, CPU], [CUDA, CPU], (CUDA, CPU), (), id="cuda-present"),
        pytest.param(
            [CUDA, CPU],
            [CPU],
            (CPU,),
            (f"{CUDA} is not available in this onnxruntime build", f"falling back to {CPU}"),
            id="cuda-absent",
        ),
        pytest.param(
            [OPENVINO, CUDA, XNNPACK],
            [XNNPACK, CUDA, CPU],
            (CUDA, XNNPACK, CPU),
            (f"{OPENVINO} is not available in this onnxruntime build",),
            id="keeps-configured-order-cpu-added-last",
        ),
        pytest.param([CPU, CUDA], [CUDA, CPU], (CUDA, CPU), (), id="cpu-always-last"),
        pytest.param([CUDA, CUDA], [CUDA, CPU], (CUDA, CPU), (), id="duplicates"),
    ],
)
def test_choose_providers(
    preferred: list[str], available: list[str], providers: tuple[str, ...], reasons: tuple[str, ...]
) -> None:
    choice = choose_providers(preferred, available)
    assert choice.providers == providers
    assert choice.reasons == reasons
    assert choice.note == ("as configured" if not reasons else "; ".join(reasons))


@pytest.mark.parametrize(
    ("name", "tag"),
    [(CPU, "ep:cpu"), (CUDA, "ep:cuda"), (OPENVINO, "ep:openvino"), (XNNPACK, "ep:xnnpack")],
)
def test_provider_tag(name: str, tag: str) -> None:
    assert provider_tag(name) == tag


def test_real_session_falls_back_to_cpu_when_preferred_provider_is_absent(tmp_path: Path) -> None:
    assert CUDA not in available_providers()  # this machine has no CUDA build
    package = affine_package(tmp_path / "pkg")
    session = OrtSession(package / "model.onnx", SessionOptions(providers=(CUDA, CPU)))
    assert session.providers == (CPU,)
    status = session.provider_status()
    assert status["providers"] == [CPU]
    assert f"{CUDA} is not available" in status["providers_note"]
    assert "falling back to CPUExecutionProvider" in status["providers_note"]


def test_real_session_default_is_cpu_as_configured(tmp_path: Path) -> None:
    package = affine_package(tmp_path / "pkg")
    session = OrtSession(package / "model.onnx", SessionOptions())
    assert session.provider_status() == {"providers": [CPU], "providers_note": "as configured"}


def test_provider_failing_at_session_creation_falls_back_to_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider the build has can still fail on the device (driver missing): CPU takes over."""
    import onnxruntime as ort

    real = ort.InferenceSession
    present = [*ort.get_available_providers(), CUDA]
    monkeypatch.setattr(ort, "get_available_providers", lambda: present)

    def session(path: str, sess_options: Any = None, providers: list[str] | None = None) -> Any:
        if providers and CUDA in providers:
            raise RuntimeError("CUDA driver version is insufficient")
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", session)
    package = affine_package(tmp_path / "pkg")
    s = OrtSession(package / "model.onnx", SessionOptions(providers=(CUDA,)))
    assert s.providers == (CPU,)
    assert "failed at session creation" in s.provider_note
    assert "CUDA driver version is insufficient" in s.provider_note


def test_config_providers_and_per_model_override() -> None:
    cfg = parse_config(
        {
            "runtime": {
                "providers": [OPENVINO, CPU],
                "hardware_tags": ["arch:x86_64", "cpu:vnni"],
                "models": {"wine": {"providers": [CUDA]}},
            }
        }
    )
    assert cfg.runtime.providers == (OPENVINO, CPU)
    assert cfg.runtime.providers_for("wine") == (CUDA,)
    assert cfg.runtime.providers_for("other") == (OPENVINO, CPU)
    assert cfg.runtime.hardware_tags == ("arch:x86_64", "cpu:vnni")
    assert parse_config({}).runtime.providers == (CPU,)


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        pytest.param({"providers": []}, "runtime.providers", id="empty"),
        pytest.param({"providers": CPU}, "runtime.providers: expected a list", id="not-a-list"),
        pytest.param({"providers": [1]}, "runtime.providers[0]", id="not-strings"),
        pytest.param({"hardware_tags": ["vnni"]}, "runtime.hardware_tags", id="tag-without-kind"),
        pytest.param({"models": {"m": {"providers": []}}}, "runtime.models.m.providers", id="model-empty"),
    ],
)
def test_config_refuses_bad_providers(runtime: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"runtime": runtime})


def test_a_cpu_session_runs_past_the_wrapper_and_answers_as_it_does(tmp_path: Path) -> None:
    import numpy as np

    s = OrtSession(affine_package(tmp_path / "pkg") / "model.onnx", SessionOptions())
    assert s._run != s._session.run  # onnxruntime's binding, called directly
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    wrapped = dict(zip(s.output_names, s._session.run(s.output_names, {"x": x}), strict=True))
    for _ in range(2):  # the kept RunOptions serves every call
        direct = s.run({"x": x})
        assert direct.keys() == wrapped.keys()
        for name, value in wrapped.items():
            np.testing.assert_array_equal(direct[name], value)
    with pytest.raises(Exception, match="nope"):  # a wrong input still fails, in onnxruntime
        s.run({"nope": x})


def test_without_the_binding_it_expects_the_session_uses_the_public_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    import onnxruntime as ort

    real = ort.InferenceSession

    class Wrapper:  # an onnxruntime whose InferenceSession keeps no `_sess`
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.real = real(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            if name == "_sess":
                raise AttributeError(name)
            return getattr(self.real, name)

    monkeypatch.setattr(ort, "InferenceSession", Wrapper)
    s = OrtSession(affine_package(tmp_path / "pkg") / "model.onnx", SessionOptions())
    assert s._run == s._session.real.run
    out = s.run({"x": np.ones((1, 4), np.float32)})
    assert set(out) == set(s.output_names)
