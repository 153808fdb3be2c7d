"""What each model runs on, as a device's retained `state` says: the hardware variant of its
default version and the execution providers onnxruntime registered for it, e.g.
`{"wine": "int8 on CPU"}`. Pure; the CLI's `outpost fleet` and the dashboard's fleet page show it.

The state carries `providers` ({model: [provider, ...]}, best first), `variants` ({model: name},
only for packages with variants) and `hardware` (the device's tags). Agents older than these
keys send none of them: nothing is shown then, rather than a guess."""

from __future__ import annotations

from typing import Any

SUFFIX = "ExecutionProvider"


def provider_name(provider: str) -> str:
    """`CUDAExecutionProvider` -> `CUDA`: the part an operator recognises."""
    return provider[: -len(SUFFIX)] if provider.endswith(SUFFIX) and provider != SUFFIX else provider


def runs_on(state: dict[str, Any]) -> dict[str, str]:
    """{model: "<variant> on <provider>[+<fallback>...]"} for the models the state names."""
    providers = state.get("providers")
    variants = state.get("variants")
    providers = providers if isinstance(providers, dict) else {}
    variants = variants if isinstance(variants, dict) else {}
    out: dict[str, str] = {}
    for model in sorted(set(providers) | set(variants)):
        names = providers.get(model)
        chain = "+".join(provider_name(str(p)) for p in names) if isinstance(names, list) else ""
        variant = variants.get(model)
        parts = [str(variant)] if isinstance(variant, str) and variant else []
        if chain:
            parts.append(f"on {chain}")
        if parts:
            out[model] = " ".join(parts)
    return out


def hardware_text(state: dict[str, Any]) -> str:
    """The device's hardware tags, comma-separated ("" when it sent none)."""
    tags = state.get("hardware")
    return ", ".join(str(t) for t in tags) if isinstance(tags, list) else ""
