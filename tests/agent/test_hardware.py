"""Hardware detection: tags from captured /proc/cpuinfo texts, and the configured override."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.runtime import hardware
from agent.runtime.hardware import Hardware, detect, hardware_tags, normalize_arch, parse_cpu_flags

# An Intel Ice Lake server (AVX-512 with VNNI).
X86_VNNI = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov sse sse2 ssse3 fma cx16 \
sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor avx2 bmi2 avx512f avx512dq avx512cd \
avx512bw avx512vl avx512ifma avx512vbmi avx512_vbmi2 gfni vaes avx512_vnni avx512_bitalg
bugs\t\t: spectre_v1 spectre_v2

processor\t: 1
flags\t\t: fpu sse sse2
"""

# An Intel Haswell laptop (AVX2, no VNNI).
X86_AVX2 = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i7-4600U CPU @ 2.10GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 \
movbe popcnt aes xsave avx f16c rdrand lahf_lm abm avx2 bmi1 bmi2 erms
"""

# An Alder Lake desktop: AVX-VNNI without AVX-512.
X86_AVX_VNNI = "processor\t: 0\nflags\t\t: sse sse2 avx avx2 fma f16c avx_vnni\n"

# A Raspberry Pi 5 (Cortex-A76): dot-product and fp16.
AARCH64_DOTPROD = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop \
asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
"""

# A Raspberry Pi 3 (Cortex-A53): plain NEON.
AARCH64_PLAIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd03\n"


@pytest.mark.parametrize(
    ("machine", "cpuinfo", "providers", "has", "lacks"),
    [
        pytest.param(
            "x86_64",
            X86_VNNI,
            ["CPUExecutionProvider"],
            {"arch:x86_64", "cpu:avx2", "cpu:avx512f", "cpu:avx512_vnni", "cpu:vnni", "ep:cpu"},
            {"cpu:dotprod", "cpu:avx_vnni", "ep:cuda"},
            id="x86-avx512-vnni",
        ),
        pytest.param(
            "x86_64",
            X86_AVX2,
            ["CPUExecutionProvider"],
            {"arch:x86_64", "cpu:avx", "cpu:avx2", "cpu:fma", "cpu:f16c", "ep:cpu"},
            {"cpu:vnni", "cpu:avx512f"},
            id="x86-avx2-no-vnni",
        ),
        pytest.param(
            "AMD64",
            X86_AVX_VNNI,
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            {"arch:x86_64", "cpu:avx_vnni", "cpu:vnni", "ep:cuda", "ep:cpu"},
            {"cpu:avx512f", "cpu:avx512_vnni"},
            id="x86-avx-vnni-cuda",
        ),
        pytest.param(
            "aarch64",
            AARCH64_DOTPROD,
            ["XnnpackExecutionProvider", "CPUExecutionProvider"],
            {"arch:aarch64", "cpu:neon", "cpu:asimddp", "cpu:dotprod", "cpu:fp16", "ep:xnnpack", "ep:cpu"},
            {"cpu:vnni", "cpu:avx2", "cpu:i8mm"},
            id="aarch64-dotprod",
        ),
        pytest.param(
            "arm64",
            AARCH64_PLAIN,
            ["CPUExecutionProvider"],
            {"arch:aarch64", "cpu:neon", "ep:cpu"},
            {"cpu:dotprod", "cpu:fp16"},
            id="aarch64-plain",
        ),
        pytest.param(
            "x86_64", "", ["CPUExecutionProvider"], {"arch:x86_64", "ep:cpu"}, {"cpu:avx"}, id="no-cpuinfo"
        ),
    ],
)
def test_tags_from_cpuinfo(
    machine: str, cpuinfo: str, providers: list[str], has: set[str], lacks: set[str]
) -> None:
    tags = hardware_tags(machine, parse_cpu_flags(cpuinfo), providers)
    assert has <= tags
    assert not (lacks & tags)


def test_only_the_first_processor_counts() -> None:
    assert "avx512_vnni" in parse_cpu_flags(X86_VNNI)
    assert parse_cpu_flags("processor\t: 0\nvendor_id\t: x\n") == frozenset()


@pytest.mark.parametrize(
    ("machine", "arch"), [("AMD64", "x86_64"), ("arm64", "aarch64"), ("armv7l", "armv7l")]
)
def test_normalize_arch(machine: str, arch: str) -> None:
    assert normalize_arch(machine) == arch


def test_meets() -> None:
    hw = Hardware(frozenset({"arch:x86_64", "cpu:vnni", "ep:cpu"}))
    assert hw.meets([])
    assert hw.meets(["cpu:vnni"])
    assert not hw.meets(["cpu:vnni", "ep:cuda"])


def test_override_wins_over_detection() -> None:
    hw = detect(override=("arch:aarch64", "cpu:dotprod"), providers=["CPUExecutionProvider"])
    assert hw.tags == {"arch:aarch64", "cpu:dotprod"}
    assert hw.status() == {
        "tags": ["arch:aarch64", "cpu:dotprod"],
        "source": "configured (runtime.hardware_tags)",
    }


def test_detect_reads_this_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "cpuinfo"
    fake.write_text(AARCH64_DOTPROD)
    monkeypatch.setattr(hardware, "CPUINFO", fake)
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    hw = detect()  # the real onnxruntime's providers
    assert {"arch:aarch64", "cpu:dotprod", "ep:cpu"} <= hw.tags
    assert hw.source == "detected"


def test_detect_without_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")
    hw = detect(providers=["CPUExecutionProvider"])
    assert "ep:cpu" in hw.tags
    assert not any(t.startswith("cpu:") for t in hw.tags)
