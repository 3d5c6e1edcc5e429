"""The quantizer settings benchmarked (and tested): the paper's (docs/spec.md, "Evaluation"), the core
performance target, and sweeps of V and of d. One table for tests and benchmarks.

A setting is a latent (batch, D, H, W) with G groups and V codes; 256x256 images give H = W = 256 / f
for a down-sampling factor f. CPU sizes keep the whole CPU run under 15 minutes on a 2-core machine;
GPU sizes use the paper's batch sizes range.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Setting:
    name: str
    batch: int
    channels: int  # D
    height: int
    width: int
    groups: int  # G
    codebook_size: int  # V

    @property
    def code_dim(self) -> int:
        return self.channels // self.groups

    @property
    def rows(self) -> int:
        """Group vectors quantized per call (positions x G)."""
        return self.batch * self.height * self.width * self.groups

    @property
    def lookup_flops(self) -> int:
        """Multiply-adds of the nearest-code search, counted as 2 flops each."""
        return 2 * self.rows * self.codebook_size * self.code_dim

    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    def with_batch(self, batch: int) -> Setting:
        return replace(self, batch=batch)

    def label(self) -> str:
        return (
            f"{self.name} [B={self.batch}, D={self.channels}, {self.height}x{self.width}, "
            f"G={self.groups}, d={self.code_dim}, V={self.codebook_size}]"
        )


def _paper(name: str, downsampling: int, channels: int, groups: int, codebook_size: int, batch: int) -> Setting:
    side = 256 // downsampling
    return Setting(name, batch, channels, side, side, groups, codebook_size)


# The paper's headline configurations at 256x256 (docs/spec.md, "Evaluation"), batch 1 (set per device).
PAPER_SETTINGS = (
    _paper("F8-D64-G16-V8k", 8, 64, 16, 8_192, 1),
    _paper("F16-D16-G8-V256k", 16, 16, 8, 262_144, 1),
    _paper("F16-D16-G1-V256k", 16, 16, 1, 262_144, 1),
    _paper("F8-D8-G1-V256k", 8, 8, 1, 262_144, 1),
)

# The core performance target: latent (32, 64, 16, 16), G=16 (d=4), V=16,384.
CORE_TARGET = Setting("core-target", 32, 64, 16, 16, 16, 16_384)

V_SWEEP = tuple(2**k for k in (10, 12, 14, 16, 18, 20))
D_SWEEP_GROUPS = (64, 32, 16, 8, 4, 1)  # d = 1, 2, 4, 8, 16, 64 at D = 64


def paper_settings(device: str) -> list[Setting]:
    batches = {
        "cpu": {"F8-D64-G16-V8k": 2, "F16-D16-G8-V256k": 1, "F16-D16-G1-V256k": 1, "F8-D8-G1-V256k": 1},
        "cuda": {"F8-D64-G16-V8k": 64, "F16-D16-G8-V256k": 64, "F16-D16-G1-V256k": 64, "F8-D8-G1-V256k": 64},
    }
    return [s.with_batch(batches[device][s.name]) for s in PAPER_SETTINGS]


def core_settings(device: str) -> list[Setting]:
    if device == "cpu":
        return [CORE_TARGET]
    return [CORE_TARGET, Setting("core-target-b128", 128, 64, 16, 16, 16, 16_384)]


def v_sweep(device: str) -> list[Setting]:
    batch = 2 if device == "cpu" else 64
    return [Setting(f"V-sweep-{v}", batch, 64, 16, 16, 16, v) for v in V_SWEEP]


def d_sweep(device: str) -> list[Setting]:
    batch = 2 if device == "cpu" else 64
    return [Setting(f"d-sweep-{64 // g}", batch, 64, 16, 16, g, 16_384) for g in D_SWEEP_GROUPS]
