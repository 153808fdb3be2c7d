"""The device's hardware class: a set of tags that model variants are matched against.

    hw = detect(override=config.runtime.hardware_tags)
    hw.tags   # frozenset({"arch:x86_64", "cpu:avx2", "cpu:vnni", "ep:cpu", ...})

Tags are `kind:value` strings, lowercase:

- `arch:<machine>`: x86_64, aarch64, armv7l, ... (amd64 and arm64 are spelled x86_64 and aarch64)
- `cpu:<feature>`: the instruction-set features that change which model runs best, from
  /proc/cpuinfo (x86 `flags`, ARM `Features`): avx, avx2, fma, f16c, avx512f, avx512bw,
  avx512_vnni, avx_vnni, amx_int8, avx512_bf16 and avx512_fp16 on x86; neon, asimddp, i8mm,
  sve, bf16 and fp16 (asimdhp) on ARM. Two summaries: `cpu:vnni` (an int8 dot-product on x86:
  avx512_vnni or avx_vnni) and `cpu:dotprod` (ARM's asimddp), so a variant for "fast int8"
  can require `cpu:vnni|cpu:dotprod` (a requirement with alternatives, see `meets`).
- `ep:<provider>`: the onnxruntime execution providers present (`ep:cpu`, `ep:cuda`,
  `ep:openvino`, ...).

The parsing is pure (captured cpuinfo texts are tested); `detect` is the thin I/O around it.
A device whose detection is wrong sets `[runtime] hardware_tags` and those tags are used as
they are, instead of the detected ones.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.runtime.providers import provider_tag

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
# Raw cpuinfo flag -> the tags it gives. Only features that decide between model variants.
_FLAG_TAGS: dict[str, tuple[str, ...]] = {
    # x86 `flags`
    "avx": ("cpu:avx",),
    "avx2": ("cpu:avx2",),
    "fma": ("cpu:fma",),
    "f16c": ("cpu:f16c",),
    "avx512f": ("cpu:avx512f",),
    "avx512bw": ("cpu:avx512bw",),
    "avx512_vnni": ("cpu:avx512_vnni", "cpu:vnni"),
    "avx_vnni": ("cpu:avx_vnni", "cpu:vnni"),
    "amx_int8": ("cpu:amx_int8",),
    "avx512_bf16": ("cpu:avx512_bf16",),
    "avx512_fp16": ("cpu:avx512_fp16",),
    # ARM `Features`
    "neon": ("cpu:neon",),
    "asimd": ("cpu:neon",),
    "asimddp": ("cpu:asimddp", "cpu:dotprod"),
    "asimdhp": ("cpu:fp16",),
    "i8mm": ("cpu:i8mm",),
    "sve": ("cpu:sve",),
    "bf16": ("cpu:bf16",),
}


@dataclass(frozen=True)
class Hardware:
    """What this device is, as tags; `source` says whether they were detected or configured."""

    tags: frozenset[str]
    source: str = "detected"  # or "configured (runtime.hardware_tags)"

    def meets(self, requires: Iterable[str]) -> bool:
        """Whether this device meets every requirement (see `meets`)."""
        return meets(self.tags, requires)

    def status(self) -> dict[str, object]:
        return {"tags": sorted(self.tags), "source": self.source}


def meets(tags: Iterable[str], requires: Iterable[str]) -> bool:
    """Whether `tags` meet every requirement; a requirement is a tag, or alternatives joined by
    "|" of which one is enough ("cpu:vnni|cpu:dotprod": fast int8 on x86 or on ARM)."""
    have = set(tags)
    return all(any(alt in have for alt in req.split("|")) for req in requires)


def normalize_arch(machine: str) -> str:
    m = machine.strip().lower()
    return _ARCH_ALIASES.get(m, m)


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The raw feature flags of the first processor in a /proc/cpuinfo text (x86 `flags`, ARM
    `Features`), lowercase. Empty when the text has neither."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.lower().split())
    return frozenset()


def hardware_tags(machine: str, cpu_flags: Iterable[str], providers: Sequence[str]) -> frozenset[str]:
    """The tags of a device with this machine name, cpuinfo flags and onnxruntime providers."""
    tags = {"arch:" + normalize_arch(machine)} if machine.strip() else set()
    for flag in cpu_flags:
        tags.update(_FLAG_TAGS.get(flag, ()))
    tags.update(provider_tag(p) for p in providers)
    return frozenset(tags)


def detect(override: Sequence[str] = (), providers: Sequence[str] | None = None) -> Hardware:
    """This device's hardware: the configured tags when `override` is not empty, else detected
    from platform.machine(), /proc/cpuinfo and onnxruntime's available providers."""
    if override:
        return Hardware(frozenset(override), "configured (runtime.hardware_tags)")
    try:
        flags = parse_cpu_flags(CPUINFO.read_text(errors="replace"))
    except OSError as exc:  # not Linux, or /proc not mounted: no CPU features, still a class
        log.warning("cannot read %s (%s): no CPU features detected", CPUINFO, exc)
        flags = frozenset()
    if providers is None:
        from agent.runtime.session import available_providers

        providers = available_providers()
    return Hardware(hardware_tags(platform.machine(), flags, providers))
