"""Loads the compiled kernels (gsq_kernels._C) once, at import.

Order: the library built by `pip install` if it was built against the torch now running; otherwise
compile it now with torch.utils.cpp_extension (ninja) into the user cache, with one log line; if
that fails too, the package still imports and the reference backend serves every call (warning).

Environment: GSQ_KERNELS_CACHE (where import-time builds go, default ~/.cache/gsq_kernels),
GSQ_KERNELS_FORCE_COMPILE=1 (ignore the prebuilt library), GSQ_NO_COMPILE=1 (never compile at
import), GSQ_DISABLE_EXTENSION=1 (reference only), GSQ_NO_CUDA=1 (CPU kernels only).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _build_config as build_config

log = logging.getLogger("gsq_kernels")


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    with_cuda: bool
    origin: str  # "prebuilt", "compiled at import (<folder>)", or why it is missing
    cuda_skipped: str = ""  # why a loaded library has no CUDA kernels (GSQ_NO_CUDA=1, CPU-only torch, ...)


def prebuilt_mismatch(info_path: Path) -> str | None:
    """None when the library described by info_path was built for this torch and Python;
    otherwise why it cannot be used."""
    if not info_path.is_file():
        return "no prebuilt gsq_kernels._C was found"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as error:
        return f"{info_path.name} is unreadable ({error})"
    if info.get("torch_version") != torch.__version__:
        return (
            f"gsq_kernels._C was built against torch {info.get('torch_version')} but torch "
            f"{torch.__version__} is running"
        )
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if info.get("python") != python:
        return f"gsq_kernels._C was built for Python {info.get('python')}, this is {python}"
    return None


def _cache_folder(with_cuda: bool) -> Path:
    root = os.environ.get("GSQ_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gsq_kernels"
    )
    digest = hashlib.sha256()
    for path in build_config.input_files():  # compiled and included files alike
        digest.update(path.read_bytes())
    tag = (
        f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-"
        f"{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:12]}"
    )
    return Path(root) / tag.replace("+", "_")


def _compile_now(reason: str) -> ExtensionStatus:
    from torch.utils import cpp_extension

    with_cuda, cuda_reason = build_config.cuda_toolkit_status()
    folder = _cache_folder(with_cuda)
    folder.mkdir(parents=True, exist_ok=True)
    log.warning(
        "gsq_kernels: %s; compiling the kernels for torch %s into %s (once; this takes a minute or two)%s",
        reason,
        torch.__version__,
        folder,
        "" if with_cuda else f" [CPU only: {cuda_reason}]",
    )
    if with_cuda:
        build_config.ensure_cuda_arch_list()
    cpp_extension.load(
        name="gsq_kernels_C",
        sources=build_config.sources(with_cuda),
        extra_cflags=build_config.cxx_flags(with_cuda),
        extra_cuda_cflags=build_config.nvcc_flags() if with_cuda else None,
        extra_ldflags=build_config.link_flags(),
        extra_include_paths=build_config.include_dirs(with_cuda),
        build_directory=str(folder),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    return ExtensionStatus(True, with_cuda, f"compiled at import into {folder}", cuda_reason)


def load() -> ExtensionStatus:
    if os.environ.get("GSQ_DISABLE_EXTENSION", "0") == "1":
        return ExtensionStatus(False, False, "GSQ_DISABLE_EXTENSION=1 is set")
    info_path = Path(__file__).resolve().parent / build_config.BUILD_INFO_FILE
    mismatch = prebuilt_mismatch(info_path)
    if os.environ.get("GSQ_KERNELS_FORCE_COMPILE", "0") == "1":
        mismatch = "GSQ_KERNELS_FORCE_COMPILE=1 is set"
    if mismatch is None:
        try:
            importlib.import_module("gsq_kernels._C")
            info = json.loads(info_path.read_text())
            return ExtensionStatus(True, bool(info.get("with_cuda")), "prebuilt", info.get("cuda_skipped", ""))
        except (ImportError, OSError) as error:
            mismatch = f"gsq_kernels._C failed to load ({error})"
    if os.environ.get("GSQ_NO_COMPILE", "0") == "1":
        warnings.warn(
            f"gsq_kernels: {mismatch}; GSQ_NO_COMPILE=1 forbids compiling it now, so only "
            "the reference backend is available",
            RuntimeWarning,
            stacklevel=3,
        )
        return ExtensionStatus(False, False, mismatch)
    try:
        return _compile_now(mismatch)
    except Exception as error:  # a failed build must not make the package unimportable
        warnings.warn(
            f"gsq_kernels: {mismatch}, and compiling it failed ({type(error).__name__}: "
            f"{error}). Falling back to the pure-PyTorch reference backend (slow, memory-"
            "hungry). Reinstall with `pip install --no-build-isolation -e .` to see the "
            "build log.",
            RuntimeWarning,
            stacklevel=3,
        )
        return ExtensionStatus(False, False, f"{mismatch}; compiling failed: {error}")


STATUS = load()
