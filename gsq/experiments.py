"""`gsq experiment ablation`: the paper's small-scale codebook ablation (docs/spec.md, section "Evaluation"), at a
scale the 2-core CPU trains in under an hour (about 9 minutes per arm).

The paper (128x128 ImageNet, no GAN, D=8, V=8192): uniform initialization without l2 in the lookup
-> usage 3.4%, rFID 11.4; spherical initialization with l2 -> usage 100%, rFID 5.4; and, for
grouping, more groups at the same D and V reconstruct better (table of section 5).

Here: the tiny autoencoder at F8 (no GAN, no LPIPS term) on 64x64 crops of the bundled photos, D=8,
V=1024, the same steps, seed and data for every arm:
  (a) uniform init, no l2, G=1     (b) spherical init, l2, G=1     (c) spherical init, l2, G=4
and, for the lookup, D=16 in G=8 groups of d=2 with V=65,536:
  (d) lookup="dot" (fp32 dot product)    (e) lookup="exact" (the nearest code)
Each arm's EMA weights are evaluated on the held-out photos (PSNR, SSIM, LPIPS-Alex when its
weights are available, codebook usage and perplexity over the validation tokens, and usage over
the last training steps). The table goes to <output>/ablation.md and ablation.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import apply_overrides, preset
from .evaluate import EvalConfig, evaluate_checkpoint
from .metrics import format_metric


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    overrides: tuple[str, ...]


ARMS = (
    Arm("a", "uniform init, no l2, G=1", ("model.codebook_init=uniform", "model.l2_normalize=false", "model.groups=1")),
    Arm("b", "spherical init, l2, G=1", ("model.codebook_init=spherical", "model.l2_normalize=true", "model.groups=1")),
    Arm("c", "spherical init, l2, G=4", ("model.codebook_init=spherical", "model.l2_normalize=true", "model.groups=4")),
    # The lookup itself at the headline's d = 2 with a large codebook: the fp32 dot product (the
    # official code's) against the exact nearest code, everything else equal.
    Arm(
        "d",
        "d=2, V=65536, dot lookup",
        ("model.latent_channels=16", "model.groups=8", "model.codebook_size=65536", "model.quantizer_lookup=dot"),
    ),
    Arm(
        "e",
        "d=2, V=65536, exact lookup",
        ("model.latent_channels=16", "model.groups=8", "model.codebook_size=65536", "model.quantizer_lookup=exact"),
    ),
)

# Shared by every arm: the tiny autoencoder, without the GAN and LPIPS terms (the paper's ablation
# has no GAN; LPIPS weights may be unavailable offline, and the arms must train the same losses).
# The model and optimizer are pinned (F8, batches of 16, lr 2e-4, EMA 0.995: the tiny preset when
# the published table was measured), so that retuning the default run leaves the ablation as it is.
BASE = (
    "model.channel_multipliers=1,1,2,2",
    "data.batch_size=16",
    "optim.lr=2e-4",
    "optim.ema_decay=0.995",
    "discriminator.kind=none",
    "loss.perceptual=0",
    "loss.adversarial=0",
    "model.latent_channels=8",
    "model.codebook_size=1024",
    "train.max_minutes=0",
)


def run_ablation(
    output: str | Path = "runs/ablation", steps: int = 1500, arms: str = "abcde", progress: bool = True
) -> dict:
    from .train import train

    output = Path(output)
    unknown = set(arms) - {arm.key for arm in ARMS}
    if unknown or not arms:
        raise ValueError(f"arms must be letters of {''.join(a.key for a in ARMS)}, got {arms!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    results = {}
    started = time.perf_counter()
    for arm in (a for a in ARMS if a.key in arms):
        overrides = [
            *BASE,
            *arm.overrides,
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            f"train.grid_every={steps}",
            f"train.checkpoint_every={steps}",
            f"train.log_every={max(1, steps // 20)}",
            f"train.run_dir={output}",
            f"train.name=arm-{arm.key}",
        ]
        config = apply_overrides(preset("tiny"), overrides)
        run_dir = output / f"arm-{arm.key}"
        if (run_dir / "checkpoints" / "latest").exists():
            print(f"arm ({arm.key}) {arm.label}: reusing the finished run in {run_dir}")
        else:
            print(f"arm ({arm.key}) {arm.label}: training {steps} steps -> {run_dir}")
            result = train(config, progress=progress)
            if result.stop_reason != "finished":
                raise RuntimeError(f"arm ({arm.key}) stopped: {result.stop_reason}")
        report = evaluate_checkpoint(
            EvalConfig(
                checkpoint=str(run_dir), num_workers=0, progress=False, output=str(run_dir / "eval"), overwrite=True
            )
        )  # this experiment's own report, re-made
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_usage = [r["train_usage_percent"] for r in records if r["kind"] == "train"][-1]
        results[arm.key] = {
            "label": arm.label,
            "overrides": list(arm.overrides),
            **report["metrics"],
            "train_usage_percent": train_usage,
        }
    summary = {"steps": steps, "base": list(BASE), "arms": results, "minutes": (time.perf_counter() - started) / 60}
    output.mkdir(parents=True, exist_ok=True)
    (output / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "ablation.md").write_text(ablation_table(summary) + "\n")
    print(ablation_table(summary))
    return summary


def ablation_table(summary: dict) -> str:
    lines = [
        "| arm | codebook | val. usage | train usage | perplexity | PSNR (dB) | SSIM | LPIPS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in summary["arms"].items():
        lines.append(
            f"| ({key}) | {r['label']} | {r['usage_percent']:.1f}% | {r['train_usage_percent']:.1f}% | "
            f"{r['perplexity']:.1f} | {format_metric(r['psnr'], 2)} | {format_metric(r['ssim'], 3)} | "
            f"{format_metric(r['lpips'], 3)} |"
        )
    return "\n".join(lines)
