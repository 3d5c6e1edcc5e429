"""`gsq convert` on checkpoints laid out as flex_gen writes them.

The state dicts are built here from flex_gen's constructor logic (flat `blocks` lists in forward
order, `fianl_layers` (sic), an nn.Embedding codebook, per-level ResBlock counts `*_layer_configs`
whose last entry is the mid count), and saved the ways the official code saves them: FlexTokenizer
.pt files carry the pickled constructor arguments, OmegaConf containers included when the official
training script built the model; trainer checkpoints ({model, ema_model, ...}), bare state dicts and
safetensors carry none. A converted model is checked against `flex_gen_reconstruct`, an independent
float64 forward pass over the flat flex_gen tensors, written here from the architecture."""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from gsq import checkpoint as ckpt
from gsq import convert as convert_module
from gsq.cli import main as gsq_main
from gsq.config import preset
from gsq.convert import (
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    infer_model_config,
    load_flex_gen,
    read_constructor_arguments,
)
from gsq.models import GSQTokenizer, count_parameters
from gsq.models.layers import (
    AdaptiveGroupNorm,
    AttentionBlock,
    DepthToSpaceUpsample,
    Downsample,
    NearestUpsample,
    ResBlock,
)

# FlexTokenizer's constructor defaults (its signature): what the pickled arguments hold for every
# key the training config does not set.
FLEX_DEFAULTS = dict(
    input_channels=3,
    hidden_channels=128,
    encoder_layer_configs=(4, 3, 4, 3, 4),
    decoder_layer_configs=(3, 4, 3, 4, 4),
    channel_multipliers=(1, 2, 2, 4),
    mid_block_attn=False,
    attention_resolutions=(),
    embedding_dim=4,
    use_adaptive_norm=False,
    use_learnable_up_down_sample=False,
    residual_conv_kernel_size=3,
    input_conv_kernel_size=3,
    output_conv_kernel_size=3,
    dropout_probability=0.0,
    quantizer_aux_loss_weight=1.0,
    quantizer_config={"quantize_type": "vq", "embed_dim": 4, "num_embed": 8192},
)

# Two small architectures: the paper's choices (depth-to-space, adaptive norm, mid attention), and
# the constructor's defaults (nearest up-sampling, plain norms, no attention) with per-level counts
# that differ between levels and between the encoder and the decoder.
PAPER = dict(
    hidden_channels=32,
    channel_multipliers=[1, 2],
    encoder_layer_configs=[1, 2, 2],
    decoder_layer_configs=[2, 1, 3],
    mid_block_attn=True,
    use_adaptive_norm=True,
    use_learnable_up_down_sample=True,
    embedding_dim=8,
)
DEFAULTS = dict(
    hidden_channels=32,
    channel_multipliers=[1, 2],
    encoder_layer_configs=[2, 1, 3],
    decoder_layer_configs=[1, 2, 2],
    embedding_dim=8,
)
# Attention on, but one mid ResBlock in the encoder (so no attention block there), plain norms.
LOPSIDED = dict(
    hidden_channels=32,
    channel_multipliers=[1, 2],
    encoder_layer_configs=[1, 2, 1],
    decoder_layer_configs=[2, 1, 3],
    mid_block_attn=True,
    use_learnable_up_down_sample=True,
    embedding_dim=8,
)


# ------------------------------------------------------------------------------------------------
# flex_gen's layout


def _conv(state, name, out_channels, in_channels, kernel):
    state[f"{name}.weight"] = torch.empty(out_channels, in_channels, kernel, kernel)
    state[f"{name}.bias"] = torch.empty(out_channels)


def _norm(state, name, channels):
    state[f"{name}.weight"] = torch.empty(channels)
    state[f"{name}.bias"] = torch.empty(channels)


def _resnet(state, name, c_in, c_out):
    _norm(state, f"{name}.net.0", c_in)
    _conv(state, f"{name}.net.2", c_out, c_in, 3)
    _norm(state, f"{name}.net.3", c_out)
    _conv(state, f"{name}.net.6", c_out, c_out, 3)
    if c_in != c_out:
        _conv(state, f"{name}.skip", c_out, c_in, 1)


def _attention(state, name, c):
    _norm(state, f"{name}.norm", c)
    _conv(state, f"{name}.qkv_conv", 3 * c, c, 1)
    _conv(state, f"{name}.proj_conv", c, c, 1)


def _adaptive_norm(state, name, c, cond):
    state[f"{name}.gamma.weight"], state[f"{name}.gamma.bias"] = torch.empty(c, cond), torch.empty(c)
    state[f"{name}.beta.weight"], state[f"{name}.beta.bias"] = torch.empty(c, cond), torch.empty(c)


def flex_gen_state_dict(
    hidden_channels=32,
    channel_multipliers=(1, 2),
    encoder_layer_configs=(1, 1, 2),
    decoder_layer_configs=(1, 1, 2),
    mid_block_attn=True,
    use_adaptive_norm=True,
    use_learnable_up_down_sample=True,
    embedding_dim=8,
    code_dim=2,
    codebook=16,
    values="markers",
    device="cpu",
    **_,
):
    """The tensors of flex_gen's FlexTokenizer with the GSQ quantizer, in its order, and the
    (network, index) of every block in construction (= forward) order. values: "markers" (every
    tensor of block k is k), "random" (a forward pass stays finite) or "meta" (shapes only)."""
    with torch.device("meta" if values == "meta" else device):
        state, blocks = _flex_gen_tensors(
            hidden_channels,
            list(channel_multipliers),
            list(encoder_layer_configs),
            list(decoder_layer_configs),
            mid_block_attn,
            use_adaptive_norm,
            use_learnable_up_down_sample,
            embedding_dim,
            code_dim,
            codebook,
        )
    if values != "meta":
        _fill(state, values)
    return state, blocks


def _flex_gen_tensors(
    hidden,
    multipliers,
    encoder_layers,
    decoder_layers,
    attention,
    adaptive,
    depth_to_space,
    embedding_dim,
    code_dim,
    codebook,
):
    state, blocks, index = {}, [], {"encoder": 0, "decoder": 0}

    def add(kind, network, *args):
        kind(state, f"{network}.blocks.{index[network]}", *args)
        blocks.append((network, index[network]))
        index[network] += 1

    _conv(state, "encoder.conv_in", hidden, 3, 3)
    c_in = hidden
    for level, multiplier in enumerate(multipliers):
        c_out = hidden * multiplier
        if c_in != c_out:
            add(_resnet, "encoder", c_in, c_out)
        for _ in range(encoder_layers[level]):
            add(_resnet, "encoder", c_out, c_out)
        if level < len(multipliers) - 1:
            add(lambda s, n, c: _conv(s, f"{n}.conv", c, c, 3), "encoder", c_out)
        c_in = c_out
    for k in range(encoder_layers[-1]):
        add(_resnet, "encoder", c_in, c_in)
        if attention and k < encoder_layers[-1] - 1:
            add(_attention, "encoder", c_in)
    _norm(state, "encoder.fianl_layers.0", c_in)
    _conv(state, "encoder.fianl_layers.2", embedding_dim, c_in, 1)

    channels = hidden * multipliers[-1]
    _conv(state, "decoder.conv_in", channels, embedding_dim, 3)
    for k in range(decoder_layers[-1]):
        add(_resnet, "decoder", channels, channels)
        if attention and k < decoder_layers[-1] - 1:
            add(_attention, "decoder", channels)
    if adaptive:
        add(_adaptive_norm, "decoder", channels, embedding_dim)
    c_in = channels
    for level in reversed(range(len(multipliers))):
        c_out = hidden * multipliers[level]
        if c_in != c_out:
            add(_resnet, "decoder", c_in, c_out)
        for _ in range(decoder_layers[level]):
            add(_resnet, "decoder", c_out, c_out)
        if level > 0:
            factor = 4 if depth_to_space else 1
            add(lambda s, n, c, factor=factor: _conv(s, f"{n}.conv", factor * c, c, 3), "decoder", c_out)
            if adaptive:
                add(_adaptive_norm, "decoder", c_out, embedding_dim)
        c_in = c_out
    _norm(state, "decoder.final_layers.0", c_in)
    _conv(state, "decoder.final_layers.2", 3, c_in, 3)
    state["quantizers.codebook.weight"] = torch.empty(codebook, code_dim)
    return state, blocks


def _fill(state, values):
    generator = torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        parts = name.split(".")
        if values == "markers" and parts[1] == "blocks":
            tensor.fill_(float(parts[2]))  # the block's index: the forward hooks read it back
        elif values == "markers" or name.startswith("quantizers"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        elif name.endswith("bias"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        elif tensor.dim() == 1:  # GroupNorm scale
            tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
        else:  # conv / linear: unit gain, so activations stay O(1)
            tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor[0].numel()))
    if values == "random":  # rows of varied norms: the l2 and the plain lookups then disagree
        codebook = state["quantizers.codebook.weight"]
        codebook.mul_(torch.exp(torch.randn(codebook.shape[0], 1, generator=generator)))


# ------------------------------------------------------------------------------------------------
# An independent float64 forward pass over the flat flex_gen tensors


def _gn(x, state, name, eps=1e-5):
    return F.group_norm(x, 32, state.get(f"{name}.weight"), state.get(f"{name}.bias"), eps)


def _apply_conv(x, state, name, stride=1):
    weight = state[f"{name}.weight"]
    return F.conv2d(x, weight, state[f"{name}.bias"], stride=stride, padding=weight.shape[-1] // 2)


def _depth_to_space(y):
    """Channel (i*2 + j)*C + k at (h, w) -> channel k at (2h + i, 2w + j)."""
    b, c4, h, w = y.shape
    c = c4 // 4
    out = y.new_empty(b, c, 2 * h, 2 * w)
    for i in range(2):
        for j in range(2):
            out[:, :, i::2, j::2] = y[:, (i * 2 + j) * c : (i * 2 + j + 1) * c]
    return out


def _flex_block(x, state, name, quantized):
    if f"{name}.net.2.weight" in state:  # ResNetBlock: GN, SiLU, conv, GN, SiLU, dropout, conv (+ skip)
        h = _apply_conv(F.silu(_gn(x, state, f"{name}.net.0")), state, f"{name}.net.2")
        h = _apply_conv(F.silu(_gn(h, state, f"{name}.net.3")), state, f"{name}.net.6")
        return h + (_apply_conv(x, state, f"{name}.skip") if f"{name}.skip.weight" in state else x)
    if f"{name}.qkv_conv.weight" in state:  # single-head attention over the positions
        b, c, h, w = x.shape
        qkv = _apply_conv(_gn(x, state, f"{name}.norm", 1e-6), state, f"{name}.qkv_conv")
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 3 * c).split(c, dim=2)
        attended = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
        return x + _apply_conv(attended.reshape(b, h, w, c).permute(0, 3, 1, 2), state, f"{name}.proj_conv")
    if f"{name}.gamma.weight" in state:  # adaptive GroupNorm conditioned on the quantized map
        flat = quantized.flatten(2)
        scale = F.linear((flat.var(dim=-1) + 1e-6).sqrt(), state[f"{name}.gamma.weight"], state[f"{name}.gamma.bias"])
        shift = F.linear(flat.mean(dim=-1), state[f"{name}.beta.weight"], state[f"{name}.beta.bias"])
        return F.group_norm(x, 32, eps=1e-6) * scale[..., None, None] + shift[..., None, None]
    weight = state[f"{name}.conv.weight"]
    if name.startswith("encoder"):
        return _apply_conv(x, state, f"{name}.conv", stride=2)
    if weight.shape[0] == weight.shape[1]:
        return _apply_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), state, f"{name}.conv")
    return _depth_to_space(_apply_conv(x, state, f"{name}.conv"))


def _run_blocks(x, state, network, quantized=None):
    i = 0
    while any(k.startswith(f"{network}.blocks.{i}.") for k in state):
        x = _flex_block(x, state, f"{network}.blocks.{i}", quantized)
        i += 1
    return x


def flex_gen_reconstruct(state, images, l2_normalize):
    """(reconstruction, indices (B, h, w, G)) of the flex_gen tokenizer `state` in float64, with the
    lookup argmin_j ||n - c_j|| over l2-normalized (or raw) vectors, the raw codebook row out."""
    state = {k: v.double() for k, v in state.items()}
    h = _run_blocks(_apply_conv(images.double(), state, "encoder.conv_in"), state, "encoder")
    latent = _apply_conv(F.silu(_gn(h, state, "encoder.fianl_layers.0")), state, "encoder.fianl_layers.2")
    codebook = state["quantizers.codebook.weight"]
    b, d_total, height, width = latent.shape
    rows = latent.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    if l2_normalize:
        indices = torch.cdist(F.normalize(rows, dim=-1), F.normalize(codebook, dim=-1)).argmin(dim=-1)
    else:
        indices = torch.cdist(rows, codebook).argmin(dim=-1)
    quantized = codebook[indices].reshape(b, height, width, d_total).permute(0, 3, 1, 2)
    x = _run_blocks(_apply_conv(quantized, state, "decoder.conv_in"), state, "decoder", quantized)
    out = _apply_conv(F.silu(_gn(x, state, "decoder.final_layers.0")), state, "decoder.final_layers.2")
    return out, indices.reshape(b, height, width, -1)


# ------------------------------------------------------------------------------------------------
# Saving as the official code does


def official_arguments(model_section: dict, quantizer: dict) -> dict:
    """FlexTokenizer's constructor arguments as the official training script produces them: the
    `model` section of an OmegaConf training config (its `name` popped) unpacked over the
    constructor's defaults, so lists and the quantizer config are ListConfig / DictConfig nodes
    whose parent chain reaches the whole training config."""
    omegaconf = pytest.importorskip("omegaconf")
    root = omegaconf.OmegaConf.create(
        {
            "seed": 42,
            "dataset": "imagenet-1k",
            "accelerate": {"mixed_precision": "bf16"},
            "model": {"name": "flexTokenizer", **model_section, "quantizer_config": quantizer},
            "logger": {"dataset_name": "${dataset}", "checkpoint_every_step": 5000},
        }
    )
    section = root.pop("model")
    section.pop("name")
    return copy.deepcopy({**FLEX_DEFAULTS, **{key: section[key] for key in section}})


def save_official(path, layout, state, arguments=None):
    if layout == "flex_tokenizer":  # FlexTokenizer.save: every eval_*.pt of the official trainer
        torch.save({"model_state_dict": state, "config": pickle.dumps(arguments)}, path)
    elif layout == "trainer":  # the trainer's checkpoint: DDP-wrapped models, optimizer, step; no config
        raw = {f"module.{k}": v + 0.01 for k, v in state.items()}
        ema = {f"module.{k}": v for k, v in state.items()}
        torch.save(
            {
                "model": raw,
                "ema_model": ema,
                "discriminator": {"head.weight": torch.ones(2)},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                "lr_scheduler": {"last_epoch": 7},
                "step": 500,
            },
            path,
        )
    elif layout == "state_dict":
        torch.save(state, path)
    else:
        save_file(state, str(path))


CASES = {  # layout, architecture, quantizer config (None: no config), overrides, expected l2, warns
    "flex_tokenizer_l2": ("flex_tokenizer", PAPER, {"use_l2_norm": True}, [], True, False),
    "flex_tokenizer_silent": ("flex_tokenizer", DEFAULTS, {}, [], False, False),
    "trainer": ("trainer", PAPER, None, [], True, True),
    "state_dict_overridden": ("state_dict", DEFAULTS, None, ["model.l2_normalize=false"], False, False),
    "safetensors": ("safetensors", DEFAULTS, None, [], True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_official_checkpoints_convert_and_reconstruct_as_flex_gen(tmp_path, capsys, case):
    layout, architecture, quantizer, overrides, l2_expected, warns = CASES[case]
    state, _ = flex_gen_state_dict(**{**FLEX_DEFAULTS, **architecture}, code_dim=2, codebook=32, values="random")
    arguments = None
    if quantizer is not None:
        quantizer = {"quantize_type": "gsq", "embed_dim": 8, "num_embed": 32, "num_group": 4, **quantizer}
        arguments = official_arguments(architecture, quantizer)
        assert b"omegaconf.dictconfig" in pickle.dumps(arguments)  # as the official script pickles them
    source = tmp_path / ("flex.safetensors" if layout == "safetensors" else "flex.pt")
    save_official(source, layout, state, arguments)

    assert gsq_main(["convert", str(source), str(tmp_path / "out"), *overrides]) == 0
    err = capsys.readouterr().err
    warnings_about_l2 = [line for line in err.splitlines() if "model.l2_normalize" in line]
    assert len(warnings_about_l2) == (1 if warns else 0), err
    if warns:
        assert "assuming model.l2_normalize=true" in warnings_about_l2[0]

    loaded = ckpt.load_checkpoint(tmp_path / "out")
    config = loaded.config.model
    assert config.l2_normalize is l2_expected
    assert (config.latent_channels, config.groups, config.codebook_size) == (8, 4, 32)
    assert config.upsample == ("depth_to_space" if architecture is PAPER else "nearest")
    encoder, decoder = architecture["encoder_layer_configs"], architecture["decoder_layer_configs"]
    if arguments is not None or architecture is PAPER:  # the config, or attention and adaptive norms, split mid
        assert list(config.level_res_blocks("encoder")) + [config.middle_blocks("encoder")] == encoder
        assert list(config.level_res_blocks("decoder")) + [config.middle_blocks("decoder")] == decoder
    info = json.loads((tmp_path / "out" / "state.json").read_text())["run_info"]
    assert info["l2_normalize"]["value"] is l2_expected and "bfloat16" in info["official_lookup"]
    assert info["l2_normalize"]["decided_by"].startswith("assumed") is warns
    assert ("command line" in info["l2_normalize"]["decided_by"]) is bool(overrides)
    assert "random" in info["official_lookup"] and "lowest index" in info["gsq_lookup"]

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    model = loaded.model.double()
    with torch.no_grad():
        out = model(images)
        expected, expected_indices = flex_gen_reconstruct(state, images, l2_expected)
        _, other_indices = flex_gen_reconstruct(state, images, not l2_expected)
    assert torch.equal(out.indices, expected_indices)
    assert not torch.equal(other_indices, expected_indices)  # the two lookups are told apart here
    torch.testing.assert_close(out.reconstruction, expected, rtol=1e-9, atol=1e-9)


def test_trainer_checkpoint_takes_the_ema_weights_unless_asked(tmp_path):
    state, _ = flex_gen_state_dict(values="random")
    save_official(tmp_path / "trainer.pt", "trainer", state)
    loaded_state, arguments = load_flex_gen(tmp_path / "trainer.pt", "ema")
    assert arguments is None and torch.equal(loaded_state["encoder.conv_in.weight"], state["encoder.conv_in.weight"])
    assert gsq_main(["convert", str(tmp_path / "trainer.pt"), str(tmp_path / "raw"), "--weights", "model"]) == 0
    converted = ckpt.load_checkpoint(tmp_path / "raw").model.state_dict()
    torch.testing.assert_close(converted["encoder.stem.weight"], state["encoder.conv_in.weight"] + 0.01)


def test_plain_pickled_arguments_are_read_too(tmp_path):
    state, _ = flex_gen_state_dict(values="random")
    arguments = {
        "quantizer_config": {
            "quantize_type": "gsq",
            "use_l2_norm": False,
            "commitment_loss_weight": 0.5,
            "use_uniform_init": True,
        }
    }
    torch.save({"model_state_dict": state, "config": pickle.dumps(arguments)}, tmp_path / "flex.pt")
    config = infer_model_config(*load_flex_gen(tmp_path / "flex.pt"))
    assert config.l2_normalize is False and config.beta == 0.5 and config.codebook_init == "uniform"
    plain = {
        "a": {1, 2},
        "b": frozenset({3}),
        "c": collections.OrderedDict(x=1),
        "d": collections.defaultdict(dict, y=2),
        "e": (1, [2.5, None]),
        "f": 1 + 2j,
        "g": "s",
        **arguments,
    }
    expected = {**plain, "a": [1, 2], "b": [3], "c": {"x": 1}, "d": {"y": 2}, "e": [1, [2.5, None]]}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert read_constructor_arguments(pickle.dumps(plain, protocol=protocol)) == expected, protocol


@pytest.mark.parametrize("architecture", [PAPER, DEFAULTS, LOPSIDED], ids=["paper", "defaults", "lopsided"])
def test_flex_gen_blocks_land_at_the_same_forward_position(tmp_path, architecture):
    state, blocks = flex_gen_state_dict(**{**FLEX_DEFAULTS, **architecture})
    source = tmp_path / "flex.pt"
    torch.save({"model_state_dict": state, "config": pickle.dumps({"quantizer_config": {"use_l2_norm": True}})}, source)
    loaded = ckpt.load_checkpoint(convert_checkpoint(source, tmp_path / "converted"))
    order = _block_order(loaded.model)
    for network in ("encoder", "decoder"):
        assert order[network] == [float(index) for net, index in blocks if net == network], network
    model_state = loaded.model.state_dict()
    assert torch.equal(model_state["quantizer.codebook"], state["quantizers.codebook.weight"])
    assert torch.equal(model_state["encoder.head.conv.weight"], state["encoder.fianl_layers.2.weight"])
    assert torch.equal(model_state["decoder.head.norm.bias"], state["decoder.final_layers.0.bias"])


def _block_order(model) -> dict[str, list[float]]:
    """The marker of each block, in the order the blocks run during a forward pass."""
    seen = {"encoder": [], "decoder": []}
    hooks = []
    kinds = (ResBlock, AttentionBlock, Downsample, DepthToSpaceUpsample, NearestUpsample, AdaptiveGroupNorm)
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            network = name.split(".")[0]
            marker = next(module.parameters()).flatten()[0].item()
            hooks.append(module.register_forward_hook(lambda m, i, o, n=network, v=marker: seen[n].append(v)))
    # The markers make activations explode; only the order of the calls matters here.
    with torch.no_grad():
        model.encoder(torch.zeros(1, 3, 16, 16))
        model.decoder(torch.zeros(1, model.config.latent_channels, 8, 8))
    for hook in hooks:
        hook.remove()
    return seen


def test_the_constructor_default_architecture_converts():
    """(4, 3, 4, 3, 4) / (3, 4, 3, 4, 4) ResBlocks over four levels, nearest up-sampling: shapes only."""
    state, _ = flex_gen_state_dict(**{**FLEX_DEFAULTS, "hidden_channels": 32}, values="meta")
    arguments = {key: list(value) if isinstance(value, tuple) else value for key, value in FLEX_DEFAULTS.items()}
    for given in (arguments, None):  # the config splits last level and mid; without it any split computes the same
        config = infer_model_config(state, given)
        assert config.channel_multipliers == (1, 2, 2, 4) and config.upsample == "nearest"
        assert not config.adaptive_norm and not config.mid_attention
        with torch.device("meta"):
            convert_state_dict(state, GSQTokenizer(config))
    assert (config.encoder_res_blocks, config.decoder_res_blocks) != ((), ())
    config = infer_model_config(state, arguments)
    assert config.encoder_res_blocks == (4, 3, 4, 3) and config.mid_blocks == 4
    assert config.decoder_res_blocks == (3, 4, 3, 4) and config.middle_blocks("decoder") == 4


@pytest.mark.parametrize("name", ["F8-D64-G16-V8k", "F16-D16-G8-V256k", "F16-D16-G1-V256k", "F8-D8-G1-V256k"])
def test_the_paper_presets_convert_from_the_official_configs(name):
    """The official configs' layout (width 128, two ResBlocks everywhere, depth-to-space, adaptive
    norm) of each paper preset converts to that preset's architecture: shapes only."""
    model = preset(name).model
    levels = len(model.channel_multipliers)
    state, _ = flex_gen_state_dict(
        hidden_channels=128,
        channel_multipliers=model.channel_multipliers,
        encoder_layer_configs=[2] * (levels + 1),
        decoder_layer_configs=[2] * (levels + 1),
        mid_block_attn=model.mid_attention,
        embedding_dim=model.latent_channels,
        code_dim=model.latent_channels // model.groups,
        codebook=model.codebook_size,
        values="meta",
    )
    config = infer_model_config(state, None)
    for field in (
        "width",
        "channel_multipliers",
        "res_blocks",
        "mid_blocks",
        "mid_attention",
        "adaptive_norm",
        "upsample",
        "latent_channels",
        "groups",
        "codebook_size",
        "encoder_res_blocks",
        "decoder_res_blocks",
        "decoder_mid_blocks",
    ):
        assert getattr(config, field) == getattr(model, field), field
    with torch.device("meta"):
        skeleton = GSQTokenizer(config)
    assert count_parameters(skeleton) == sum(t.numel() for t in state.values())
    convert_state_dict(state, skeleton)


def test_per_level_counts_are_validated():
    from gsq.config import ConfigError, apply_overrides

    four_levels = "model.channel_multipliers=1,1,2,2"
    config = apply_overrides(
        preset("tiny"), [four_levels, "model.encoder_res_blocks=0,2,1,3", "model.decoder_mid_blocks=3"]
    )
    assert config.model.level_res_blocks("decoder") == (1, 1, 1, 1) and config.model.middle_blocks("decoder") == 3
    with torch.device("meta"):
        model = GSQTokenizer(config.model)
    assert [len(level.blocks) for level in model.encoder.levels] == [0, 2, 2, 3]  # + width changes at 1 and 3
    assert len(model.decoder.mid) == 3 and len(model.encoder.mid) == 1
    with pytest.raises(ConfigError, match="model.encoder_res_blocks must be empty or hold one count"):
        apply_overrides(preset("tiny"), [four_levels, "model.encoder_res_blocks=1,2"])
    with pytest.raises(ConfigError, match="model.upsample must be one of"):
        apply_overrides(preset("tiny"), ["model.upsample=bilinear"])


# ------------------------------------------------------------------------------------------------
# Hostile files


def test_pickled_code_never_runs(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    marker = tmp_path / "executed"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    node = omegaconf.nodes.AnyNode(1)
    node.__dict__["_val"] = Boom()  # an OmegaConf node carrying a call as its value
    config = omegaconf.OmegaConf.create({"quantizer_config": {"use_l2_norm": True}})
    blob = pickle.dumps({"quantizer_config": config.quantizer_config, "x": Boom(), "y": node, "z": exec})
    arguments = read_constructor_arguments(blob)
    assert arguments["quantizer_config"] == {"use_l2_norm": True}
    assert repr(arguments["x"]) == repr(arguments["y"]) == "<posix.system>"
    assert not marker.exists()


# Each file is a few hundred bytes: memo opcodes (BINGET) repeat one object. The self-referencing
# list L = [L] * 40 (the original report: a 98-byte config that hung the key search), a DAG of
# lists 40 wide and 12 deep (40^12 paths, 12 distinct lists), and the same DAG of tuples used as
# a dict key (hashing it walks every path).
HOSTILE = textwrap.dedent("""
    import sys, torch
    from gsq.cli import main

    def dag(build, leaf, fan=40, depth=12):
        # leaf, then level k = MARK, BINGET (level k-1) x fan, LIST/TUPLE; each memoized (BINPUT) and popped
        body = leaf + b"q\\x00" + b"0"
        for level in range(1, depth + 1):
            body += b"(" + (b"h" + bytes([level - 1])) * fan + build + b"q" + bytes([level]) + b"0"
        return body + b"h" + bytes([depth])

    state = torch.load(sys.argv[1], weights_only=True)
    self_list = b"\\x80\\x02}\\x8c\\x06config]q\\x00(" + b"h\\x00" * 40 + b"es."
    dag_lists = b"\\x80\\x02}\\x8c\\x01a" + dag(b"l", b"]") + b"s."
    dag_tuples = b"\\x80\\x02}" + dag(b"t", b")") + b"Ns."
    for label, blob in (("self_list", self_list), ("dag_lists", dag_lists), ("dag_tuples", dag_tuples)):
        torch.save({"model_state_dict": state, "config": blob}, f"{sys.argv[2]}/{label}.pt")
        code = main(["convert", f"{sys.argv[2]}/{label}.pt", f"{sys.argv[2]}/{label}_out"])
        print(label, len(blob), code, flush=True)
""")


@pytest.mark.slow
def test_hostile_configs_end_fast(tmp_path):
    """In a subprocess with a timeout: on the old code these never end."""
    state, _ = flex_gen_state_dict(values="random")
    torch.save(state, tmp_path / "state.pt")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", HOSTILE, str(tmp_path / "state.pt"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert lines["self_list"] == ["98", "2"]  # refused, one line
    assert "self_list.pt: its pickled config contains itself" in result.stderr
    assert lines["dag_lists"][1] == "0"  # 12 distinct lists: read in no time, no key anywhere
    assert lines["dag_tuples"][1] == "0"  # not plain data: ignored, said so
    assert "dag_tuples.pt: its 'config' entry is not a readable FlexTokenizer config" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 100


def test_config_reading_is_bounded():
    nested = [[] for _ in range(convert_module.CONFIG_MAX_NODES + 1)]
    with pytest.raises(ConversionError, match="larger than 200,000 containers"):
        read_constructor_arguments(pickle.dumps({"a": nested}))
    deep = []
    for _ in range(convert_module.CONFIG_MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ConversionError, match="nested deeper than"):
        read_constructor_arguments(pickle.dumps({"a": deep}))
    with pytest.raises(ConversionError, match="bytes"):
        read_constructor_arguments(b"\x80" * (convert_module.CONFIG_MAX_BYTES + 1))
    assert read_constructor_arguments(b"garbage") is None
    assert read_constructor_arguments(pickle.dumps([1, 2])) is None


def _recompress(source, target):
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


def test_compressed_archive_is_not_inflated(tmp_path, monkeypatch):
    """A zip whose records inflate far beyond its size (a 3 MB file declaring 3 GB) is refused before
    torch.load allocates anything; scaled down here by dropping the slack."""
    torch.save({"weight": torch.zeros(1 << 20)}, tmp_path / "plain.pt")  # 4 MB of zeros
    _recompress(tmp_path / "plain.pt", tmp_path / "bomb.pt")  # deflate packs them into a few KB
    monkeypatch.setattr(convert_module, "ARCHIVE_SLACK_BYTES", 0)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a zip bomb"))
    with pytest.raises(ConversionError, match=r"declares 4 MB of records in a 0\.0 MB file"):
        load_flex_gen(tmp_path / "bomb.pt")
    monkeypatch.undo()
    monkeypatch.setattr(convert_module, "ARCHIVE_SLACK_BYTES", 0)
    assert "weight" in load_flex_gen(tmp_path / "plain.pt")[0]  # torch.save's own files pass


# ------------------------------------------------------------------------------------------------
# The output folder


@pytest.fixture
def source(tmp_path):
    state, _ = flex_gen_state_dict(values="random")
    path = tmp_path / "flex.pt"
    torch.save({"model_state_dict": state, "config": pickle.dumps({"quantizer_config": {"use_l2_norm": True}})}, path)
    return path


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob(".*"))


def test_output_must_be_a_new_or_empty_folder(tmp_path, source, capsys, monkeypatch):
    (tmp_path / "file").write_text("keep")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"png")
    (tmp_path / "here").mkdir()
    cases = {
        "file": "existing file",
        "link": "is a symbolic link",
        "dangling": "dangling symbolic link",
        "photos": "holding other files",
    }
    for name, message in cases.items():
        for extra in ([], ["--overwrite"]):
            assert gsq_main(["convert", str(source), str(tmp_path / name), *extra]) == 2
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.chdir(tmp_path / "here")
    for output in (".", "..", str(tmp_path / "here")):
        assert gsq_main(["convert", str(source), output]) == 2
        assert "output" in capsys.readouterr().err
    assert list((tmp_path / "here").iterdir()) == [] and list((tmp_path / "empty").iterdir()) == []
    assert (tmp_path / "file").read_text() == "keep" and (tmp_path / "photos" / "a.png").read_bytes() == b"png"
    assert _leftovers(tmp_path) == []

    assert gsq_main(["convert", str(source), str(tmp_path / "empty")]) == 0  # an empty folder is fine
    first = (tmp_path / "empty" / "state.json").read_text()
    assert gsq_main(["convert", str(source), str(tmp_path / "empty")]) == 2
    assert "already holds a checkpoint; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "empty" / "state.json").read_text() == first
    assert gsq_main(["convert", str(source), str(tmp_path / "empty"), "--overwrite"]) == 0
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Errors and the commands that use a converted checkpoint


def test_bad_checkpoints_give_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_flex_gen(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot be read"):
        load_flex_gen(garbage)
    state, _ = flex_gen_state_dict()
    del state["encoder.fianl_layers.2.weight"]
    with pytest.raises(ConversionError, match="missing encoder.fianl_layers.2.weight"):
        infer_model_config(state)
    state, _ = flex_gen_state_dict()
    state["decoder.blocks.0.net.2.weight"] = torch.empty(64, 64, 5, 5)
    torch.save(state, tmp_path / "bad_shape.pt")
    assert gsq_main(["convert", str(tmp_path / "bad_shape.pt"), str(tmp_path / "out")]) == 2
    assert "decoder.blocks.0.net.2.weight has shape" in capsys.readouterr().err
    state, _ = flex_gen_state_dict()
    state["encoder.extra.weight"] = torch.empty(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match="no place in gsq"):
        convert_checkpoint(tmp_path / "extra.pt", tmp_path / "converted_extra")
    for quantizer, message in (
        ({"use_l1_norm": True}, "l1 norm"),
        ({"force_1d_clip": True, "use_uniform_init": True}, "clamps 1-d codes"),
    ):
        state, _ = flex_gen_state_dict(embedding_dim=8, code_dim=1)
        torch.save(
            {"model_state_dict": state, "config": pickle.dumps({"quantizer_config": quantizer})}, tmp_path / "q.pt"
        )
        with pytest.raises(ConversionError, match=message):
            convert_checkpoint(tmp_path / "q.pt", tmp_path / "q_out")


def test_converted_checkpoint_runs_eval_encode_decode(tmp_path, source, monkeypatch, capsys):
    from gsq import losses

    def offline(*args, **kwargs):
        raise OSError("offline (test)")

    monkeypatch.setattr("gsq.evaluate.hub_file", offline)  # InceptionV3's download
    monkeypatch.setattr(losses, "torchvision_state_dict", offline)
    for name in ("GSQ_INCEPTION_WEIGHTS", "GSQ_ALEXNET_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    folder = tmp_path / "converted"
    assert gsq_main(["convert", str(source), str(folder)]) == 0
    assert (
        gsq_main(
            [
                "eval",
                str(folder),
                "--data",
                str(images),
                "--image-size",
                "16",
                "--num-workers",
                "0",
                "--no-progress",
                "--output",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["images"] == 3 and math.isfinite(report["metrics"]["psnr"])
    tokens = tmp_path / "tokens.safetensors"
    assert gsq_main(["encode", str(folder), str(images), str(tokens), "--image-size", "16", "--no-progress"]) == 0
    assert gsq_main(["decode", str(tokens), str(tmp_path / "decoded")]) == 0
    decoded = sorted(p.name for p in (tmp_path / "decoded").iterdir())
    assert decoded == ["im0.png", "im1.png", "im2.png"]
    with Image.open(tmp_path / "decoded" / "im1.png") as image:
        assert image.size == (16, 16)
