"""What the trainer and `gsq eval` measure (docs/spec.md, section "Evaluation") and the reconstruction grids.

- PSNR = 10 log10(1 / MSE) with the MSE pooled over every pixel of every image (data range 1),
  after clamping reconstructions to [-1, 1] and mapping both to [0, 1].
- SSIM: Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, data range 1, on each channel over the
  positions where the window fits inside the image, averaged over channels, then over images.
- Codebook usage (percent of the V codes chosen at least once) and perplexity (exp of the entropy)
  of one histogram pooled over groups, summed over all ranks.
- Frechet distance of two feature sets (rFID with InceptionV3 pool features): from float64 running
  sums (count, sum, sum of outer products), so ranks reduce three tensors instead of gathering
  every feature vector.
Sums are reduced over ranks (gsq.distributed), so every rank must call `compute` at the same point.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gsq_kernels import usage_percent, usage_perplexity

from .distributed import all_reduce_sum


def to_unit_range(images: Tensor) -> Tensor:
    return (images.float().clamp(-1, 1) + 1) / 2


def psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def format_metric(value: float | None, digits: int, missing: str = "n/a") -> str:
    """`value` with `digits` decimals, or `missing` for a metric that could not be computed (None or NaN)."""
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


class PSNRMeter:
    """Pooled squared error over every pixel seen since construction."""

    def __init__(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)  # squared error, pixels

    @torch.no_grad()
    def update(self, images: Tensor, reconstructions: Tensor) -> None:
        error = (to_unit_range(images).double() - to_unit_range(reconstructions).double()).square().sum()
        self.sums += torch.stack([error.cpu(), torch.tensor(float(images.numel()), dtype=torch.float64)])

    def compute(self) -> dict:
        squared_error, pixels = all_reduce_sum(self.sums).tolist()
        mse = squared_error / pixels if pixels else math.nan
        return {"mse": mse, "psnr": psnr_from_mse(mse) if pixels else math.nan}


class CodebookUsage:
    """Histogram of chosen codes (pooled over groups), kept by the trainer itself so that it can be
    checkpointed and reset at exact steps."""

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(codebook_size, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, indices: Tensor) -> None:
        """Count a batch of indices (on the counts' device: no host synchronisation)."""
        self.counts += torch.bincount(indices.reshape(-1).to(self.counts.device), minlength=self.counts.numel())

    def reset(self) -> None:
        self.counts.zero_()

    def compute(self) -> dict:
        counts = all_reduce_sum(self.counts).cpu()
        return {"usage_percent": usage_percent(counts), "perplexity": usage_perplexity(counts)}


GRID_TITLE_HEIGHT = 14  # px of the caption strip above a grid's tiles


def save_comparison_grid(
    originals: Tensor, reconstructions: Tensor, path: Path, columns: int = 8, title: str = ""
) -> Path:
    """PNG: originals on the top row, their reconstructions right below, 2 px white gaps, under a
    caption strip (`title`, clipped to the width; none when empty); written under a temporary name
    and renamed."""
    from PIL import Image, ImageDraw

    n = min(columns, originals.shape[0])
    rows = [to_unit_range(originals[:n]).cpu(), to_unit_range(reconstructions[:n]).cpu()]
    _, _, h, w = rows[0].shape
    pad = 2
    caption = GRID_TITLE_HEIGHT if title else 0
    canvas = torch.ones(3, caption + 2 * h + 3 * pad, n * w + (n + 1) * pad)
    for r, row in enumerate(rows):
        for c in range(n):
            top, left = caption + pad + r * (h + pad), pad + c * (w + pad)
            canvas[:, top : top + h, left : left + w] = row[c]
    image = Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if title:
        ImageDraw.Draw(image).text((pad, 1), title, fill=(0, 0, 0))  # Pillow's built-in font: no file needed
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    image.save(temporary, format="PNG")
    temporary.replace(path)
    return path


# ------------------------------------------------------------------------------------------------
# SSIM


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(images: Tensor, reconstructions: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """SSIM of each image pair (B,) for images in [-1, 1] (Wang et al. 2004; the value
    skimage.metrics.structural_similarity gives with gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)."""
    x, y = to_unit_range(images).double(), to_unit_range(reconstructions).double()
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    g = _gaussian_window(window, sigma).to(x.device)
    kernel_h = g.view(1, 1, window, 1).repeat(channels, 1, 1, 1)
    kernel_w = g.view(1, 1, 1, window).repeat(channels, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:  # separable Gaussian, "valid" positions only
        return F.conv2d(F.conv2d(t, kernel_h, groups=channels), kernel_w, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


class MeanMeter:
    """Sum and count of per-image values (SSIM, LPIPS), reduced over ranks."""

    def __init__(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)

    def update(self, values: Tensor) -> None:
        values = values.detach().double().reshape(-1).cpu()
        self.sums += torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64)])

    def compute(self) -> float:
        total, count = all_reduce_sum(self.sums).tolist()
        return total / count if count else math.nan


# ------------------------------------------------------------------------------------------------
# Frechet distance


class FeatureMoments:
    """Running float64 count, sum and sum of outer products of feature vectors (B, F)."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.outer = torch.zeros(features, features, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, features: Tensor) -> None:
        f = features.detach().reshape(features.shape[0], -1).to(self.sum.device, torch.float64)
        if f.shape[1] != self.sum.numel():
            raise ValueError(f"features have {f.shape[1]} dimensions, expected {self.sum.numel()}")
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f

    def mean_and_covariance(self) -> tuple[Tensor, Tensor]:
        """Mean and unbiased covariance (as numpy.cov) over every rank's features."""
        count, total, outer = (all_reduce_sum(t) for t in (self.count, self.sum, self.outer))
        n = float(count)
        if n < 2:
            raise ValueError(f"a Frechet distance needs at least 2 feature vectors, got {int(n)}")
        mean = total / n
        covariance = (outer - n * torch.outer(mean, mean)) / (n - 1)
        return mean, covariance


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    Tr((S1 S2)^(1/2)) = Tr((A S2 A)^(1/2)) with A = S1^(1/2), and A S2 A is symmetric positive
    semi-definite, so its square root comes from a symmetric eigendecomposition (eigenvalues
    clamped at 0 against rounding) instead of a general matrix square root."""
    mean1, mean2, cov1, cov2 = (t.double().cpu() for t in (mean1, mean2, cov1, cov2))
    eigenvalues, eigenvectors = torch.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_root
    return float(distance)
