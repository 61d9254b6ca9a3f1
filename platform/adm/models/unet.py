"""The ADM U-Net and its super-resolution variant (Dhariwal & Nichol, 2021, section 3).

`UNet(x, t, y=None)` predicts the noise (and, with a learned variance, the interpolation
coefficient v) for a noisy image x at timestep t, optionally class-conditional on y.
`SuperResUNet(x, t, low_res=..., y=None)` does the same with a low-resolution image as extra
input, bilinearly resized to x's size and concatenated to it along channels.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (
    AttentionBlock,
    ResBlock,
    TimestepEmbedSequential,
    encoder_blocks,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)


def fp16_autocast(device: torch.device, enabled: bool):
    """The torso's precision when a model is built with `use_fp16=True`.

    The reference casts the torso's weights to fp16 and keeps fp32 master weights in its
    trainer. Here the weights stay float32 (same state-dict keys and dtypes) and the torso runs
    under float16 autocast on CUDA, which computes the same fp16 convolutions and matmuls. On
    CPU, where fp16 kernels are slow, it runs in float32. An autocast the caller opened
    (e.g. bf16) takes precedence."""
    if enabled and device.type == "cuda" and not torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class UNet(nn.Module):
    """The ADM denoiser.

    :param image_size: side of the (square) images; used by nothing but the attention pool of
        the classifier, kept for introspection.
    :param model_channels: base width (`num_channels`); level i has channel_mult[i] times it.
    :param out_channels: 3, or 6 with a learned variance (eps, then v).
    :param num_res_blocks: residual blocks per level (the decoder has one more per level);
        0 is valid: the encoder keeps only its downsamplers, each decoder level one block.
    :param attention_resolutions: downsample rates (1, 2, 4, ...) that get self-attention.
    :param num_classes: class-conditional when set: a label embedding added to the time one.
    :param null_class: give the label embedding one more row, label `num_classes` (then
        `null_label`), the "no class" of classifier-free guidance (trained with label dropout,
        flag `class_dropout_prob`). Off by default, so released checkpoints keep their shapes.
    :param num_heads / num_head_channels: a fixed number of heads, or (when not -1) a fixed
        width per head; `num_heads_upsample` overrides num_heads in the decoder.
    :param use_fp16: run the torso in float16 on CUDA (see `fp16_autocast`).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: tuple,
        dropout: float = 0.0,
        channel_mult: tuple = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        null_class: bool = False,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes, self.use_fp16 = model_channels, num_classes, use_fp16
        self.num_res_blocks = num_res_blocks
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if null_class and num_classes is None:
            raise ValueError("null_class (classifier-free guidance) needs a class-conditional "
                             "model (num_classes)")
        # The label classifier-free guidance conditions on for "no class", or None.
        self.null_label = num_classes if null_class else None
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + int(null_class), emb_dim)

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, heads, num_head_channels, use_checkpoint,
                                  use_new_attention_order)

        self.input_blocks, skip_chans, ds = encoder_blocks(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, res,
            lambda ch: attn(ch, num_heads), resblock_updown, conv_resample)
        input_ch, ch = skip_chans[0], skip_chans[-1]

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(),
            zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)),
        )

    @property
    def cache_depth(self) -> int:
        """The default depth of deep-feature reuse (`forward`'s `cache_depth`): the blocks at
        full resolution, i.e. the stem and the first level's residual blocks; a shallow call
        then runs the full-resolution level only, encoder and decoder."""
        return 1 + self.num_res_blocks

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                cache_depth: int = 0, deep: torch.Tensor | None = None,
                refresh: torch.Tensor | None = None):
        """
        :param x: [N, C, H, W] noisy images (unit scale, e.g. in [-1, 1]).
        :param t: [N] timesteps of the underlying chain (integer, or float when rescaled).
        :param y: [N] int64 labels; required if and only if the model is class-conditional
            (`null_label` too, with a null class).
        :param cache_depth: 0 (default): the plain network, returning its output only. d >= 1:
            split it for deep-feature reuse (DeepCache, Ma et al. 2024) after the first d
            encoder blocks and before their d decoder partners (the last d output blocks), and
            return (output, deep), deep being the features the decoder's shallow part starts
            from ([N, C', H', W'], the output of output block L - d - 1, in the torso's dtype).
        :param deep: with cache_depth, the deep features of an earlier call to reuse: the call
            then runs the shallow blocks only (the first d encoder blocks and the last d
            decoder blocks, with fresh skips) and returns `deep` as it was given.
        :param refresh: with `deep`, [N] bool: compute the deep part anyway (for every row, a
            fixed shape) and use it for the rows where refresh is True, `deep` elsewhere, so
            each row gets exactly what a full call (True) or a shallow call (False) gives it.
        :return: [N, out_channels, H, W] in x's dtype, or (it, deep) with cache_depth.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        blocks = len(self.input_blocks)
        if not 0 <= cache_depth <= blocks:
            raise ValueError(f"cache_depth={cache_depth}: 0 (off) to {blocks} (the encoder's blocks)")
        if (deep is not None or refresh is not None) and not cache_depth:
            raise ValueError("deep features (deep, refresh) need a cache_depth")
        if refresh is not None and deep is None:
            raise ValueError("refresh selects between fresh and given deep features: pass deep")
        depth = cache_depth or blocks
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        with fp16_autocast(x.device, self.use_fp16):
            h, skips = x, []
            for block in self.input_blocks[:depth]:
                h = block(h, emb)
                skips.append(h)
            if deep is None or refresh is not None:
                fresh = self._deep(h, emb, depth)
                deep = fresh if deep is None else torch.where(
                    refresh.view(-1, *[1] * (fresh.dim() - 1)), fresh, deep)
            h = deep
            for block in self.output_blocks[len(self.output_blocks) - depth:]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h.to(x.dtype)).to(x.dtype)
        return (out, deep) if cache_depth else out

    def _deep(self, h: torch.Tensor, emb: torch.Tensor, depth: int) -> torch.Tensor:
        """The part of the network below encoder block `depth`: the remaining encoder blocks,
        the middle block and the decoder blocks that take their skips; h is encoder block
        depth - 1's output. Returns the features the last `depth` decoder blocks start from."""
        skips = []
        for block in self.input_blocks[depth:]:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks[:len(self.output_blocks) - depth]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return h


class SuperResUNet(UNet):
    """A U-Net for super-resolution: `in_channels` are the image's; the model sees twice as
    many, the noisy image and the bilinearly upsampled low-resolution one."""

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor | None = None,
                y: torch.Tensor | None = None, **cache):
        """
        :param x: [N, C, H, W] noisy high-resolution images.
        :param low_res: [N, C, h, w] low-resolution images in [-1, 1].
        :param cache: `UNet.forward`'s deep-feature reuse (cache_depth, deep, refresh).
        :return: [N, out_channels, H, W] (with cache_depth: and the deep features).
        """
        if low_res is None:
            raise ValueError("SuperResUNet needs low_res=[N, C, h, w]")
        upsampled = F.interpolate(low_res, x.shape[-2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled.to(x.dtype)], dim=1), t, y, **cache)
