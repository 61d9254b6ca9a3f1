"""Forward time of the ADM U-Net: fused SDPA kernels vs the unfused MATH form, float32 vs bf16
autocast, eager vs torch.compile (and channels_last), measured in one run.

    python benchmarks/models.py                       # 64x64 ADM preset, batch 8, CPU
    python benchmarks/models.py --device cuda --batch 32
    python benchmarks/models.py --preset 128x128_diffusion --device cuda

Timing is `torch.utils.benchmark.Timer` (CUDA synchronisation, thread count, block sizes):
configurations are timed round-robin, one `blocked_autorange` of each per round, and the rounds'
measurements merged (median), so a machine that gets busier during the run slows every
configuration alike.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from adm.presets import preset

CONFIGS = {  # name: (use_sdpa, autocast dtype, compile, channels_last)
    "sdpa fp32 eager": (True, None, False, False),
    "plain-attn fp32 eager": (False, None, False, False),
    "sdpa bf16 eager": (True, torch.bfloat16, False, False),
    "plain-attn bf16 eager": (False, torch.bfloat16, False, False),
    "sdpa fp32 eager channels_last": (True, None, False, True),
    "sdpa fp32 compile": (True, None, True, False),
    "sdpa bf16 compile": (True, torch.bfloat16, True, False),
}
RATIOS = [  # (label, config, baseline)
    ("SDPA vs plain attention, fp32", "sdpa fp32 eager", "plain-attn fp32 eager"),
    ("SDPA vs plain attention, bf16", "sdpa bf16 eager", "plain-attn bf16 eager"),
    ("bf16 autocast vs fp32 (SDPA, eager)", "sdpa bf16 eager", "sdpa fp32 eager"),
    ("channels_last vs contiguous (fp32)", "sdpa fp32 eager channels_last", "sdpa fp32 eager"),
    ("torch.compile vs eager, fp32", "sdpa fp32 compile", "sdpa fp32 eager"),
    ("torch.compile vs eager, bf16", "sdpa bf16 compile", "sdpa bf16 eager"),
    ("best (bf16 + compile) vs fp32 eager", "sdpa bf16 compile", "sdpa fp32 eager"),
]


def forward_gflops(flags: dict, x, t, y) -> float:
    """FLOPs of one forward (2 per multiply-add), counted on the meta device."""
    from adm import factory

    with torch.device("meta"):
        model = factory.create_model(flags)
    with FlopCounterMode(display=False) as counter:
        model(x.to("meta"), t.to("meta"), None if y is None else y.to("meta"))
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="64x64_diffusion")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    ap.add_argument("--min-run-time", type=float, default=0.2,
                    help="seconds of forwards per configuration and round (blocked_autorange)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    args = ap.parse_args()

    dev = torch.device(args.device)
    p = preset(args.preset)
    # use_fp16 off: the comparison sets precision itself (use_fp16 would add fp16 autocast on CUDA).
    flags = {**p.model_flags, "use_fp16": False}
    from adm import factory

    torch.manual_seed(0)
    base = factory.create_model(flags).to(dev).eval()
    size = flags["image_size"]
    x = torch.randn(args.batch, 3, size, size, device=dev)
    t = torch.randint(0, 1000, (args.batch,), device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev) if flags["class_cond"] else None

    names = [n.strip() for n in args.configs.split(",")]
    runners = {}
    for name in names:
        use_sdpa, dtype, compiled, channels_last = CONFIGS[name]
        # Each configuration gets its own copy of the weights: a compiled module specialises on
        # its memory format.
        model = factory.create_model(flags).to(dev).eval()
        model.load_state_dict(base.state_dict())
        # "plain" attention: SDPA restricted to its unfused matmul/softmax (MATH) kernel.
        backends = None if use_sdpa else [SDPBackend.MATH]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        fn = torch.compile(model) if compiled else model
        xin = x.contiguous(memory_format=fmt)

        def call(fn=fn, dtype=dtype, xin=xin, backends=backends):
            kernels = sdpa_kernel(backends) if backends else contextlib.nullcontext()
            with torch.inference_mode(), kernels, torch.autocast(
                    dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return fn(xin, t, y)

        runners[name] = call

    print(f"# {args.preset} U-Net forward, batch {args.batch}, {dev.type}"
          f" ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f", torch {torch.__version__}")
    gflops = None
    try:
        gflops = forward_gflops(flags, x, t, y)
    except Exception as e:  # FLOP counting is informational
        print(f"# (FLOP count unavailable: {e})")

    for name in names:  # warm-up (and compilation) outside the timed rounds
        t0 = time.perf_counter()
        runners[name]()
        print(f"# warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        if dev.type == "cuda":  # GPU: a few extra warm-ups so autotuning settles
            for _ in range(3):
                runners[name]()
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": runners[name]},
                                    num_threads=torch.get_num_threads(),
                                    label=f"{args.preset} forward", sub_label=name)
              for name in names}
    rounds = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            rounds[name].append(timers[name].blocked_autorange(min_run_time=args.min_run_time))
    med = {name: benchmark.Measurement.merge(rounds[name])[0].median for name in names}

    print(f"{'configuration':32} {'ms/forward':>11} {'images/s':>9} {'GFLOP/s':>9}")
    for name in names:
        s = med[name]
        rate = f"{gflops / s:9.0f}" if gflops else f"{'-':>9}"
        print(f"{name:32} {s * 1e3:11.1f} {args.batch / s:9.2f} {rate}")
    print()
    print(f"{'speed-up':44} {'ratio':>6}")
    for label, a, b in RATIOS:
        if a in med and b in med:
            print(f"{label:44} {med[b] / med[a]:6.2f}x")


if __name__ == "__main__":
    main()
