"""`gsq eval`: reconstruction quality of a trained tokenizer, following GSQ.md section 4.

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint as ckpt
from .data import ImageFolderDataset, build_datasets, collate, list_images
from .losses import build_lpips
from .metrics import (CodebookUsage, FeatureMoments, MeanMeter, PSNRMeter, frechet_distance, save_comparison_grid,
                      ssim, to_unit_range)
from .pretrained import WeightsUnavailable, load_state_dict_file, resolve

INCEPTION_FEATURES = 2048
PROTOCOL_RESIZE_RATIO = 292 / 256  # GSQ.md section 4: short side 292, center crop 256


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
    inception_weights: str = ""  # torch-fidelity pt_inception-2015-12-05 file; else $GSQ_INCEPTION_WEIGHTS; else hub
    alexnet_weights: str = ""  # torchvision AlexNet file; else $GSQ_ALEXNET_WEIGHTS; else hub
    output: str = ""  # report folder; "" = <run>/eval/<checkpoint name>
    num_workers: int = 4
    progress: bool = True


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
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    def from_file(path: str) -> nn.Module:
        load_state_dict_file(path)  # a safe (weights-only) read first: torch-fidelity unpickles freely
        return FeatureExtractorInceptionV3("inception-v3-compat", [str(INCEPTION_FEATURES)],
                                           feature_extractor_weights_path=path)

    def from_hub() -> nn.Module:
        return FeatureExtractorInceptionV3("inception-v3-compat", [str(INCEPTION_FEATURES)])

    extractor, source = resolve("InceptionV3 (rFID)", weights_file, "GSQ_INCEPTION_WEIGHTS", from_file, from_hub)
    return InceptionFeatures(extractor).eval().requires_grad_(False), source


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] (clamped) -> uint8 [0, 255], as images are stored."""
    return (to_unit_range(images) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------


def _processes(device: str):
    from .config import RunConfig, TrainConfig
    from .train import setup_processes

    return setup_processes(RunConfig(train=TrainConfig(device=device)))


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
        return ImageFolderDataset(files, resize, size), f"{config.data}: {len(files)} images (short side {resize}, " \
                                                         f"center crop {size})"
    data = dataclasses.replace(run_config.data, image_size=size, resize=config.resize,
                               validation_images=config.max_images or 10**9)
    datasets = build_datasets(data, run_config.train.seed)
    return datasets.validation, f"the run's validation images: {len(datasets.validation)} ({datasets.description})"


def evaluate_checkpoint(config: EvalConfig, feature_extractor: nn.Module | None = None,
                        lpips_model: nn.Module | None = None,
                        log: Callable[[str], None] = print) -> dict:
    """Run the protocol and write report.json and grid.png (rank 0). `feature_extractor` /
    `lpips_model` replace InceptionV3 / LPIPS-Alex (tests use small random networks)."""
    if config.weights not in ("ema", "generator"):
        raise ValueError(f"weights must be 'ema' or 'generator', got {config.weights!r}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    processes = _processes(config.device)
    device = processes.device
    loaded = ckpt.load_checkpoint(config.checkpoint, weights=config.weights, device=device)
    model, run_config = loaded.model, loaded.config
    dataset, description = evaluation_images(config, run_config)
    shard = torch.utils.data.Subset(dataset, range(processes.rank, len(dataset), processes.world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=config.batch_size, collate_fn=collate,
                                         num_workers=config.num_workers, pin_memory=device.type == "cuda")

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
    for name, reason in unavailable.items():
        if processes.main:
            log(f"gsq eval: {name} unavailable: {reason}")
    feature_extractor = feature_extractor.to(device).eval() if feature_extractor is not None else None
    lpips_model = lpips_model.to(device).eval() if lpips_model is not None else None

    psnr, ssim_mean, lpips_mean = PSNRMeter(), MeanMeter(), MeanMeter()
    usage = CodebookUsage(run_config.model.codebook_size, device)
    real_moments = fake_moments = None
    grid_originals, grid_reconstructions = [], []
    bar = None
    if processes.main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), desc="gsq eval", unit="image", dynamic_ncols=True, mininterval=1.0)
    started = time.perf_counter()
    skipped = 0
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            skipped += batch["skipped"]
            out = model(images)
            reconstructions = out.reconstruction.float().clamp(-1, 1)
            psnr.update(images, reconstructions)
            ssim_mean.update(ssim(images, reconstructions))
            usage.update(out.indices)
            if lpips_model is not None:
                lpips_mean.update(lpips_model(reconstructions, images).reshape(-1))
            if feature_extractor is not None:
                real, fake = feature_extractor(to_uint8(images)), feature_extractor(to_uint8(reconstructions))
                if real_moments is None:
                    real_moments = FeatureMoments(real.shape[1], device)
                    fake_moments = FeatureMoments(fake.shape[1], device)
                real_moments.update(real)
                fake_moments.update(fake)
            if len(grid_originals) * config.batch_size < 8:
                grid_originals.append(images[:8].cpu())
                grid_reconstructions.append(reconstructions[:8].cpu())
            if bar is not None:
                bar.update(images.shape[0] * processes.world_size)
    if bar is not None:
        bar.close()

    images_seen = int(_sum(torch.tensor(float(len(shard))), processes))
    metrics = {**psnr.compute(), "ssim": ssim_mean.compute(), **usage.compute()}
    metrics["lpips"] = lpips_mean.compute() if lpips_model is not None else None
    if feature_extractor is not None:
        if real_moments is None:  # this rank had no images; the reductions still need its zeros
            real_moments = FeatureMoments(INCEPTION_FEATURES, device)
            fake_moments = FeatureMoments(INCEPTION_FEATURES, device)
        metrics["rfid"] = frechet_distance(*real_moments.mean_and_covariance(), *fake_moments.mean_and_covariance())
    else:
        metrics["rfid"] = None
    report = {
        "checkpoint": str(loaded.folder), "step": loaded.step, "weights": config.weights,
        "preset": run_config.preset, "images": images_seen, "skipped_unreadable": int(_sum(torch.tensor(float(skipped)),
                                                                                            processes)),
        "data": description, "metrics": metrics, "unavailable": unavailable,
        "networks": {"inception": inception_source, "lpips": lpips_source},
        "protocol": "GSQ.md section 4: EMA weights, clamp to [-1,1] -> [0,1]; PSNR pooled MSE; SSIM Gaussian 11/1.5; "
                    "LPIPS-Alex; rFID TF-InceptionV3 pool features of uint8 images, float64 Frechet distance",
        "processes": processes.world_size, "seconds": time.perf_counter() - started,
    }
    if processes.main:
        output = Path(config.output) if config.output else default_output(loaded.folder)
        output.mkdir(parents=True, exist_ok=True)
        (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if grid_originals:
            save_comparison_grid(torch.cat(grid_originals)[:8], torch.cat(grid_reconstructions)[:8], output / "grid.png")
        report["output"] = str(output)
        log(format_report(report))
    if processes.distributed:
        dist.barrier()
        if processes.owns_process_group:
            dist.destroy_process_group()
    return report


def _sum(value: Tensor, processes) -> float:
    if processes.distributed:
        value = value.double().to(processes.device if processes.device.type == "cuda" else "cpu")
        dist.all_reduce(value)
    return float(value)


def _show(value, digits: int) -> str:
    return "unavailable" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_report(report: dict) -> str:
    m = report["metrics"]
    return (f"gsq eval {report['checkpoint']} (step {report['step']}, {report['weights']} weights) on "
            f"{report['images']} images: rFID {_show(m['rfid'], 3)}, PSNR {_show(m['psnr'], 2)} dB, "
            f"SSIM {_show(m['ssim'], 4)}, LPIPS {_show(m['lpips'], 4)}, usage {m['usage_percent']:.2f}%, "
            f"perplexity {m['perplexity']:.1f}" + (f"; report in {report['output']}" if "output" in report else ""))
