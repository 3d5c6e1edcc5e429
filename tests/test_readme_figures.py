"""The README's hand-written figures against the files and code they come from: the presets'
parameter counts, and the ablation table and its run time against docs/ablation.json (the result
file `gsq experiment ablation` writes)."""

import json
import re
from pathlib import Path

import torch

from gsq.config import preset
from gsq.experiments import ablation_table
from gsq.models import GSQTokenizer, count_parameters

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_parameter_counts_are_the_presets():
    """Every "`PRESET` (12.3M)" or "`PRESET` preset (12.3M parameters" in the README."""
    stated = re.findall(r"`([\w-]+)`(?: preset)? \((\d+\.\d)M\b", README)
    assert stated, "the README states no preset parameter counts any more: update this test"
    for name, millions in stated:
        with torch.device("meta"):  # counts only: nothing is allocated
            model = GSQTokenizer(preset(name).model)
        assert f"{count_parameters(model) / 1e6:.1f}" == millions, name


def test_ablation_table_is_the_result_file():
    summary = json.loads((ROOT / "docs" / "ablation.json").read_text())
    assert ablation_table(summary) in README
    assert f"{summary['minutes']:.1f} minutes in all" in README
    assert f"{summary['steps']:,} steps of batch" in README
