"""GroupedSphericalQuantizer: the drop-in nn.Module (docs/spec.md, section "Quantizer")."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import dispatch, functional
from .functional import GSQOutput
from .lookup import check_lookup
from .reference import l2


def spherical_init(codebook_size: int, code_dim: int, generator: torch.Generator | None = None) -> Tensor:
    """Rows uniform on the unit sphere S^(d-1): standard normal samples divided by their norm."""
    return l2(torch.randn(codebook_size, code_dim, generator=generator), 1e-12)


def uniform_init(codebook_size: int, code_dim: int, generator: torch.Generator | None = None) -> Tensor:
    """The ablation's baseline init (flex_gen's): U(-1/V, 1/V), or U(-1, 1) for d = 1."""
    bound = 1.0 if code_dim == 1 else 1.0 / codebook_size
    return torch.empty(codebook_size, code_dim).uniform_(-bound, bound, generator=generator)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class GroupedSphericalQuantizer(nn.Module):
    """Grouped Spherical Quantization with one shared, gradient-trained codebook.

    Args:
        dim: D, the channels of the latent.
        codebook_size: V, codes in the shared codebook.
        groups: G; D must be divisible by G, each group vector has d = D / G channels.
        beta: commitment weight of the loss.
        l2_normalize: cosine lookup on l2-normalized vectors (the paper's default); off gives the
            plain Euclidean nearest code on raw vectors.
        backend: "auto" (fastest available for the input's device), "cpu", "cuda", "triton" or
            "reference".
        lookup: "exact" (the truly nearest code, ties to the lowest index; the default) or "dot"
            (the fp32 dot product of the official code, kept to reproduce its choices; at small d
            and large V it misses the nearest code for most rows; docs/spec.md, section "Lookup").
        eps: the l2 normalization's clamp, x / max(||x||, eps).
        check_finite: raise on NaN/inf in the latents or the codebook (a reduction and a host sync
            per call; turn it off for CUDA graph capture).
        init: "spherical" (the paper's) or "uniform" (the ablation baseline).
        track_usage: count how often each code is chosen (see codebook_usage / perplexity).

    forward(z) takes (B, D, H, W) image maps, (B, N, D) sequences or (N, D) vectors (the rank
    decides) and returns GSQOutput(quantized, indices, loss): quantized in z's layout and dtype,
    indices int64 (B, H, W, G) / (B, N, G) / (N, G), loss a float32 scalar.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        groups: int = 1,
        beta: float = 0.25,
        l2_normalize: bool = True,
        backend: str = "auto",
        *,
        eps: float = 1e-12,
        check_finite: bool = True,
        init: str = "spherical",
        track_usage: bool = True,
        lookup: str = "exact",
    ) -> None:
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.codebook_size = _positive_int("codebook_size", codebook_size)
        self.groups = _positive_int("groups", groups)
        if dim % groups != 0:
            raise ValueError(f"dim={dim} is not divisible by groups={groups}")
        functional.check_scalars(beta, eps)
        check_lookup(lookup)
        dispatch.check_backend_name(backend)
        if init not in ("spherical", "uniform"):
            raise ValueError(f"init must be 'spherical' or 'uniform', got {init!r}")
        self.code_dim = dim // groups
        self.beta = float(beta)
        self.l2_normalize = bool(l2_normalize)
        self.backend = backend
        self.eps = float(eps)
        self.check_finite = bool(check_finite)
        self.init = init
        self.track_usage = bool(track_usage)
        self.lookup = lookup
        make = spherical_init if init == "spherical" else uniform_init
        self.codebook = nn.Parameter(make(codebook_size, self.code_dim))
        # A plain tensor, not a buffer: DDP would broadcast rank 0's buffer over every rank's
        # counts, and the counts are metrics, not state to checkpoint. _apply moves it.
        self._usage_counts = torch.zeros(codebook_size, dtype=torch.int64)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._usage_counts = fn(self._usage_counts)
        return module

    def forward(self, z: Tensor) -> GSQOutput:
        out = functional.grouped_spherical_quantize(
            z,
            self.codebook,
            self.groups,
            beta=self.beta,
            l2_normalize=self.l2_normalize,
            eps=self.eps,
            backend=self.backend,
            check_finite=self.check_finite,
            lookup=self.lookup,
        )
        if self.track_usage:
            self._count_usage(out.indices)
        return out

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Indices only (tokenization); no loss, no gradient, no usage counting."""
        return functional.nearest_code_indices(
            z,
            self.codebook,
            self.groups,
            l2_normalize=self.l2_normalize,
            eps=self.eps,
            backend=self.backend,
            check_finite=self.check_finite,
            lookup=self.lookup,
        )

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Raw codebook rows for indices: (B, H, W, G) -> (B, D, H, W), (B, N, G) -> (B, N, D)."""
        if isinstance(indices, Tensor) and indices.dim() >= 1 and indices.shape[-1] != self.groups:
            raise ValueError(f"indices must end in G={self.groups} groups, got shape {tuple(indices.shape)}")
        return functional.decode_indices(indices, self.codebook)

    @torch.no_grad()
    def _count_usage(self, indices: Tensor) -> None:
        flat = indices.reshape(-1)
        if self._usage_counts.device != flat.device:
            self._usage_counts = self._usage_counts.to(flat.device)
        self._usage_counts.index_add_(0, flat, torch.ones_like(flat))

    @torch.no_grad()
    def usage_histogram(self) -> Tensor:
        """Counts per code since the last reset, pooled over groups and summed over all ranks."""
        counts = self._usage_counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        return counts

    def codebook_usage(self) -> float:
        """Percent (0-100, not a fraction) of the V codes chosen at least once since the last reset (all ranks)."""
        return usage_percent(self.usage_histogram())

    def perplexity(self) -> float:
        """exp(entropy) of the pooled code histogram since the last reset (all ranks); 0 if empty."""
        return usage_perplexity(self.usage_histogram())

    def reset_usage(self) -> None:
        self._usage_counts.zero_()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, groups={self.groups} "
            f"(d={self.code_dim}), beta={self.beta}, l2_normalize={self.l2_normalize}, "
            f"backend={self.backend!r}, lookup={self.lookup!r}, init={self.init!r}"
        )


def usage_perplexity(counts: Tensor) -> float:
    total = counts.sum()
    if int(total) == 0:
        return 0.0
    p = counts[counts > 0].double() / total.double()
    return float(torch.exp(-(p * p.log()).sum()))


def usage_percent(counts: Tensor) -> float:
    return 100.0 * float((counts > 0).sum()) / counts.numel()


__all__ = ["GroupedSphericalQuantizer", "spherical_init", "uniform_init", "usage_perplexity", "usage_percent"]
