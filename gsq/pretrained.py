"""Pretrained networks the recipe needs (VGG16 for LPIPS, DINOv2 for the discriminator; AlexNet
and InceptionV3 for evaluation): from an explicit local file, else from the file named by an
environment variable, else from the hub (downloaded, or found in the torch / Hugging Face cache).

When none of these works the caller gets WeightsUnavailable, one line saying what is missing, why
and how to provide it, and decides: the trainer falls back as configured, says so in one warning and
records it in the run's files. It never trains silently against a randomly initialised network.

Hub downloads go through hub_file / hf_hub_file, which look in the cache first and, on a machine
that cannot reach the host, fail at once and silently: no "Downloading ..." line, no retries.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import torch

T = TypeVar("T")
REACH_TIMEOUT_S = 10.0  # the reachability probe; a download itself has no time limit


class HubUnreachable(OSError):
    """The host that serves the weights cannot be reached (offline, DNS or proxy failure)."""


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


def resolve(
    what: str,
    explicit: str,
    env_var: str,
    from_file: Callable[[str], T],
    from_hub: Callable[[], T],
    option: str = "",
    file: str = "the weights file",
) -> tuple[T, str]:
    """(loaded object, where it came from): the explicit file, else $env_var, else the hub. A file
    that is given but fails raises WeightsFileError (the user asked for it); a failing hub raises
    WeightsUnavailable, whose message names `file` and how to give it (`option`, e.g.
    "loss.vgg_weights=FILE", and the environment variable)."""
    for label, path in (("option", explicit), (f"${env_var}", os.environ.get(env_var, ""))):
        if path:
            try:
                return from_file(path), f"{label}: {path}"
            except Exception as error:  # re-raised with the source named
                raise WeightsFileError(
                    f"could not load {what} weights from {label} {path}: {type(error).__name__}: {error}"
                ) from error
    try:
        return from_hub(), "hub"
    except Exception as error:  # offline, missing package, ...: all mean "unavailable"
        give = f"{option} or {env_var}=FILE" if option else f"{env_var}=FILE"
        raise WeightsUnavailable(
            f"no pretrained weights for {what}: {hub_failure(error)}; give {file} with {give}"
        ) from None


def hub_failure(error: BaseException) -> str:
    """Why a hub load failed, in a few words."""
    if isinstance(error, HubUnreachable):
        return str(error)
    text = str(error).strip()
    return f"the hub failed ({type(error).__name__}{': ' + text.splitlines()[0][:160] if text else ''})"


def check_reachable(url: str) -> None:
    """Raises HubUnreachable unless url's host answers within REACH_TIMEOUT_S: a HEAD request, so
    nothing is downloaded."""
    host = urlparse(url).netloc
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "gsq"})
    try:
        urllib.request.urlopen(request, timeout=REACH_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the host answered (a refused HEAD, a missing file): the download says what is wrong
    except OSError as error:  # URLError, timeouts and socket errors are all OSErrors
        reason = getattr(error, "reason", error)
        raise HubUnreachable(f"offline or {host} unreachable ({reason})") from None


def hub_file(url: str) -> str:
    """The file at url in torch's hub cache (<torch hub dir>/checkpoints, where torch.hub and
    torch-fidelity keep it too), downloaded there first if it is missing and the host answers."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        return str(cached)
    check_reachable(url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {cached}", file=sys.stderr)
    torch.hub.download_url_to_file(url, str(cached), progress=True)  # via a temporary file
    return str(cached)


def hf_hub_file(repo_id: str, filename: str) -> str:
    """A file of a Hugging Face hub repository, from its cache or downloaded (huggingface_hub comes
    with timm). Checked for reachability first: offline, huggingface_hub retries for most of a minute."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    check_reachable(f"https://huggingface.co/{repo_id}/resolve/main/{filename}")
    return hf_hub_download(repo_id, filename)


def torchvision_state_dict(url: str) -> dict:
    """A torchvision checkpoint (weights only) from the torch hub cache, downloading it if needed.
    torch.hub reads it once it is cached (it also knows the legacy zip layout of older files)."""
    hub_file(url)
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
