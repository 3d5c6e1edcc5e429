"""The optional dependencies (the package's extras) a command needs, checked before it starts: a
missing one is one line naming the extra to install, not a ModuleNotFoundError halfway through a
run that has already written its run folder."""

from __future__ import annotations

import importlib.util

INSTALL = 'pip install "gsq-kernels[{extra}]"'


class MissingExtra(ImportError):
    """A package of an extra (train, eval) is not installed."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None  # finds it without importing it
    except (ImportError, ValueError):
        return False


def require(extra: str, needs: dict[str, tuple[str, ...]]) -> None:
    """needs: {what a package is for: its modules}. Raises MissingExtra for the first purpose that
    has a module missing, naming the extra that provides it."""
    for purpose, modules in needs.items():
        missing = [module for module in modules if not _installed(module)]
        if missing:
            names = " and ".join(missing)
            raise MissingExtra(
                f"{purpose} needs {names}, which {'is' if len(missing) == 1 else 'are'} not "
                f"installed: {INSTALL.format(extra=extra)}"
            )


def training_needs(config) -> dict[str, tuple[str, ...]]:
    """What a training run of this RunConfig imports beyond the base dependencies (TensorBoard is
    used only when installed)."""
    needs = {}
    if config.loss.perceptual != 0:
        needs[f"the LPIPS perceptual loss (loss.perceptual={config.loss.perceptual}; 0 turns it off)"] = (
            "lpips",
            "torchvision",
        )
    if config.discriminator.kind == "dino":
        needs["the DINOv2 discriminator (discriminator.kind=dino)"] = ("timm",)
    return needs


def require_for_training(config) -> None:
    require("train", training_needs(config))


EVALUATION_NEEDS = {
    "rFID (InceptionV3 features)": ("torch_fidelity",),
    "LPIPS (AlexNet)": ("lpips", "torchvision"),
}


def require_for_evaluation() -> None:
    require("eval", EVALUATION_NEEDS)
