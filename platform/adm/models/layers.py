"""Building blocks of the ADM networks (Dhariwal & Nichol, 2021, section 3).

Module and attribute names follow the reference implementation exactly (`in_layers`,
`emb_layers`, `out_layers`, `skip_connection`, `qkv`, `proj_out`, ...), because the released
checkpoints' state-dict keys are made of them. Everything else is written for speed: attention
goes through `scaled_dot_product_attention`, nothing branches on tensor values, and every block
works on `channels_last` tensors and under `torch.autocast`.
"""
from __future__ import annotations

import math

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, cast back afterwards.

    Under fp16/bf16 the per-group variance of large activations loses too many bits; the
    reference does the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 input and weights; autocast lists group_norm as a float32 op, so it stays there.
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The ADM norm layer: 32 groups."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (output layers start as the identity of the residual path)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps.

    :param t: [N] timesteps, integer or fractional (`rescale_timesteps` passes floats).
    :param dim: embedding width; an odd width gets a zero last column.
    :return: [N, dim] float32, cosines then sines (the reference's order).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (`conv`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or, without conv, 2x2 average pooling (`op`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep (and class) embedding.

    :param use_scale_shift_norm: adaptive group norm, `norm(h) * (1 + scale) + shift` with
        scale and shift projected from the embedding (the paper's AdaGN); otherwise the
        projected embedding is added to the features.
    :param up, down: BigGAN-style resampling inside the block (features and skip alike).
    :param use_conv: a 3x3 instead of a 1x1 conv on the skip path when channels change.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the activation and the conv, on the skip path too.
            h = self.in_layers[1](self.in_layers[0](x))
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[2](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def split_qkv(qkv: torch.Tensor, num_heads: int, legacy_order: bool):
    """Split a [N, 3*H*C, T] projection into q, k, v of shape [N, H, T, C].

    `legacy_order` (the reference's default `QKVAttentionLegacy`) splits heads first, then q/k/v
    inside each head; the "new attention order" splits q/k/v first, then heads."""
    n, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy_order:
        q, k, v = qkv.reshape(n, num_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = qkv.reshape(n, 3, num_heads, ch, length).unbind(1)
    return q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over [N, H, T, C] tensors -> [N, H*C, T], by PyTorch's fused
    `scaled_dot_product_attention` (which kernel runs is `torch.nn.attention.sdpa_kernel`'s
    choice; benchmarks/models.py compares it with the unfused MATH form).

    q, k and v are made contiguous first: `split_qkv`'s are transposed views, and on CPU the
    fused (flash) kernel takes only a unit-stride last dimension, so strided inputs fall back to
    the unfused form, 2-4x slower at 16x16 tokens and above (benchmarks/profile_step.py)."""
    a = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    n, h, t, c = a.shape
    return a.transpose(-1, -2).reshape(n, h * c, t)


def heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads: fixed (`num_heads`) or from a fixed width per head."""
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ValueError(
            f"num_head_channels={num_head_channels} does not divide the {channels} channels "
            "of an attention layer"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.num_heads = heads_for(channels, num_heads, num_head_channels)
        self.legacy_order = not use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, hgt * wid))
        h = attention(*split_qkv(qkv, self.num_heads, self.legacy_order))
        return x + self.proj_out(h).reshape(b, c, hgt, wid)


class AttentionPool2d(nn.Module):
    """The classifier's attention pooling (after CLIP): the mean token, prepended to the
    spatial tokens, attends to all of them; its output is the logits."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = heads_for(embed_dim, 1, num_head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        qkv = self.qkv_proj(x)
        h = attention(*split_qkv(qkv, self.num_heads, legacy_order=False))
        return self.c_proj(h)[:, :, 0]


def encoder_blocks(in_channels: int, model_channels: int, channel_mult: tuple,
                   num_res_blocks: int, attention_resolutions: tuple,
                   res: Callable[..., nn.Module], attn: Callable[[int], nn.Module],
                   resblock_updown: bool, conv_resample: bool = True
                   ) -> tuple[nn.ModuleList, list[int], int]:
    """The ADM encoder that the U-Net and the classifier share (same modules, same state-dict
    keys as the reference's ``input_blocks``): a stem convolution, then per level
    `num_res_blocks` residual blocks (each followed by self-attention at the downsample rates in
    `attention_resolutions`) and, on every level but the last, a downsampler (a residual block
    that downsamples when `resblock_updown`, else `Downsample`).

    :param res: ``res(ch_in, ch_out, down=False)`` builds a residual block.
    :param attn: ``attn(ch)`` builds an attention block.
    :return: (the blocks, the channels each block outputs, the final downsample rate).
    """
    ch = int(channel_mult[0] * model_channels)
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    widths, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attn(ch))
            blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != len(channel_mult) - 1:
            down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
            blocks.append(TimestepEmbedSequential(down))
            widths.append(ch)
            ds *= 2
    return blocks, widths, ds
