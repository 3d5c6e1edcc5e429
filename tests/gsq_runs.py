"""A tiny-preset config small enough for tests (32x32 crops, batches of 4, a few steps)."""

from __future__ import annotations

from gsq.config import RunConfig, apply_overrides, preset

SMALL = [
    "data.image_size=32",
    "data.batch_size=4",
    "data.validation_images=4",
    "data.bundled_epoch_size=16",
    "train.steps=6",
    "train.log_every=1",
    "train.eval_every=3",
    "train.grid_every=3",
    "train.checkpoint_every=3",
    "train.max_minutes=0",
    "discriminator.start_step=2",
    "loss.perceptual=0",
]


def small_config(run_dir, *overrides: str) -> RunConfig:
    return apply_overrides(preset("tiny"), SMALL + [f"train.run_dir={run_dir}", *overrides])
