"""GSQTokenizer: encoder -> GroupedSphericalQuantizer -> decoder (docs/spec.md, "Architecture").

model = GSQTokenizer(config.model)
out = model(images)               # images in [-1, 1], (B, 3, H, W)
out.reconstruction, out.indices, out.quantizer_loss
tokens = model.encode(images)     # (B, H/f, W/f, G) int64, each in [0, V)
images = model.decode(tokens)     # (B, 3, H, W), unclamped
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from gsq_kernels import GroupedSphericalQuantizer

from ..config import ModelConfig
from .encoder_decoder import Decoder, Encoder


class TokenizerOutput(NamedTuple):
    reconstruction: Tensor  # (B, 3, H, W), pixels in [-1, 1] (not clamped)
    indices: Tensor  # (B, H/f, W/f, G) int64
    quantizer_loss: Tensor  # scalar: codebook term + beta * commitment term


class GSQTokenizer(nn.Module):
    """The GSQ-GAN generator: images in [-1, 1] -> tokens (B, H/f, W/f, G) -> reconstructions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = GroupedSphericalQuantizer(
            config.latent_channels,
            config.codebook_size,
            config.groups,
            beta=config.beta,
            l2_normalize=config.l2_normalize,
            backend=config.quantizer_backend,
            init=config.codebook_init,
            lookup=config.quantizer_lookup,
        )
        self.decoder = Decoder(config)

    @property
    def downsampling(self) -> int:
        return self.config.downsampling

    def token_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, G) of the tokens of an H x W image."""
        f = self.downsampling
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} must be divisible by the down-sampling factor {f}")
        return height // f, width // f, self.config.groups

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor in [-1, 1], got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [-1, 1], got {images.dtype}")
        self.token_shape(images.shape[2], images.shape[3])

    def forward(self, images: Tensor) -> TokenizerOutput:
        self._check_images(images)
        quantized, indices, loss = self.quantizer(self.encoder(images))
        return TokenizerOutput(self.decoder(quantized), indices, loss)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Token indices (B, H/f, W/f, G) int64."""
        self._check_images(images)
        return self.quantizer.encode(self.encoder(images))

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Images (B, 3, h*f, w*f) in [-1, 1] (unclamped) from token indices (B, h, w, G)."""
        if not isinstance(indices, Tensor) or indices.dim() != 4:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"indices must be a (B, h, w, G) tensor, got {shape}")
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.config.codebook_size):
            raise ValueError(
                f"indices must be in [0, {self.config.codebook_size}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        return self.decoder(self.quantizer.decode_indices(indices.long()))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
