"""Building blocks of the GSQ-GAN autoencoder (docs/spec.md, "Architecture").

Each block holds the same tensors, with the same shapes, as its counterpart in the public reference
code (flex_gen), so its checkpoints convert tensor for tensor (gsq/convert.py keeps the name map).
The initialisations are the reference's: Kaiming-normal "linear" gains, times 1.6761 for a conv
that follows a SiLU (the SiLU's variance gain) and 1/sqrt(2) more for the conv whose output is
summed with a residual.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

NORM_GROUPS = 32  # GroupNorm(32) everywhere, as the paper
SILU_GAIN = 1.6761  # 1 / std(SiLU(x)) for x ~ N(0, 1)


def _kaiming(conv: nn.Module, gain: float = 1.0) -> None:
    nn.init.kaiming_normal_(conv.weight, nonlinearity="linear")
    conv.weight.data.mul_(gain)


class ResBlock(nn.Module):
    """GN + SiLU + conv3x3, GN + SiLU (+ dropout) + conv3x3, plus the input (through a 1x1 conv
    when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(NORM_GROUPS, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(NORM_GROUPS, out_channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        _kaiming(self.conv1, SILU_GAIN)
        _kaiming(self.conv2, SILU_GAIN * 0.70711)
        if isinstance(self.skip, nn.Conv2d):
            _kaiming(self.skip)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        _kaiming(self.qkv)
        _kaiming(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).split(c, dim=2)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        _kaiming(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def depth_to_space(x: Tensor, block: int = 2) -> Tensor:
    """(B, block*block*C, H, W) -> (B, C, H*block, W*block), channels read as (row, column, C)
    ("DCR" order): output pixel (h*block + i, w*block + j) of channel k is input channel
    (i*block + j)*C + k at (h, w). The reference's order; torch's pixel_shuffle reads (C, row,
    column) instead, which would scramble converted weights."""
    b, channels, h, w = x.shape
    c = channels // (block * block)
    x = x.view(b, block, block, c, h, w).permute(0, 3, 4, 1, 5, 2)  # (B, C, H, row, W, column)
    return x.reshape(b, c, h * block, w * block)


class DepthToSpaceUpsample(nn.Module):
    """conv3x3 C -> 4C, then depth-to-space 2x. (The reference keeps PyTorch's default init here.)"""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return depth_to_space(self.conv(x), 2)


class NearestUpsample(nn.Module):
    """Nearest-neighbour 2x, then conv3x3 C -> C (the reference's up-sampling when its learnable
    depth-to-space is off)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        _kaiming(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then x * Linear(std_hw(q)) + Linear(mean_hw(q)), where q is the
    quantized latent: the decoder's feature statistics are set by the tokens' statistics.

    std_hw uses the unbiased variance over the h*w positions, as the reference computes it
    (torch's default `var`), so converted checkpoints see the statistics they were trained with;
    a 1x1 latent (one position) uses the biased one (0) instead of NaN."""

    def __init__(self, channels: int, condition_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(NORM_GROUPS, channels, eps=eps, affine=False)
        self.scale = nn.Linear(condition_channels, channels)
        self.shift = nn.Linear(condition_channels, channels)
        self.eps = eps

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        flat = condition.flatten(2)
        # Deliberate deviation: the reference's unbiased variance of a single position (a 1x1
        # latent) is NaN, which would turn the whole image NaN; the biased one is 0, so the scale
        # becomes Linear(sqrt(eps)) and the output stays finite. Larger latents match exactly.
        correction = 1 if flat.shape[-1] > 1 else 0
        std = (flat.var(dim=-1, correction=correction) + self.eps).sqrt()
        scale = self.scale(std)[:, :, None, None]
        shift = self.shift(flat.mean(dim=-1))[:, :, None, None]
        return self.norm(x) * scale + shift


class Head(nn.Module):
    """GN + SiLU + conv (the last layers of the encoder and of the decoder)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(NORM_GROUPS, in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        _kaiming(self.conv, SILU_GAIN)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.silu(self.norm(x)))
