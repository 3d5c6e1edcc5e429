"""Codebooks and rows that defeat a naive sorted search at d = 2 (the exact lookup's hard cases),
shared by the tests of every implementation of it."""

import math

import torch

from gsq_kernels import spherical_init


def angles_to_vectors(angles: torch.Tensor) -> torch.Tensor:
    return torch.stack([angles.cos(), angles.sin()], 1)


def hard_codebook(case: str, small: bool = False):
    """(rows, codebook) of a codebook that defeats a naive search, seeded; `small` shrinks them
    (for the emulated CUDA kernels, which run a CPU thread per GPU thread, and Triton's interpreter,
    which interprets every step of a row's scan)."""
    torch.manual_seed(1)
    many = 5000 if small else 70_000
    few = 1000 if small else 4000
    if case == "clustered":  # many codes within 1e-6 rad: windows cannot prove their winner
        codebook = angles_to_vectors(torch.cat([torch.randn(few) * 1e-6, torch.rand(200) * 2 * math.pi]))
        z = torch.stack([torch.randn(500) * 1e-6, torch.zeros(500)], 1) + torch.tensor([1.0, 0.0])
        return torch.cat([z, torch.randn(500, 2)]), codebook
    if case == "short_codes":  # zero and near-zero codes (eps-clamped) next to unit ones
        codebook = spherical_init(1000, 2)
        codebook[[5, 17, 900]] = torch.tensor([[0.0, 0.0], [1e-13, 0.0], [0.0, 3e-13]])
        z = torch.randn(2000, 2)
        z[:3] = 0
        return z, codebook
    if case == "many_zero_codes":  # a codebook collapsed to zero, but for a few codes
        codebook = torch.zeros(few, 2)
        codebook[::100] = spherical_init(few // 100, 2)
        return torch.randn(300, 2), codebook
    if case == "wraparound":  # codes and rows around angle +-pi
        angles = math.pi - torch.rand(500) * 1e-3 * torch.tensor([1.0, -1.0]).repeat(250)
        return angles_to_vectors(math.pi + (torch.rand(1000) - 0.5) * 2e-3), angles_to_vectors(angles)
    if case == "tiny_rows":  # rows shorter than eps: |n| < 1
        return torch.randn(500, 2) * 1e-13, spherical_init(few, 2)
    if case == "few_codes":
        return torch.randn(500, 2), spherical_init(3, 2)
    if case == "collapsed":  # most codes identical: the crowded bucket drops its duplicates
        codebook = spherical_init(5 * few, 2)
        codebook[few // 4 : 5 * few - few // 4] = codebook[77].clone()
        return torch.cat([codebook[77:78] + torch.randn(200, 2) * 1e-3, torch.randn(200, 2)]), codebook
    if case == "one_sided":  # all codes in a narrow arc, rows everywhere: windows widen past it
        return torch.randn(300, 2), angles_to_vectors(torch.rand(many) * 0.1)
    if case == "one_ulp":  # neighbours whose normalized coordinates differ by about an ulp
        base = torch.rand(64) * 2 * math.pi
        angles = torch.cat([base, base + 1.2e-7, base - 1.2e-7, torch.rand(many) * 2 * math.pi])
        rows = base.repeat(40) + (torch.rand(2560) - 0.5) * 4e-7
        return angles_to_vectors(rows.double()).float(), angles_to_vectors(angles.double()).float()
    if case == "huge_codes":  # norms beyond fp32's range (c^ = 0) and codes at the extremes
        codebook = spherical_init(3000, 2)
        codebook[:3] = torch.tensor([[3e38, 3e38], [-3e38, 1.0], [1e30, -1e30]])
        return torch.randn(500, 2) * torch.tensor([1.0, 1e30]), codebook
    raise ValueError(case)


HARD_CASES = [
    "clustered",
    "short_codes",
    "many_zero_codes",
    "wraparound",
    "tiny_rows",
    "few_codes",
    "collapsed",
    "one_sided",
    "one_ulp",
    "huge_codes",
]
