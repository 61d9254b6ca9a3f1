"""The noisy-image classifier of ADM-G: the U-Net's encoder half and a pooling head.

`Classifier(x, t)` returns logits of p(y | x_t, t); its input gradient steers sampling
(section 4 of the paper). Heads (`pool`):
- "adaptive": norm, SiLU, global average pool, 1x1 conv;
- "attention": norm, SiLU, attention pooling (the released classifiers use this one);
- "spatial": the spatial mean of every encoder block's output, concatenated, then an MLP;
- "spatial_v2": the same with a group norm and SiLU in the MLP.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (
    AttentionBlock,
    AttentionPool2d,
    ResBlock,
    TimestepEmbedSequential,
    encoder_blocks,
    normalization,
    timestep_embedding,
    zero_module,
)
from .unet import fp16_autocast

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class Classifier(nn.Module):
    """Encoder half of the ADM U-Net with a classification head; arguments as `UNet`'s
    (`num_res_blocks` is the reference's `classifier_depth`, 0 included)."""

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
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"classifier_pool={pool!r} is not one of {POOLS}")
        self.model_channels, self.pool, self.use_fp16 = model_channels, pool, use_fp16
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch):
            return AttentionBlock(ch, num_heads, num_head_channels, use_checkpoint,
                                  use_new_attention_order)

        self.input_blocks, widths, ds = encoder_blocks(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, res,
            attn, resblock_updown, conv_resample)
        ch = widths[-1]
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        feature_size = sum(widths) + ch  # the spatial pools see every block's mean

        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(nn.Conv2d(ch, out_channels, 1)), nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("the attention pool needs num_head_channels")
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels)
            )
        else:
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048), normalization(2048), nn.SiLU(),
                nn.Linear(2048, out_channels),
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """
        :param x: [N, 3, H, W] noisy images x_t.
        :param t: [N] timesteps of the underlying chain.
        :return: [N, num_classes] logits, in x's dtype.
        """
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        spatial = self.pool.startswith("spatial")
        with fp16_autocast(x.device, self.use_fp16):
            h, means = x, []
            for block in self.input_blocks:
                h = block(h, emb)
                if spatial:
                    means.append(h.to(x.dtype).mean(dim=(2, 3)))
            h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1)).to(x.dtype)
        return self.out(h.to(x.dtype)).to(x.dtype)
