"""The settings table the benchmarks time and report (benchmarks/shapes.py) against what it
describes: each paper setting is the latent its preset's encoder makes of a 256x256 image; the rows
and lookup flops the reports divide by are those of a real lookup, counted independently; and
every setting quantizes like the reference."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.shapes import CORE_TARGET, PAPER_SETTINGS, Setting, d_sweep, v_sweep
from gsq.config import preset
from gsq.models import GSQTokenizer
from gsq_kernels import GroupedSphericalQuantizer, nearest_code_indices
from parity import assert_indices_match, backends_for

EVERY_SETTING = [*PAPER_SETTINGS, CORE_TARGET, *v_sweep("cpu"), *d_sweep("cpu"), *v_sweep("cuda")]


@pytest.mark.parametrize("setting", [*PAPER_SETTINGS, CORE_TARGET], ids=lambda s: s.name)
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_paper_setting(setting: Setting, backend):
    quantizer = GroupedSphericalQuantizer(setting.channels, setting.codebook_size, setting.groups, backend=backend)
    z = torch.randn(1, setting.channels, 3, 5)  # a small latent of the setting's width
    out = quantizer(z)
    assert out.indices.shape == (1, 3, 5, setting.groups)
    assert out.quantized.shape == z.shape
    expected = GroupedSphericalQuantizer(setting.channels, setting.codebook_size, setting.groups, backend="reference")
    expected.load_state_dict(quantizer.state_dict())
    rows = z.permute(0, 2, 3, 1).reshape(-1, setting.code_dim)
    assert_indices_match(out.indices, expected(z).indices, rows, quantizer.codebook.detach(), 1e-12, True)


@pytest.mark.parametrize("setting", PAPER_SETTINGS, ids=lambda s: s.name)
def test_paper_setting_is_the_latent_of_its_preset(setting: Setting):
    config = preset(setting.name)
    with torch.device("meta"):  # shapes only: the 256k-code presets allocate nothing
        model = GSQTokenizer(config.model)
        latent = model.encoder(torch.empty(setting.batch, 3, 256, 256))
    assert tuple(latent.shape) == setting.latent_shape()
    assert model.quantizer.groups == setting.groups
    assert tuple(model.quantizer.codebook.shape) == (setting.codebook_size, setting.code_dim)


@pytest.mark.parametrize("setting", EVERY_SETTING, ids=lambda s: f"{s.name}-b{s.batch}")
def test_rows_and_flops_are_those_of_a_real_lookup(setting: Setting):
    """The reference's lookup on a (fake: shapes only) latent of the setting: the indices it returns
    count the rows, and torch's FLOP counter counts its score matmul, 2 flops per multiply-add."""
    with FakeTensorMode():
        z = torch.empty(setting.latent_shape())
        codebook = torch.empty(setting.codebook_size, setting.code_dim)
        with FlopCounterMode(display=False) as counter:
            indices = nearest_code_indices(
                z, codebook, setting.groups, lookup="dot", check_finite=False, backend="reference"
            )
    assert indices.numel() == setting.rows
    assert counter.get_total_flops() == setting.lookup_flops
