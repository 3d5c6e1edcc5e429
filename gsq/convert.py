"""`gsq convert`: an official flex_gen GSQ tokenizer checkpoint as a gsq checkpoint.

flex_gen (github.com/HelmholtzAI-FZJ/flex_gen) keeps its encoder and decoder as flat block lists
(`encoder.blocks.{i}`, `decoder.blocks.{i}`) in forward order; gsq nests the same blocks in levels
but registers them in the same forward order, with the same tensors and shapes. The map is:

    flex_gen                                   gsq
    encoder.conv_in / decoder.conv_in          encoder.stem / decoder.stem
    *.blocks.{i} in order                      encoder.levels[l].blocks[j], .downsample, encoder.mid[k]
                                               decoder.mid[k], .mid_norm, decoder.levels[l].blocks[j],
                                               .upsample, .norm
      ResNetBlock net.0 / net.2 / net.3 / net.6 / skip    norm1 / conv1 / norm2 / conv2 / skip
      AttentionBlock norm / qkv_conv / proj_conv         norm / qkv / proj
      Downsample conv, DepthToSpace2DWithConv conv       conv
      AdaptiveGroupNorm2D gamma / beta                   scale / shift
    encoder.fianl_layers.0 / .2 (sic)          encoder.head.norm / encoder.head.conv
    decoder.final_layers.0 / .2                decoder.head.norm / decoder.head.conv
    quantizers.codebook.weight (nn.Embedding)  quantizer.codebook

The architecture (width, multipliers, blocks, D, G, V, attention, adaptive norm) is read from the
tensor shapes; the lookup's l2 switch and beta cannot be, so they come from the checkpoint's
pickled constructor arguments when those unpickle into plain values (read with a restricted
unpickler that builds no foreign objects), else from the paper's defaults (overridable).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .config import ModelConfig, apply_overrides, preset
from .models import GSQTokenizer
from .models.layers import AdaptiveGroupNorm, AttentionBlock, DepthToSpaceUpsample, Downsample, ResBlock

BLOCK_TENSORS = {
    ResBlock: {"net.0": "norm1", "net.2": "conv1", "net.3": "norm2", "net.6": "conv2", "skip": "skip"},
    AttentionBlock: {"norm": "norm", "qkv_conv": "qkv", "proj_conv": "proj"},
    Downsample: {"conv": "conv"},
    DepthToSpaceUpsample: {"conv": "conv"},
    AdaptiveGroupNorm: {"gamma": "scale", "beta": "shift"},
}


class ConversionError(ValueError):
    """The checkpoint is not a flex_gen GSQ tokenizer this converter can map."""


# ------------------------------------------------------------------------------------------------
# Reading the checkpoint


class _Opaque:
    """Stands in for any class a pickle names that is not a plain container: records its arguments
    and state, runs no code."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state) -> None:
        self.state = state


class _PlainUnpickler(pickle.Unpickler):
    SAFE = {("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float",
                                            "bool", "bytes", "slice", "complex")} | {("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        return _Opaque


def read_constructor_arguments(blob) -> dict:
    """flex_gen's pickled FlexTokenizer arguments as plain values where they are plain, {} when the
    blob cannot be read. Foreign objects (e.g. omegaconf containers) stay opaque."""
    if not isinstance(blob, (bytes, bytearray)):
        return {}
    try:
        arguments = _PlainUnpickler(io.BytesIO(bytes(blob))).load()
    except Exception:  # noqa: BLE001 - an unreadable blob just means "unknown"
        return {}
    return arguments if isinstance(arguments, dict) else {}


def _find_key(tree, key: str, depth: int = 0):
    """The first value stored under `key` anywhere in nested dicts / lists / opaque objects
    (omegaconf keeps values in nodes whose state holds them under '_val')."""
    if depth > 12:
        return None
    if isinstance(tree, _Opaque):
        for part in (tree.state, tree.args, tree.kwargs):
            found = _find_key(part, key, depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(tree, dict):
        if key in tree:
            return _plain(tree[key])
        children = list(tree.values())
    elif isinstance(tree, (list, tuple)):
        children = list(tree)
    else:
        return None
    for child in children:
        found = _find_key(child, key, depth + 1)
        if found is not None:
            return found
    return None


def _plain(value, depth: int = 0):
    if isinstance(value, _Opaque) and depth < 6:
        for part in (value.state, *value.args):
            if isinstance(part, dict) and "_val" in part:
                return _plain(part["_val"], depth + 1)
            if isinstance(part, dict) and "__dict__" in part:  # omegaconf nodes pickle their __dict__
                return _plain(part["__dict__"], depth + 1)
        return None
    if isinstance(value, dict) and "_val" in value:
        return _plain(value["_val"], depth + 1)
    return value


def load_flex_gen(path: str | Path, which: str = "ema") -> tuple[dict[str, Tensor], dict]:
    """(tokenizer state dict, constructor arguments) of a flex_gen file: a FlexTokenizer.save file
    ({'model_state_dict', 'config'}), a trainer checkpoint ({'model', 'ema_model', ...}; `which`
    picks), or a bare state dict (.pt or .safetensors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            package = load_file(str(path))
        else:
            package = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch/safetensors raise many types for bad files
        raise ConversionError(f"{path} cannot be read as a checkpoint: {type(error).__name__}: {error}") from None
    if not isinstance(package, dict):
        raise ConversionError(f"{path} holds a {type(package).__name__}, not a checkpoint dictionary")
    arguments = read_constructor_arguments(package.get("config"))
    if "model_state_dict" in package:
        state = package["model_state_dict"]
    elif "ema_model" in package or "model" in package:
        key = "ema_model" if which == "ema" and "ema_model" in package else "model"
        if which == "ema" and key != "ema_model":
            warnings.warn(f"{path} has no EMA weights; converting 'model'", RuntimeWarning, stacklevel=2)
        state = package[key]
    else:
        state = package
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{path} holds no tokenizer state dict")
    # DDP / torch.compile wrappers prefix the names.
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    return state, arguments


# ------------------------------------------------------------------------------------------------
# Reading the architecture off the shapes


def _blocks(state: dict, prefix: str) -> list[tuple[str, str, dict]]:
    """[(kind, flex_gen prefix, {tensor suffix: shape})] of `prefix`.blocks in index order."""
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.blocks\.(\d+)\.", k))})
    if indices != list(range(len(indices))):
        raise ConversionError(f"{prefix}.blocks has gaps: {indices}")
    blocks = []
    for i in indices:
        head = f"{prefix}.blocks.{i}."
        shapes = {k[len(head):]: tuple(v.shape) for k, v in state.items() if k.startswith(head)}
        if "net.2.weight" in shapes:
            kind = "res"
        elif "qkv_conv.weight" in shapes:
            kind = "attention"
        elif "gamma.weight" in shapes:
            kind = "adaptive_norm"
        elif set(shapes) == {"conv.weight", "conv.bias"}:
            out_channels, in_channels = shapes["conv.weight"][:2]
            kind = "resample" if out_channels == in_channels else "depth_to_space" if out_channels == 4 * in_channels \
                else "unknown"
        else:
            kind = "unknown"
        if kind == "unknown":
            raise ConversionError(f"{head[:-1]} is not a block this converter knows (tensors: {sorted(shapes)})")
        blocks.append((kind, head[:-1], shapes))
    return blocks


def infer_model_config(state: dict, arguments: dict | None = None) -> ModelConfig:
    """The gsq ModelConfig of a flex_gen tokenizer state dict."""
    needed = ("encoder.conv_in.weight", "encoder.fianl_layers.2.weight", "decoder.conv_in.weight",
              "quantizers.codebook.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ConversionError(f"not a flex_gen FlexTokenizer state dict: missing {', '.join(missing)}")
    arguments = arguments or {}
    width = state["encoder.conv_in.weight"].shape[0]
    latent = state["encoder.fianl_layers.2.weight"].shape[0]
    codebook_size, code_dim = state["quantizers.codebook.weight"].shape
    if latent % code_dim:
        raise ConversionError(f"latent channels {latent} are not a multiple of the code width {code_dim}")

    # Encoder: levels are separated by the stride-2 convs; after the last one come the last level's
    # blocks (a width-changing ResBlock if any, then res_blocks ResBlocks) and the mid blocks.
    levels, current = [], []
    for kind, name, shapes in _blocks(state, "encoder"):
        if kind == "resample":
            levels.append(current)
            current = []
        elif kind in ("res", "attention"):
            current.append((kind, name, shapes))
        else:
            raise ConversionError(f"{name}: unexpected {kind} block in the encoder")
    levels.append(current)
    if any(kind == "attention" for level in levels[:-1] for kind, _, _ in level):
        raise ConversionError("attention inside the encoder levels (flex_gen attention_resolutions) is not supported")
    first = levels[0]
    res_blocks = sum(1 for kind, _, s in first if kind == "res" and s["net.2.weight"][0] == s["net.2.weight"][1])
    widths = []
    for level in levels:
        out_channels = [s["net.2.weight"][0] for kind, _, s in level if kind == "res"]
        if not out_channels:
            raise ConversionError("an encoder level without ResBlocks")
        widths.append(out_channels[0])
        changing = [s for kind, _, s in level if kind == "res" and s["net.2.weight"][0] != s["net.2.weight"][1]]
        if len(changing) > 1:
            raise ConversionError("an encoder level with two width-changing ResBlocks")
    for level in levels[:-1]:
        count = sum(1 for kind, _, s in level if kind == "res" and s["net.2.weight"][0] == s["net.2.weight"][1])
        if count != res_blocks:
            raise ConversionError(f"encoder levels have different numbers of ResBlocks ({count} vs {res_blocks}); "
                                  "gsq configs use one count for all levels")
    last = levels[-1]
    changes = 1 if last and last[0][2]["net.2.weight"][0] != last[0][2]["net.2.weight"][1] else 0
    mid = last[changes + res_blocks:]
    mid_resblocks = sum(1 for kind, _, _ in mid if kind == "res")
    mid_attention = any(kind == "attention" for kind, _, _ in mid)
    if any(w % width for w in widths):
        raise ConversionError(f"level widths {widths} are not multiples of the first width {width}")

    decoder = _blocks(state, "decoder")
    kinds = {kind for kind, _, _ in decoder}
    if "resample" in kinds:
        raise ConversionError("this checkpoint up-samples with nearest + conv (use_learnable_up_down_sample=False); "
                              "gsq implements the paper's conv + depth-to-space up-sampling only")
    quantizer_type = str(_find_key(arguments, "quantize_type") or "gsq").lower()
    if quantizer_type != "gsq":
        warnings.warn(f"the checkpoint's quantizer is {quantizer_type!r}, not 'gsq': the lookup may differ",
                      RuntimeWarning, stacklevel=2)
    l2 = _find_key(arguments, "use_l2_norm")
    beta = _find_key(arguments, "commitment_loss_weight")
    uniform = _find_key(arguments, "use_uniform_init")
    return ModelConfig(
        width=width, channel_multipliers=tuple(w // width for w in widths), res_blocks=res_blocks,
        mid_blocks=mid_resblocks, mid_attention=mid_attention, adaptive_norm="adaptive_norm" in kinds,
        latent_channels=latent, groups=latent // code_dim, codebook_size=codebook_size,
        beta=float(beta) if isinstance(beta, (int, float)) else 0.25,
        l2_normalize=bool(l2) if isinstance(l2, bool) else True,
        codebook_init="uniform" if uniform is True else "spherical",
    )


# ------------------------------------------------------------------------------------------------
# The name map


def _ordered_blocks(model: GSQTokenizer) -> dict[str, list[tuple[str, nn.Module]]]:
    """gsq's blocks in the reference's flat order, per network."""
    encoder, decoder = [], []
    for l, level in enumerate(model.encoder.levels):
        encoder += [(f"encoder.levels.{l}.blocks.{j}", b) for j, b in enumerate(level.blocks)]
        if level.downsample is not None:
            encoder.append((f"encoder.levels.{l}.downsample", level.downsample))
    encoder += [(f"encoder.mid.{k}", b) for k, b in enumerate(model.encoder.mid)]
    decoder += [(f"decoder.mid.{k}", b) for k, b in enumerate(model.decoder.mid)]
    if model.decoder.mid_norm is not None:
        decoder.append(("decoder.mid_norm", model.decoder.mid_norm))
    for l, level in enumerate(model.decoder.levels):
        decoder += [(f"decoder.levels.{l}.blocks.{j}", b) for j, b in enumerate(level.blocks)]
        for part in ("upsample", "norm"):
            if getattr(level, part) is not None:
                decoder.append((f"decoder.levels.{l}.{part}", getattr(level, part)))
    return {"encoder": encoder, "decoder": decoder}


def flex_gen_name_map(model: GSQTokenizer) -> dict[str, str]:
    """{flex_gen tensor name: gsq tensor name} for every tensor of `model`."""
    names = {"encoder.conv_in": "encoder.stem", "decoder.conv_in": "decoder.stem",
             "encoder.fianl_layers.0": "encoder.head.norm", "encoder.fianl_layers.2": "encoder.head.conv",
             "decoder.final_layers.0": "decoder.head.norm", "decoder.final_layers.2": "decoder.head.conv"}
    for network, blocks in _ordered_blocks(model).items():
        for i, (ours, block) in enumerate(blocks):
            for theirs_part, our_part in BLOCK_TENSORS[type(block)].items():
                names[f"{network}.blocks.{i}.{theirs_part}"] = f"{ours}.{our_part}"
    mapping = {"quantizers.codebook.weight": "quantizer.codebook"}
    ours_all = set(model.state_dict())
    for theirs_prefix, ours_prefix in names.items():
        for suffix in ("weight", "bias"):
            if f"{ours_prefix}.{suffix}" in ours_all:
                mapping[f"{theirs_prefix}.{suffix}"] = f"{ours_prefix}.{suffix}"
    return mapping


def convert_state_dict(state: dict[str, Tensor], model: GSQTokenizer) -> dict[str, Tensor]:
    """flex_gen tensors renamed to gsq's, every tensor accounted for and shape-checked."""
    mapping = flex_gen_name_map(model)
    expected = model.state_dict()
    unmapped = sorted(set(state) - set(mapping))
    absent = sorted(set(mapping) - set(state))
    if unmapped or absent:
        detail = []
        if unmapped:
            detail.append(f"{len(unmapped)} tensors of the checkpoint have no place in gsq (e.g. {unmapped[0]})")
        if absent:
            detail.append(f"{len(absent)} gsq tensors are missing from the checkpoint (e.g. {absent[0]})")
        raise ConversionError("the checkpoint does not map onto the inferred architecture: " + "; ".join(detail))
    converted = {}
    for theirs, ours in mapping.items():
        tensor = state[theirs]
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise ConversionError(f"{theirs} has shape {tuple(tensor.shape)}, but {ours} needs {tuple(expected[ours].shape)}")
        converted[ours] = tensor.detach().to(expected[ours].dtype).contiguous()
    return converted


def convert_checkpoint(source: str | Path, output: str | Path, overrides: list[str] = (), which: str = "ema") -> Path:
    """Write a weights-only gsq checkpoint folder (load it with gsq.checkpoint.load_checkpoint)."""
    state, arguments = load_flex_gen(source, which)
    model_config = infer_model_config(state, arguments)
    base = preset("F16-D16-G8-V256k" if model_config.downsampling >= 16 else "F8-D64-G16-V8k")
    base.preset = "flex_gen"
    base.model = model_config
    config = apply_overrides(base, list(overrides))
    with torch.device("meta"):
        skeleton = GSQTokenizer(config.model)
    tensors = convert_state_dict(state, skeleton)
    model = GSQTokenizer(config.model)
    model.load_state_dict(tensors)  # proves the converted tensors load (strict)
    output = Path(output).expanduser()
    if output.exists() and any(output.iterdir()):
        raise ckpt.CheckpointError(f"{output} exists and is not empty")
    weights = ckpt.module_tensors(model)
    return ckpt.write_checkpoint(output.parent, output.name, config, {"ema": weights, "generator": weights},
                                 {"step": 0, "converted_from": str(Path(source).resolve()), "converted_weights": which},
                                 update_latest=False)
