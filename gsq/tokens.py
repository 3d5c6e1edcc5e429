"""`gsq encode` / `gsq decode`: images <-> token files.

A token file is a .safetensors file holding `indices` (N, h, w, G) in the smallest signed integer
type that holds V - 1 (int16 up to V = 32,768, else int32), with metadata naming the model that made
it: the checkpoint folder, which weights, the sha256 of those weights, the step and the config, and
the source image of every row. `gsq decode` refuses tokens of a different model (same config and
weights checksum) unless forced, since decoding them with another codebook gives garbage silently.

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
from .data import DataError, list_images, resize_center_crop, to_tensor
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
    return {"checkpoint": str(loaded.folder.resolve()), "weights": loaded.weights, "step": loaded.step,
            "weights_sha256": state["files"][f"{loaded.weights}.safetensors"]["sha256"],
            "config": loaded.config.to_dict()}


def read_image(path: Path, resize: int, size: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return to_tensor(np.asarray(resize_center_crop(image, resize, size)))
    except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {type(error).__name__}: {error}") from None


def input_files(source: str | Path) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    return list_images(path)


def index_dtype(codebook_size: int) -> torch.dtype:
    return torch.int16 if codebook_size <= 2**15 else torch.int32


def encode_images(checkpoint: str | Path, source: str | Path, output: str | Path, image_size: int = 0,
                  resize: int = 0, batch_size: int = 32, device: str = "auto", weights: str = "ema",
                  progress: bool = True) -> Path:
    """Tokens of an image file or of every image under a folder (sorted), written to `output`."""
    output = Path(output).expanduser()
    if output.suffix != ".safetensors":
        raise TokenFileError(f"output must be a .safetensors file, got {output}")
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
        images = torch.stack([read_image(f, resize, size) for f in files[start:start + batch_size]])
        parts.append(loaded.model.encode(images.to(loaded.model.quantizer.codebook.device)).cpu())
    indices = torch.cat(parts).to(index_dtype(loaded.config.model.codebook_size))
    metadata = {"format": TOKEN_FORMAT, "model": json.dumps(model_identity(loaded)),
                "files": json.dumps([str(f) for f in files]), "image_size": str(size), "resize": str(resize)}
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    save_file({"indices": indices.contiguous()}, str(temporary), metadata=metadata)
    temporary.replace(output)
    return output


def read_tokens(path: str | Path) -> TokenFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TokenFileError(f"token file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != TOKEN_FORMAT or "indices" not in f.keys():
                raise TokenFileError(f"{path} is not a gsq token file (format {metadata.get('format')!r}, expected "
                                f"{TOKEN_FORMAT!r})")
            indices = f.get_tensor("indices").long()
    except (SafetensorError, OSError) as error:
        raise TokenFileError(f"{path} is not a readable token file: {error}") from None
    return TokenFile(indices, {**metadata, "model": json.loads(metadata["model"]), "files": json.loads(metadata["files"])})


def decode_tokens(tokens: TokenFile, checkpoint: str | Path | None = None, device: str = "auto",
                  batch_size: int = 32, force: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] (unclamped) of a token file, decoded by `checkpoint` (default:
    the one that made the tokens)."""
    made_by = tokens.metadata["model"]
    loaded = ckpt.load_checkpoint(checkpoint or made_by["checkpoint"], weights=made_by["weights"],
                                  device=_device(device))
    identity = json.loads(json.dumps(model_identity(loaded)))  # as stored: tuples become lists
    if not force and (identity["weights_sha256"] != made_by["weights_sha256"] or identity["config"]["model"] !=
                      made_by["config"]["model"]):
        raise ckpt.CheckpointError(f"the tokens were made by {made_by['checkpoint']} (step {made_by['step']}), not by "
                                   f"{loaded.folder} (step {loaded.step}): its codebook would decode them into other "
                                   "images; pass --force to decode anyway")
    parts = [loaded.model.decode(tokens.indices[i:i + batch_size].to(loaded.model.quantizer.codebook.device)).cpu()
             for i in range(0, tokens.indices.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, 3, 0, 0)


def write_images(images: torch.Tensor, names: list[str], folder: str | Path) -> list[Path]:
    """PNG files (clamped to [-1, 1], uint8) named after the source images (index-prefixed where two
    sources share a name)."""
    from PIL import Image

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    stems = [Path(name).stem for name in names]
    unique = len(set(stems)) == len(stems)
    written = []
    for i, image in enumerate(images):
        array = (to_unit_range(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = folder / (f"{stems[i]}.png" if unique else f"{i:06d}_{stems[i]}.png")
        Image.fromarray(array).save(path)
        written.append(path)
    return written
