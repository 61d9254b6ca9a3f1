"""The per-row step: one model call for a batch whose rows are each at their own step of their
own chain, each with its own sampler, step count, classifier scale, classifier-free scale and
class, then every row advanced by its own coefficients. The serving engine (`adm.engine`)
makes one such call per engine step, so that a request joins the running batch at the next step
and leaves it as soon as its chain ends.

A `Row` is one sample in flight: its chain (the respaced diffusion its settings give, as
`sample` spaces it), its index in that chain, x_t, the older data predictions of the multistep
solvers, and its own noise generator. `RowStepper.step(rows)` advances each row by one step:

1. one call of the network on exactly `slots` rows (a fixed shape: the rows, a classifier-free
   row twice, with the null class the second time, then padding that repeats the first row);
2. one classifier-gradient call on `slots` rows for the rows with a classifier scale > 0 whose
   step is inside their guidance interval (none at all when no row's is);
3. each sampler's update on its rows, through the same functions `sample`'s loops use
   (`GaussianDiffusion.p_sample` / `ddim_sample`, the multistep solvers' `_data_prediction`
   and `multistep_update`), on the rows' chains laid end to end (`concatenated`), so each row
   gathers its own coefficients.

So in float32 a row gets exactly the bits `sample` gives it for the same seed and settings
(tests/test_engine.py), given network kernels whose per-row arithmetic does not depend on the
other rows or the row's position in a call of fixed shape (true of the CPU and GPU kernels here
for calls of a multiple of 4 rows; MKL's sgemm rounds the rows of a call's M % 4 tail its own
way: hence `slots` multiple of 4, and the generation job's calls of `rows` rows).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..guidance import classifier_cond_fn
from ..images import to_uint8
from .deepcache import cache_depth_of, check_cache_interval, is_full_call
from .gaussian import GaussianDiffusion, concatenated
from .interval import check_interval, in_interval
from .samplers import UNIPC_ORDER, _data_prediction, _dpmpp_2m_coefs, _dpmpp_3m_coefs, \
    _unipc_coefs, check_eta, multistep_update
from .sampling import _compile_options, _model_fn, _prepared
from .spacing import sampling_diffusion

# The multistep samplers: ᾱ's -> (per-index predictor coefficients, correctors or None).
MULTISTEP = {"dpmpp_2m": lambda ac: (_dpmpp_2m_coefs(ac), None),
             "dpmpp_3m": lambda ac: (_dpmpp_3m_coefs(ac), None),
             "unipc": lambda ac: _unipc_coefs(ac, UNIPC_ORDER)}


@dataclass(frozen=True)
class RowSpec:
    """What decides a row's chain and update: `sample`'s keywords of the same names."""

    sampler: str = "ddim"
    steps: int | str | None = None
    timesteps: str | None = None
    lambda_min: float | None = None
    classifier_scale: float = 0.0
    guidance_interval: tuple[float, float] | None = None
    cfg_scale: float = 1.0
    eta: float = 0.0
    clip_denoised: bool = True
    cache_interval: int = 1
    lambda_max: float | None = None

    @property
    def width(self) -> int:
        """Model-call rows a row of these settings takes: 2 with classifier-free guidance."""
        return 1 if self.cfg_scale == 1.0 else 2


class Row:
    """One sample in flight. `index` counts down from its chain's last index to 0 (the step it
    makes next); `x` is x_t [C, H, W]; `pred_xstart` the last step's x_0 prediction (a
    preview); `result` the final image in [-1, 1] once the chain has ended (then `done`)."""

    def __init__(self, chain: GaussianDiffusion, settings: RowSpec, label: int, seed: int,
                 shape: tuple, device: torch.device, low_res: torch.Tensor | None = None):
        self.chain, self.settings, self.label, self.low_res = chain, settings, int(label), low_res
        self.steps = chain.num_timesteps
        self.index = self.steps - 1
        self.generator = torch.Generator(device).manual_seed(int(seed))
        # x_T as `RowNoise` draws a row: one normal_ of [C, H, W] from the row's generator.
        self.x = torch.empty(shape, device=device).normal_(generator=self.generator)
        self.history: list[torch.Tensor] = []
        self.previous: torch.Tensor | None = None  # UniPC: x where its last step started
        self.calls = 0  # model calls made (deep-feature reuse: full or shallow by this count)
        self.deep: torch.Tensor | None = None  # [width, C', H', W'] its last full call's features
        self.pred_xstart: torch.Tensor | None = None
        self.result: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def guided(self) -> bool:
        """Whether its next step is classifier-guided (a scale > 0, and the step's noise level
        in its guidance interval, if it has one)."""
        return self.settings.classifier_scale > 0 and in_interval(
            self.settings.guidance_interval, self.chain.alphas_cumprod[self.index])

    @property
    def steps_done(self) -> int:
        return self.steps - 1 - self.index if not self.done else self.steps


@functools.lru_cache(maxsize=64)
def _multistep_coefs(sampler: str, chain: GaussianDiffusion) -> tuple[list, list | None]:
    return MULTISTEP[sampler](chain.alphas_cumprod)


def _column(values, device: torch.device) -> torch.Tensor:
    """[N] python numbers -> [N, 1, 1, 1] float32 (each rounded as torch rounds a float scalar
    into a float32 op, so a row's arithmetic matches `sample`'s with the scalar)."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1, 1)


class RowStepper:
    """Steps rows of one stage's network (a base model, optionally classifier-guided, or an
    upsampler: rows then carry `low_res`) on `device`, in model calls of exactly `slots` rows.

    :param diffusion: the network's whole chain (rows respace it as `sample` does).
    :param autocast: run the networks under autocast to this dtype (None: float32).
    :param compile: `torch.compile` the network and the classifier's gradient (static shapes:
        every call has `slots` rows)."""

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion, *, slots: int,
                 image_size: int, classifier: nn.Module | None = None,
                 autocast: torch.dtype | None = None, compile: bool | dict = False,
                 device: torch.device | str = "cpu", channels: int = 3):
        self.diffusion, self.slots, self.device = diffusion, int(slots), torch.device(device)
        self.shape = (channels, image_size, image_size)
        self.null_label = getattr(net, "null_label", None)
        options = _compile_options(compile)
        self.net = _prepared(net, classifier, False, options)
        self.pass_y = getattr(net, "num_classes", True) is not None
        self.model = _model_fn(self.net, self.pass_y)
        self.cache_depth = getattr(net, "cache_depth", None)  # None: no deep-feature reuse
        self.guidance = None if classifier is None else classifier_cond_fn(
            classifier, 1.0, compile=options or False)
        self.autocast = autocast

    def chain(self, settings: RowSpec) -> GaussianDiffusion:
        """The chain `sample` runs for these settings (a ValueError names what is wrong)."""
        if settings.sampler not in ("ddpm", "ddim", *MULTISTEP):
            raise ValueError(f"unknown sampler {settings.sampler!r}")
        check_eta(settings.sampler, settings.eta)
        if settings.cfg_scale != 1.0 and self.null_label is None:
            raise ValueError(f"cfg_scale={settings.cfg_scale}: the model has no null class")
        if settings.classifier_scale > 0 and self.guidance is None:
            raise ValueError("classifier_scale > 0 needs a classifier")
        if settings.guidance_interval is not None:
            check_interval(settings.guidance_interval)
            if not settings.classifier_scale > 0:
                raise ValueError("guidance_interval needs classifier_scale > 0")
        if check_cache_interval(settings.cache_interval) > 1:
            cache_depth_of(self.net)
        if settings.width > self.slots:
            raise ValueError(f"a row takes {settings.width} model rows; slots={self.slots}")
        return sampling_diffusion(self.diffusion, settings.sampler, settings.steps,
                                  settings.timesteps, settings.lambda_min, settings.lambda_max)

    def start(self, settings: RowSpec, label: int, seed: int,
              low_res: torch.Tensor | None = None) -> Row:
        """A new row at its chain's first step, x_T drawn from `seed` (low_res: [C, h, w] in
        [-1, 1] for an upsampler)."""
        return Row(self.chain(settings), settings, label, seed, self.shape, self.device,
                   None if low_res is None else low_res.to(self.device))

    def _precision(self):
        return (torch.autocast(self.device.type, dtype=self.autocast)
                if self.autocast is not None else contextlib.nullcontext())

    def _padded(self, positions: list[int]) -> torch.Tensor:
        return torch.tensor(positions + [positions[0]] * (self.slots - len(positions)),
                            device=self.device)

    @torch.no_grad()
    def step(self, rows: list[Row]) -> None:
        """Advance every row (none done, their widths summing to at most `slots`) by one step:
        afterwards each has its next `x`, `pred_xstart` and index, or its `result`."""
        n = len(rows)
        if not rows or sum(r.settings.width for r in rows) > self.slots:
            raise ValueError(f"step: {n} rows of width {sum(r.settings.width for r in rows)} "
                             f"for {self.slots} slots")
        chains = tuple(dict.fromkeys(r.chain for r in rows))
        packed, offsets = concatenated(chains)
        start = dict(zip(chains, offsets))
        t = torch.tensor([start[r.chain] + r.index for r in rows], device=self.device)
        x = torch.stack([r.x for r in rows])
        labels = torch.tensor([r.label for r in rows], device=self.device)
        cfg = [k for k, r in enumerate(rows) if r.settings.width == 2]
        out = self._model_outputs(rows, packed, x, t, labels, cfg)
        guided = [k for k, r in enumerate(rows) if r.guided]
        gradient = None
        if guided:
            take = self._padded(guided)
            with self._precision():
                grad = self.guidance(x[take], packed.model_timesteps(t[take]), y=labels[take])
            gradient = torch.zeros_like(x)
            gradient[guided] = grad[:len(guided)] * _column(
                [rows[k].settings.classifier_scale for k in guided], self.device)
        groups: dict[tuple, list[int]] = {}
        for k, r in enumerate(rows):
            groups.setdefault((r.settings.sampler, r.settings.eta, r.settings.clip_denoised,
                               r.guided), []).append(k)
        for (sampler, eta, clip, is_guided), ks in groups.items():
            self._update([rows[k] for k in ks], packed, x[ks], t[ks], out[ks],
                         gradient[ks] if is_guided else None, sampler, eta, clip)

    def _model_outputs(self, rows, packed, x, t, labels, cfg: list[int]) -> torch.Tensor:
        """The network's output per row [N, C or 2C, H, W] (float32), classifier-free guided
        where a row asks (as `classifier_free_guidance` combines the two halves)."""
        n = len(rows)
        take = self._padded(list(range(n)) + cfg)
        y = labels[take]
        if cfg:
            y[n:n + len(cfg)] = self.null_label
        kwargs = {"y": y}
        if rows[0].low_res is not None:
            kwargs["low_res"] = torch.stack([r.low_res for r in rows])[take]
        with self._precision():
            if any(r.settings.cache_interval > 1 for r in rows):
                out = self._cached_call(rows, cfg, take, x[take],
                                        packed.model_timesteps(t[take]), kwargs)
            else:
                out = self.model(x[take], packed.model_timesteps(t[take]), **kwargs)
        cond = out[:n]
        if cfg:
            c = x.shape[1]
            scale = _column([rows[k].settings.cfg_scale for k in cfg], self.device)
            both, null = cond[cfg], out[n:n + len(cfg)]
            eps = null[:, :c] + scale * (both[:, :c] - null[:, :c])
            cond = cond.clone()
            cond[cfg] = torch.cat([eps, both[:, c:]], dim=1)
        return cond

    def _cached_call(self, rows: list[Row], cfg: list[int], take: torch.Tensor,
                     x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The network's output at the call's `slots` positions (`take`: the rows, the
        classifier-free rows' second rows `cfg`, then padding repeating position 0) with
        deep-feature reuse: each row runs full or shallow by its own call count, as `DeepCache`
        runs it in `sample` (a row without reuse: always full), so it gets the same bits; the
        rows that reuse keep their new features."""
        n = len(rows)
        # The row and the half (0: its own row, 1: its classifier-free second row) at each
        # position of the call.
        places = [(k, 0) for k in range(n)] + [(k, 1) for k in cfg]
        places += [places[0]] * (self.slots - len(places))
        full = [is_full_call(r.calls, r.settings.cache_interval) for r in rows]
        deep = refresh = None
        if not all(full):
            like = next(r.deep[0] for r, f in zip(rows, full) if not f)
            deep = torch.stack([rows[k].deep[h] if rows[k].deep is not None
                                else torch.zeros_like(like) for k, h in places])
            if any(full):
                refresh = torch.tensor([full[k] for k, _ in places], device=self.device)
        y = kwargs.pop("y")
        if self.pass_y:
            kwargs["y"] = y
        out, deep = self.net(x, t, cache_depth=self.cache_depth, deep=deep, refresh=refresh,
                             **kwargs)
        for k, r in enumerate(rows):
            r.calls += 1
            if r.settings.cache_interval > 1:
                r.deep = deep[[k, n + cfg.index(k)] if r.settings.width == 2 else [k]]
        return out.float()

    def _update(self, rows: list[Row], packed: GaussianDiffusion, x, t, out, gradient,
                sampler: str, eta: float, clip: bool) -> None:
        """One sampler's step for its rows, given their model outputs `out` and scaled
        classifier gradients (None: unguided)."""
        model = lambda *args, **kwargs: out  # noqa: E731  (the outputs already computed)
        cond_fn = None if gradient is None else (lambda *args, **kwargs: gradient)
        if sampler in MULTISTEP:
            x0 = _data_prediction(packed, model, x, t, cond_fn, {}, clip)
            coefs, correctors = _multistep_coefs(sampler, rows[0].chain)
            older = [torch.stack([r.history[j] if len(r.history) > j else torch.zeros_like(r.x)
                                  for r in rows]) for j in range(len(coefs[0]) - 3)]
            if correctors is not None:  # UniC: correct x from where its step started
                # (a row's first index has no step behind it: 1·x + 0 is x itself)
                keep = (1.0, 0.0, 1.0) + (0.0,) * len(older)
                table = [_multistep_coefs(sampler, r.chain)[1][r.index] or keep for r in rows]
                a, b, *weights = (_column(list(col), self.device) for col in zip(*table))
                start = torch.stack([r.previous if r.previous is not None else r.x
                                     for r in rows])
                x = multistep_update(start, x0, older, a, b, weights)
            table = [_multistep_coefs(sampler, r.chain)[0][r.index] for r in rows]
            a, b, *weights = (_column(list(col), self.device) for col in zip(*table))
            nxt = multistep_update(x, x0, older, a, b, weights)
            for k, r in enumerate(rows):
                r.history = [x0[k], *r.history][:len(weights) - 1]
                if correctors is not None:
                    r.previous = x[k]
            self._advance(rows, nxt, x0, final=x0)
            return
        noise = self._noise(rows, needed=sampler == "ddpm" or eta != 0.0)
        if sampler == "ddpm":
            step = packed.p_sample(model, x, t, clip, None, cond_fn, {}, noise_fn=noise)
        else:
            step = packed.ddim_sample(model, x, t, clip, None, cond_fn, {}, eta, noise_fn=noise)
        self._advance(rows, step["sample"], step["pred_xstart"], final=step["sample"])

    def _noise(self, rows: list[Row], needed: bool):
        """The step's noise function: each row's next draw from its own generator, a zero row
        for a row at its last step (which `sample` does not draw, and which adds nothing)."""
        if not needed or all(r.index == 0 for r in rows):
            return lambda: None

        def draw() -> torch.Tensor:
            z = torch.zeros((len(rows), *rows[0].x.shape), device=self.device)
            for row, r in zip(z, rows):
                if r.index > 0:
                    row.normal_(generator=r.generator)
            return z

        return draw

    @staticmethod
    def _advance(rows: list[Row], nxt: torch.Tensor, x0: torch.Tensor,
                 final: torch.Tensor) -> None:
        for k, r in enumerate(rows):
            r.pred_xstart = x0[k]
            if r.index == 0:
                r.result = final[k].clamp(-1, 1)
                r.history, r.previous, r.deep = [], None, None
            else:
                r.x, r.index = nxt[k], r.index - 1


def rows_to_images(rows: list[Row]) -> np.ndarray:
    """The finished rows' images, [N, H, W, C] uint8 (as `adm.images.to_uint8` makes them)."""
    return to_uint8(torch.stack([r.result for r in rows]))
