"""Test configuration shared by every test file.

Without a GPU, Triton kernels run on the CPU through Triton's interpreter; TRITON_INTERPRET must be
set before any kernel is defined, i.e. before gsq_kernels is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import gsq_kernels  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
