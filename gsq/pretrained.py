"""Pretrained networks the recipe needs (VGG16 for LPIPS, DINOv2 for the discriminator; issue #7
adds AlexNet and InceptionV3 the same way): from an explicit local file, else from the file named by
an environment variable, else from the hub (downloaded, or found in the torch / Hugging Face cache).

When none of these works the caller gets WeightsUnavailable, listing every attempt, and decides:
the trainer falls back as configured, says so in one loud warning and records it in the run's
files. It never trains silently against a randomly initialised network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class WeightsUnavailable(RuntimeError):
    """No local file was given and the hub did not work: the caller may fall back."""


class WeightsFileError(ValueError):
    """A weights file was given (option or environment variable) but cannot be used: an error,
    never a reason to fall back."""


def load_state_dict_file(path: str | Path) -> dict:
    """Tensors of a .safetensors file, or of a torch file holding a state dict (possibly nested
    under 'state_dict' / 'model' / 'model_state_dict'), loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def resolve(what: str, explicit: str, env_var: str, from_file: Callable[[str], T],
            from_hub: Callable[[], T]) -> tuple[T, str]:
    """(loaded object, where it came from): the explicit file, else $env_var, else the hub. A file
    that is given but fails raises WeightsFileError (the user asked for it); a failing hub raises
    WeightsUnavailable."""
    for label, path in (("option", explicit), (f"${env_var}", os.environ.get(env_var, ""))):
        if path:
            try:
                return from_file(path), f"{label}: {path}"
            except Exception as error:  # noqa: BLE001 - re-raised with the source named
                raise WeightsFileError(f"could not load {what} weights from {label} {path}: "
                                         f"{type(error).__name__}: {error}") from error
    try:
        return from_hub(), "hub"
    except Exception as error:  # noqa: BLE001 - offline, missing package, ...: all mean "unavailable"
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise WeightsUnavailable(
            f"no pretrained weights for {what}: no local file given (option or ${env_var}) and the hub "
            f"failed ({type(error).__name__}: {reason})") from None


def torchvision_state_dict(url: str) -> dict:
    """A torchvision checkpoint from the torch hub cache, downloading it if needed."""
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=False)
