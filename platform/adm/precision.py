"""How the networks' arithmetic runs: the precision settings' autocast dtypes, and what the
setting "auto" picks for a device.

"auto" picks a 16-bit autocast only where the device computes it natively, since an emulated
one is slower than float32:

- a CUDA GPU: bf16 from compute capability 8.0 (Ampere) up, else fp16 (which every CUDA GPU
  computes natively); a ROCm GPU: bf16, as `torch.cuda.is_bf16_supported` counts it (not
  measured by this project; older AMD cards may emulate it: set the precision there).
- a CPU: bf16 where it has the AVX-512 BF16 or AMX-BF16 instructions (the `avx512_bf16` /
  `amx_bf16` flags of Linux's /proc/cpuinfo), else fp32. oneDNN's own
  `_is_mkldnn_bf16_supported()` is no guide: it says yes on any AVX-512 CPU (Skylake, Cascade
  Lake, Ice Lake), which converts through float32 and runs slower than fp32. Where no such
  flags can be read (macOS, Windows, an ARM CPU, whose bf16 this project has not measured) the
  answer is fp32: correct everywhere, and never slower than an emulation.

Nothing here imports Ray: a Ray job asks this module on the worker that runs the networks
(`adm.generate.pipeline.probe_device`), not on the machine that submitted it.
"""
from __future__ import annotations

from pathlib import Path

import torch

# Precision setting -> the dtype the networks run under autocast (None: float32 throughout).
AUTOCAST: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# CPU feature flags (as Linux names them) of native bf16 arithmetic: AVX-512 BF16 (Cooper
# Lake, Zen 4 and later) and AMX-BF16 (Sapphire Rapids and later).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def precision_name(dtype: torch.dtype | None) -> str:
    """The precision setting whose autocast dtype is `dtype` (None: "fp32")."""
    return next(k for k, v in AUTOCAST.items() if v == dtype)


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from the text of Linux's /proc/cpuinfo (read when `cpuinfo` is
    None): the words of its "flags" lines. Empty where there is no such file or line."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return frozenset()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return frozenset(flags)


def cpu_precision(flags: frozenset[str] | set[str]) -> str:
    """"auto" on a CPU with feature `flags`: "bf16" where bf16 is native, else "fp32"."""
    return "bf16" if NATIVE_BF16_CPU_FLAGS & set(flags) else "fp32"


def gpu_precision(capability: tuple[int, int], rocm: bool = False) -> str:
    """"auto" on a GPU of compute `capability` (major, minor): "bf16" where bf16 is native
    (CUDA 8.0 and up, any ROCm GPU; what `torch.cuda.is_bf16_supported(including_emulation=
    False)` answers), else "fp16"."""
    return "bf16" if rocm or capability >= (8, 0) else "fp16"


def auto_precision(device: torch.device) -> str:
    """The precision setting "auto" picks on `device` (a key of AUTOCAST), asked of this
    process's hardware: call it where the networks run."""
    if device.type == "cuda":
        return gpu_precision(torch.cuda.get_device_capability(device),
                             rocm=torch.version.hip is not None)
    return cpu_precision(cpu_flags())
