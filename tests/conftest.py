"""Test configuration shared by every test file.

Without a GPU, Triton kernels run on the CPU through Triton's interpreter; TRITON_INTERPRET must be
set before any kernel is defined, i.e. before gsq_kernels is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import gsq_kernels  # noqa: F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The tests that take more than a few seconds on a 2-core machine (measured with --durations):
# end-to-end training, evaluation and conversion runs, multi-process and rebuild tests, compiles
# for Hopper. `python -m pytest -q -m "not slow"` (the README's command) leaves them out;
# .ci/run runs them afterwards with `-m slow`.
SLOW_FILES = (
    "test_triton_gpu_compile.py",
    "test_gsq_distributed.py",
    "test_distributed_usage.py",
    "test_extension_loading.py",
    "test_gsq_train.py",
    "test_gsq_convert.py",
)
SLOW_TESTS = (
    "test_headline_setting_d2_v262144",
    "test_large_codebook",
    "test_offline_runs_say_one_line_per_missing_weight",
    "test_torch_compile_fullgraph",
    "test_torch_compile_traces_the_triton_op",
    "test_codebook_gradient_of_a_collapsed_codebook_is_correct_and_parallel",
    "test_inception_and_alexnet_load_from_local_files",
    "test_missing_inception_and_alexnet_are_reported_unavailable",
    "test_encode_decode_round_trip_equals_the_reconstruction",
    "test_token_bad_inputs",
    "test_eval_pipeline_end_to_end",
    "test_a_full_disk_keeps_the_last_checkpoint",
    "test_decode_into_the_source_folder_keeps_the_originals",
    "test_a_file_size_limit_mid_write_is_a_clear_error",
    "test_eval_skips_unreadable_images_and_lists_them",
    "test_decoding_with_a_rewritten_checkpoint_names_it_once",
    "test_corrupt_token_files_are_one_line_errors",
    "test_dino_discriminator_heads_on_a_small_random_backbone",
    "test_a_step_that_outruns_its_budget_is_stopped",
)


def _interpreted_triton_case(item) -> bool:
    """A parametrized case of a shared suite run on the Triton backend in the CPU interpreter, where
    every kernel launch is interpreted in Python (test_triton_backend.py keeps fast Triton cases in
    the default run)."""
    callspec = getattr(item, "callspec", None)
    if os.environ.get("TRITON_INTERPRET") != "1" or callspec is None:
        return False
    return item.fspath.basename != "test_triton_backend.py" and "triton" in callspec.params.values()


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.name.split("[")[0]
        if item.fspath.basename in SLOW_FILES or name in SLOW_TESTS or _interpreted_triton_case(item):
            item.add_marker(pytest.mark.slow)
