"""The training step of the GPU check (benchmarks/gpu_check.py): a few steps of the F16-D16-G8-V256k
recipe (gsq.train.train, bf16 autocast, the DINO discriminator), once with
model.quantizer_backend=reference and once with auto, on synthetic images at a small batch.

No network: the DINOv2 ViT-S/14-reg backbone gets random weights written to a local file first
(gsq.pretrained loads it like a real checkpoint), and the perceptual loss is off (LPIPS needs VGG16
weights and the lpips package). Per run: the median step time after the warm-up steps (cuDNN
autotuning, Triton autotuning, the discriminator's first passes), the peak GPU memory over the
timed steps, and the quantizer's share of a step: the quantizer module's forward+backward, timed
apart (CUDA events, median of up to 10) on the very latent it received in training, over the step time.

On a CPU (the check's --dry-run) the same code trains a tiny F16 model (width 32, 32x32 images,
V=256, DINO at 28x28 pixels) in fp32 for 3 steps.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

PRESET = "F16-D16-G8-V256k"
TINY = [
    "model.width=32",
    "model.res_blocks=1",
    "model.mid_blocks=1",
    "model.mid_attention=false",
    "model.codebook_size=256",
    "data.image_size=32",
    "discriminator.dino_resolution=28",
]


def synthetic_images(folder: Path, count: int, size: int) -> Path:
    """`count` smooth random RGB images (PNG) in `folder`: gradients plus low-frequency noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, size)[None, :, None]
    for i in range(count):
        low = rng.random((8, 8, 3))
        noise = np.kron(low, np.ones((size // 8 + 1, size // 8 + 1, 1)))[:size, :size]
        pixels = 0.5 * noise + 0.5 * grid * rng.random(3)
        Image.fromarray((255 * pixels).astype(np.uint8)).save(folder / f"image_{i:03d}.png")
    return folder


def dino_weights(folder: Path) -> Path:
    """Random DINOv2 ViT-S/14-reg weights (timm layout) saved where discriminator.dino_weights can read them."""
    from gsq.models.discriminators import create_dino_backbone

    path = folder / "dino-random.pth"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save(create_dino_backbone(resolution=518).state_dict(), path)
    return path


def config_for(backend: str, work: Path, batch: int, steps: int, device: str):
    from gsq.config import apply_overrides, preset

    overrides = [
        f"model.quantizer_backend={backend}",
        f"data.path={work / 'images'}",
        "data.validation_fraction=0.25",
        "data.validation_images=2",
        f"data.batch_size={batch}",
        f"data.num_workers={2 if device == 'cuda' else 0}",
        "discriminator.kind=dino",
        f"discriminator.dino_weights={work / 'dino-random.pth'}",
        "discriminator.dino_fallback=error",
        "loss.perceptual=0",
        f"train.steps={steps}",
        f"train.log_every={steps}",
        f"train.eval_every={10 * steps}",
        f"train.grid_every={10 * steps}",
        f"train.checkpoint_every={10 * steps}",
        "train.keep_checkpoints=1",
        "train.max_minutes=0",
        f"train.mixed_precision={'bf16' if device == 'cuda' else 'none'}",
        f"train.device={device}",
        f"train.run_dir={work / 'runs'}",
        f"train.name={backend}",
    ]
    return apply_overrides(preset(PRESET), overrides + (TINY if device == "cpu" else []))


class StepClock:
    """Train callback: the wall time of each step (synchronized), the peak memory over the steps
    after the warm-up, and the quantizer's input of the first training forward."""

    def __init__(self, device: str, warmup: int) -> None:
        from gsq_kernels import GroupedSphericalQuantizer

        self.quantizer_type = GroupedSphericalQuantizer
        self.device, self.warmup = device, warmup
        self.ends: list[float] = []
        self.peak_bytes: int | None = None
        self.captured: dict = {}

    def __call__(self, step: int, losses: dict) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            if step == self.warmup:
                torch.cuda.reset_peak_memory_stats()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        self.ends.append(time.perf_counter())

    def capture(self, module, args) -> None:
        """A global forward pre-hook: keeps the first latent a training-mode quantizer receives."""
        if (
            "z" not in self.captured
            and isinstance(module, self.quantizer_type)
            and module.training
            and torch.is_grad_enabled()
        ):
            self.captured.update(z=args[0].detach().clone(), module=module)

    def step_times(self) -> list[float]:
        """Durations of the steps after the warm-up (the first step has no start mark)."""
        return [b - a for a, b in zip(self.ends[self.warmup - 1 :], self.ends[self.warmup :])]


def time_quantizer(module, z: torch.Tensor, device: str, bf16: bool, repeats: int = 10) -> float:
    """Median seconds of the quantizer's forward+backward on `z`, as in a training step (autocast,
    an upstream gradient on the quantized latent, the loss term)."""
    z = z.detach().requires_grad_()
    upstream = torch.randn_like(z)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = module(z)
        torch.autograd.backward(
            [out.quantized, out.loss], [upstream.to(out.quantized.dtype), torch.ones_like(out.loss)]
        )
        z.grad = None
        module.zero_grad(set_to_none=True)

    from .gpu_timings import timed_calls

    return statistics.median(timed_calls(step, device)[:repeats])


def train_once(backend: str, work: Path, batch: int, warmup: int, timed: int, device: str) -> dict:
    """A short run of gsq.train.train with `backend`, measured by StepClock."""
    from gsq.train import train
    from gsq_kernels import dispatch

    config = config_for(backend, work, batch, warmup + timed, device)
    clock = StepClock(device, warmup)
    hook = register_module_forward_pre_hook(clock.capture)
    try:
        started = time.perf_counter()
        result = train(config, progress=False, callbacks=(clock,))
        wall = time.perf_counter() - started
    finally:
        hook.remove()
    times = clock.step_times()
    row = {
        "backend": backend,
        "status": "ok",
        "batch": batch,
        "steps": result.step,
        "warmup_steps": warmup,
        "step_times_s": times,
        "step_s": statistics.median(times),
        "peak_bytes": clock.peak_bytes,
        "wall_s": wall,
        "resolved_backend": dispatch.resolve(backend, torch.device(device)).name,
        "latent_shape": list(clock.captured["z"].shape) if clock.captured else None,
    }
    if clock.captured:
        bf16 = config.train.mixed_precision == "bf16"
        row["quantizer_s"] = time_quantizer(clock.captured["module"], clock.captured["z"], device, bf16)
        row["quantizer_share"] = row["quantizer_s"] / row["step_s"]
    return row


def run(work: Path, device: str, batch: int, warmup: int = 3, timed: int = 4) -> list[dict]:
    """Both runs (reference, then auto); a run that fails is recorded with its error."""
    synthetic_images(work / "images", 16, 256 if device == "cuda" else 32)
    dino_weights(work)
    rows = []
    for backend in ("reference", "auto"):
        try:
            rows.append(train_once(backend, work, batch, warmup, timed, device))
        except Exception as error:  # recorded; the other run still goes
            oom = isinstance(error, torch.OutOfMemoryError)
            rows.append(
                {
                    "backend": backend,
                    "status": "oom" if oom else "error",
                    "batch": batch,
                    "reason": f"{type(error).__name__}: {str(error).strip()[:300]}",
                }
            )
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        print(
            f"training: {rows[-1]['backend']}: {rows[-1]['status']} "
            f"{rows[-1].get('step_s', rows[-1].get('reason', ''))}",
            flush=True,
        )
    return rows
