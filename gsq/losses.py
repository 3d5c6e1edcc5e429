"""Losses of GSQ-GAN (docs/spec.md, "Recipe").

Generator: 1.0 x MSE + 1.0 x LPIPS(VGG) + 1.0 x quantizer loss + 0.1 x non-saturating adversarial
loss; discriminator: 1.0 x hinge loss. No adaptive weight, no gradient penalty, no LeCAM.
"""

from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch import Tensor, nn

from .pretrained import load_state_dict_file, resolve, torchvision_state_dict

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """(relu(1 - D(real)) + relu(1 + D(fake))) / 2, averaged over every logit."""
    return (F.relu(1.0 - real_logits.float()) + F.relu(1.0 + fake_logits.float())).mean() / 2


def non_saturating_generator_loss(fake_logits: Tensor) -> Tensor:
    """-log sigmoid(D(fake)) = softplus(-D(fake)), reduced as the reference: each image's logits
    (tokens or patches) are averaged first, then the loss is averaged over images."""
    per_image = fake_logits.reshape(fake_logits.shape[0], -1).float().mean(dim=1)
    return F.softplus(-per_image).mean()


# LPIPS backbones: (name in messages, torchvision IMAGENET1K_V1 weights, environment variable).
LPIPS_BACKBONES = {
    "vgg": ("VGG16", VGG16_URL, "GSQ_VGG_WEIGHTS"),  # the training loss
    "alex": ("AlexNet", ALEXNET_URL, "GSQ_ALEXNET_WEIGHTS"),  # the evaluation metric
}
LPIPS_OPTIONS = {"vgg": "loss.vgg_weights=FILE", "alex": "--alexnet-weights FILE"}  # named when missing


def load_torchvision_features(model: nn.Module, state: dict) -> nn.Module:
    """Copy torchvision VGG16 / AlexNet `features.*` tensors into an lpips.LPIPS backbone (its
    slices keep torchvision's layer indices as module names)."""
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError("no 'features.*' tensors: expected a torchvision VGG16 / AlexNet state dict")
    copied = 0
    for slice_module in model.net.children():
        for index, layer in slice_module.named_children():
            for name, parameter in layer.named_parameters(recurse=False):
                key = f"{index}.{name}"
                if key not in features:
                    raise ValueError(f"features.{key} is missing")
                if features[key].shape != parameter.shape:
                    raise ValueError(
                        f"features.{key} has shape {tuple(features[key].shape)}, expected {tuple(parameter.shape)}"
                    )
                parameter.data.copy_(features[key])
                copied += 1
    if copied == 0:
        raise ValueError("no backbone layers found in the LPIPS network")
    return model


def build_lpips(net: str = "vgg", weights_file: str = "") -> tuple[nn.Module, str]:
    """A frozen LPIPS network ("vgg" or "alex"). Its linear heads ship inside the lpips package;
    the backbone comes from weights_file, the backbone's environment variable or the torchvision
    hub. Raises WeightsUnavailable (nothing found) or WeightsFileError (a given file is unusable)."""
    import lpips

    if net not in LPIPS_BACKBONES:
        raise ValueError(f"net must be one of {', '.join(LPIPS_BACKBONES)}, got {net!r}")
    label, url, env_var = LPIPS_BACKBONES[net]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notes about `pretrained`
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    model, source = resolve(
        f"LPIPS ({label})",
        weights_file,
        env_var,
        lambda path: load_torchvision_features(model, load_state_dict_file(path)),
        lambda: load_torchvision_features(model, torchvision_state_dict(url)),
        option=LPIPS_OPTIONS[net],
        file=f"torchvision's {url.rsplit('/', 1)[-1]}",
    )
    return model.eval().requires_grad_(False), source


def build_lpips_vgg(weights_file: str = "") -> tuple[nn.Module, str]:
    return build_lpips("vgg", weights_file)


class PerceptualLoss(nn.Module):
    """LPIPS-VGG between images in [-1, 1], averaged over the batch; the network stays frozen and
    in inference mode (no dropout) whatever mode its parent is in."""

    def __init__(self, lpips_model: nn.Module) -> None:
        super().__init__()
        self.lpips = lpips_model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        return self.lpips(reconstruction, target).mean()
