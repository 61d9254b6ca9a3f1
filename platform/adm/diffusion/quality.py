"""Sampling presets by quality: what `quality: fast` sets, for the sampling job, its configs and
the Serve API alike.

"default" sets nothing: the settings are what they were before presets existed (the model's
README defaults, else DDPM over the whole chain), so earlier runs keep their bytes. "fast" is
the fastest combination of sampler, steps, grid ends, guidance interval and deep-feature reuse
that matched the reference's DDIM-25 FID on both models of benchmarks/sampling.py's quality
table (docs/benchmarks.md): explicit settings still win over it, one by one.
"""
from __future__ import annotations

from typing import Literal, get_args

QualityName = Literal["default", "fast"]
QUALITIES = get_args(QualityName)

# benchmarks/sampling.py --tables quality --train-deep (docs/benchmarks.md, "Quality against
# speed"): of the rows that matched DDIM-25 on both models, the fastest by its slower speed-up
# over the reference loop's DDIM-25 (5.00x on the quickstart models, 8.05x on the deep one):
# UniPC-8 from t = 960 (lambda -2.8) to lambda 1.9, guided above sigma 1, DeepCache every 2nd.
FAST = dict(sampler="unipc", steps=8, lambda_min=-2.8, lambda_max=1.9,
            guidance_interval=(1.0, 1e6), cache_interval=2)


def with_quality(quality: str, guided: bool, *, sampler: str | None = None,
                 steps: int | str | None = None, lambda_min: float | None = None,
                 lambda_max: float | None = None,
                 guidance_interval: tuple[float, float] | None = None,
                 cache_interval: int | None = None) -> dict:
    """The six settings a quality preset fills in, each as given, else the preset's (None
    where neither sets it; cache_interval 1): {"sampler", "steps", "lambda_min", "lambda_max",
    "guidance_interval", "cache_interval"}. The preset's grid (`lambda_min`, `lambda_max`)
    goes with its own sampler only, and its guidance interval only where a classifier guides
    (`guided`). "default" fills in nothing but cache_interval 1."""
    if quality not in QUALITIES:
        raise ValueError(f"quality {quality!r}: one of {', '.join(QUALITIES)}")
    preset = FAST if quality == "fast" else {}
    out = dict(sampler=sampler if sampler is not None else preset.get("sampler"),
               steps=steps if steps is not None else preset.get("steps"),
               lambda_min=lambda_min, lambda_max=lambda_max,
               guidance_interval=guidance_interval,
               cache_interval=cache_interval if cache_interval is not None
               else preset.get("cache_interval", 1))
    for name, given in (("lambda_min", lambda_min), ("lambda_max", lambda_max)):
        if given is None and out["sampler"] == preset.get("sampler"):
            out[name] = preset.get(name)
    if guidance_interval is None and guided:
        out["guidance_interval"] = preset.get("guidance_interval")
    return out
