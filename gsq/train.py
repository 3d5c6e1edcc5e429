"""`gsq train`: the GSQ-GAN training loop (GSQ.md sections 3-4), top to bottom.

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
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .config import PAPER_PRESETS, RunConfig
from .data import DataError, ResumableBatchSampler, build_datasets, collate
from .losses import PerceptualLoss, build_lpips_vgg, hinge_discriminator_loss, non_saturating_generator_loss
from .metrics import CodebookUsage, PSNRMeter, save_comparison_grid
from .models import GSQTokenizer, count_parameters
from .models.discriminators import (DinoDiscriminator, PatchGAN, build_dino_backbone,
                                    trainable_parameters)
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
# Processes


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_process_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_processes(config: RunConfig) -> Processes:
    """One process, or a torchrun rank (WORLD_SIZE / RANK / LOCAL_RANK set): NCCL on GPUs, gloo on CPUs."""
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    use_cuda = config.train.device == "cuda" or (config.train.device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world_size, local_rank, device, owns)


def broadcast_from_main(processes: Processes, value):
    """rank 0's `value` on every rank (any picklable object)."""
    if not processes.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


# ------------------------------------------------------------------------------------------------
# Networks and their pretrained parts (with the documented, loud fallbacks)


def fallback_warning(notes: dict, flag: str, message: str) -> None:
    """One loud warning, recorded in the run's files (run_info.json, metrics.jsonl, checkpoints)."""
    banner = "!" * 100
    warnings.warn(f"\n{banner}\n{message}\n{banner}", RuntimeWarning, stacklevel=3)
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
            fallback_warning(notes, "dino_discriminator_unavailable",
                             f"DINO DISCRIMINATOR UNAVAILABLE: {error}.\nThis run falls back to a PatchGAN "
                             f"({spec.patchgan_layers} layers, {spec.patchgan_channels} channels): results will "
                             "differ from the paper's (its ablation: rFID 1.87 with DINO vs 9.6 with PatchGAN). "
                             "Give DINOv2 weights with discriminator.dino_weights=FILE or $GSQ_DINO_WEIGHTS, or "
                             "set discriminator.dino_fallback=error to refuse.")
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
        fallback_warning(notes, "lpips_unavailable",
                         f"PERCEPTUAL LOSS DISABLED: {error}.\nThis run trains WITHOUT the LPIPS term (weight "
                         f"{config.loss.perceptual} ignored), not against a random network; reconstructions will be "
                         "blurrier than the paper's. Give VGG16 weights (torchvision's vgg16-397923af.pth) with "
                         "loss.vgg_weights=FILE or $GSQ_VGG_WEIGHTS, or set loss.perceptual_fallback=error to refuse.")
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


def resolve_run_dir(config: RunConfig, resume_folder: Path | None) -> Path:
    """The run folder: the resumed checkpoint's run, else runs/<name>. Without an explicit
    train.name, an existing runs/<preset> gets a numbered sibling instead of being overwritten."""
    if resume_folder is not None:
        return resume_folder.parent.parent
    root = Path(config.train.run_dir)
    run_dir = root / config.run_name
    if (run_dir / "checkpoints" / "latest").exists():
        if config.train.name:
            raise ckpt.CheckpointError(f"{run_dir} already holds a run: continue it with `--resume {run_dir}`, "
                                       "or pick another train.name")
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
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self) -> "StopRequest":
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


def should_stop(processes: Processes, local: bool) -> bool:
    """Every rank stops at the same step if any rank wants to."""
    if not processes.distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=processes.device if processes.device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# ------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: GSQTokenizer, loader, device: torch.device, autocast) -> dict:
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


# ------------------------------------------------------------------------------------------------


def train(config: RunConfig, resume: str | Path | None = None, progress: bool = True,
          callbacks: tuple[Callable[[int, dict], None], ...] = ()) -> TrainResult:
    """Train as configured. `resume`: a run folder or checkpoint folder to continue (its config must
    match `config` up to ckpt.RESUME_MAY_CHANGE). `callbacks` are called after every step with
    (step, {name: loss tensor})."""
    # -- processes, precision, seeds ---------------------------------------------------------------
    processes = setup_processes(config)
    device = processes.device
    use_bf16 = config.train.mixed_precision == "bf16" or (config.train.mixed_precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- run folder; a resumed checkpoint must match this config ----------------------------------
    resume_folder, state = None, None
    if resume is not None:
        resume_folder = ckpt.find_checkpoint(resume)
        state = ckpt.check_resumable(resume_folder, config)
    elif config.preset in PAPER_PRESETS and not config.data.path:
        raise DataError(f"preset {config.preset} trains on ImageNet-1k: give its train folder with "
                        f"data.path=/path/to/imagenet/train (or train `tiny` on the bundled photos)")
    run_dir = broadcast_from_main(processes, resolve_run_dir(config, resume_folder) if processes.main else None)
    start_step = int(state["step"]) if state else 0
    if processes.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json() + "\n")

    # -- data --------------------------------------------------------------------------------------
    datasets = build_datasets(config.data, config.train.seed)
    batches_done = start_step * config.train.grad_accum_steps
    if state and state.get("world_size", 1) != processes.world_size:
        batches_done = batches_done * state["world_size"] // processes.world_size
        warnings.warn(f"resuming a run of {state['world_size']} processes on {processes.world_size}: the data "
                      "order continues from the same point but is not the one an uninterrupted run would use",
                      RuntimeWarning, stacklevel=2)
    sampler = ResumableBatchSampler(datasets.train, config.data.batch_size, config.train.seed, processes.rank,
                                    processes.world_size, start_batch=batches_done)
    train_loader = torch.utils.data.DataLoader(
        datasets.train, batch_sampler=sampler, collate_fn=collate, num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=config.data.num_workers > 0,
        worker_init_fn=_ignore_interrupts if config.data.num_workers > 0 else None)
    shard = list(range(processes.rank, len(datasets.validation), processes.world_size))
    validation_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(datasets.validation, shard),
                                                    batch_size=config.data.batch_size, collate_fn=collate)
    # grid: validation images spread over the whole set (the bundled tiles come photo by photo)
    grid_indices = np.unique(np.linspace(0, len(datasets.validation) - 1, GRID_IMAGES).round().astype(int))
    grid_images = torch.stack([datasets.validation[int(i)]["image"] for i in grid_indices])

    # -- networks (same initial weights on every rank), optimizers ---------------------------------
    torch.manual_seed(config.train.seed)
    notes: dict = {"fallbacks": {}, "data": datasets.description, "device": str(device),
                   "processes": processes.world_size, "bf16_autocast": use_bf16}
    generator = GSQTokenizer(config.model).to(device)
    ema = copy.deepcopy(generator).requires_grad_(False).eval()
    discriminator = build_discriminator(config, notes)
    discriminator = discriminator.to(device) if discriminator is not None else None
    perceptual = build_perceptual_loss(config, notes)
    perceptual = perceptual.to(device) if perceptual is not None else None
    discriminator_parameters = trainable_parameters(discriminator) if discriminator is not None else []
    notes["parameters"] = {"tokenizer": count_parameters(generator),
                           "discriminator_trainable": sum(p.numel() for p in discriminator_parameters)}

    def adamw(parameters) -> torch.optim.AdamW:
        o = config.optim
        return torch.optim.AdamW(parameters, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    generator_optimizer = adamw(generator.parameters())
    discriminator_optimizer = adamw(discriminator_parameters) if discriminator_parameters else None
    train_usage = CodebookUsage(config.model.codebook_size, device)
    interval = {"sums": {}, "steps": 0, "skipped": 0}  # running means between log lines

    # -- restore -----------------------------------------------------------------------------------
    if resume_folder is not None:
        ckpt.load_weights(generator, resume_folder / "generator.safetensors")
        ckpt.load_weights(ema, resume_folder / "ema.safetensors")
        tensors = ckpt.read_tensors(resume_folder / "training_state.safetensors")
        scalars = state["training_state"]
        generator_optimizer.load_state_dict(ckpt.unflatten_optimizer("generator_optimizer", tensors, scalars))
        if discriminator is not None:
            if not (resume_folder / "discriminator.safetensors").is_file():
                raise ckpt.CheckpointError(f"{resume_folder} has no discriminator.safetensors")
            ckpt.load_weights(discriminator, resume_folder / "discriminator.safetensors", ckpt.FROZEN_PREFIXES)
            if discriminator_optimizer is not None:
                discriminator_optimizer.load_state_dict(
                    ckpt.unflatten_optimizer("discriminator_optimizer", tensors, scalars))
        rank = processes.rank if processes.rank < state.get("world_size", 1) else 0
        rng_tensors = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{rank}.")}
        ckpt.set_rng_state(rng_tensors, scalars["rng"][rank], device)
        if processes.main:  # the histogram was reduced over ranks when saved
            train_usage.counts.copy_(tensors["usage.counts"].to(device))
        interval.update(scalars["interval"])
        interval["sums"] = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in interval["sums"].items()}
        notes["resumed_from"] = str(resume_folder)
    else:
        torch.manual_seed(config.train.seed * 1_000 + processes.rank)  # augmentations differ per rank
        np.random.seed(config.train.seed * 1_000 + processes.rank)

    ddp = dict(device_ids=[device.index]) if device.type == "cuda" else {}
    # No buffer broadcast before each forward (torch >= 2.14 calls it forward_sync_buffers and
    # deprecates broadcast_buffers; the one sync at construction that it keeps is harmless here).
    sync_option = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else "broadcast_buffers"
    ddp[sync_option] = False
    # The tokenizer has no buffers; the discriminator's BatchNorm statistics stay per rank (never
    # used in eval mode), so nothing needs broadcasting before each forward.
    generator_step = DistributedDataParallel(generator, **ddp) if processes.distributed else generator
    discriminator_step = DiscriminatorLoss(discriminator) if discriminator_parameters else None
    if discriminator_step is not None and processes.distributed:
        discriminator_step = DistributedDataParallel(discriminator_step, **ddp)

    log = MetricsLog(run_dir, processes.main, start_step if resume_folder is not None else None)
    if processes.main:
        (run_dir / "run_info.json").write_text(json.dumps(notes, indent=2) + "\n")
        log.write(start_step, "run", notes)
        print(f"gsq train {config.preset} -> {run_dir} on {device} x{processes.world_size}"
              f"{' (bf16 autocast)' if use_bf16 else ''}; tokenizer {notes['parameters']['tokenizer'] / 1e6:.2f}M "
              f"parameters; discriminator: {notes['discriminator']}; perceptual: {notes['perceptual_loss']}; "
              f"data: {datasets.description}" + (f"; resuming at step {start_step}" if start_step else ""), flush=True)

    # -- checkpoints and evaluations ----------------------------------------------------------------
    def save(step: int) -> Path | None:
        tensors, scalars = ckpt.rng_state(device)
        if processes.distributed:
            gathered = [None] * processes.world_size
            dist.all_gather_object(gathered, ({k: v.cpu() for k, v in tensors.items()}, scalars))
        else:
            gathered = [(tensors, scalars)]
        usage_counts = train_usage.counts.clone()
        if processes.distributed:
            dist.all_reduce(usage_counts)  # rank 0 holds the whole histogram after a resume
        interval_sums = {k: float(_reduce_mean(v, processes)) for k, v in interval["sums"].items()}
        if not processes.main:
            return None
        training_tensors, training_scalars = {}, {"rng": [s for _, s in gathered]}
        for rank, (rank_tensors, _) in enumerate(gathered):
            training_tensors.update({f"rng.{rank}.{k}": v.cpu() for k, v in rank_tensors.items()})
        training_tensors["usage.counts"] = usage_counts.cpu()
        ckpt.flatten_optimizer("generator_optimizer", generator_optimizer.state_dict(), training_tensors, training_scalars)
        if discriminator_optimizer is not None:
            ckpt.flatten_optimizer("discriminator_optimizer", discriminator_optimizer.state_dict(), training_tensors,
                                   training_scalars)
        training_scalars["interval"] = {"sums": interval_sums, "steps": interval["steps"], "skipped": interval["skipped"]}
        weights = {"ema": ckpt.module_tensors(ema), "generator": ckpt.module_tensors(generator)}
        if discriminator is not None:
            weights["discriminator"] = ckpt.module_tensors(discriminator, ckpt.FROZEN_PREFIXES)
        folder = ckpt.write_checkpoint(run_dir / "checkpoints", f"step_{step:08d}", config, weights,
                                       {"step": step, "world_size": processes.world_size, "notes": notes,
                                        "training_state": training_scalars}, training_tensors)
        ckpt.prune_checkpoints(run_dir / "checkpoints", config.train.keep_checkpoints)
        return folder

    validated: dict = {}  # step -> metrics of the validations run

    def validate(step: int) -> dict:
        validated[step] = result = evaluate(ema, validation_loader, device, autocast)
        if processes.main:
            log.write(step, "eval", result)
            message = (f"step {step}: validation PSNR {result['psnr']:.2f} dB, codebook usage "
                       f"{result['usage_percent']:.1f}%, perplexity {result['perplexity']:.1f}")
            (bar.write if bar is not None else print)(message)
        return result

    def save_grid(step: int) -> None:
        if processes.main:
            with torch.no_grad(), autocast():
                reconstruction = ema(grid_images.to(device)).reconstruction
            save_comparison_grid(grid_images, reconstruction.float(), run_dir / "grids" / f"step_{step:08d}.png")

    # -- the loop ----------------------------------------------------------------------------------
    weights = config.loss
    accumulation = config.train.grad_accum_steps
    batches = iter(train_loader)
    bar = None
    if processes.main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.train.steps, initial=start_step, desc=f"gsq train {config.preset}", unit="step",
                   dynamic_ncols=True, mininterval=1.0)
    started = interval_started = time.perf_counter()
    step, last_saved, stop_reason = start_step, (start_step if resume_folder else -1), "finished"
    with StopRequest() as stop_request:
        try:
            if step == 0:
                validate(0)
                save_grid(0)
            while step < config.train.steps:
                adversarial = discriminator is not None and step >= config.discriminator.start_step
                generator.train()

                # 1. Generator: reconstruction + perceptual + quantizer (+ adversarial) losses.
                if discriminator is not None:
                    discriminator.train()
                    for p in discriminator_parameters:
                        p.requires_grad_(False)  # the generator's loss does not train the discriminator
                generator_optimizer.zero_grad(set_to_none=True)
                pairs, losses = [], {}
                for micro in range(accumulation):
                    batch = next(batches)
                    interval["skipped"] += batch["skipped"]
                    images = batch["image"].to(device, non_blocking=True)
                    sync = micro == accumulation - 1 or not processes.distributed
                    with contextlib.nullcontext() if sync else generator_step.no_sync():
                        with autocast():
                            out = generator_step(images)
                            terms = {"reconstruction": F.mse_loss(out.reconstruction.float(), images),
                                     "quantizer": out.quantizer_loss.float()}
                            if perceptual is not None:
                                terms["perceptual"] = perceptual(out.reconstruction, images).float()
                            if adversarial:
                                terms["adversarial"] = non_saturating_generator_loss(discriminator(out.reconstruction))
                        total = sum(getattr(weights, name) * value for name, value in terms.items())
                        (total / accumulation).backward()
                    for name, value in terms.items():
                        losses[name] = losses.get(name, 0.0) + value.detach() / accumulation
                    train_usage.update(out.indices)
                    pairs.append((images, out.reconstruction.detach()))
                losses["generator_grad_norm"] = torch.nn.utils.clip_grad_norm_(generator.parameters(), config.optim.grad_clip)
                generator_optimizer.step()
                update_ema(ema, generator, config.optim.ema_decay)

                # 2. Discriminator: hinge loss on real images and the detached reconstructions.
                if adversarial and discriminator_optimizer is not None:
                    for p in discriminator_parameters:
                        p.requires_grad_(True)
                    discriminator_optimizer.zero_grad(set_to_none=True)
                    total_discriminator = 0.0
                    for micro, (images, reconstruction) in enumerate(pairs):
                        sync = micro == accumulation - 1 or not processes.distributed
                        with contextlib.nullcontext() if sync else discriminator_step.no_sync():
                            with autocast():
                                loss = weights.discriminator * discriminator_step(images, reconstruction)
                            (loss / accumulation).backward()
                        total_discriminator = total_discriminator + loss.detach().float() / accumulation
                    losses["discriminator"] = total_discriminator
                    losses["discriminator_grad_norm"] = torch.nn.utils.clip_grad_norm_(discriminator_parameters,
                                                                                      config.optim.grad_clip)
                    discriminator_optimizer.step()
                step += 1
                for name, value in losses.items():
                    interval["sums"][name] = interval["sums"].get(name, 0.0) + value.detach().double()
                interval["steps"] += 1
                for callback in callbacks:
                    callback(step, losses)

                # 3. Logs, validation, grids, checkpoints.
                if step % config.train.log_every == 0 or step == config.train.steps:
                    now = time.perf_counter()
                    entry = {name: float(_reduce_mean(total, processes)) / interval["steps"]
                             for name, total in interval["sums"].items()}
                    entry.update({f"train_{k}": v for k, v in train_usage.compute().items()})
                    entry["skipped_images"] = int(_reduce_sum(interval["skipped"], processes))
                    entry["steps_per_second"] = interval["steps"] / max(now - interval_started, 1e-9)
                    entry["images_per_second"] = entry["steps_per_second"] * config.data.batch_size * accumulation * processes.world_size
                    if not all(math.isfinite(v) for v in entry.values()):
                        raise FloatingPointError(f"non-finite training losses at step {step}: {entry}; the last "
                                                 f"checkpoint is in {run_dir / 'checkpoints'}")
                    log.write(step, "train", entry)
                    if bar is not None:
                        shown = {"rec": "reconstruction", "lpips": "perceptual", "q": "quantizer", "adv": "adversarial",
                                 "disc": "discriminator"}
                        bar.set_postfix({label: f"{entry[key]:.4f}" for label, key in shown.items() if key in entry}
                                        | {"usage": f"{entry['train_usage_percent']:.0f}%"}, refresh=False)
                    train_usage.reset()
                    interval.update(sums={}, steps=0, skipped=0)
                    interval_started = now
                if bar is not None:
                    bar.update(1)
                if step % config.train.eval_every == 0:
                    validate(step)
                if step % config.train.grid_every == 0:
                    save_grid(step)
                if step % config.train.checkpoint_every == 0:
                    save(step)
                    last_saved = step
                out_of_time = bool(config.train.max_minutes) and (time.perf_counter() - started) / 60 > config.train.max_minutes
                if step < config.train.steps and should_stop(processes, stop_request.requested or (processes.main and out_of_time)):
                    stop_reason = "interrupted" if stop_request.requested else \
                        f"time limit (train.max_minutes={config.train.max_minutes}) reached"
                    break
        except KeyboardInterrupt:
            stop_reason = "aborted"
            raise
        finally:
            if bar is not None:
                bar.close()
            if stop_reason == "aborted":
                log.close()

    # -- the end: validation, grid, checkpoint, summary ---------------------------------------------
    final = {}
    if stop_reason != "interrupted":
        final = validated[step] if step in validated else validate(step)
        if step % config.train.grid_every != 0:
            save_grid(step)
    folder = save(step) if step != last_saved else None
    if processes.main:
        minutes = (time.perf_counter() - started) / 60
        if stop_reason == "interrupted":
            print(f"gsq train: interrupted at step {step}; checkpoint {folder or 'already saved'}; continue with "
                  f"`gsq train --resume {run_dir}`", flush=True)
        else:
            log.write(step, "summary", {"stop": stop_reason, "minutes": minutes, **final})
            print(f"gsq train: {stop_reason} at step {step} after {minutes:.1f} min: validation PSNR "
                  f"{final['psnr']:.2f} dB, codebook usage {final['usage_percent']:.1f}%; run folder {run_dir}",
                  flush=True)
    log.close()
    if processes.distributed:
        dist.barrier()
        if processes.owns_process_group:
            dist.destroy_process_group()
    return TrainResult(run_dir, step, stop_reason, final)


def _reduce_mean(value, processes: Processes) -> Tensor:
    value = torch.as_tensor(value, dtype=torch.float64)
    if processes.distributed:
        value = _reduce_sum(value, processes) / processes.world_size
    return value


def _reduce_sum(value, processes: Processes) -> Tensor:
    value = torch.as_tensor(value, dtype=torch.float64)
    if processes.distributed:
        device = processes.device if processes.device.type == "cuda" else torch.device("cpu")
        value = value.to(device)
        dist.all_reduce(value)
    return value.cpu()


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave SIGINT to the main process, which stops the run cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
