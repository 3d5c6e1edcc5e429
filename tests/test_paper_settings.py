"""The paper's settings (the table the benchmarks time, benchmarks/shapes.py) through the module:
shapes, index ranges and agreement with the reference on a small latent of each configuration."""

import pytest
import torch

from benchmarks.shapes import CORE_TARGET, PAPER_SETTINGS, Setting

from gsq_kernels import GroupedSphericalQuantizer
from parity import assert_indices_match, backends_for


@pytest.mark.parametrize("setting", [*PAPER_SETTINGS, CORE_TARGET], ids=lambda s: s.name)
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_paper_setting(setting: Setting, backend):
    quantizer = GroupedSphericalQuantizer(setting.channels, setting.codebook_size, setting.groups, backend=backend)
    z = torch.randn(1, setting.channels, 3, 5)  # a small latent of the setting's width
    out = quantizer(z)
    assert out.indices.shape == (1, 3, 5, setting.groups)
    assert out.quantized.shape == z.shape
    expected = GroupedSphericalQuantizer(setting.channels, setting.codebook_size, setting.groups,
                                         backend="reference")
    expected.load_state_dict(quantizer.state_dict())
    rows = z.permute(0, 2, 3, 1).reshape(-1, setting.code_dim)
    assert_indices_match(out.indices, expected(z).indices, rows, quantizer.codebook.detach(), 1e-12, True)


def test_settings_table_is_consistent():
    for setting in PAPER_SETTINGS:
        assert setting.channels % setting.groups == 0
        assert setting.rows == setting.batch * setting.height * setting.width * setting.groups
    assert CORE_TARGET.latent_shape() == (32, 64, 16, 16) and CORE_TARGET.code_dim == 4
