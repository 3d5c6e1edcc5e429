"""The compiled extension matches the torch that runs it, or is rebuilt at import, or the package
falls back to the reference with a warning; it never fails to import."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gsq_kernels import _extension, dispatch


def test_prebuilt_mismatch_detection(tmp_path):
    info = tmp_path / "info.json"
    assert "no prebuilt" in _extension.prebuilt_mismatch(info)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    info.write_text(json.dumps({"torch_version": torch.__version__, "python": python}))
    assert _extension.prebuilt_mismatch(info) is None
    info.write_text(json.dumps({"torch_version": "2.0.0", "python": python}))
    assert f"built against torch 2.0.0 but torch {torch.__version__} is running" in _extension.prebuilt_mismatch(info)
    info.write_text("{not json")
    assert "unreadable" in _extension.prebuilt_mismatch(info)


def test_this_install_loaded_its_prebuilt_library():
    if os.environ.get("GSQ_KERNELS_FORCE_COMPILE") == "1":
        pytest.skip("forced import-time build")
    assert _extension.STATUS.loaded, _extension.STATUS.origin
    assert _extension.STATUS.origin == "prebuilt"
    assert dispatch.BACKENDS["cpu"].available


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True, text=True, timeout=600
    )


CHECK_CPU_BACKEND = """
    import torch, gsq_kernels
    from gsq_kernels import _extension
    print("ORIGIN", _extension.STATUS.origin)
    print("CPU KERNELS", "cpu" in gsq_kernels.available_backends("cpu"))
    z, c = torch.randn(9, 4), torch.randn(5, 4)
    got = gsq_kernels.nearest_code_indices(z, c, backend="auto")
    assert torch.equal(got, gsq_kernels.nearest_code_indices(z, c, backend="reference"))
"""


@pytest.mark.slow
def test_rebuild_at_import_when_the_prebuilt_library_does_not_fit(tmp_path):
    result = _run_python(
        CHECK_CPU_BACKEND, GSQ_KERNELS_FORCE_COMPILE="1", GSQ_NO_CUDA="1", GSQ_KERNELS_CACHE=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ORIGIN compiled at import into {tmp_path}" in result.stdout
    assert "CPU KERNELS True" in result.stdout
    # one clear log line saying why and where
    assert "GSQ_KERNELS_FORCE_COMPILE=1 is set; compiling the kernels for torch" in result.stderr


def test_failed_rebuild_falls_back_to_the_reference(tmp_path):
    result = _run_python(
        CHECK_CPU_BACKEND,
        GSQ_KERNELS_FORCE_COMPILE="1",
        GSQ_NO_CUDA="1",
        GSQ_KERNELS_CACHE=str(tmp_path),
        CXX="/bin/false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU KERNELS False" in result.stdout
    assert "Falling back to the pure-PyTorch reference backend" in result.stderr
    # an explicit request for the missing backend says how to get it
    explicit = _run_python(
        "import torch, gsq_kernels\n"
        "try:\n"
        "    gsq_kernels.GroupedSphericalQuantizer(4, 4, backend='cpu')\n"
        "except gsq_kernels.BackendUnavailableError as e:\n"
        "    print('ERROR', e)\n",
        GSQ_KERNELS_FORCE_COMPILE="1",
        GSQ_NO_CUDA="1",
        GSQ_KERNELS_CACHE=str(tmp_path),
        CXX="/bin/false",
    )
    assert "ERROR gsq_kernels backend 'cpu' is not available" in explicit.stdout
    assert "pip install --no-build-isolation -e ." in explicit.stdout
