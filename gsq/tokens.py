"""`gsq encode` / `gsq decode`: images <-> token files.

A token file is a .safetensors file holding `indices` (N, h, w, G) in the smallest signed integer
type that holds V - 1 (int16 up to V = 32,768, else int32), with metadata naming the model that made
it: the checkpoint folder, which weights, the sha256 of those weights, the step and the config, and
the source image of every row. `gsq decode` refuses tokens of a different model (same config and
weights checksum) unless forced, since decoding them with another codebook gives garbage silently.
A token file is checked before use: integer indices of shape (N, h, w, G) within the codebook, one
source name per row, metadata that describes a model. Neither command replaces an existing file
unless asked to (overwrite / --overwrite).

Round trip: decode(encode(image)) is exactly the model's reconstruction of the preprocessed image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import checkpoint as ckpt
from .data import DataError, list_images, read_image, refuse_existing, write_new
from .metrics import to_unit_range

TOKEN_FORMAT = "gsq-tokens/1"


class TokenFileError(ValueError):
    """A token file that cannot be written or read as asked."""


@dataclass
class TokenFile:
    indices: torch.Tensor  # (N, h, w, G) int64
    metadata: dict


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_identity(loaded: ckpt.LoadedCheckpoint) -> dict:
    state = ckpt.read_state(loaded.folder, verify=False)
    return {
        "checkpoint": str(loaded.folder.resolve()),
        "weights": loaded.weights,
        "step": loaded.step,
        "weights_sha256": state["files"][f"{loaded.weights}.safetensors"]["sha256"],
        "config": loaded.config.to_dict(),
    }


def input_files(source: str | Path) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    return list_images(path)


def index_dtype(codebook_size: int) -> torch.dtype:
    return torch.int16 if codebook_size <= 2**15 else torch.int32


def encode_images(
    checkpoint: str | Path,
    source: str | Path,
    output: str | Path,
    image_size: int = 0,
    resize: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    weights: str = "ema",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Tokens of an image file or of every image under a folder (sorted), written to `output` (an
    existing file only if `overwrite`)."""
    output = Path(output).expanduser()
    if output.suffix != ".safetensors":
        raise TokenFileError(f"output must be a .safetensors file, got {output}")
    refuse_existing([output], overwrite)
    if batch_size < 1:
        raise TokenFileError(f"batch_size must be >= 1, got {batch_size}")
    files = input_files(source)
    loaded = ckpt.load_checkpoint(checkpoint, weights=weights, device=_device(device))
    size = image_size or loaded.config.data.image_size
    resize = resize or size
    try:
        loaded.model.token_shape(size, size)
    except ValueError as error:
        raise TokenFileError(f"--image-size {size}: {error}") from None
    batches = range(0, len(files), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="gsq encode", unit="batch", dynamic_ncols=True)
    parts = []
    for start in batches:
        images = torch.stack([read_image(f, resize, size) for f in files[start : start + batch_size]])
        parts.append(loaded.model.encode(images.to(loaded.model.quantizer.codebook.device)).cpu())
    indices = torch.cat(parts).to(index_dtype(loaded.config.model.codebook_size))
    metadata = {
        "format": TOKEN_FORMAT,
        "model": json.dumps(model_identity(loaded)),
        "files": json.dumps([str(f) for f in files]),
        "image_size": str(size),
        "resize": str(resize),
    }
    return write_new(
        output,
        lambda temporary: save_file({"indices": indices.contiguous()}, str(temporary), metadata=metadata),
        overwrite,
    )


def read_tokens(path: str | Path) -> TokenFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TokenFileError(f"token file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != TOKEN_FORMAT or "indices" not in f.keys():
                raise TokenFileError(
                    f"{path} is not a gsq token file (format {metadata.get('format')!r}, expected {TOKEN_FORMAT!r})"
                )
            indices = f.get_tensor("indices")
    except (SafetensorError, OSError) as error:
        raise TokenFileError(f"{path} is not a readable token file: {error}") from None
    if indices.dtype == torch.bool or indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise TokenFileError(
            f"{path}: indices are {str(indices.dtype).removeprefix('torch.')}, not integers (gsq "
            "encode writes int16 or int32)"
        )
    if indices.dim() != 4 or 0 in indices.shape[1:]:
        raise TokenFileError(f"{path}: indices have shape {tuple(indices.shape)}, expected (N, h, w, G)")
    return TokenFile(indices.long(), _checked_metadata(path, metadata, indices.shape[0]))


def _checked_metadata(path: Path, metadata: dict, rows: int) -> dict:
    """A token file's metadata, parsed: the model that made it, and one source file name per row."""

    def corrupt(what: str) -> TokenFileError:
        return TokenFileError(f"{path}: its metadata {what} (not written by gsq encode, or altered)")

    try:
        model, files = json.loads(metadata["model"]), json.loads(metadata["files"])
    except KeyError as key:
        raise corrupt(f"has no {key}") from None
    except json.JSONDecodeError as error:
        raise corrupt(f"is not JSON ({error})") from None
    fields = {"checkpoint": str, "weights_sha256": str, "step": int, "config": dict}
    if (
        not isinstance(model, dict)
        or any(not isinstance(model.get(k), t) for k, t in fields.items())
        or model.get("weights") not in ("ema", "generator")
        or not isinstance(model["config"].get("model"), dict)
    ):
        raise corrupt(
            '"model" does not describe a model (checkpoint, weights "ema" or "generator", weights_sha256, step, config)'
        )
    if not isinstance(files, list) or not all(isinstance(n, str) and "\x00" not in n and Path(n).stem for n in files):
        raise corrupt('"files" is not a list of file names')
    if rows == 0:
        raise TokenFileError(f"{path} holds no images")
    if len(files) != rows:
        raise corrupt(f"names {len(files)} source files for {rows} images")
    return {**metadata, "model": model, "files": files}


def decode_tokens(
    tokens: TokenFile,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 32,
    force: bool = False,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] (unclamped) of a token file, decoded by `checkpoint` (default:
    the one that made the tokens)."""
    made_by = tokens.metadata["model"]
    loaded = ckpt.load_checkpoint(
        checkpoint or made_by["checkpoint"], weights=made_by["weights"], device=_device(device)
    )
    identity = json.loads(json.dumps(model_identity(loaded)))  # as stored: tuples become lists
    if not force and (
        identity["weights_sha256"] != made_by["weights_sha256"]
        or identity["config"]["model"] != made_by["config"]["model"]
    ):
        raise ckpt.CheckpointError(_other_model(made_by, identity, loaded))
    groups, codebook_size = loaded.config.model.groups, loaded.config.model.codebook_size
    if tokens.indices.shape[3] != groups:
        raise TokenFileError(
            f"the tokens have {tokens.indices.shape[3]} groups per position; the model of "
            f"{loaded.folder} decodes {groups}"
        )
    low, high = int(tokens.indices.min()), int(tokens.indices.max())
    if low < 0 or high >= codebook_size:
        raise TokenFileError(
            f"the token file holds indices from {low} to {high}, outside the codebook's [0, {codebook_size})"
        )
    parts = [
        loaded.model.decode(tokens.indices[i : i + batch_size].to(loaded.model.quantizer.codebook.device)).cpu()
        for i in range(0, tokens.indices.shape[0], batch_size)
    ]
    return torch.cat(parts) if parts else torch.empty(0, 3, 0, 0)


def _other_model(made_by: dict, identity: dict, loaded: ckpt.LoadedCheckpoint) -> str:
    if identity["checkpoint"] == made_by["checkpoint"]:  # the same folder, rewritten since
        changed = "weights" if identity["weights_sha256"] != made_by["weights_sha256"] else "model config"
        return (
            f"the tokens were made by {made_by['checkpoint']} at step {made_by['step']}, and its {changed} "
            f"changed since (it now holds step {loaded.step}): it would decode them into other images; pass "
            "--force to decode anyway"
        )
    return (
        f"the tokens were made by {made_by['checkpoint']} (step {made_by['step']}), not by {loaded.folder} (step "
        f"{loaded.step}): its codebook would decode them into other images; pass --force to decode anyway"
    )


def image_paths(names: list[str], folder: str | Path) -> list[Path]:
    """The PNG file for each source name: <stem>.png, all index-prefixed when two stems are equal
    (ignoring case, as some file systems do)."""
    stems = [Path(name).stem for name in names]
    unique = len({stem.casefold() for stem in stems}) == len(stems)
    folder = Path(folder).expanduser()
    return [folder / (f"{stem}.png" if unique else f"{i:06d}_{stem}.png") for i, stem in enumerate(stems)]


def write_images(images: torch.Tensor, names: list[str], folder: str | Path, overwrite: bool = False) -> list[Path]:
    """PNG files (clamped to [-1, 1], uint8) named by image_paths; an existing file is replaced only if
    `overwrite` (a decode into the source folder would otherwise replace the originals)."""
    from PIL import Image

    paths = image_paths(names, folder)
    if paths and paths[0].parent.exists() and not paths[0].parent.is_dir():
        raise TokenFileError(f"output {paths[0].parent} exists and is not a folder")
    refuse_existing(paths, overwrite)
    for image, path in zip(images, paths):
        array = (to_unit_range(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        write_new(path, lambda temporary, array=array: Image.fromarray(array).save(temporary, format="PNG"), overwrite)
    return paths
