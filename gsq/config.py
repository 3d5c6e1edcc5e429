"""Typed configuration of a GSQ-GAN run: dataclasses whose defaults are the paper's recipe
(docs/spec.md, "Recipe"), named presets, and `section.key=value` overrides checked against the field
types (unknown keys are rejected with a suggestion).

    config = preset("tiny")
    config = apply_overrides(config, ["train.steps=500", "data.batch_size=16"])
    config.to_dict(); RunConfig.from_dict(...)   # saved in every checkpoint and in the run folder
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field

from gsq_kernels.dispatch import BACKEND_NAMES
from gsq_kernels.lookup import LOOKUP_MODES


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the field."""


@dataclass
class ModelConfig:
    width: int = 128  # channels of the first level; level i has width * channel_multipliers[i]
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)  # down-sampling = 2 ** (len - 1): F8
    res_blocks: int = 2  # ResBlocks per level (after the channel-changing one, if any)
    mid_blocks: int = 2  # ResBlocks in the middle of the encoder and of the decoder
    # Per-level counts, one per channel multiplier in the same order, overriding res_blocks for one
    # network; () = res_blocks everywhere. (flex_gen's encoder/decoder_layer_configs without their
    # last entry, which is the mid count.)
    encoder_res_blocks: tuple[int, ...] = ()
    decoder_res_blocks: tuple[int, ...] = ()
    decoder_mid_blocks: int = -1  # mid ResBlocks of the decoder; -1 = mid_blocks
    mid_attention: bool = True  # single-head self-attention between consecutive mid ResBlocks
    adaptive_norm: bool = True  # decoder GroupNorms conditioned on the quantized map
    upsample: str = "depth_to_space"  # conv3x3 C->4C + depth-to-space 2x (the paper), or "nearest" + conv3x3
    dropout: float = 0.0  # inside ResBlocks (the paper: none)
    latent_channels: int = 64  # D
    groups: int = 16  # G, with D = G * d
    codebook_size: int = 8192  # V: one codebook shared by all groups
    beta: float = 0.25  # commitment weight of the quantizer loss
    l2_normalize: bool = True  # cosine lookup on the unit sphere
    codebook_init: str = "spherical"  # or "uniform" (the ablation's baseline)
    quantizer_backend: str = "auto"  # gsq_kernels backend: auto, cpu, cuda, triton, reference
    quantizer_lookup: str = "exact"  # the nearest code, or "dot": the official fp32 dot product

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    def level_res_blocks(self, network: str) -> tuple[int, ...]:
        """ResBlocks of each level of "encoder" or "decoder" (after the width-changing one), in
        channel_multipliers order."""
        counts = self.encoder_res_blocks if network == "encoder" else self.decoder_res_blocks
        return tuple(counts) if counts else (self.res_blocks,) * len(self.channel_multipliers)

    def middle_blocks(self, network: str) -> int:
        """Mid ResBlocks of "encoder" or "decoder"."""
        return self.decoder_mid_blocks if network == "decoder" and self.decoder_mid_blocks >= 0 else self.mid_blocks


@dataclass
class DiscriminatorConfig:
    kind: str = "dino"  # "dino" (frozen DINOv2 ViT-S/14-reg + trainable heads), "patchgan", "none"
    dino_weights: str = ""  # local DINOv2 file (timm or original layout); else $GSQ_DINO_WEIGHTS; else the hub
    dino_resolution: int = 518  # images are resized to this before DINOv2 (the reference: the hub model's 518)
    dino_fallback: str = "patchgan"  # no DINOv2 weights anywhere: "patchgan" (loud warning, recorded) or "error"
    diffaugment: str = "color,translation,cutout"  # on real and fake inputs of the DINO discriminator
    patchgan_channels: int = 64
    patchgan_layers: int = 3
    start_step: int = 0  # the paper trains the discriminator (and the adversarial loss) from step 0


@dataclass
class LossConfig:
    reconstruction: float = 1.0  # MSE
    perceptual: float = 1.0  # LPIPS-VGG; 0 turns it off
    quantizer: float = 1.0  # GSQ loss: codebook term + beta * commitment term
    adversarial: float = 0.1  # non-saturating generator loss
    discriminator: float = 1.0  # hinge loss of the discriminator
    vgg_weights: str = ""  # local torchvision VGG16 file for LPIPS; else $GSQ_VGG_WEIGHTS; else the hub
    perceptual_fallback: str = "disable"  # no VGG16 weights anywhere: "disable" (loud warning, recorded) or "error"


@dataclass
class OptimConfig:
    lr: float = 2e-4  # constant (the paper: decay hurt, warm-up gave nothing); both networks
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.05  # AdamW, on every parameter (as the reference)
    grad_clip: float = 2.0  # max global gradient norm, per network
    ema_decay: float = 0.999  # EMA of the generator; evaluation and inference use the EMA weights


@dataclass
class DataConfig:
    path: str = ""  # training image folder (recursive); "" = the bundled scikit-image photos
    validation_path: str = ""  # validation image folder; "" = every n-th file of `path` held out
    image_size: int = 256  # training images are image_size x image_size
    resize: int = 0  # short side before the center crop (image folders); 0 = image_size
    validation_fraction: float = 0.01  # of `path`, when validation_path is empty
    validation_images: int = 64  # at most this many validation images per evaluation
    batch_size: int = 32  # per process: global batch = batch_size * processes * train.grad_accum_steps
    num_workers: int = 4  # DataLoader worker processes
    bundled_epoch_size: int = 4096  # random crops per "epoch" of the bundled photos


@dataclass
class TrainConfig:
    steps: int = 50_000  # optimizer steps
    grad_accum_steps: int = 1
    seed: int = 0
    log_every: int = 50  # training losses to metrics.jsonl and the progress bar
    eval_every: int = 2_000  # validation PSNR / usage of the EMA weights
    grid_every: int = 2_000  # reconstruction grid PNG (originals above reconstructions)
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 3  # newest step checkpoints kept
    mixed_precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "none"
    device: str = "auto"  # "auto", "cpu", "cuda"
    run_dir: str = "runs"
    name: str = ""  # run folder runs/<name>; "" = the preset's name
    max_minutes: float = 0.0  # stop cleanly (checkpoint and all) after this wall time; 0 = no limit


@dataclass
class RunConfig:
    preset: str = "F8-D64-G16-V8k"
    model: ModelConfig = field(default_factory=ModelConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """Rebuild a config (e.g. from a checkpoint), checking every key and type."""
        config = _from_dict(cls, data, "")
        check_config(config)
        return config

    @property
    def run_name(self) -> str:
        return self.train.name or self.preset


# ------------------------------------------------------------------------------------------------
# Presets


def _paper(name: str, multipliers: tuple[int, ...], latent: int, groups: int, codebook: int) -> RunConfig:
    """The paper's ImageNet 256x256 recipe (docs/spec.md, "Recipe"): 50k steps at a global batch of
    512, e.g. batch 64 per GPU on 8 GPUs (or fewer GPUs with train.grad_accum_steps). Needs
    data.path (the ImageNet-1k train folder)."""
    return RunConfig(
        preset=name,
        model=ModelConfig(
            channel_multipliers=multipliers, latent_channels=latent, groups=groups, codebook_size=codebook
        ),
        data=DataConfig(image_size=256, batch_size=64, num_workers=8),
        train=TrainConfig(steps=50_000),
    )


def _tiny() -> RunConfig:
    """A CPU-sized tokenizer trained in 10 minutes on 64x64 crops of the bundled photos (the default
    of `gsq train`). F4 (16x16 tokens per crop) at width 32 with one ResBlock per level; D=16 as G=4
    groups of d=4 over V=64 codes (a small V per group keeps every code in use on a tiny data set).
    Tuned for held-out PSNR within a 10-minute budget on 2 CPU cores (README, "Train a tokenizer"):
    F4 rather than F8, batches of 8 rather than 16 and lr 1e-3 rather than 2e-4 each reached a given
    PSNR sooner; lr 2e-3 was slower again. The run stops at 2,200 steps or 10 minutes, whichever
    comes first, so a slower machine stops early with a usable model (the learning rate is constant).
    LPIPS joins when VGG16 weights can be found; a small PatchGAN joins at step 1,600: a run of
    minutes first needs a working autoencoder, and an adversarial term from step 0 (the paper's
    choice over 50k steps with a DINO discriminator) would compete with the reconstruction."""
    return RunConfig(
        preset="tiny",
        model=ModelConfig(
            width=32,
            channel_multipliers=(1, 2, 2),
            res_blocks=1,
            mid_blocks=1,
            mid_attention=False,
            latent_channels=16,
            groups=4,
            codebook_size=64,
        ),
        discriminator=DiscriminatorConfig(kind="patchgan", patchgan_channels=32, patchgan_layers=2, start_step=1_600),
        data=DataConfig(image_size=64, batch_size=8, num_workers=0, validation_images=64),
        # The EMA's horizon, 1 / (1 - 0.99) = 100 steps, is short next to the run's 2,200 steps.
        optim=OptimConfig(lr=1e-3, ema_decay=0.99),
        train=TrainConfig(
            steps=2_200, log_every=25, eval_every=200, grid_every=550, checkpoint_every=300, max_minutes=10.0
        ),
    )


PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    "F8-D64-G16-V8k": lambda: _paper("F8-D64-G16-V8k", (1, 2, 2, 4), 64, 16, 8_192),
    "F16-D16-G8-V256k": lambda: _paper("F16-D16-G8-V256k", (1, 1, 2, 2, 4), 16, 8, 262_144),
    "F16-D16-G1-V256k": lambda: _paper("F16-D16-G1-V256k", (1, 1, 2, 2, 4), 16, 1, 262_144),
    "F8-D8-G1-V256k": lambda: _paper("F8-D8-G1-V256k", (1, 2, 2, 4), 8, 1, 262_144),
    "tiny": _tiny,
}
PAPER_PRESETS = tuple(name for name in PRESETS if name != "tiny")


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    check_config(config)
    return config


# ------------------------------------------------------------------------------------------------
# Overrides and (de)serialization


def leaf_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every overridable key, e.g. 'train.steps'."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def key_table(config: RunConfig) -> list[tuple[str, str, str]]:
    """(key, type, value in `config` as JSON) of every overridable key, e.g. ('train.steps', 'int', '3000')."""
    rows = []
    for key in leaf_keys():
        *sections, name = key.split(".")
        owner = config
        for section in sections:
            owner = getattr(owner, section)
        hint, value = typing.get_type_hints(type(owner))[name], getattr(owner, name)
        rows.append((key, hint.__name__ if isinstance(hint, type) else str(hint), json.dumps(value)))
    return rows


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _convert(value: object, hint: typing.Any, path: str) -> object:
    """`value` (a command-line string or a JSON value) as the type `hint`, or ConfigError."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{path} must be a boolean (true/false), got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{path} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} must be a string, got {value!r}")
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            items = [item.strip() for item in value.strip().strip("[]()").split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{path} must be a comma-separated list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(item, args[0], f"{path}[{i}]") for i, item in enumerate(items))
        if len(items) != len(args):
            raise ConfigError(f"{path} must have {len(args)} values, got {len(items)}: {value!r}")
        return tuple(_convert(item, arg, f"{path}[{i}]") for i, (item, arg) in enumerate(zip(items, args)))
    raise ConfigError(f"{path}: unsupported field type {hint}")


def _from_dict(cls: type, data: object, prefix: str) -> typing.Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}{hint}")
    values = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _from_dict(hints[name], value, f"{prefix}{name}.")
        else:
            values[name] = _convert(value, hints[name], prefix + name)
    return cls(**values)


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` overrides, type-checked; unknown keys are rejected."""
    data = config.to_dict()
    valid = leaf_keys()
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like section.key=value (e.g. train.steps=1000)")
        key, value = override.split("=", 1)
        key = key.strip()
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; `gsq train --print-config` lists them"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[leaf] = value
    return RunConfig.from_dict(data)


def _choice(path: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{path} must be one of {', '.join(choices)}; got {value!r}")


def _at_least(path: str, value, minimum) -> None:
    if value < minimum:
        raise ConfigError(f"{path} must be >= {minimum}, got {value}")


def check_config(config: RunConfig) -> None:
    """Checks that involve values (and several fields), with messages naming the fields."""
    _check_model(config.model)
    _check_discriminator(config.discriminator)
    _check_losses(config.loss)
    _check_optimizer(config.optim)
    _check_data(config.data, config.model)
    _check_schedule(config.train)


def _check_model(m: ModelConfig) -> None:
    for name in ("width", "latent_channels", "groups", "codebook_size", "res_blocks"):
        _at_least(f"model.{name}", getattr(m, name), 1)
    _at_least("model.mid_blocks", m.mid_blocks, 0)
    _at_least("model.decoder_mid_blocks", m.decoder_mid_blocks, -1)
    for name in ("encoder_res_blocks", "decoder_res_blocks"):
        counts = getattr(m, name)
        if counts and (len(counts) != len(m.channel_multipliers) or min(counts) < 0):
            raise ConfigError(
                f"model.{name} must be empty or hold one count >= 0 per channel multiplier "
                f"({len(m.channel_multipliers)}), got {counts}"
            )
    if m.latent_channels % m.groups:
        raise ConfigError(f"model.latent_channels={m.latent_channels} is not divisible by model.groups={m.groups}")
    if not m.channel_multipliers or any(x < 1 for x in m.channel_multipliers):
        raise ConfigError(f"model.channel_multipliers must be positive integers, got {m.channel_multipliers}")
    for x in m.channel_multipliers:
        if (m.width * x) % 32:
            raise ConfigError(
                f"model.width * each channel multiplier must be a multiple of 32 (GroupNorm(32)); "
                f"{m.width} * {x} = {m.width * x}"
            )
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.beta < 0:
        raise ConfigError(f"model.beta must be >= 0, got {m.beta}")
    _choice("model.codebook_init", m.codebook_init, ("spherical", "uniform"))
    _choice("model.upsample", m.upsample, ("depth_to_space", "nearest"))
    _choice("model.quantizer_backend", m.quantizer_backend, ("auto", *BACKEND_NAMES))
    _choice("model.quantizer_lookup", m.quantizer_lookup, LOOKUP_MODES)


def _check_discriminator(d: DiscriminatorConfig) -> None:
    _choice("discriminator.kind", d.kind, ("dino", "patchgan", "none"))
    _choice("discriminator.dino_fallback", d.dino_fallback, ("patchgan", "error"))
    _at_least("discriminator.dino_resolution", d.dino_resolution, 14)
    _at_least("discriminator.patchgan_channels", d.patchgan_channels, 1)
    _at_least("discriminator.patchgan_layers", d.patchgan_layers, 1)
    _at_least("discriminator.start_step", d.start_step, 0)
    for policy in filter(None, (p.strip() for p in d.diffaugment.split(","))):
        _choice("discriminator.diffaugment entries", policy, ("color", "translation", "cutout"))


def _check_losses(loss: LossConfig) -> None:
    for name in ("reconstruction", "perceptual", "quantizer", "adversarial", "discriminator"):
        _at_least(f"loss.{name}", getattr(loss, name), 0)
    _choice("loss.perceptual_fallback", loss.perceptual_fallback, ("disable", "error"))


def _check_optimizer(o: OptimConfig) -> None:
    if o.lr <= 0 or o.grad_clip <= 0 or o.eps <= 0:
        raise ConfigError("optim.lr, optim.eps and optim.grad_clip must be > 0")
    if not all(0 <= b < 1 for b in o.betas) or not 0 <= o.ema_decay < 1:
        raise ConfigError("optim.betas and optim.ema_decay must be in [0, 1)")
    _at_least("optim.weight_decay", o.weight_decay, 0)


def _check_data(data: DataConfig, m: ModelConfig) -> None:
    if data.image_size % m.downsampling:
        raise ConfigError(
            f"data.image_size={data.image_size} must be divisible by the down-sampling factor "
            f"{m.downsampling} of model.channel_multipliers"
        )
    if data.resize and data.resize < data.image_size:
        raise ConfigError(f"data.resize={data.resize} must be 0 or >= data.image_size={data.image_size}")
    for name in ("image_size", "batch_size", "validation_images", "bundled_epoch_size"):
        _at_least(f"data.{name}", getattr(data, name), 1)
    _at_least("data.num_workers", data.num_workers, 0)
    if not 0 <= data.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction must be in [0, 1), got {data.validation_fraction}")


def _check_schedule(t: TrainConfig) -> None:
    for name in (
        "steps",
        "grad_accum_steps",
        "log_every",
        "eval_every",
        "grid_every",
        "checkpoint_every",
        "keep_checkpoints",
    ):
        _at_least(f"train.{name}", getattr(t, name), 1)
    _choice("train.mixed_precision", t.mixed_precision, ("auto", "bf16", "none"))
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _at_least("train.max_minutes", t.max_minutes, 0)
    if "/" in t.name or t.name in (".", ".."):
        raise ConfigError(f"train.name must be a plain folder name, got {t.name!r}")
