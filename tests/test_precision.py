"""What `precision: auto` and `compile: auto` pick (`adm.precision`, `adm.stage`): bf16 only
where the device computes it natively, read from the CPU's flags as Linux lists them and from
the GPU's compute capability; compile for long generation stages and never for a server."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adm.precision import (AUTOCAST, auto_precision, cpu_flags, cpu_precision, gpu_precision,
                           precision_name)
from adm.stage import COMPILE_PAYS_AFTER_CALLS, resolve_compile, resolve_fast_path

# The "flags" line of /proc/cpuinfo on three cloud CPUs (abridged to the AVX-512 part and a
# few neighbours): Ice Lake and Cascade Lake have AVX-512 but no bf16 instructions (oneDNN
# emulates bf16 there, slower than fp32); Zen 4 has AVX-512 BF16; Sapphire Rapids has AMX.
ICE_LAKE = ("fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl "
            "avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq")
CASCADE_LAKE = "fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
ZEN4 = ICE_LAKE + " avx512_bf16"
SAPPHIRE_RAPIDS = ICE_LAKE + " avx512_fp16 amx_bf16 amx_tile amx_int8"


def cpuinfo(flags: str, cpus: int = 2) -> str:
    """/proc/cpuinfo's text for `cpus` processors with these flags."""
    return "".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n"
                   f"bugs\t\t: spectre_v1\n\n" for i in range(cpus))


@pytest.mark.parametrize("flags,want", [
    (ICE_LAKE, "fp32"), (CASCADE_LAKE, "fp32"), ("", "fp32"),
    (ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), ("sse2 amx_bf16", "bf16")])
def test_cpu_precision_is_bf16_only_with_native_bf16_instructions(flags, want):
    assert cpu_precision(cpu_flags(cpuinfo(flags))) == want


def test_cpu_flags_reads_the_flags_lines_only():
    text = cpuinfo("avx2 fma") + "model name\t: avx512_bf16 in a name\n"
    assert cpu_flags(text) == {"avx2", "fma"}
    # An ARM CPU lists "Features", not "flags": no x86 flags, fp32.
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\nCPU implementer\t: 0x41\n"
    assert cpu_flags(arm) == frozenset() and cpu_precision(cpu_flags(arm)) == "fp32"


@pytest.mark.parametrize("capability,rocm,want", [
    ((6, 0), False, "fp16"),  # P100
    ((7, 0), False, "fp16"),  # V100
    ((7, 5), False, "fp16"),  # T4: bf16 only emulated
    ((8, 0), False, "bf16"),  # A100
    ((8, 6), False, "bf16"),  # A10G
    ((8, 9), False, "bf16"),  # L4
    ((9, 0), False, "bf16"),  # H100
    ((9, 0), True, "bf16"),  # MI200 (ROCm)
])
def test_gpu_precision_is_bf16_from_compute_capability_8(capability, rocm, want):
    assert gpu_precision(capability, rocm) == want


def test_this_cpu_answers_from_its_own_flags():
    """auto_precision on this machine's CPU follows /proc/cpuinfo, read here independently."""
    path = Path("/proc/cpuinfo")
    words = set(path.read_text().split()) if path.exists() else set()
    want = "bf16" if {"avx512_bf16", "amx_bf16"} & words else "fp32"
    assert auto_precision(torch.device("cpu")) == want


def test_precision_names_and_dtypes():
    assert {k: precision_name(v) for k, v in AUTOCAST.items()} == {k: k for k in AUTOCAST}
    assert AUTOCAST["bf16"] is torch.bfloat16 and AUTOCAST["fp16"] is torch.float16


def test_compile_auto_generation_by_calls_server_never():
    assert resolve_compile("auto", COMPILE_PAYS_AFTER_CALLS) is True
    assert resolve_compile("auto", COMPILE_PAYS_AFTER_CALLS - 1) is False
    assert resolve_compile("auto", None) is False  # a server, on any device
    assert resolve_compile(True, None) is True and resolve_compile(False, 10**9) is False
    assert resolve_fast_path("fp16", "auto", torch.device("cpu"), None) == ("fp16", False)
