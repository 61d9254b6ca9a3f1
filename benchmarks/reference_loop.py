"""The baseline of the speed tables: guided-diffusion's classifier-guided DDIM loop, restated.

guided-diffusion is not on the package index, so the benchmarks cannot import it. This module
runs the same computation the way the reference's `ddim_sample_loop` + `classifier_sample.py`
run it, step for step, with the reference's execution costs:

- the schedule lives in float64 numpy arrays, and every use gathers from a fresh host tensor
  (`_extract`: `torch.from_numpy(arr).to(device)[t].float()`, a host-to-device copy per use);
- the respaced model wrapper maps indices to the original chain's timesteps through a tensor
  built on every call, for the model and again for the classifier;
- `p_mean_variance` computes the learned-range variance, the x_0 and the posterior mean even
  though DDIM uses only x_0 (the reference does);
- the guidance gradient: `enable_grad`, `x.detach().requires_grad_(True)`, the classifier in
  float32, `log_softmax`, the selected log-probabilities, `autograd.grad`;
- DDIM draws `randn_like(x)` every step, also at η = 0;
- eager, NCHW, no autocast, no compile; float32, or the reference's fp16 (`convert_to_fp16`,
  what its README's commands ask for with `--use_fp16 True --classifier_use_fp16 True`).

The networks are the project's own (they load the released files unchanged): the baseline is
the reference's loop, not its U-Net (whose attention is an einsum rather than SDPA), so the
speed-ups measured against it are the sampling path's, not the model code's.
`tests/test_reference_loop.py` checks that this loop reproduces the reference's own guided
DDIM-10 output (fixtures/ddim_loop.pt) within the fixture tolerance.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_to_fp16(net: nn.Module) -> nn.Module:
    """`net` (one of the project's U-Nets or classifiers, in place) run as guided-diffusion
    runs a network built with `use_fp16=True` (its `convert_to_fp16` and `forward`): the
    weights and biases of every convolution of the torso (the input blocks, the middle block
    and, for a U-Net, the output blocks; attention's qkv and projection are 1-d convolutions)
    in float16, the torso's activations in float16 (the input cast on entry), and everything
    else in float32: the time and label embeddings and each block's embedding projection (a
    Linear), the group norms (computed in float32 and cast back), and the output head, which
    gets the torso's result cast back to the input's dtype. The project's own `use_fp16` (an
    autocast) is switched off, so that this cast alone decides the arithmetic."""
    torso = [net.input_blocks, net.middle_block]
    if hasattr(net, "output_blocks"):
        torso.append(net.output_blocks)
    for part in torso:
        for module in part.modules():
            if isinstance(module, _CONVS):
                module.weight.data = module.weight.data.half()
                if module.bias is not None:
                    module.bias.data = module.bias.data.half()
    net.use_fp16 = False
    # The reference's `h = x.type(self.dtype)` before the first block; the project's forward
    # already casts the torso's output back (`h.to(x.dtype)`) before the head.
    net.input_blocks[0].register_forward_pre_hook(
        lambda _, args: (args[0].half(), *args[1:]))
    return net


def _extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
    """arr[t] as a float32 tensor broadcastable to `shape` (as the reference's
    `_extract_into_tensor`: a new host tensor per call)."""
    out = torch.from_numpy(arr).to(device=t.device)[t].float()
    return out.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


def reference_ddim(model, classifier, diffusion, noise: torch.Tensor, y: torch.Tensor,
                   classifier_scale: float, clip_denoised: bool = True) -> torch.Tensor:
    """Classifier-guided DDIM (η = 0) over every step of `diffusion` (a respaced diffusion of
    the project: only its numpy arrays and timestep map are read) from x_T = noise [N, C, H, W],
    labels y [N]; `classifier` None: unguided. Returns x_0 [N, C, H, W] float32."""
    betas = np.asarray(diffusion.betas, dtype=np.float64)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    sqrt_recip_ac, sqrt_recipm1_ac = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1)
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    post_c1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
    post_c2 = (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)
    timestep_map = list(diffusion.timestep_map)

    def mapped(t):  # the reference's _WrappedModel: a new tensor every call
        return torch.tensor(timestep_map, device=t.device, dtype=t.dtype)[t]

    def cond_fn(x, t):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, mapped(t))
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * classifier_scale

    x = noise
    for i in reversed(range(len(timestep_map))):
        t = torch.tensor([i] * x.shape[0], device=x.device)
        with torch.no_grad():
            out = model(x, mapped(t), **({"y": y} if getattr(model, "num_classes", None) else {}))
            eps, v = out.split(x.shape[1], dim=1) if out.shape[1] == 2 * x.shape[1] else (out, None)
            if v is not None:  # learned range: computed by the reference, unused by DDIM
                min_log = _extract(post_log_var, t, x.shape)
                max_log = _extract(np.log(betas), t, x.shape)
                frac = (v + 1) / 2
                torch.exp(frac * max_log + (1 - frac) * min_log)
            x0 = _extract(sqrt_recip_ac, t, x.shape) * x - _extract(sqrt_recipm1_ac, t, x.shape) * eps
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            _extract(post_c1, t, x.shape) * x0 + _extract(post_c2, t, x.shape) * x  # posterior mean
            if classifier is not None:  # condition_score
                alpha_bar = _extract(ac, t, x.shape)
                eps = (_extract(sqrt_recip_ac, t, x.shape) * x - x0) / _extract(sqrt_recipm1_ac, t, x.shape)
                eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t)
                x0 = _extract(sqrt_recip_ac, t, x.shape) * x - _extract(sqrt_recipm1_ac, t, x.shape) * eps
            eps = (_extract(sqrt_recip_ac, t, x.shape) * x - x0) / _extract(sqrt_recipm1_ac, t, x.shape)
            alpha_bar_prev = _extract(ac_prev, t, x.shape)
            noise_t = torch.randn_like(x)  # drawn at η = 0 too; σ = 0 multiplies it away
            mean = x0 * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev).sqrt() * eps
            nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
            x = mean + nonzero * 0.0 * noise_t
    return x
