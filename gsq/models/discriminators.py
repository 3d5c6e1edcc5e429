"""Discriminators of GSQ-GAN (docs/spec.md, "Architecture").

- DinoDiscriminator, the paper's default: a frozen DINOv2 ViT-S/14 with registers (timm) reads
  DiffAugment-ed images; trainable heads on its patch-embedding tokens and on the outputs of
  blocks 2, 5, 8, 11 give one logit per token (the projected discriminator of StyleGAN-T).
- PatchGAN: the pix2pix N-layer convolutional discriminator (the paper's ablation: 3 layers, 64
  channels).
Both take images in [-1, 1] and return logits (B, N).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pretrained import hf_hub_file, load_state_dict_file, resolve

DINO_MODEL = "vit_small_patch14_reg4_dinov2.lvd142m"  # timm's DINOv2 ViT-S/14 with 4 registers
DINO_HOOKS = (2, 5, 8, 11)  # blocks whose outputs get a head (plus the patch-embedding tokens)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020): differentiable augmentations of real and fake inputs alike, drawn
# from the global torch RNG (saved in checkpoints, so resumed runs draw the same ones).


def _brightness(x: Tensor) -> Tensor:
    return x + (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)


def _saturation(x: Tensor) -> Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (2 * torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)) + mean


def _contrast(x: Tensor) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def _translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Shift each image by up to ratio * size pixels in each direction, filling with zeros."""
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (b, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    source = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    return x.flatten(2).gather(2, source).view_as(x) * inside.unsqueeze(1).to(x.dtype)


def _cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """Zero one random square of side ratio * size per image (it may overhang the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    hole = ((rows - cy).abs() * 2 < ch) & ((cols - cx).abs() * 2 < cw)
    return x * (~hole).unsqueeze(1).to(x.dtype)


AUGMENTATIONS = {"color": (_brightness, _saturation, _contrast), "translation": (_translation,), "cutout": (_cutout,)}


def diff_augment(x: Tensor, policy: str) -> Tensor:
    """Apply the comma-separated policies in order (e.g. "color,translation,cutout")."""
    for name in filter(None, (p.strip() for p in policy.split(","))):
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown DiffAugment policy {name!r}; known: {', '.join(AUGMENTATIONS)}")
        for augment in AUGMENTATIONS[name]:
            x = augment(x)
    return x


# ------------------------------------------------------------------------------------------------


class PatchGAN(nn.Module):
    """pix2pix N-layer discriminator: conv4x4/2 + LeakyReLU; (layers - 1) x [conv4x4/2 + BN +
    LeakyReLU] doubling the channels (at most 8x); conv4x4/1 + BN + LeakyReLU; conv4x4/1 -> one
    logit per patch. Initialised as the reference (Kaiming "linear"; the last conv x 0.1 so the
    first logits sit in the sigmoid's linear range)."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        convs: list[nn.Conv2d] = [nn.Conv2d(in_channels, channels, 4, 2, 1)]
        blocks: list[nn.Module] = [convs[-1], nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers):
            out = channels * min(2**n, 8)
            convs.append(nn.Conv2d(width, out, 4, 2, 1, bias=False))
            blocks += [convs[-1], nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        out = channels * min(2**layers, 8)
        convs.append(nn.Conv2d(width, out, 4, 1, 1, bias=False))
        convs.append(nn.Conv2d(out, 1, 4, 1, 1, bias=False))
        blocks += [convs[-2], nn.BatchNorm2d(out), nn.LeakyReLU(0.2), convs[-1]]
        self.blocks = nn.Sequential(*blocks)
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="linear")
        convs[-1].weight.data.mul_(0.1)

    def forward(self, images: Tensor) -> Tensor:
        return self.blocks(images).flatten(1)


class TokenBlock(nn.Module):
    """conv1d over the token axis (circular padding) + BatchNorm + LeakyReLU(0.2)."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class DinoHead(nn.Module):
    """Token features (B, C, N) -> logits (B, 1, N): a k=1 block, a residual k=9 block (sum scaled by
    1/sqrt 2), then conv1d -> 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = TokenBlock(channels, 1)
        self.residual = TokenBlock(channels, 9)
        self.logits = nn.Conv1d(channels, 1, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.block(tokens)
        h = (self.residual(h) + h) / math.sqrt(2)
        return self.logits(h)


def create_dino_backbone(resolution: int = 518, **overrides) -> nn.Module:
    """An untrained timm DINOv2 ViT-S/14-reg at `resolution` (overrides shrink it for tests)."""
    import timm

    return timm.create_model(DINO_MODEL, pretrained=False, img_size=resolution, num_classes=0, **overrides)


def dino_state_dict_for(model: nn.Module, state: dict) -> dict:
    """A DINOv2 state dict in timm's layout for `model`: original (facebookresearch) checkpoints
    are converted by timm's filter, and position embeddings resampled to the model's grid."""
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import checkpoint_filter_fn

    if "register_tokens" in state or "mask_token" in state:  # the original dinov2 layout
        state = checkpoint_filter_fn(state, model)
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=0)
    return state


def dino_from_hub(resolution: int) -> nn.Module:
    """DINOv2 ViT-S/14-reg with timm's pretrained weights from the Hugging Face hub (or its cache),
    loaded as a local file is: offline, hf_hub_file fails at once where timm would retry."""
    state = load_state_dict_file(hf_hub_file(f"timm/{DINO_MODEL}", "model.safetensors"))
    model = create_dino_backbone(resolution)
    model.load_state_dict(dino_state_dict_for(model, state), strict=True)
    return model


def build_dino_backbone(weights_file: str = "", resolution: int = 518) -> tuple[nn.Module, str]:
    """The frozen DINOv2 ViT-S/14-reg: from weights_file, $GSQ_DINO_WEIGHTS or the hub (timm).
    Raises WeightsUnavailable (nothing found) or WeightsFileError (a given file is unusable)."""

    def from_file(path: str) -> nn.Module:
        model = create_dino_backbone(resolution)
        model.load_state_dict(dino_state_dict_for(model, load_state_dict_file(path)), strict=True)
        return model

    model, source = resolve(
        "the DINOv2 discriminator backbone",
        weights_file,
        "GSQ_DINO_WEIGHTS",
        from_file,
        lambda: dino_from_hub(resolution),
        option="discriminator.dino_weights=FILE",
        file="a DINOv2 ViT-S/14-reg state dict (timm or original layout)",
    )
    return model.eval().requires_grad_(False), source


class DinoDiscriminator(nn.Module):
    """Frozen DINOv2 features -> trainable token heads -> logits (B, heads * tokens).

    As the reference: DiffAugment on the [-1, 1] input (in training mode), an "area" resize to
    the backbone's resolution, then ImageNet mean/std normalisation applied directly to the
    [-1, 1] values (the reference skips the [0, 1] mapping, reporting it made no difference)."""

    def __init__(self, backbone: nn.Module, diffaugment: str = "color,translation,cutout") -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.diffaugment = diffaugment
        self.resolution = tuple(backbone.patch_embed.img_size)
        self.heads = nn.ModuleList(DinoHead(backbone.embed_dim) for _ in range(1 + len(DINO_HOOKS)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen, always in inference mode
        return self

    def token_features(self, images: Tensor) -> list[Tensor]:
        """The patch-embedding tokens (with class and register tokens, position-embedded) and the
        outputs of blocks 2, 5, 8, 11, each (B, C, tokens)."""
        vit = self.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        features = [x]
        for index, block in enumerate(vit.blocks[: max(DINO_HOOKS) + 1]):
            x = block(x)
            if index in DINO_HOOKS:
                features.append(x)
        return [f.transpose(1, 2) for f in features]

    def forward(self, images: Tensor) -> Tensor:
        if self.training and self.diffaugment:
            images = diff_augment(images, self.diffaugment)
        x = F.interpolate(images, size=self.resolution, mode="area")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        logits = [head(tokens) for head, tokens in zip(self.heads, self.token_features(x))]
        return torch.cat([logit.flatten(1) for logit in logits], dim=1)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
