"""Training and validation images.

- An image folder (recursive; common formats): the short side resized to `resize` (bicubic,
  antialiased), then the central image_size x image_size crop (the paper's ImageNet protocol, no
  augmentation). Every image is read by read_image (16-bit images scaled to 8 bits, not clipped).
  An unreadable file gets one warning (per file and process) and is counted once each time it is
  drawn: training substitutes the next readable file (it samples anyway), evaluation skips it and
  lists it (never scoring another image in its place).
- The bundled default (data.path=""): random crops of scikit-image's sample photos, which ship
  inside the scikit-image package (no download); two photos are held out as validation tiles.

Reproducible order: every epoch is a seeded permutation (DistributedSampler), split over the
ranks, and a random crop is a function of (seed, epoch, position) alone, so a resumed run draws
exactly the batches of the uninterrupted one (ResumableBatchSampler starts mid-epoch).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from .config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

# scikit-image sample photos (in the package itself). `cat` is `chelsea` again, so it stays out.
BUNDLED_TRAIN = (
    "astronaut",
    "rocket",
    "stereo_motorcycle",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "camera",
    "brick",
    "grass",
    "gravel",
    "coins",
    "clock",
    "moon",
)
BUNDLED_VALIDATION = ("coffee", "chelsea")


class DataError(ValueError):
    """Missing or unusable training data."""


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursive), sorted for a machine-independent order."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float32 in [-1, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_rgb8(image):
    """A PIL image of any mode as 8-bit RGB. PIL's own convert("RGB") clips 16-bit gray (modes I;16*,
    and I from a PNG, which can only be 16-bit) to white: those are scaled by 255/65535 instead.
    32-bit integer and float images (other I, F) have no defined white level and are refused.
    (16-bit RGB/RGBA files already open as 8-bit modes, scaled by PIL.)"""
    from PIL import Image

    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        array = np.asarray(image).astype(np.int64)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"16-bit image holds values outside [0, 65535] ({array.min()}..{array.max()})")
        image = Image.fromarray(((array * 255 + 32767) // 65535).astype(np.uint8), "L")  # rounded
    elif image.mode in ("I", "F"):
        raise ValueError(
            f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} images (mode {image.mode}) "
            "have no defined white level; save it with 8 or 16 bits per channel"
        )
    return image.convert("RGB")


def read_image(path: str | Path, resize: int, crop: int) -> torch.Tensor:
    """The one way gsq reads an image file: 3 x crop x crop float32 in [-1, 1] (short side to
    `resize`, center crop). DataError, naming the file, if it cannot be read."""
    try:
        return _read_image(path, resize, crop)
    except Exception as error:  # PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {type(error).__name__}: {error}") from None


def _read_image(path: str | Path, resize: int, crop: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return to_tensor(np.asarray(resize_center_crop(image, resize, crop)))


def resize_center_crop(image, resize: int, crop: int):
    """PIL image -> RGB (to_rgb8), short side to `resize` (bicubic, antialiased), central crop x crop."""
    from PIL import Image

    image = to_rgb8(image)
    width, height = image.size
    scale = resize / min(width, height)
    size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    return image.crop((left, top, left + crop, top + crop))


class ImageFolderDataset(Dataset):
    """Images of a folder, resized and center-cropped. Sample index i (taken modulo the number of
    files, so samplers may number samples across epochs) is file i. When file i cannot be read the
    sample has "skipped": 1 and "unreadable": its path, and its image is the next readable file's
    (substitute=True: training) or None (substitute=False: evaluation, which must not score one image
    twice; collate drops it)."""

    def __init__(self, files: list[Path], resize: int, crop: int, substitute: bool = True) -> None:
        self.files = files
        self.resize = resize
        self.crop = crop
        self.substitute = substitute
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, path: Path) -> torch.Tensor | None:
        try:
            return _read_image(path, self.resize, self.crop)
        except Exception as error:  # PIL raises many types for broken files
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(
                    f"skipping unreadable image {path}: {type(error).__name__}: {error}", RuntimeWarning, stacklevel=3
                )
            return None

    def __getitem__(self, index: int) -> dict:
        path = self.files[index % len(self.files)]
        image = self._read(path)
        if image is not None:
            return {"image": image, "skipped": 0, "unreadable": ""}
        if self.substitute:
            for offset in range(1, len(self.files)):
                image = self._read(self.files[(index + offset) % len(self.files)])
                if image is not None:
                    break
            else:
                raise DataError(f"none of the {len(self.files)} images could be read")
        return {"image": image, "skipped": 1, "unreadable": str(path)}


def load_bundled_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as H x W x 3 uint8 (gray photos repeated over 3 channels)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)


class BundledPhotoCrops(Dataset):
    """Random crop x crop patches of the bundled photos, `epoch_size` per epoch. Sample index
    epoch * epoch_size + i is a function of (seed, epoch, i) only."""

    def __init__(self, names: tuple[str, ...], crop: int, epoch_size: int, seed: int) -> None:
        self.photos = [load_bundled_photo(name) for name in names]
        for name, photo in zip(names, self.photos):
            if min(photo.shape[:2]) < crop:
                raise DataError(
                    f"bundled photo {name} ({photo.shape[1]}x{photo.shape[0]}) is smaller than the "
                    f"{crop}x{crop} crops asked for (data.image_size)"
                )
        self.crop = crop
        self.epoch_size = epoch_size
        self.seed = seed

    def __len__(self) -> int:
        return self.epoch_size

    def __getitem__(self, index: int) -> dict:
        epoch, position = divmod(index, self.epoch_size)
        rng = np.random.default_rng([self.seed, epoch, position])
        photo = self.photos[rng.integers(len(self.photos))]
        top = rng.integers(photo.shape[0] - self.crop + 1)
        left = rng.integers(photo.shape[1] - self.crop + 1)
        return {"image": to_tensor(photo[top : top + self.crop, left : left + self.crop]), "skipped": 0}


class BundledPhotoTiles(Dataset):
    """The held-out photos cut into non-overlapping crop x crop tiles, at most `limit`, spread
    evenly over all tiles (validation)."""

    def __init__(self, names: tuple[str, ...], crop: int, limit: int) -> None:
        tiles = []
        for name in names:
            photo = load_bundled_photo(name)
            for r in range(photo.shape[0] // crop):
                for c in range(photo.shape[1] // crop):
                    tiles.append(photo[r * crop : (r + 1) * crop, c * crop : (c + 1) * crop])
        if not tiles:
            raise DataError(f"the validation photos are smaller than {crop}x{crop} (data.image_size)")
        keep = np.unique(np.linspace(0, len(tiles) - 1, num=min(limit, len(tiles))).round().astype(int))
        self.tiles = [tiles[i] for i in keep]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict:
        return {"image": to_tensor(self.tiles[index]), "skipped": 0}


class ResumableBatchSampler(Sampler):
    """Endless batches of sample indices for one rank. Epoch e is DistributedSampler's seeded
    permutation for that epoch (disjoint shards per rank, the shard's tail that does not fill a
    batch dropped); indices are numbered epoch * len(dataset) + i so epoch-dependent datasets (random
    crops) differ between epochs. `start_batch` = batches this rank already consumed."""

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        self.size = len(dataset)
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.shard = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batches_per_epoch = len(self.shard) // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{self.size} training images are too few for batches of {batch_size} on {world_size} process(es)"
            )

    def __iter__(self):
        epoch, position = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            self.shard.set_epoch(epoch)
            order = list(self.shard)
            for b in range(position, self.batches_per_epoch):
                yield [epoch * self.size + i for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
            epoch, position = epoch + 1, 0


class ModuloIndex(Dataset):
    """Maps the sampler's epoch-numbered indices back to a dataset whose samples do not change
    between epochs (image folders)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index % len(self.dataset)]


@dataclass
class Datasets:
    train: Dataset  # indexed by the sampler's epoch-numbered indices
    validation: Dataset
    description: str


def build_datasets(config: DataConfig, seed: int, substitute: bool = True) -> Datasets:
    """substitute: see ImageFolderDataset (False for evaluation)."""
    size = config.image_size
    if not config.path:
        train = BundledPhotoCrops(BUNDLED_TRAIN, size, config.bundled_epoch_size, seed)
        validation = BundledPhotoTiles(BUNDLED_VALIDATION, size, config.validation_images)
        return Datasets(
            train,
            validation,
            f"bundled photos: random {size}x{size} crops of {len(BUNDLED_TRAIN)} scikit-image photos; "
            f"validation: {len(validation)} tiles of {' and '.join(BUNDLED_VALIDATION)}",
        )
    files = list_images(config.path)
    resize = config.resize or size
    if config.validation_path:
        train_files, validation_files = files, list_images(config.validation_path)
    elif config.validation_fraction > 0 and len(files) > 1:
        # A fixed, seed-independent split: every n-th file is held out.
        every = max(2, round(1 / config.validation_fraction))
        validation_files = files[::every]
        train_files = [f for i, f in enumerate(files) if i % every]
    else:
        raise DataError(
            f"{config.path} alone cannot give validation images: set data.validation_path or "
            f"data.validation_fraction > 0 with at least 2 images"
        )
    validation_files = validation_files[: config.validation_images]
    return Datasets(
        ModuloIndex(ImageFolderDataset(train_files, resize, size, substitute)),
        ImageFolderDataset(validation_files, resize, size, substitute),
        f"{config.path}: {len(train_files)} training and {len(validation_files)} validation images "
        f"(short side {resize}, center crop {size})",
    )


def collate(samples: list[dict]) -> dict:
    """A batch: "image" (None if no sample was readable), "skipped" (unreadable files drawn) and
    "unreadable" (their paths); samples without an image are dropped."""
    images = [s["image"] for s in samples if s["image"] is not None]
    return {
        "image": torch.stack(images) if images else None,
        "skipped": sum(s["skipped"] for s in samples),
        "unreadable": [s["unreadable"] for s in samples if s.get("unreadable")],
    }


# ------------------------------------------------------------------------------------------------
# Files written for the user: never one that was there before the command ran, unless asked to


class OutputExistsError(FileExistsError):
    """An output file exists and the command was not asked to overwrite it."""

    @classmethod
    def at(cls, path: Path) -> OutputExistsError:
        return cls(f"{path} already exists; pass --overwrite to replace it (overwrite=True from Python)")


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Fail before any work if an output exists (a dangling symlink too) and overwrite is off."""
    if not overwrite:
        for path in paths:
            if os.path.lexists(path):
                raise OutputExistsError.at(path)


def give_default_mode(path: Path) -> None:
    """Give a file the mode open() would: 0o666 less the umask. Files made by tempfile.mkstemp or by
    safetensors' save_file are 0600, unreadable to the group and others unlike every other output."""
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it: put it back at once
    path.chmod(0o666 & ~umask)


def write_new(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Create `path` through write(temporary path in the same folder), moved into place at once: a
    reader never sees half a file, and without `overwrite` an existing file (even one made meanwhile)
    is never replaced (os.link fails if the name exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        give_default_mode(temporary)
        if overwrite:
            os.replace(temporary, path)
            return path
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise OutputExistsError.at(path) from None
        except OSError:  # no hard links here (some network and FAT file systems): check, then rename
            refuse_existing([path], overwrite)
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
