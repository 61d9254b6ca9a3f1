"""The conversions between the networks' image tensors ([N, C, H, W] float in [-1, 1]) and the
uint8 images (numpy [N, H, W, C]) that sample files, HTTP responses and the upsampler's input
hold, as the reference's sample scripts make them."""
from __future__ import annotations

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8, as the reference's sample scripts do
    (scaled by 127.5, clamped, truncated)."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """[N, H, W, C] uint8 -> [N, C, H, W] float32 in [-1, 1] on `device` (the reference's base
    samples, as its upsampler's input)."""
    x = torch.from_numpy(np.array(images)).to(device)  # a writable copy (Ray blocks are not)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1
