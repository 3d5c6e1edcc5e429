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

state.json also holds its own checksum (an edited step is caught) and the checkpoint's sequence
number in the run: the order checkpoints were written, which is the run's history (a run resumed
from an earlier step writes smaller steps after larger ones). Pruning and the fallback of a resume
follow that order, never the folder names.

Crash safety: a folder is written under a temporary name (.<name>.tmp-<host>-<pid>) and flushed to
disk; only then does it replace the final name (an existing folder of that step is first renamed
to .<name>.old-<host>-<pid>, and removed last), then `latest` is replaced atomically. Leftovers of
a writer that died are found by that process id: a half-done replacement is finished or undone, the
rest removed. An interruption at any moment (kill -9, power loss, a full disk) leaves the previous
checkpoint intact and `latest` naming an intact checkpoint or, for the instant of a replacement, a
folder that recover() restores; `resume_point` falls back to the newest intact checkpoint.
A weights-only checkpoint (e.g. from `gsq convert`) has config.json, ema.safetensors,
generator.safetensors and state.json with "resumable": false.

    loaded = load_checkpoint("runs/tiny")          # the newest checkpoint of a run, EMA weights
    loaded.model.encode(images); loaded.config; loaded.step
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunConfig
from .data import give_default_mode

FORMAT_VERSION = 1
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
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, values in scalars[prefix]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in scalars[prefix]["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def rng_state(device: torch.device) -> tuple[dict, dict]:
    """(tensors, scalars) of every global RNG this process draws from."""
    numpy_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(numpy_state[1].astype(np.int64))}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    scalars = {
        "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
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
    return {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in module.state_dict().items()
        if not name.startswith(skip_prefixes)
    }


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


HOST = socket.gethostname()
# Leftovers of a writer: .<name>.tmp-<host>-<pid> (being written), .old- (replaced, removed last),
# .del- (being pruned). Older gsq wrote .<name>.tmp-<pid>, without the host.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?:(?P<host>.*)-)?(?P<pid>\d+)$")
# A full disk, a full quota, or a file size limit (ulimit -f; the process must ignore SIGXFSZ).
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def _leftover_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{HOST}-{os.getpid()}"


def _is_folder_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\x00\n")


def _state_checksum(state: dict) -> str:
    """sha256 of the canonical JSON of state.json's other fields (independent of the file's layout)."""
    body = {key: value for key, value in state.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _dead(match: re.Match) -> bool:
    """Whether the process that left a leftover has ended: knowable only for this host's processes."""
    if match["host"] not in (None, HOST) or os.name != "posix":  # os.kill(pid, 0) would end it on Windows
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return True  # a failed earlier write of this process, which writes one checkpoint at a time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def recover(root: Path, only: str | None = None) -> None:
    """Clean up after writers that died (kill -9, power loss) in `root`: a replacement caught between
    its two renames is completed (the new folder, if intact) or undone (the old one), every other
    leftover of theirs is removed. Leftovers of live processes and of other hosts stay. `only`: the
    leftovers of that folder name only. Several processes may run this at once (a rank that finds
    its work done by another moves on)."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    for entry in root.iterdir() if root.is_dir() else ():
        match = _LEFTOVER.match(entry.name)
        if match is not None and (only is None or match["name"] == only) and _dead(match):
            groups.setdefault(match["name"], []).append((match["kind"], entry))
    for name, entries in groups.items():
        final = root / name
        old = [path for kind, path in entries if kind == "old"]
        if old and not os.path.lexists(final):
            new = [path for kind, path in entries if kind == "tmp" and _intact(path)]
            try:
                os.replace((new or old)[0], final)
                _fsync(root)
            except OSError:
                continue  # another process recovered it first
            warnings.warn(
                f"recovered checkpoint {final}, left half-replaced by a writer that died (kept its "
                f"{'new' if new else 'previous'} version)",
                RuntimeWarning,
                stacklevel=2,
            )
        for _, path in entries:
            _remove(path)


def _check_replaceable(final: Path) -> None:
    """Only a checkpoint folder (or an empty folder) may be replaced by a new checkpoint."""
    if final.is_symlink() or not final.is_dir():
        raise CheckpointError(f"{final} exists and is not a folder; refusing to replace it with a checkpoint")
    if not (final / "state.json").is_file() and any(final.iterdir()):
        raise CheckpointError(f"{final} exists and is not a gsq checkpoint folder; refusing to replace it")


def _bytes_needed(weights: dict[str, dict], training_tensors: dict | None) -> int:
    groups = [*weights.values(), training_tensors or {}]
    return sum(t.numel() * t.element_size() for group in groups for t in group.values()) + (1 << 20)  # + headers, JSON


def _os_error_code(error: BaseException) -> int | None:
    """errno of an OSError, or of the I/O error inside a SafetensorError ("... (os error 28)")."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"os error (\d+)", str(error)) if isinstance(error, SafetensorError) else None
    return int(found[1]) if found else None


def _space_error(root: Path, name: str, needed: int, cause: str) -> CheckpointError:
    free = shutil.disk_usage(root).free
    latest = _latest_or_none(root)
    kept = f"the last complete checkpoint, {latest}, is intact" if latest else "nothing else was changed"
    return CheckpointError(
        f"not enough space to write checkpoint {name} in {root} ({cause}): it needs about "
        f"{needed / 1e6:.1f} MB free, {free / 1e6:.1f} MB are; {kept}"
    )


def _write_folder(
    folder: Path, config: RunConfig, weights: dict[str, dict], state: dict, training_tensors: dict | None
) -> None:
    """Every file of a checkpoint into the new `folder`, state.json last, all flushed to disk."""
    folder.mkdir()
    (folder / "config.json").write_text(config.to_json() + "\n")
    for label, tensors in weights.items():
        save_file(tensors, str(folder / f"{label}.safetensors"))
        give_default_mode(folder / f"{label}.safetensors")
    if training_tensors is not None:
        save_file(training_tensors, str(folder / "training_state.safetensors"))
        give_default_mode(folder / "training_state.safetensors")
    files = {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)} for path in sorted(folder.iterdir())}
    state = {**state, "files": files}
    state["checksum"] = _state_checksum(state)
    (folder / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    for path in folder.iterdir():
        _fsync(path)
    _fsync(folder)


def _publish(root: Path, name: str, temporary: Path) -> Path | None:
    """Rename a complete folder to root/name. An existing root/name is renamed aside first (returned,
    for removal once `latest` has moved on): at every instant one of the two is complete under a name
    that recover() knows."""
    final, retired = root / name, None
    if os.path.lexists(final):
        retired = root / _leftover_name(name, "old")
        os.replace(final, retired)
        _fsync(root)
    try:
        os.replace(temporary, final)
    except BaseException:
        if retired is not None:
            os.replace(retired, final)
        raise
    _fsync(root)
    return retired


def _switch_latest(root: Path, name: str) -> None:
    pointer = root / _leftover_name("latest", "tmp")
    pointer.write_text(name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / "latest")
    _fsync(root)


def write_checkpoint(
    root: Path,
    name: str,
    config: RunConfig,
    weights: dict[str, dict],
    state: dict,
    training_tensors: dict | None = None,
    update_latest: bool = True,
) -> Path:
    """Write folder root/name, crash-safe (see the module docstring). weights: {"ema": tensors,
    "generator": ..., ...}; state: JSON-able metadata (step, ...); training_tensors: optimizer/RNG/usage
    tensors; update_latest: a run's checkpoints folder (root/latest names the new folder, and the
    checkpoint gets the next sequence number of the run). An existing root/name is replaced only if
    it is a checkpoint or an empty folder. A full disk raises CheckpointError, changing nothing."""
    if not _is_folder_name(name):
        raise CheckpointError(f"checkpoint name {name!r} is not a folder name")
    root.mkdir(parents=True, exist_ok=True)
    recover(root, None if update_latest else name)
    if os.path.lexists(root / name):
        _check_replaceable(root / name)
    needed = _bytes_needed(weights, training_tensors)
    if shutil.disk_usage(root).free < needed:
        raise _space_error(root, name, needed, "checked before writing")
    state = {"format_version": FORMAT_VERSION, "resumable": training_tensors is not None, **state}
    if update_latest:
        state["sequence"] = 1 + max([_sequence(folder) for folder in history(root)] + [0])
    temporary = root / _leftover_name(name, "tmp")
    retired = None
    try:
        _write_folder(temporary, config, weights, state, training_tensors)
        retired = _publish(root, name, temporary)
        if update_latest:
            _switch_latest(root, name)
    except BaseException as error:
        _remove(temporary)
        _remove(root / _leftover_name("latest", "tmp"))
        if _os_error_code(error) in _NO_SPACE:
            raise _space_error(root, name, needed, os.strerror(_os_error_code(error))) from None
        raise
    if retired is not None:
        _remove(retired)
    return root / name


def _sequence(folder: Path) -> int:
    """A checkpoint's position in its run's history; -1 if its state.json cannot be read."""
    try:
        sequence = json.loads((folder / "state.json").read_text()).get("sequence", 0)
    except (OSError, ValueError, AttributeError):
        return -1
    return sequence if isinstance(sequence, int) else -1


def history(root: Path) -> list[Path]:
    """A run's checkpoint folders (step_*), the most recently written first: by state.json's sequence
    (older checkpoints without one, or unreadable ones, count as older), then by name."""
    folders = [p for p in root.glob("step_*") if p.is_dir() and not p.is_symlink()]
    return sorted(folders, key=lambda folder: (_sequence(folder), folder.name), reverse=True)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently written checkpoints (the run's history, not the folder
    names: a run resumed from an earlier step keeps its new checkpoints), never the one `latest`
    names. Each folder is renamed aside first, so a half-removed folder never passes for a checkpoint."""
    latest = _latest_or_none(root)
    for folder in history(root)[keep:]:
        if folder.name != latest:
            doomed = root / _leftover_name(folder.name, "del")
            os.replace(folder, doomed)
            _remove(doomed)


# ------------------------------------------------------------------------------------------------
# Reading


def _read_latest(root: Path) -> str:
    """The folder name that root/latest holds (CheckpointError if it holds none)."""
    pointer = root / "latest"
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{pointer} is corrupt: it is not text (it should hold the name of the newest checkpoint folder)"
        ) from None
    except OSError as error:
        raise CheckpointError(f"{pointer} cannot be read: {error}") from None
    if not name:
        raise CheckpointError(f"{pointer} is empty (it should hold the name of the newest checkpoint folder)")
    if not _is_folder_name(name):
        raise CheckpointError(f"{pointer} is corrupt: {name[:80]!r} is not the name of a checkpoint folder")
    return name


def _latest_or_none(root: Path) -> str | None:
    try:
        return _read_latest(root) if (root / "latest").is_file() else None
    except CheckpointError:
        return None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, from a run folder or from its checkpoints folder (newest)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    for candidate in (path, path / "checkpoints"):
        if (candidate / "state.json").is_file():
            return candidate
        if (candidate / "latest").is_file():
            folder = candidate / _read_latest(candidate)
            if not (folder / "state.json").is_file():
                raise CheckpointError(f"{candidate / 'latest'} names {folder.name}, which is missing or incomplete")
            return folder
    if (path / "config.json").is_file() or (path / "checkpoints").is_dir():  # a run folder, before its first save
        raise CheckpointError(f"{path} has no checkpoint yet (train it first, or pass a checkpoint folder)")
    raise CheckpointError(f"{path} is not a checkpoint folder (no state.json), a run folder or a checkpoints folder")


def _intact(folder: Path) -> bool:
    try:
        read_state(folder)
        read_config(folder)
    except (CheckpointError, OSError):  # OSError: another process moved it meanwhile
        return False
    return True


def resume_point(path: str | Path) -> Path:
    """The checkpoint that `gsq train --resume path` continues: `path` itself if it is a checkpoint
    folder; for a run (or its checkpoints folder) the one `latest` names or, when that one is missing
    or damaged, the newest intact checkpoint in the run's history, with a warning. Leftovers of
    writers that died are recovered first."""
    path = Path(path).expanduser()
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (path / "state.json").is_file() or not ((root / "latest").exists() or history(root)):
        return find_checkpoint(path)
    recover(root)
    try:
        folder = find_checkpoint(path)
        read_state(folder)
        read_config(folder)
        return folder
    except CheckpointError as error:
        problem = error
    for candidate in history(root):
        if _intact(candidate):
            warnings.warn(
                f"{problem}; resuming from {candidate}, the newest intact checkpoint of the run",
                RuntimeWarning,
                stacklevel=2,
            )
            return candidate
    raise CheckpointError(f"{problem}; {root} holds no other intact checkpoint to resume from")


def _check_files(folder: Path, files) -> None:
    """state.json's "files": {file name: {"bytes": int, "sha256": hex}}, names inside the folder."""

    def valid(name, entry) -> bool:
        return (
            _is_folder_name(name)
            and isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
        )

    if not isinstance(files, dict) or not all(valid(name, entry) for name, entry in files.items()):
        raise CheckpointError(
            f'{folder / "state.json"} is corrupt: "files" must map each file name to its "bytes" and "sha256"'
        )


def read_state(folder: Path, verify: bool = True) -> dict:
    """state.json (its checksum checked), with every listed file checked for its size (and sha256
    when verify)."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no state.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{folder / 'state.json'} is corrupt: {error}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(
            f"{folder} has checkpoint format version {version!r}; this gsq reads version {FORMAT_VERSION}"
        )
    if "checksum" not in state:
        raise CheckpointError(f"{folder / 'state.json'} has no checksum (written by an older gsq, or edited)")
    if state["checksum"] != _state_checksum(state):
        raise CheckpointError(f"{folder / 'state.json'} was changed after it was written: its checksum does not match")
    _check_files(folder, state.get("files"))
    step = state.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{folder / 'state.json'} is corrupt: step {step!r} is not a count of steps")
    for name, expected in state["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{file} is corrupt or truncated: {file.stat().st_size} bytes, expected {expected['bytes']}"
            )
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
            detail.append(
                f"{len(wrong)} of other shapes (e.g. {k}: {tuple(tensors[k].shape)} in the file, "
                f"{tuple(expected[k].shape)} in the model)"
            )
        raise CheckpointError(f"{file} does not match the model: " + "; ".join(detail))
    module.load_state_dict(tensors, strict=not skip_prefixes)


# Fields that may change when a run is resumed without changing what it computes.
RESUME_MAY_CHANGE = {
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.grid_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_minutes",
    "train.run_dir",
    "train.name",
    "train.device",
    "data.num_workers",
    "data.validation_images",
    "model.quantizer_backend",
    "discriminator.dino_weights",
    "loss.vgg_weights",
}


def config_differences(saved: RunConfig, current: RunConfig) -> list[str]:
    def leaves(data: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in data.items():
            out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    a, b = leaves(saved.to_dict()), leaves(current.to_dict())
    return [
        f"{key}: {a[key]!r} in the checkpoint, {b[key]!r} now"
        for key in a
        if a[key] != b[key] and key not in RESUME_MAY_CHANGE and key != "preset"
    ]


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


def load_checkpoint(
    path: str | Path, weights: str = "ema", device: str | torch.device = "cpu", verify: bool = True
) -> LoadedCheckpoint:
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
