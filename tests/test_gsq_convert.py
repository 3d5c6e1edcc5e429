"""`gsq convert`: a state dict laid out as flex_gen's FlexTokenizer (built here from flex_gen's
constructor logic: flat `blocks` lists in forward order, `fianl_layers` (sic), nn.Embedding codebook)
maps onto GSQTokenizer, and each flex_gen block lands on the gsq block that runs at the same position
of the forward pass (checked with forward hooks and per-block marker values, not with the name map
itself)."""

from __future__ import annotations

import pickle

import pytest
import torch

from gsq import checkpoint as ckpt
from gsq.cli import main as gsq_main
from gsq.convert import ConversionError, convert_checkpoint, infer_model_config, load_flex_gen
from gsq.models.layers import AdaptiveGroupNorm, AttentionBlock, DepthToSpaceUpsample, Downsample, ResBlock


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


def flex_gen_state_dict(hidden=32, multipliers=(1, 2), res_blocks=1, mid=2, attention=True, embedding_dim=8,
                        code_dim=2, codebook=16):
    """The tensors (uninitialized) of flex_gen's FlexTokenizer with the GSQ quantizer, in its order."""
    state, blocks = {}, []  # blocks: (network, index) in construction (= forward) order
    _conv(state, "encoder.conv_in", hidden, 3, 3)
    i, c_in = 0, hidden

    def add(kind, network, *args):
        nonlocal i
        kind(state, f"{network}.blocks.{i}", *args)
        blocks.append((network, i))
        i += 1

    for level, multiplier in enumerate(multipliers):
        c_out = hidden * multiplier
        if c_in != c_out:
            add(_resnet, "encoder", c_in, c_out)
        for _ in range(res_blocks):
            add(_resnet, "encoder", c_out, c_out)
        if level < len(multipliers) - 1:
            _conv(state, f"encoder.blocks.{i}.conv", c_out, c_out, 3)
            blocks.append(("encoder", i))
            i += 1
        c_in = c_out
    for k in range(mid):
        add(_resnet, "encoder", c_in, c_in)
        if attention and k < mid - 1:
            add(_attention, "encoder", c_in)
    _norm(state, "encoder.fianl_layers.0", c_in)
    _conv(state, "encoder.fianl_layers.2", embedding_dim, c_in, 1)

    i = 0
    channels = hidden * multipliers[-1]
    _conv(state, "decoder.conv_in", channels, embedding_dim, 3)
    for k in range(mid):
        add(_resnet, "decoder", channels, channels)
        if attention and k < mid - 1:
            add(_attention, "decoder", channels)
    add(_adaptive_norm, "decoder", channels, embedding_dim)
    c_in = channels
    for level, multiplier in enumerate(multipliers[::-1]):
        c_out = hidden * multiplier
        if c_in != c_out:
            add(_resnet, "decoder", c_in, c_out)
        for _ in range(res_blocks):
            add(_resnet, "decoder", c_out, c_out)
        if level < len(multipliers) - 1:
            _conv(state, f"decoder.blocks.{i}.conv", 4 * c_out, c_out, 3)
            blocks.append(("decoder", i))
            i += 1
            add(_adaptive_norm, "decoder", c_out, embedding_dim)
        c_in = c_out
    _norm(state, "decoder.final_layers.0", c_in)
    _conv(state, "decoder.final_layers.2", 3, c_in, 3)
    state["quantizers.codebook.weight"] = torch.empty(codebook, code_dim)
    # Marker values: every tensor of block k of a network is filled with k (+ a tiny per-tensor jitter
    # so that tensors are distinguishable); other tensors get random values.
    generator = torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[1] == "blocks":
            tensor.fill_(float(parts[2]))
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return state, blocks


def _block_order(model) -> dict[str, list[float]]:
    """The marker of each block, in the order the blocks run during a forward pass."""
    seen = {"encoder": [], "decoder": []}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (ResBlock, AttentionBlock, Downsample, DepthToSpaceUpsample, AdaptiveGroupNorm)):
            network = name.split(".")[0]
            marker = next(module.parameters()).flatten()[0].item()
            hooks.append(module.register_forward_hook(lambda m, i, o, n=network, v=marker: seen[n].append(v)))
    # The markers make activations explode (no finiteness check runs outside the quantizer); only
    # the order of the calls matters here.
    with torch.no_grad():
        model.encoder(torch.zeros(1, 3, 16, 16))
        model.decoder(torch.zeros(1, model.config.latent_channels, 8, 8))
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("attention", [True, False])
def test_flex_gen_blocks_land_at_the_same_forward_position(tmp_path, attention):
    state, blocks = flex_gen_state_dict(attention=attention)
    source = tmp_path / "flex.pt"
    torch.save({"model_state_dict": state, "config": pickle.dumps({"quantize_type": "gsq", "use_l2_norm": True})},
               source)
    folder = convert_checkpoint(source, tmp_path / "converted")
    loaded = ckpt.load_checkpoint(folder)
    config = loaded.config.model
    assert (config.width, config.channel_multipliers, config.res_blocks, config.mid_blocks) == (32, (1, 2), 1, 2)
    assert config.mid_attention is attention and config.adaptive_norm
    assert (config.latent_channels, config.groups, config.codebook_size) == (8, 4, 16)
    order = _block_order(loaded.model)
    for network in ("encoder", "decoder"):
        expected = [float(index) for net, index in blocks if net == network]
        assert order[network] == expected, network
    model_state = loaded.model.state_dict()
    assert torch.equal(model_state["quantizer.codebook"], state["quantizers.codebook.weight"])
    assert torch.equal(model_state["encoder.stem.weight"], state["encoder.conv_in.weight"])
    assert torch.equal(model_state["encoder.head.conv.weight"], state["encoder.fianl_layers.2.weight"])
    assert torch.equal(model_state["decoder.head.norm.bias"], state["decoder.final_layers.0.bias"])


def test_trainer_checkpoint_takes_the_ema_weights_and_reads_plain_constructor_arguments(tmp_path):
    state, _ = flex_gen_state_dict(attention=False)
    raw = {k: v + 1 for k, v in state.items()}
    arguments = {"quantizer": {"quantize_type": "gsq", "use_l2_norm": False, "commitment_loss_weight": 0.5}}
    source = tmp_path / "trainer.pt"
    torch.save({"model": {f"module.{k}": v for k, v in raw.items()}, "ema_model": state,
                "config": pickle.dumps(arguments)}, source)
    loaded_state, read_arguments = load_flex_gen(source, "ema")
    assert torch.equal(loaded_state["encoder.conv_in.weight"], state["encoder.conv_in.weight"])
    config = infer_model_config(loaded_state, read_arguments)
    assert config.l2_normalize is False and config.beta == 0.5
    assert gsq_main(["convert", str(source), str(tmp_path / "raw"), "--weights", "model"]) == 0
    converted = ckpt.load_checkpoint(tmp_path / "raw").model.state_dict()
    assert torch.equal(converted["encoder.stem.weight"], raw["encoder.conv_in.weight"])


def test_pickled_foreign_objects_are_not_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    from gsq.convert import read_constructor_arguments

    assert read_constructor_arguments(pickle.dumps({"a": 1, "bad": Boom()}))["a"] == 1


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
    bad = tmp_path / "bad_shape.pt"
    torch.save(state, bad)
    assert gsq_main(["convert", str(bad), str(tmp_path / "out")]) == 2
    assert "decoder.blocks.0.net.2.weight has shape" in capsys.readouterr().err
    state, _ = flex_gen_state_dict()
    state["encoder.extra.weight"] = torch.empty(1)
    with pytest.raises(ConversionError, match="no place in gsq"):
        convert_checkpoint_from_state(state, tmp_path)


def convert_checkpoint_from_state(state, folder):
    source = folder / "state.pt"
    torch.save(state, source)
    return convert_checkpoint(source, folder / "converted_state")
