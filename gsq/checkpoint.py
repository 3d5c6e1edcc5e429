"""Checkpoints: one folder per step, written atomically, nothing pickled.

    runs/<name>/checkpoints/step_00001000/
        config.json                  the resolved RunConfig
        ema.safetensors              EMA of the tokenizer weights: what evaluation and inference use
        generator.safetensors        the tokenizer weights being trained
        discriminator.safetensors    trainable discriminator weights and buffers (not a frozen backbone)
        training_state.safetensors   optimizer moments, RNG states, the codebook-usage histogram
        state.json                   step, optimizer settings, RNG scalars, notes, and the size and
                                     sha256 of every file above (checked on load)
    runs/<name>/checkpoints/latest   name of the newest complete checkpoint folder

A folder is written under a temporary name, flushed to disk and renamed into place, then `latest`
is replaced atomically: an interruption at any moment leaves the previous checkpoint intact.
A weights-only checkpoint (e.g. from `gsq convert`) has config.json, ema.safetensors,
generator.safetensors and state.json with "resumable": false.

    loaded = load_checkpoint("runs/tiny")          # the newest checkpoint of a run, EMA weights
    loaded.model.encode(images); loaded.config; loaded.step
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunConfig

FORMAT_VERSION = 1
WEIGHT_FILES = ("ema", "generator", "discriminator")
FROZEN_PREFIXES = ("backbone.",)  # discriminator tensors that come from pretrained weights, not training


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the run or model."""


# ------------------------------------------------------------------------------------------------
# Flattening optimizer and RNG state into tensors (safetensors) and JSON scalars


def flatten_optimizer(prefix: str, state: dict, tensors: dict, scalars: dict) -> None:
    per_param = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                per_param.setdefault(str(index), {})[name] = value
    scalars[prefix] = {"param_groups": state["param_groups"], "scalars": per_param}


def unflatten_optimizer(prefix: str, tensors: dict, scalars: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, values in scalars[prefix]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in scalars[prefix]["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state(device: torch.device) -> tuple[dict, dict]:
    """(tensors, scalars) of every global RNG this process draws from."""
    numpy_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(numpy_state[1].astype(np.int64))}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    scalars = {"numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
               "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    return tensors, scalars


def set_rng_state(tensors: dict, scalars: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    name, position, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = scalars["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)


# ------------------------------------------------------------------------------------------------
# Writing


def module_tensors(module: torch.nn.Module, skip_prefixes: tuple[str, ...] = ()) -> dict:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()
            if not name.startswith(skip_prefixes)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, name: str, config: RunConfig, weights: dict[str, dict], state: dict,
                     training_tensors: dict | None = None, update_latest: bool = True) -> Path:
    """Write folder root/name atomically. weights: {"ema": tensors, "generator": ..., ...};
    state: JSON-able metadata (step, ...); training_tensors: optimizer/RNG/usage tensors;
    update_latest: point root/latest at the new folder (a run's checkpoints folder)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    temporary = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    (temporary / "config.json").write_text(config.to_json() + "\n")
    for label, tensors in weights.items():
        save_file(tensors, str(temporary / f"{label}.safetensors"))
    if training_tensors is not None:
        save_file(training_tensors, str(temporary / "training_state.safetensors"))
    files = {}
    for path in sorted(temporary.iterdir()):
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    state = {"format_version": FORMAT_VERSION, "resumable": training_tensors is not None, **state, "files": files}
    (temporary / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    for path in temporary.iterdir():
        _fsync(path)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    if not update_latest:
        _fsync(root)
        return final
    pointer = root / ".latest.tmp"
    pointer.write_text(name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / "latest")
    _fsync(root)
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` step folders (never the one `latest` names)."""
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    folders = sorted(p for p in root.glob("step_*") if p.is_dir())
    for folder in folders[:-keep]:
        if folder.name != latest:
            shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Reading


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, from a run folder or from its checkpoints folder (newest)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    for candidate in (path, path / "checkpoints"):
        if (candidate / "state.json").is_file():
            return candidate
        if (candidate / "latest").is_file():
            folder = candidate / (candidate / "latest").read_text().strip()
            if not (folder / "state.json").is_file():
                raise CheckpointError(f"{candidate / 'latest'} names {folder.name}, which is missing or incomplete")
            return folder
    raise CheckpointError(f"{path} is not a checkpoint folder (no state.json), a run folder or a checkpoints folder")


def read_state(folder: Path, verify: bool = True) -> dict:
    """state.json, with every listed file checked for its size (and sha256 when verify)."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no state.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{folder / 'state.json'} is corrupt: {error}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"{folder} has checkpoint format version {version!r}; this gsq reads version "
                              f"{FORMAT_VERSION}")
    for name, expected in state.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{file} is corrupt or truncated: {file.stat().st_size} bytes, expected "
                                  f"{expected['bytes']}")
        if verify and _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} is corrupt: its sha256 does not match the one recorded when it was written")
    return state


def read_config(folder: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as error:
        raise CheckpointError(f"{folder / 'config.json'} is corrupt or from an incompatible version: {error}") from None


def read_tensors(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{file} is corrupt or truncated: {error}") from None


def load_weights(module: torch.nn.Module, file: Path, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load a safetensors file into a module; a clear error says what does not fit."""
    tensors = read_tensors(file)
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(skip_prefixes)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} of other shapes (e.g. {k}: {tuple(tensors[k].shape)} in the file, "
                          f"{tuple(expected[k].shape)} in the model)")
        raise CheckpointError(f"{file} does not match the model: " + "; ".join(detail))
    module.load_state_dict(tensors, strict=not skip_prefixes)


# Fields that may change when a run is resumed without changing what it computes.
RESUME_MAY_CHANGE = {
    "train.steps", "train.log_every", "train.eval_every", "train.grid_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_minutes", "train.run_dir", "train.name", "train.device",
    "data.num_workers", "data.validation_images", "model.quantizer_backend", "discriminator.dino_weights",
    "loss.vgg_weights",
}


def config_differences(saved: RunConfig, current: RunConfig) -> list[str]:
    def leaves(data: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in data.items():
            out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    a, b = leaves(saved.to_dict()), leaves(current.to_dict())
    return [f"{key}: {a[key]!r} in the checkpoint, {b[key]!r} now" for key in a if a[key] != b[key]
            and key not in RESUME_MAY_CHANGE and key != "preset"]


def check_resumable(folder: Path, current: RunConfig) -> dict:
    """The checkpoint's state if `current` can continue it exactly; CheckpointError otherwise."""
    state = read_state(folder)
    if not state.get("resumable"):
        raise CheckpointError(f"{folder} holds weights only (no optimizer or RNG state) and cannot resume training")
    differences = config_differences(read_config(folder), current)
    if differences:
        raise CheckpointError(f"{folder} does not match this run's config: " + "; ".join(differences))
    return state


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module  # a GSQTokenizer in eval mode, gradients off
    config: RunConfig
    step: int
    folder: Path
    weights: str  # "ema" or "generator"


def load_checkpoint(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
                    verify: bool = True) -> LoadedCheckpoint:
    """A trained tokenizer (its EMA weights by default) and its config, ready for inference. `path`:
    a checkpoint folder, a run folder or its checkpoints folder (the newest checkpoint)."""
    from .models import GSQTokenizer

    if weights not in ("ema", "generator"):
        raise ValueError(f"weights must be 'ema' or 'generator', got {weights!r}")
    folder = find_checkpoint(path)
    state = read_state(folder, verify=verify)
    config = read_config(folder)
    model = GSQTokenizer(config.model)
    load_weights(model, folder / f"{weights}.safetensors")
    model.to(device).eval().requires_grad_(False)
    return LoadedCheckpoint(model, config, int(state.get("step", 0)), folder, weights)
