"""The GSQ-GAN encoder and decoder (docs/spec.md, "Architecture").

Encoder: conv3x3 3 -> W; for each level (width W * multiplier): a ResBlock that changes the width
when it differs from the previous level's, then that level's ResBlocks (`res_blocks`, or the level's
entry of `encoder_res_blocks`), and a stride-2 conv after
every level but the last; the mid ResBlocks (attention between consecutive ones, optionally); head
GN + SiLU + conv1x1 -> D.

Decoder: conv3x3 D -> W * multiplier[-1]; the mid ResBlocks (and attention); an adaptive GroupNorm
conditioned on the quantized map; the levels in reverse, each (but the last) ending in conv3x3
C -> 4C + depth-to-space 2x (or nearest 2x + conv3x3: `upsample`) and an adaptive GroupNorm; head
GN + SiLU + conv3x3 -> 3.
(docs/spec.md's "adaptive GroupNorm before each up-sample and after the mid block" reads the same
sequence from the other side; this order is the reference code's, which the converter needs.)

Modules are registered in forward order, so walking them in order gives the reference's flat
block list (gsq/convert.py relies on that).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from .layers import AdaptiveGroupNorm, AttentionBlock, DepthToSpaceUpsample, Downsample, Head, NearestUpsample, ResBlock

UPSAMPLERS = {"depth_to_space": DepthToSpaceUpsample, "nearest": NearestUpsample}


def level_widths(config: ModelConfig) -> list[int]:
    return [config.width * multiplier for multiplier in config.channel_multipliers]


def mid_blocks(channels: int, count: int, attention: bool) -> nn.ModuleList:
    """ResBlocks with (optionally) an attention block between consecutive ones."""
    blocks = nn.ModuleList()
    for i in range(count):
        blocks.append(ResBlock(channels, channels))
        if attention and i < count - 1:
            blocks.append(AttentionBlock(channels))
    return blocks


def level_blocks(in_channels: int, out_channels: int, count: int, dropout: float) -> nn.ModuleList:
    blocks = nn.ModuleList()
    if in_channels != out_channels:
        blocks.append(ResBlock(in_channels, out_channels, dropout))
    blocks.extend(ResBlock(out_channels, out_channels, dropout) for _ in range(count))
    return blocks


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, res_blocks: int, downsample: bool, dropout: float) -> None:
        super().__init__()
        self.blocks = level_blocks(in_channels, out_channels, res_blocks, dropout)
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class Encoder(nn.Module):
    """images (B, 3, H, W) -> latents (B, D, H/f, W/f)."""

    def __init__(self, config: ModelConfig, in_channels: int = 3) -> None:
        super().__init__()
        widths = level_widths(config)
        self.stem = nn.Conv2d(in_channels, config.width, 3, padding=1)
        nn.init.kaiming_normal_(self.stem.weight, nonlinearity="linear")
        self.levels = nn.ModuleList()
        previous = config.width
        for i, (width, count) in enumerate(zip(widths, config.level_res_blocks("encoder"))):
            self.levels.append(EncoderLevel(previous, width, count, i < len(widths) - 1, config.dropout))
            previous = width
        self.mid = mid_blocks(previous, config.middle_blocks("encoder"), config.mid_attention)
        self.head = Head(previous, config.latent_channels, kernel_size=1)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stem(images)
        for level in self.levels:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.head(x)


class DecoderLevel(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        res_blocks: int,
        upsample: str | None,
        adaptive_norm: bool,
        latent_channels: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.blocks = level_blocks(in_channels, out_channels, res_blocks, dropout)
        self.upsample = UPSAMPLERS[upsample](out_channels) if upsample else None
        self.norm = AdaptiveGroupNorm(out_channels, latent_channels) if upsample and adaptive_norm else None

    def forward(self, x: Tensor, quantized: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        if self.upsample is not None:
            x = self.upsample(x)
        if self.norm is not None:
            x = self.norm(x, quantized)
        return x


class Decoder(nn.Module):
    """quantized latents (B, D, h, w) -> images (B, 3, h*f, w*f), unclamped."""

    def __init__(self, config: ModelConfig, out_channels: int = 3) -> None:
        super().__init__()
        widths = level_widths(config)[::-1]
        self.stem = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        nn.init.kaiming_normal_(self.stem.weight, nonlinearity="linear")
        self.mid = mid_blocks(widths[0], config.middle_blocks("decoder"), config.mid_attention)
        self.mid_norm = AdaptiveGroupNorm(widths[0], config.latent_channels) if config.adaptive_norm else None
        self.levels = nn.ModuleList()
        previous = widths[0]
        counts = config.level_res_blocks("decoder")[::-1]
        for i, (width, count) in enumerate(zip(widths, counts)):
            upsample = config.upsample if i < len(widths) - 1 else None
            self.levels.append(
                DecoderLevel(
                    previous, width, count, upsample, config.adaptive_norm, config.latent_channels, config.dropout
                )
            )
            previous = width
        self.head = Head(previous, out_channels, kernel_size=3)

    def forward(self, quantized: Tensor) -> Tensor:
        x = self.stem(quantized)
        for block in self.mid:
            x = block(x)
        if self.mid_norm is not None:
            x = self.mid_norm(x, quantized)
        for level in self.levels:
            x = level(x, quantized)
        return self.head(x)
