"""`gsq eval`: reconstruction quality of a trained tokenizer (docs/spec.md, section "Evaluation").

Images: resize the short side to `resize` (ImageNet protocol: 292) and center-crop `image_size`
(256), pixels in [-1, 1]; reconstruct with the EMA weights; clamp to [-1, 1], map to [0, 1].
  rFID    InceptionV3 with the TF-FID weights (torch-fidelity's "inception-v3-compat", 2048-d pool
          features) of uint8 originals and uint8 reconstructions; Frechet distance in float64.
  PSNR    10 log10(1 / MSE), MSE pooled over every pixel of every image.
  SSIM    Gaussian 11x11, sigma 1.5, data range 1, mean over images.
  LPIPS   AlexNet variant, inputs in [-1, 1], mean over images.
  usage / perplexity of the codes chosen over the whole set (pooled over groups).
InceptionV3 and AlexNet weights come from a file (option), an environment variable
($GSQ_INCEPTION_WEIGHTS, $GSQ_ALEXNET_WEIGHTS) or the hub; without them rFID / LPIPS are reported as
unavailable (null, with the reason), never as numbers. Under torchrun every rank reconstructs its
shard and the sums (pixels, per-image values, float64 feature moments, code histogram) are reduced.
An unreadable image is skipped, counted and listed in the report (never replaced by another one);
report.json and grid.png replace existing files only with `overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .data import (
    DataError,
    ImageFolderDataset,
    OutputExistsError,
    build_datasets,
    collate,
    list_images,
    refuse_existing,
    write_new,
)
from .distributed import (
    Processes,
    broadcast_from_main,
    finish_processes,
    gather_objects,
    setup_processes,
    sum_over_ranks,
)
from .losses import build_lpips
from .metrics import (
    CodebookUsage,
    FeatureMoments,
    MeanMeter,
    PSNRMeter,
    format_metric,
    frechet_distance,
    save_comparison_grid,
    ssim,
    to_unit_range,
)
from .pretrained import WeightsUnavailable, hub_file, load_state_dict_file, resolve

INCEPTION_FEATURES = 2048
GRID_IMAGES = 8  # originals (top row) and reconstructions in grid.png
PROTOCOL_RESIZE_RATIO = 292 / 256  # docs/spec.md, section "Evaluation": short side 292, center crop 256


def default_workers(most: int = 4) -> int:
    """DataLoader workers: up to `most`, never more than the CPU cores this process may run on
    (past that, torch warns and the workers only compete with the main process)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        cores = os.cpu_count() or 1
    return max(1, min(most, cores))


@dataclass
class EvalConfig:
    checkpoint: str  # checkpoint folder, run folder or checkpoints folder (newest)
    data: str = ""  # image folder (recursive); "" = the validation images of the checkpoint's run
    image_size: int = 0  # center crop; 0 = the checkpoint's data.image_size
    resize: int = 0  # short side before the crop; 0 = image_size * 292 / 256 (the protocol)
    batch_size: int = 32  # per process
    max_images: int = 0  # 0 = all
    weights: str = "ema"  # "ema" (the protocol) or "generator"
    device: str = "auto"
    inception_weights: str = ""  # torch-fidelity's weights-inception-2015-12-05 file, $GSQ_INCEPTION_WEIGHTS or hub
    alexnet_weights: str = ""  # torchvision AlexNet file; else $GSQ_ALEXNET_WEIGHTS; else hub
    output: str = ""  # report folder; "" = <run>/eval/<checkpoint name>
    num_workers: int = field(default_factory=default_workers)
    progress: bool = True
    overwrite: bool = False  # replace an existing report.json / grid.png


# ------------------------------------------------------------------------------------------------
# Feature extractors


class InceptionFeatures(nn.Module):
    """torch-fidelity's TF-compatible InceptionV3: uint8 images (B, 3, H, W) -> (B, 2048) pool
    features (it resizes to 299 with TF1's bilinear rule itself)."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: Tensor) -> Tensor:
        return self.extractor(images)[0]


def build_inception(weights_file: str = "") -> tuple[nn.Module, str]:
    """The FID network, from weights_file, $GSQ_INCEPTION_WEIGHTS or the hub (torch-fidelity's
    download, or its cache). Raises WeightsUnavailable / WeightsFileError (see gsq.pretrained)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    def from_file(path: str) -> nn.Module:
        load_state_dict_file(path)  # a safe (weights-only) read first: torch-fidelity unpickles freely
        return FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(INCEPTION_FEATURES)], feature_extractor_weights_path=path
        )

    def from_hub() -> nn.Module:  # the file torch-fidelity would download, fetched without its chatter
        return FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(INCEPTION_FEATURES)], feature_extractor_weights_path=hub_file(URL_INCEPTION_V3)
        )

    extractor, source = resolve(
        "InceptionV3 (rFID)",
        weights_file,
        "GSQ_INCEPTION_WEIGHTS",
        from_file,
        from_hub,
        option="--inception-weights FILE",
    )
    return InceptionFeatures(extractor).eval().requires_grad_(False), source


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] (clamped) -> uint8 [0, 255], as images are stored."""
    return (to_unit_range(images) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------


def default_output(folder: Path) -> Path:
    if folder.parent.name == "checkpoints":
        return folder.parent.parent / "eval" / folder.name
    return folder / "eval"


def evaluation_images(config: EvalConfig, run_config) -> tuple[torch.utils.data.Dataset, str]:
    size = config.image_size or run_config.data.image_size
    if config.data:
        resize = config.resize or round(size * PROTOCOL_RESIZE_RATIO)
        files = list_images(config.data)
        if config.max_images:
            files = files[: config.max_images]
        return ImageFolderDataset(
            files, resize, size, substitute=False
        ), f"{config.data}: {len(files)} images (short side {resize}, center crop {size})"
    data = dataclasses.replace(
        run_config.data, image_size=size, resize=config.resize, validation_images=config.max_images or 10**9
    )
    datasets = build_datasets(data, run_config.train.seed, substitute=False)
    return datasets.validation, f"the run's validation images: {len(datasets.validation)} ({datasets.description})"


def evaluate_checkpoint(
    config: EvalConfig,
    feature_extractor: nn.Module | None = None,
    lpips_model: nn.Module | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the protocol and write report.json and grid.png (rank 0). `feature_extractor` /
    `lpips_model` replace InceptionV3 / LPIPS-Alex (tests use small random networks)."""
    if config.weights not in ("ema", "generator"):
        raise ValueError(f"weights must be 'ema' or 'generator', got {config.weights!r}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    processes = setup_processes(config.device, "device")
    device = processes.device
    loaded = ckpt.load_checkpoint(config.checkpoint, weights=config.weights, device=device)
    model, run_config = loaded.model, loaded.config
    output = Path(config.output).expanduser() if config.output else default_output(loaded.folder)
    _refuse_existing_outputs(output, config.overwrite, processes)
    dataset, description = evaluation_images(config, run_config)
    shard = torch.utils.data.Subset(dataset, range(processes.rank, len(dataset), processes.world_size))
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=config.batch_size,
        collate_fn=collate,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )

    feature_extractor, lpips_model, networks, unavailable = _networks(config, feature_extractor, lpips_model, device)
    for name, reason in unavailable.items():
        if processes.main:
            log(f"gsq eval: {name} unavailable: {reason}")

    scores = _Scores(run_config.model.codebook_size, device, feature_extractor, lpips_model)
    started = time.perf_counter()
    scored, unreadable, grid = _score_shard(loader, model, scores, len(dataset), config.progress, processes)
    images_seen = int(sum_over_ranks(scored))
    unreadable = sorted(path for part in gather_objects(processes, unreadable) for path in part)
    if images_seen == 0:
        raise DataError(
            f"none of the {len(dataset)} images could be read" + (f" (e.g. {unreadable[0]})" if unreadable else "")
        )
    metrics = scores.compute()
    report = {
        "checkpoint": str(loaded.folder),
        "step": loaded.step,
        "weights": config.weights,
        "preset": run_config.preset,
        "images": images_seen,
        "skipped_unreadable": len(unreadable),
        "unreadable": unreadable,
        "data": description,
        "metrics": metrics,
        "unavailable": unavailable,
        "networks": networks,
        "protocol": "docs/spec.md, section Evaluation: EMA weights, clamp to [-1,1] -> [0,1]; PSNR pooled MSE; "
        "SSIM Gaussian 11/1.5; LPIPS-Alex; rFID TF-InceptionV3 pool features of uint8 images, "
        "float64 Frechet distance",
        "processes": processes.world_size,
        "seconds": time.perf_counter() - started,
    }
    if processes.main:
        text = json.dumps(report, indent=2) + "\n"
        write_new(output / "report.json", lambda temporary: temporary.write_text(text), config.overwrite)
        if grid is not None:
            title = "images above, reconstructions (EMA weights) below"
            write_new(
                output / "grid.png",
                lambda temporary: save_comparison_grid(*grid, temporary, title=title),
                config.overwrite,
            )
        report["output"] = str(output)
        log(format_report(report))
    finish_processes(processes)
    return report


def _score_shard(
    loader, model: nn.Module, scores: _Scores, total: int, progress: bool, processes: Processes
) -> tuple[int, list, tuple[Tensor, Tensor] | None]:
    """Reconstruct and score this rank's images: (images scored, unreadable files, the first
    GRID_IMAGES originals and reconstructions, or None)."""
    device = processes.device
    bar = None
    if processes.main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="gsq eval", unit="image", dynamic_ncols=True, mininterval=1.0)
    scored, unreadable, originals, reconstructed = 0, [], [], []
    with torch.no_grad():
        for batch in loader:
            unreadable += batch["unreadable"]
            if bar is not None:
                bar.update(
                    (len(batch["unreadable"]) + (0 if batch["image"] is None else len(batch["image"])))
                    * processes.world_size
                )
            if batch["image"] is None:
                continue
            images = batch["image"].to(device, non_blocking=True)
            scored += images.shape[0]
            reconstructions = scores.update(images, model(images))
            if sum(len(x) for x in originals) < GRID_IMAGES:
                originals.append(images[:GRID_IMAGES].cpu())
                reconstructed.append(reconstructions[:GRID_IMAGES].cpu())
    if bar is not None:
        bar.close()
    grid = (torch.cat(originals)[:GRID_IMAGES], torch.cat(reconstructed)[:GRID_IMAGES]) if originals else None
    return scored, unreadable, grid


class _Scores:
    """The running sums of every metric over this rank's images (reduced over ranks by compute)."""

    def __init__(
        self,
        codebook_size: int,
        device: torch.device,
        feature_extractor: nn.Module | None,
        lpips_model: nn.Module | None,
    ) -> None:
        self.psnr, self.ssim, self.lpips = PSNRMeter(), MeanMeter(), MeanMeter()
        self.usage = CodebookUsage(codebook_size, device)
        self.device, self.feature_extractor, self.lpips_model = device, feature_extractor, lpips_model
        self.real = self.fake = None  # FeatureMoments, sized by the first batch's features

    def update(self, images: Tensor, out) -> Tensor:
        """Add a batch; returns its reconstructions, clamped to [-1, 1]."""
        reconstructions = out.reconstruction.float().clamp(-1, 1)
        self.psnr.update(images, reconstructions)
        self.ssim.update(ssim(images, reconstructions))
        self.usage.update(out.indices)
        if self.lpips_model is not None:
            self.lpips.update(self.lpips_model(reconstructions, images).reshape(-1))
        if self.feature_extractor is not None:
            real, fake = self.feature_extractor(to_uint8(images)), self.feature_extractor(to_uint8(reconstructions))
            if self.real is None:
                self.real, self.fake = (
                    FeatureMoments(real.shape[1], self.device),
                    FeatureMoments(fake.shape[1], self.device),
                )
            self.real.update(real)
            self.fake.update(fake)
        return reconstructions

    def compute(self) -> dict:
        metrics = {**self.psnr.compute(), "ssim": self.ssim.compute(), **self.usage.compute()}
        metrics["lpips"] = self.lpips.compute() if self.lpips_model is not None else None
        metrics["rfid"] = None
        if self.feature_extractor is not None:
            if self.real is None:  # this rank had no images; the reductions still need its zeros
                self.real = FeatureMoments(INCEPTION_FEATURES, self.device)
                self.fake = FeatureMoments(INCEPTION_FEATURES, self.device)
            metrics["rfid"] = frechet_distance(*self.real.mean_and_covariance(), *self.fake.mean_and_covariance())
        return metrics


def _networks(
    config: EvalConfig, feature_extractor: nn.Module | None, lpips_model: nn.Module | None, device: torch.device
) -> tuple[nn.Module | None, nn.Module | None, dict, dict]:
    """(InceptionV3 or the given extractor, LPIPS or the given model, where each came from, why a
    missing one is unavailable)."""
    unavailable = {}
    if feature_extractor is None:
        try:
            feature_extractor, inception_source = build_inception(config.inception_weights)
        except WeightsUnavailable as error:
            unavailable["rfid"] = str(error)
            inception_source = None
    else:
        inception_source = f"given {type(feature_extractor).__name__}"
    if lpips_model is None:
        try:
            lpips_model, lpips_source = build_lpips("alex", config.alexnet_weights)
        except WeightsUnavailable as error:
            unavailable["lpips"] = str(error)
            lpips_source = None
    else:
        lpips_source = f"given {type(lpips_model).__name__}"
    feature_extractor = feature_extractor.to(device).eval() if feature_extractor is not None else None
    lpips_model = lpips_model.to(device).eval() if lpips_model is not None else None
    return feature_extractor, lpips_model, {"inception": inception_source, "lpips": lpips_source}, unavailable


def _refuse_existing_outputs(output: Path, overwrite: bool, processes: Processes) -> None:
    """Before the work, not after it: the main rank checks, and every rank raises what it found (one
    rank alone raising would leave the others waiting)."""
    found = None
    if processes.main:
        try:
            refuse_existing([output / "report.json", output / "grid.png"], overwrite)
        except OutputExistsError as error:
            found = error
    found = broadcast_from_main(processes, found)
    if found is not None:
        raise found


def _skipped(report: dict) -> str:
    return f" ({report['skipped_unreadable']} unreadable skipped, listed in the report)" if report["unreadable"] else ""


def format_report(report: dict) -> str:
    m = report["metrics"]

    def _show(value, digits: int) -> str:
        return format_metric(value, digits, missing="unavailable")

    return (
        f"gsq eval {report['checkpoint']} (step {report['step']}, {report['weights']} weights) on "
        f"{report['images']} images{_skipped(report)}: rFID {_show(m['rfid'], 3)}, PSNR {_show(m['psnr'], 2)} dB, "
        f"SSIM {_show(m['ssim'], 4)}, LPIPS {_show(m['lpips'], 4)}, usage {m['usage_percent']:.2f}%, "
        f"perplexity {m['perplexity']:.1f}" + (f"; report in {report['output']}" if "output" in report else "")
    )
