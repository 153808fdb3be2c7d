"""Which onnxruntime execution providers a session asks for, and why. Pure: no onnxruntime here.

The configuration lists providers in order of preference (`[runtime] providers`, per model
`[runtime.models.NAME] providers`). A session asks for the preferred providers that this build
of onnxruntime has (`onnxruntime.get_available_providers()`), always ending with the CPU
provider, which every build has: onnxruntime hands a graph node to the first provider in the
list that can run it, so CPU is the net under whatever the accelerator cannot do. When none of
the preferred providers is present, the session runs on CPU, and the choice says why.

Invariants: the CPU provider is always in the result and always last; the result keeps the
configured order; every provider left out is named in the reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS: tuple[str, ...] = (CPU,)


@dataclass(frozen=True)
class ProviderChoice:
    """The providers to ask onnxruntime for, and a note for status when it is not what was asked."""

    providers: tuple[str, ...]
    reasons: tuple[str, ...] = ()

    @property
    def note(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "as configured"


def choose_providers(preferred: Sequence[str], available: Sequence[str]) -> ProviderChoice:
    """The preferred providers this onnxruntime build has, in order, with CPU last."""
    have = set(available)
    chosen: list[str] = []
    reasons: list[str] = []
    for name in preferred:
        if name in chosen or name == CPU:
            continue
        if name in have:
            chosen.append(name)
        else:
            reasons.append(f"{name} is not available in this onnxruntime build")
    if not chosen and any(p != CPU for p in preferred):
        reasons.append("falling back to CPUExecutionProvider")
    return ProviderChoice((*chosen, CPU), tuple(reasons))


def provider_tag(name: str) -> str:
    """The hardware tag of a provider: "CUDAExecutionProvider" -> "ep:cuda"."""
    short = name.removesuffix("ExecutionProvider") or name
    return "ep:" + short.lower()
