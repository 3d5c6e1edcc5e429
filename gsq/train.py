"""`gsq train`: the GSQ-GAN training loop (docs/spec.md, sections "Architecture" and "Recipe").

One process on a CPU or a GPU, or many under torchrun (DDP: every rank reads its own shard of each
epoch; codebook usage and losses are reduced over ranks; only rank 0 writes files). Each step:

  1. generator: MSE + LPIPS + quantizer loss + 0.1 x non-saturating adversarial loss, summed over
     `grad_accum_steps` micro-batches, clipped to norm 2.0, one AdamW step; then the EMA update;
  2. discriminator: hinge loss on the same real images and the (detached) reconstructions, clipped,
     one AdamW step (from discriminator.start_step on; the paper: step 0).

Every N steps: losses to metrics.jsonl / TensorBoard and the progress bar, validation of the EMA
weights (PSNR, codebook usage, perplexity), a reconstruction grid, a checkpoint. Ctrl-C (SIGINT) or
SIGTERM finishes the current step, saves a checkpoint and stops; `gsq train --resume RUN` continues
exactly where it stopped (same batches, same random draws, same losses).

`train` builds a `Trainer` and runs it; the Trainer's methods read in the order they run: set-up
(run folder, data, networks, restored state), then per step `generator_step` and
`discriminator_step`, then `log`, `evaluate`, `save_grid` and `checkpoint` when they are due.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .config import PAPER_PRESETS, RunConfig
from .data import DataError, ResumableBatchSampler, build_datasets, collate
from .distributed import (
    all_reduce_sum,
    any_rank,
    broadcast_from_main,
    finish_processes,
    gather_objects,
    mean_over_ranks,
    setup_processes,
    sum_over_ranks,
)
from .extras import require_for_training
from .losses import PerceptualLoss, build_lpips_vgg, hinge_discriminator_loss, non_saturating_generator_loss
from .metrics import CodebookUsage, PSNRMeter, save_comparison_grid
from .models import GSQTokenizer, count_parameters
from .models.discriminators import DinoDiscriminator, PatchGAN, build_dino_backbone, trainable_parameters
from .pretrained import WeightsUnavailable

GRID_IMAGES = 8


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stop_reason: str  # "finished", "time limit ...", "interrupted"
    final: dict  # the last validation metrics (empty when interrupted)

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "interrupted"


# ------------------------------------------------------------------------------------------------
# Networks and their pretrained parts (with the documented, loud fallbacks)


def fallback_warning(notes: dict, flag: str, message: str) -> None:
    """One warning of one line (what is missing, what it disables, how to provide it), recorded in the
    run's files (run_info.json, metrics.jsonl, checkpoints)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    notes["fallbacks"][flag] = message


def build_discriminator(config: RunConfig, notes: dict) -> nn.Module | None:
    spec = config.discriminator
    if spec.kind == "none":
        notes["discriminator"] = "none"
        return None
    if spec.kind == "dino":
        try:
            backbone, source = build_dino_backbone(spec.dino_weights, spec.dino_resolution)
            notes["discriminator"] = f"DINOv2 ViT-S/14-reg ({source}) + 5 trainable heads"
            return DinoDiscriminator(backbone, spec.diffaugment)
        except WeightsUnavailable as error:
            if spec.dino_fallback == "error":
                raise
            fallback_warning(
                notes,
                "dino_discriminator_unavailable",
                f"DINO DISCRIMINATOR UNAVAILABLE, training with a PatchGAN ({spec.patchgan_layers} "
                f"layers, {spec.patchgan_channels} channels; the paper's ablation: rFID 9.6 vs 1.87 "
                f"with DINO): {error} (discriminator.dino_fallback=error refuses)",
            )
            notes["discriminator"] = "PatchGAN (FALLBACK: no DINOv2 weights)"
            return PatchGAN(spec.patchgan_channels, spec.patchgan_layers)
    notes["discriminator"] = f"PatchGAN ({spec.patchgan_layers} layers, {spec.patchgan_channels} channels)"
    return PatchGAN(spec.patchgan_channels, spec.patchgan_layers)


def build_perceptual_loss(config: RunConfig, notes: dict) -> nn.Module | None:
    if config.loss.perceptual == 0:
        notes["perceptual_loss"] = "off (loss.perceptual=0)"
        return None
    try:
        model, source = build_lpips_vgg(config.loss.vgg_weights)
    except WeightsUnavailable as error:
        if config.loss.perceptual_fallback == "error":
            raise
        fallback_warning(
            notes,
            "lpips_unavailable",
            "PERCEPTUAL LOSS DISABLED, training without the LPIPS term (blurrier reconstructions): "
            f"{error} (loss.perceptual_fallback=error refuses)",
        )
        notes["perceptual_loss"] = "DISABLED (FALLBACK: no VGG16 weights)"
        return None
    notes["perceptual_loss"] = f"LPIPS-VGG ({source})"
    return PerceptualLoss(model)


class DiscriminatorLoss(nn.Module):
    """Hinge loss of the discriminator on real and fake images: separate forward passes (its
    BatchNorm sees real and fake batches apart, as the reference) inside one module call, so that
    DDP sees one forward per backward."""

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        return hinge_discriminator_loss(self.discriminator(real), self.discriminator(fake))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_tensor, tensor in zip(ema.parameters(), model.parameters()):
        ema_tensor.lerp_(tensor.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


# ------------------------------------------------------------------------------------------------
# Run folder, logs, stop requests


def time_to_stop(steps_done: int, steps_left: int, elapsed_s: float, max_minutes: float) -> tuple[float, str]:
    """(seconds, which stop) until the run ends: the steps left at the rate so far, or the
    train.max_minutes limit if that comes first (a time-capped run must not show the steps' ETA)."""
    by_steps = steps_left * elapsed_s / steps_done if steps_done else math.inf
    if max_minutes:
        by_time = max(0.0, max_minutes * 60 - elapsed_s)
        if by_time < by_steps:
            return by_time, "time limit"
    return by_steps, "steps"


PROGRESS_LOSSES = {  # bar label -> loss name
    "rec": "reconstruction",
    "lpips": "perceptual",
    "q": "quantizer",
    "adv": "adversarial",
    "disc": "discriminator",
}
PROGRESS_EVERY_S = 1.0  # reading the latest losses syncs with the GPU: at most this often


def resolve_run_dir(config: RunConfig, resume_folder: Path | None) -> Path:
    """The run folder: the resumed checkpoint's run, else runs/<name>. Without an explicit
    train.name, an existing runs/<preset> gets a numbered sibling instead of being overwritten."""
    if resume_folder is not None:
        return resume_folder.parent.parent
    root = Path(config.train.run_dir)
    run_dir = root / config.run_name
    if (run_dir / "checkpoints" / "latest").exists():
        if config.train.name:
            raise ckpt.CheckpointError(
                f"{run_dir} already holds a run: continue it with `--resume {run_dir}`, or pick another train.name"
            )
        number = 2
        while (root / f"{config.run_name}-{number}" / "checkpoints" / "latest").exists():
            number += 1
        run_dir = root / f"{config.run_name}-{number}"
    return run_dir


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (when installed), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.file = run_dir / "metrics.jsonl"
        self.tensorboard = None
        if not enabled:
            return
        if resume_step is not None and self.file.exists():
            # Lines logged after the checkpoint are logged again by the resumed run.
            kept = []
            for line in self.file.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if record.get("step", 0) <= resume_step and record.get("kind") != "summary":
                        kept.append(line)
            self.file.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:
            pass

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        with self.file.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step (and save); a second SIGINT
    aborts at once (the last complete checkpoint stays intact)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(Ctrl-C again to abort without saving)",
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------------
# Validation and the running means between log lines


@torch.no_grad()
def validation_metrics(model: GSQTokenizer, loader, device: torch.device, autocast) -> dict:
    """PSNR (pooled MSE), codebook usage and perplexity of `model` (the EMA) on this rank's shard of
    the validation set, reduced over all ranks."""
    model.eval()
    psnr, usage = PSNRMeter(), CodebookUsage(model.config.codebook_size, device)
    for batch in loader:
        images = batch["image"].to(device)
        with autocast():
            out = model(images)
        psnr.update(images, out.reconstruction)
        usage.update(out.indices)
    return {**psnr.compute(), **usage.compute()}


@dataclass
class RunningSums:
    """What the trainer accumulates between two log lines (checkpointed, so that a resumed run logs
    the means an uninterrupted one would)."""

    sums: dict = field(default_factory=dict)  # loss name -> float64 tensor, summed over steps
    steps: int = 0
    skipped: int = 0  # unreadable images drawn (and replaced)
    started: float = 0.0  # time.perf_counter() at the last log line

    def add(self, losses: dict) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().double()
        self.steps += 1

    def reset(self, now: float) -> None:
        self.sums, self.steps, self.skipped, self.started = {}, 0, 0, now

    def state(self) -> dict:
        """The checkpoint's record (every rank takes part: the sums are averaged over ranks)."""
        return {
            "sums": {k: float(mean_over_ranks(v)) for k, v in self.sums.items()},
            "steps": self.steps,
            "skipped": self.skipped,
        }

    def load(self, state: dict, device: torch.device) -> None:
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in state["sums"].items()}
        self.steps, self.skipped = state["steps"], state["skipped"]


# ------------------------------------------------------------------------------------------------
# The trainer


def train(
    config: RunConfig,
    resume: str | Path | None = None,
    progress: bool = True,
    callbacks: tuple[Callable[[int, dict], None], ...] = (),
) -> TrainResult:
    """Train as configured. `resume`: a run folder or checkpoint folder to continue (its config must
    match `config` up to ckpt.RESUME_MAY_CHANGE). `callbacks` are called after every step with
    (step, {name: loss tensor})."""
    require_for_training(config)  # a missing extra is one line, before the run folder is written
    return Trainer(config, resume, progress, callbacks).run()


class Trainer:
    """One training run. The set-up happens in the constructor, in a fixed order: the random draws
    it makes (network initialization, data order) are part of what exact resume reproduces."""

    def __init__(
        self,
        config: RunConfig,
        resume: str | Path | None,
        progress: bool,
        callbacks: tuple[Callable[[int, dict], None], ...],
    ) -> None:
        self.config, self.progress, self.callbacks = config, progress, callbacks
        self.processes = setup_processes(config.train.device, "train.device")
        self.device = self.processes.device
        self.use_bf16 = config.train.mixed_precision == "bf16" or (
            config.train.mixed_precision == "auto" and self.device.type == "cuda"
        )
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._open_run_folder(resume)
        self._build_data()
        self._build_networks()
        if self.resume_folder is not None:
            self._restore()
        else:
            torch.manual_seed(config.train.seed * 1_000 + self.processes.rank)  # augmentations differ per rank
            np.random.seed(config.train.seed * 1_000 + self.processes.rank)
        self._wrap_for_ddp()
        self.log_file = MetricsLog(
            self.run_dir, self.processes.main, self.start_step if self.resume_folder is not None else None
        )
        self.validated: dict = {}  # step -> metrics of the validations run
        self.bar, self.bar_shown_at, self.bar_usage = None, -math.inf, None  # usage: of the last log line
        if self.processes.main:
            self._announce()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    # -- set-up ------------------------------------------------------------------------------------

    def _open_run_folder(self, resume: str | Path | None) -> None:
        """The run folder and, when resuming, the checkpoint (which must match this config)."""
        config, processes = self.config, self.processes
        self.resume_folder, self.resume_state = None, None
        if resume is not None:
            self.resume_folder = ckpt.resume_point(resume)  # a broken `latest`: the newest intact checkpoint
            self.resume_state = ckpt.check_resumable(self.resume_folder, config)
        elif config.preset in PAPER_PRESETS and not config.data.path:
            raise DataError(
                f"preset {config.preset} trains on ImageNet-1k: give its train folder with "
                f"data.path=/path/to/imagenet/train (or train `tiny` on the bundled photos)"
            )
        self.run_dir = broadcast_from_main(
            processes, resolve_run_dir(config, self.resume_folder) if processes.main else None
        )
        self.start_step = int(self.resume_state["step"]) if self.resume_state else 0
        if processes.main:
            taken = Path(config.train.run_dir) / config.run_name
            if resume is None and self.run_dir != taken:  # resolve_run_dir numbered it: say where it goes
                print(
                    f"gsq train: {taken} holds a run already (continue it with --resume {taken}); "
                    f"this run writes to {self.run_dir}",
                    flush=True,
                )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(config.to_json() + "\n")

    def _build_data(self) -> None:
        """This rank's training batches (continuing after the checkpoint's), its validation shard and
        the grid's images."""
        config, processes, state = self.config, self.processes, self.resume_state
        self.datasets = datasets = build_datasets(config.data, config.train.seed)
        batches_done = self.start_step * config.train.grad_accum_steps
        if state and state.get("world_size", 1) != processes.world_size:
            batches_done = batches_done * state["world_size"] // processes.world_size
            warnings.warn(
                f"resuming a run of {state['world_size']} processes on {processes.world_size}: the data "
                "order continues from the same point but is not the one an uninterrupted run would use",
                RuntimeWarning,
                stacklevel=4,
            )  # the caller of train()
        sampler = ResumableBatchSampler(
            datasets.train,
            config.data.batch_size,
            config.train.seed,
            processes.rank,
            processes.world_size,
            start_batch=batches_done,
        )
        workers = config.data.num_workers
        self.train_loader = torch.utils.data.DataLoader(
            datasets.train,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=_ignore_interrupts if workers > 0 else None,
        )
        shard = list(range(processes.rank, len(datasets.validation), processes.world_size))
        self.validation_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(datasets.validation, shard), batch_size=config.data.batch_size, collate_fn=collate
        )
        # grid: validation images spread over the whole set (the bundled tiles come photo by photo)
        grid_indices = np.unique(np.linspace(0, len(datasets.validation) - 1, GRID_IMAGES).round().astype(int))
        self.grid_images = torch.stack([datasets.validation[int(i)]["image"] for i in grid_indices])

    def _build_networks(self) -> None:
        """The tokenizer, its EMA, the discriminator and the perceptual loss (the same initial weights
        on every rank), their optimizers, and the notes recorded in run_info.json."""
        config, device = self.config, self.device
        torch.manual_seed(config.train.seed)
        self.notes = notes = {
            "fallbacks": {},
            "data": self.datasets.description,
            "device": str(device),
            "processes": self.processes.world_size,
            "bf16_autocast": self.use_bf16,
        }
        self.generator = GSQTokenizer(config.model).to(device)
        self.ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        discriminator = build_discriminator(config, notes)
        self.discriminator = discriminator.to(device) if discriminator is not None else None
        perceptual = build_perceptual_loss(config, notes)
        self.perceptual = perceptual.to(device) if perceptual is not None else None
        self.discriminator_parameters = trainable_parameters(discriminator) if discriminator is not None else []
        notes["parameters"] = {
            "tokenizer": count_parameters(self.generator),
            "discriminator_trainable": sum(p.numel() for p in self.discriminator_parameters),
        }
        o = config.optim

        def adamw(parameters) -> torch.optim.AdamW:
            return torch.optim.AdamW(parameters, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

        self.generator_optimizer = adamw(self.generator.parameters())
        self.discriminator_optimizer = adamw(self.discriminator_parameters) if self.discriminator_parameters else None
        self.train_usage = CodebookUsage(config.model.codebook_size, device)
        self.running = RunningSums()

    def _restore(self) -> None:
        """Weights, optimizer moments, this rank's RNG state, usage histogram and running sums."""
        folder, state, device = self.resume_folder, self.resume_state, self.device
        ckpt.load_weights(self.generator, folder / "generator.safetensors")
        ckpt.load_weights(self.ema, folder / "ema.safetensors")
        tensors = ckpt.read_tensors(folder / "training_state.safetensors")
        scalars = state["training_state"]
        self.generator_optimizer.load_state_dict(ckpt.unflatten_optimizer("generator_optimizer", tensors, scalars))
        if self.discriminator is not None:
            if not (folder / "discriminator.safetensors").is_file():
                raise ckpt.CheckpointError(f"{folder} has no discriminator.safetensors")
            ckpt.load_weights(self.discriminator, folder / "discriminator.safetensors", ckpt.FROZEN_PREFIXES)
            if self.discriminator_optimizer is not None:
                self.discriminator_optimizer.load_state_dict(
                    ckpt.unflatten_optimizer("discriminator_optimizer", tensors, scalars)
                )
        rank = self.processes.rank if self.processes.rank < state.get("world_size", 1) else 0
        rng_tensors = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{rank}.")}
        ckpt.set_rng_state(rng_tensors, scalars["rng"][rank], device)
        if self.processes.main:  # the histogram was reduced over ranks when saved
            self.train_usage.counts.copy_(tensors["usage.counts"].to(device))
        self.running.load(scalars["interval"], device)
        self.notes["resumed_from"] = str(folder)

    def _wrap_for_ddp(self) -> None:
        """The modules each step calls: DDP wrappers under torchrun, the networks themselves otherwise."""
        ddp = dict(device_ids=[self.device.index]) if self.device.type == "cuda" else {}
        # No buffer broadcast before each forward (torch >= 2.14 calls it forward_sync_buffers and
        # deprecates broadcast_buffers; the one sync at construction that it keeps is harmless here).
        # The tokenizer has no buffers; the discriminator's BatchNorm statistics stay per rank (never
        # used in eval mode), so nothing needs broadcasting before each forward.
        parameters = inspect.signature(DistributedDataParallel.__init__).parameters
        ddp["forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"] = False
        distributed = self.processes.distributed
        self.generator_forward = DistributedDataParallel(self.generator, **ddp) if distributed else self.generator
        self.discriminator_loss = DiscriminatorLoss(self.discriminator) if self.discriminator_parameters else None
        if self.discriminator_loss is not None and distributed:
            self.discriminator_loss = DistributedDataParallel(self.discriminator_loss, **ddp)

    def _announce(self) -> None:
        notes, processes = self.notes, self.processes
        (self.run_dir / "run_info.json").write_text(json.dumps(notes, indent=2) + "\n")
        self.log_file.write(self.start_step, "run", notes)
        print(
            f"gsq train {self.config.preset} -> {self.run_dir} on {self.device} x{processes.world_size}"
            f"{' (bf16 autocast)' if self.use_bf16 else ''}; tokenizer {notes['parameters']['tokenizer'] / 1e6:.2f}M "
            f"parameters; discriminator: {notes['discriminator']}; perceptual: {notes['perceptual_loss']}; "
            f"data: {self.datasets.description}" + (f"; resuming at step {self.start_step}" if self.start_step else ""),
            flush=True,
        )

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        schedule = self.config.train
        self.batches = iter(self.train_loader)
        if self.processes.main and self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=schedule.steps,
                initial=self.start_step,
                desc=f"gsq train {self.config.preset}",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                # tqdm's own remaining time counts steps only; the postfix carries time_to_stop's
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
            )
        self.started = self.running.started = time.perf_counter()
        step, stop_reason = self.start_step, "finished"
        self.last_saved = self.start_step if self.resume_folder else -1
        with StopRequest() as stop_request:
            try:
                if step == 0:
                    self.evaluate(0)
                    self.save_grid(0)
                while step < schedule.steps:
                    losses = self.generator_step(step)
                    losses.update(self.discriminator_step(step))
                    step += 1
                    self.after_step(step, losses)
                    minutes = (time.perf_counter() - self.started) / 60
                    out_of_time = bool(schedule.max_minutes) and minutes > schedule.max_minutes
                    if step < schedule.steps and any_rank(
                        self.processes, stop_request.requested or (self.processes.main and out_of_time)
                    ):
                        stop_reason = (
                            "interrupted"
                            if stop_request.requested
                            else f"time limit (train.max_minutes={schedule.max_minutes}) reached"
                        )
                        break
            except KeyboardInterrupt:
                stop_reason = "aborted"
                raise
            finally:
                if self.bar is not None:
                    self.bar.close()
                if stop_reason == "aborted":
                    self.log_file.close()
        return self.finish(step, stop_reason)

    def _adversarial_at(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.discriminator.start_step

    def generator_terms(self, out, images: Tensor, adversarial: bool) -> list[tuple[str, float, Tensor]]:
        """(name, weight, value) of each generator loss term, in the order they are summed."""
        weights = self.config.loss
        terms = [
            ("reconstruction", weights.reconstruction, F.mse_loss(out.reconstruction.float(), images)),
            ("quantizer", weights.quantizer, out.quantizer_loss.float()),
        ]
        if self.perceptual is not None:
            terms.append(("perceptual", weights.perceptual, self.perceptual(out.reconstruction, images).float()))
        if adversarial:
            terms.append(
                (
                    "adversarial",
                    weights.adversarial,
                    non_saturating_generator_loss(self.discriminator(out.reconstruction)),
                )
            )
        return terms

    def generator_step(self, step: int) -> dict:
        """Reconstruction + perceptual + quantizer (+ adversarial) losses over the micro-batches, one
        clipped AdamW step, then the EMA update. Keeps the batches for the discriminator step."""
        accumulation, adversarial = self.config.train.grad_accum_steps, self._adversarial_at(step)
        self.generator.train()
        if self.discriminator is not None:
            self.discriminator.train()
            for p in self.discriminator_parameters:
                p.requires_grad_(False)  # the generator's loss does not train the discriminator
        self.generator_optimizer.zero_grad(set_to_none=True)
        self.pairs, losses = [], {}
        for micro in range(accumulation):
            batch = next(self.batches)
            self.running.skipped += batch["skipped"]
            images = batch["image"].to(self.device, non_blocking=True)
            with self._no_sync_unless_last(micro, self.generator_forward):
                with self.autocast():
                    out = self.generator_forward(images)
                    terms = self.generator_terms(out, images, adversarial)
                total = sum(weight * value for _, weight, value in terms)
                (total / accumulation).backward()
            for name, _, value in terms:
                losses[name] = losses.get(name, 0.0) + value.detach() / accumulation
            self.train_usage.update(out.indices)
            self.pairs.append((images, out.reconstruction.detach()))
        losses["generator_grad_norm"] = torch.nn.utils.clip_grad_norm_(
            self.generator.parameters(), self.config.optim.grad_clip
        )
        self.generator_optimizer.step()
        update_ema(self.ema, self.generator, self.config.optim.ema_decay)
        return losses

    def discriminator_step(self, step: int) -> dict:
        """Hinge loss on the generator step's real images and detached reconstructions, one clipped
        AdamW step; nothing before discriminator.start_step."""
        if not self._adversarial_at(step) or self.discriminator_optimizer is None:
            return {}
        accumulation = self.config.train.grad_accum_steps
        for p in self.discriminator_parameters:
            p.requires_grad_(True)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro, (images, reconstruction) in enumerate(self.pairs):
            with self._no_sync_unless_last(micro, self.discriminator_loss):
                with self.autocast():
                    loss = self.config.loss.discriminator * self.discriminator_loss(images, reconstruction)
                (loss / accumulation).backward()
            total = total + loss.detach().float() / accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(self.discriminator_parameters, self.config.optim.grad_clip)
        self.discriminator_optimizer.step()
        return {"discriminator": total, "discriminator_grad_norm": grad_norm}

    def _no_sync_unless_last(self, micro: int, module: nn.Module):
        """DDP reduces the gradients on the last micro-batch only."""
        last = micro == self.config.train.grad_accum_steps - 1
        return contextlib.nullcontext() if last or not self.processes.distributed else module.no_sync()

    def after_step(self, step: int, losses: dict) -> None:
        """Callbacks, then whatever is due at this step: log line, validation, grid, checkpoint."""
        schedule = self.config.train
        self.running.add(losses)
        for callback in self.callbacks:
            callback(step, losses)
        if step % schedule.log_every == 0 or step == schedule.steps:
            self.log(step)
        if self.bar is not None:
            self.show_progress(step, losses)  # first: update() then draws it
            self.bar.update(1)
        if step % schedule.eval_every == 0:
            self.evaluate(step)
        if step % schedule.grid_every == 0:
            self.save_grid(step)
        if step % schedule.checkpoint_every == 0:
            self.checkpoint(step)
            self.last_saved = step

    # -- logs, validation, grids, checkpoints ------------------------------------------------------

    def show_progress(self, step: int, losses: dict) -> None:
        """The bar's postfix: time to whichever stop comes first and this step's losses, from the first
        step on (the log lines average over train.log_every steps); at most every PROGRESS_EVERY_S."""
        now = time.perf_counter()
        if now - self.bar_shown_at < PROGRESS_EVERY_S and step < self.config.train.steps:
            return
        self.bar_shown_at = now
        schedule = self.config.train
        seconds, which = time_to_stop(
            step - self.start_step, schedule.steps - step, now - self.started, schedule.max_minutes
        )
        shown = [f"eta {self.bar.format_interval(seconds) if math.isfinite(seconds) else '?'} ({which})"]
        shown += [f"{label}={float(losses[key]):.4f}" for label, key in PROGRESS_LOSSES.items() if key in losses]
        if self.bar_usage is not None:
            shown.append(f"usage={self.bar_usage:.0f}%")
        self.bar.set_postfix_str(", ".join(shown), refresh=False)

    def log(self, step: int) -> None:
        """The mean losses since the last log line, training codebook usage and speed (every rank
        takes part in the reductions; rank 0 writes)."""
        running, processes = self.running, self.processes
        now = time.perf_counter()
        entry = {name: float(mean_over_ranks(total)) / running.steps for name, total in running.sums.items()}
        entry.update({f"train_{k}": v for k, v in self.train_usage.compute().items()})
        entry["skipped_images"] = int(sum_over_ranks(running.skipped))
        entry["steps_per_second"] = running.steps / max(now - running.started, 1e-9)
        entry["images_per_second"] = (
            entry["steps_per_second"]
            * self.config.data.batch_size
            * self.config.train.grad_accum_steps
            * processes.world_size
        )
        if not all(math.isfinite(v) for v in entry.values()):
            raise FloatingPointError(
                f"non-finite training losses at step {step}: {entry}; the last "
                f"checkpoint is in {self.run_dir / 'checkpoints'}"
            )
        self.log_file.write(step, "train", entry)
        self.bar_usage = entry["train_usage_percent"]
        self.train_usage.reset()
        running.reset(now)

    def evaluate(self, step: int) -> dict:
        """Validation metrics of the EMA weights, logged and shown."""
        self.validated[step] = result = validation_metrics(self.ema, self.validation_loader, self.device, self.autocast)
        if self.processes.main:
            self.log_file.write(step, "eval", result)
            message = (
                f"step {step}: validation PSNR {result['psnr']:.2f} dB, codebook usage "
                f"{result['usage_percent']:.1f}%, perplexity {result['perplexity']:.1f}"
            )
            (self.bar.write if self.bar is not None else print)(message)
        return result

    def save_grid(self, step: int) -> None:
        if self.processes.main:
            with torch.no_grad(), self.autocast():
                reconstruction = self.ema(self.grid_images.to(self.device)).reconstruction
            save_comparison_grid(
                self.grid_images,
                reconstruction.float(),
                self.run_dir / "grids" / f"step_{step:08d}.png",
                title=f"step {step}: validation tiles above, EMA reconstructions below",
            )

    def _training_state(self) -> tuple[dict, dict]:
        """(tensors, scalars) of everything besides the weights that exact resume needs: every rank's
        RNG state, the usage histogram, optimizer moments, running sums. Every rank takes part."""
        tensors, scalars = ckpt.rng_state(self.device)
        gathered = gather_objects(self.processes, ({k: v.cpu() for k, v in tensors.items()}, scalars))
        usage_counts = all_reduce_sum(self.train_usage.counts).cpu().clone()  # rank 0 holds it all after a resume
        running = self.running.state()
        training_tensors, training_scalars = {}, {"rng": [s for _, s in gathered]}
        for rank, (rank_tensors, _) in enumerate(gathered):
            training_tensors.update({f"rng.{rank}.{k}": v.cpu() for k, v in rank_tensors.items()})
        training_tensors["usage.counts"] = usage_counts.cpu()
        ckpt.flatten_optimizer(
            "generator_optimizer", self.generator_optimizer.state_dict(), training_tensors, training_scalars
        )
        if self.discriminator_optimizer is not None:
            ckpt.flatten_optimizer(
                "discriminator_optimizer", self.discriminator_optimizer.state_dict(), training_tensors, training_scalars
            )
        training_scalars["interval"] = running
        return training_tensors, training_scalars

    def checkpoint(self, step: int) -> Path | None:
        """Write (rank 0) and prune checkpoints; returns the new folder on rank 0."""
        training_tensors, training_scalars = self._training_state()
        if not self.processes.main:
            return None
        weights = {"ema": ckpt.module_tensors(self.ema), "generator": ckpt.module_tensors(self.generator)}
        if self.discriminator is not None:
            weights["discriminator"] = ckpt.module_tensors(self.discriminator, ckpt.FROZEN_PREFIXES)
        folder = ckpt.write_checkpoint(
            self.run_dir / "checkpoints",
            f"step_{step:08d}",
            self.config,
            weights,
            {
                "step": step,
                "world_size": self.processes.world_size,
                "notes": self.notes,
                "training_state": training_scalars,
            },
            training_tensors,
        )
        ckpt.prune_checkpoints(self.run_dir / "checkpoints", self.config.train.keep_checkpoints)
        return folder

    # -- the end -----------------------------------------------------------------------------------

    def finish(self, step: int, stop_reason: str) -> TrainResult:
        """The last validation, grid and checkpoint (those not already made at this step), the summary."""
        final = {}
        if stop_reason != "interrupted":
            final = self.validated[step] if step in self.validated else self.evaluate(step)
            if step % self.config.train.grid_every != 0:
                self.save_grid(step)
        folder = self.checkpoint(step) if step != self.last_saved else None
        if self.processes.main:
            minutes = (time.perf_counter() - self.started) / 60
            if stop_reason == "interrupted":
                print(
                    f"gsq train: interrupted at step {step}; checkpoint {folder or 'already saved'}; continue with "
                    f"`gsq train --resume {self.run_dir}`",
                    flush=True,
                )
            else:
                self.log_file.write(step, "summary", {"stop": stop_reason, "minutes": minutes, **final})
                print(
                    f"gsq train: {stop_reason} at step {step} after {minutes:.1f} min: validation PSNR "
                    f"{final['psnr']:.2f} dB, codebook usage {final['usage_percent']:.1f}%; run folder "
                    f"{self.run_dir}",
                    flush=True,
                )
        self.log_file.close()
        finish_processes(self.processes)
        return TrainResult(self.run_dir, step, stop_reason, final)


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave SIGINT to the main process, which stops the run cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
