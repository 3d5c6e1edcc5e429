"""Packaging and first-run behaviour, without building anything: what the build compiles and with
which flags, what the sdist ships, what a missing extra or an offline machine looks like."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gsq.cli import main as gsq_main
from gsq_kernels import _build_config as build_config
from gsq_kernels import _extension
from gsq_runs import SMALL

ROOT = Path(__file__).resolve().parents[1]
TORCH_INCLUDE = re.compile(r"#include\s*<(torch|ATen|c10)/")
LOCAL_INCLUDE = re.compile(r'#include\s*"([^"]+)"')


def _includes_torch(path: Path, seen: set[Path]) -> bool:
    """Whether path, or a file it includes with quotes, includes torch's headers."""
    if path in seen or not path.is_file():
        return False
    seen.add(path)
    text = path.read_text()
    if TORCH_INCLUDE.search(text):
        return True
    return any(
        _includes_torch(path.parent / name, seen) or _includes_torch(build_config.source_root() / name, seen)
        for name in LOCAL_INCLUDE.findall(text)
    )


@pytest.mark.parametrize("with_cuda", [False, True])
def test_torch_headers_are_compiled_once_per_build(with_cuda):
    units = build_config.sources(with_cuda)
    with_torch = [Path(unit).name for unit in units if _includes_torch(Path(unit), set())]
    assert with_torch == [build_config.TORCH_GLUE_UNIT]
    # ... and the glue unit covers every torch-including file the build needs, exactly once.
    root = build_config.source_root()
    glue = (root / build_config.TORCH_GLUE_UNIT).read_text()
    for name in build_config.TORCH_GLUE:
        assert f'#include "{name}"' in glue, name
        assert str(root / name) not in units
    needed = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*.cpp")
        if p.name != build_config.TORCH_GLUE_UNIT
        and TORCH_INCLUDE.search(p.read_text())
        and (with_cuda or not p.is_relative_to(root / "cuda"))
    }
    assert needed <= set(build_config.TORCH_GLUE)
    assert len(units) == len(set(units))


def test_every_source_file_decides_the_import_time_cache(tmp_path, monkeypatch):
    names = {p.relative_to(build_config.source_root()).as_posix() for p in build_config.input_files()}
    assert {"cpu/gsq_cpu.cpp", "gsq_ops.cpp", build_config.TORCH_GLUE_UNIT, "cpu/gsq_cpu_kernels.h"} <= names
    # A change to a file the glue unit includes (not itself compiled alone) must move the cache.
    copy = tmp_path / "csrc"
    shutil.copytree(build_config.source_root(), copy)
    monkeypatch.setattr(build_config, "source_root", lambda: copy)
    before = _extension._cache_folder(False)
    with (copy / "cpu" / "gsq_cpu.cpp").open("a") as file:
        file.write("\n")
    assert _extension._cache_folder(False) != before


def test_release_builds_carry_no_debug_info_unless_asked(monkeypatch):
    monkeypatch.delenv("GSQ_DEBUG_BUILD", raising=False)
    monkeypatch.delenv("MAX_JOBS", raising=False)
    cxx = build_config.cxx_flags(True)
    # Python's CFLAGS (-g) come first on the compile line; the last -g option wins.
    assert [f for f in cxx if f.startswith("-g")][-1] == "-g0"
    assert "-Wl,--strip-debug" in build_config.link_flags()
    nvcc = build_config.nvcc_flags()
    assert "-lineinfo" not in nvcc and "--threads=0" in nvcc
    monkeypatch.setenv("MAX_JOBS", "3")
    assert "--threads=3" in build_config.nvcc_flags()
    monkeypatch.setenv("GSQ_DEBUG_BUILD", "1")
    assert [f for f in build_config.cxx_flags(False) if f.startswith("-g")][-1] == "-g"
    assert "-lineinfo" in build_config.nvcc_flags() and "-Wl,--strip-debug" not in build_config.link_flags()


def test_the_cuda_backend_says_why_it_was_built_without_cuda(tmp_path, monkeypatch):
    import importlib

    info = json.loads(build_config.write_build_info(tmp_path, False, "GSQ_NO_CUDA=1 is set").read_text())
    assert info["cuda_skipped"] == "GSQ_NO_CUDA=1 is set" and info["with_cuda"] is False
    assert "cuda_skipped" not in build_config.build_info(True)

    cuda_backend = importlib.import_module("gsq_kernels.backends.cuda")
    monkeypatch.setattr(cuda_backend.ops, "OPS_AVAILABLE", True)
    monkeypatch.setattr(
        cuda_backend, "STATUS", _extension.ExtensionStatus(True, False, "prebuilt", info["cuda_skipped"])
    )
    available, reason = cuda_backend._availability()
    assert not available and reason == "the extension was built without CUDA (GSQ_NO_CUDA=1 is set)"


# ------------------------------------------------------------------------------------------------
# The sdist


def _manifest_files() -> set[str]:
    from setuptools._distutils.filelist import FileList

    files = FileList()
    files.findall(str(ROOT))
    files.allfiles = [Path(f).relative_to(ROOT).as_posix() for f in files.allfiles]
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    return set(files.files)


def test_every_manifest_line_matches_files():
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#") or words[0].endswith("exclude") or words[0] == "prune":
            continue
        if words[0] == "graft":
            assert any((ROOT / words[1]).rglob("*")), line
        else:
            folder, patterns = (ROOT / words[1], words[2:]) if words[0] == "recursive-include" else (ROOT, words[1:])
            for pattern in patterns:
                assert any(folder.rglob(pattern) if words[0] == "recursive-include" else folder.glob(pattern)), (
                    f"MANIFEST.in: {pattern!r} of {line!r} matches no file"
                )


def test_the_sdist_ships_the_whole_test_suite_and_what_the_readme_links():
    shipped = _manifest_files()
    needed = {
        "tests/conftest.py",
        "tests/parity.py",
        "tests/gsq_runs.py",
        "benchmarks/shapes.py",
        "csrc/" + build_config.TORCH_GLUE_UNIT,
    }
    needed |= {
        p.relative_to(ROOT).as_posix()
        for folder in ("tests", "benchmarks", "docs", "csrc")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so", ".o")
    }
    readme = (ROOT / "README.md").read_text()
    links = {m.split("#")[0] for m in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in m and m[0] != "#"}
    links |= set(re.findall(r"`((?:docs|benchmarks)/[^`\s]+\.(?:md|json|png))`", readme))
    assert links, "the README links nothing in the repository? the pattern is stale"
    for link in links:
        assert (ROOT / link).exists(), f"README links {link}, which does not exist"
        needed |= {link} if (ROOT / link).is_file() else set()
    missing = sorted(needed - shipped)
    assert not missing, f"not in the sdist: {missing}"


def test_license_is_an_spdx_string_that_the_installed_setuptools_accepts():
    import setuptools

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    requires = pyproject["build-system"]["requires"]
    assert "setuptools>=77" in requires  # the first release that reads an SPDX license string
    assert int(setuptools.__version__.split(".")[0]) >= 77


# ------------------------------------------------------------------------------------------------
# A missing extra, an offline machine


def test_gsq_train_without_the_train_extra_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if not installed
    runs = tmp_path / "runs"
    assert gsq_main(["train", f"train.run_dir={runs}", "--no-progress"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "gsq train: error: the LPIPS perceptual loss (loss.perceptual=1.0; 0 turns it off) needs "
        'lpips, which is not installed: pip install "gsq-kernels[train]"'
    ]
    assert not runs.exists()

    monkeypatch.setitem(sys.modules, "timm", None)
    assert gsq_main(["train", f"train.run_dir={runs}", "loss.perceptual=0", "discriminator.kind=dino"]) == 2
    assert "needs timm, which is not installed" in capfd.readouterr().err and not runs.exists()


def test_gsq_eval_without_the_eval_extra_is_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    assert gsq_main(["eval", str(tmp_path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        'needs torch_fidelity, which is not installed: pip install "gsq-kernels[eval]"'
    )


# `gsq train` then `gsq eval` with the network gone as on an offline machine (name resolution
# fails), in a process of their own so that warnings reach stderr as a user sees them (pytest would
# capture them); one process for both, to import torch once.
OFFLINE_GSQ = """
import socket, sys
def no_network(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
socket.getaddrinfo = no_network
from gsq.cli import main
split = sys.argv.index("--then")
for args in (sys.argv[1:split], sys.argv[split + 1:]):
    if main(args) != 0:
        sys.exit(1)
    print("=" * 8, file=sys.stderr, flush=True)
    print("=" * 8, flush=True)
"""
WEIGHT_VARIABLES = ("GSQ_VGG_WEIGHTS", "GSQ_DINO_WEIGHTS", "GSQ_INCEPTION_WEIGHTS", "GSQ_ALEXNET_WEIGHTS")


def test_offline_runs_say_one_line_per_missing_weight(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in WEIGHT_VARIABLES}
    env.update(
        TORCH_HOME=str(tmp_path / "torch"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf"),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )  # empty weight caches
    overrides = [o for o in SMALL if not o.startswith(("loss.perceptual", "train.steps"))]
    train = [
        "train",
        *overrides,
        "train.steps=1",
        f"train.run_dir={tmp_path / 'runs'}",
        "data.num_workers=0",
        "discriminator.kind=dino",
        "discriminator.dino_resolution=28",
        "--no-progress",
    ]
    evaluation = ["eval", str(tmp_path / "runs" / "tiny"), "--num-workers", "0", "--max-images", "2", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_GSQ, *train, "--then", *evaluation],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for text in (done.stdout, done.stderr):
        assert "Downloading" not in text and "RuntimeWarning" not in text and "Traceback" not in text
    (_, eval_out, _), (train_err, eval_err, _) = (text.split("=" * 8 + "\n") for text in (done.stdout, done.stderr))
    assert train_err.strip().splitlines() == [
        "gsq train: warning: DINO DISCRIMINATOR UNAVAILABLE, training with a PatchGAN (2 layers, 32 channels; the "
        "paper's ablation: rFID 9.6 vs 1.87 with DINO): no pretrained weights for the DINOv2 discriminator backbone: "
        "offline or huggingface.co unreachable ([Errno -2] Name or service not known); give a DINOv2 ViT-S/14-reg "
        "state dict (timm or original layout) with discriminator.dino_weights=FILE or GSQ_DINO_WEIGHTS=FILE "
        "(discriminator.dino_fallback=error refuses)",
        "gsq train: warning: PERCEPTUAL LOSS DISABLED, training without the LPIPS term (blurrier reconstructions): "
        "no pretrained weights for LPIPS (VGG16): offline or download.pytorch.org unreachable ([Errno -2] Name or "
        "service not known); give torchvision's vgg16-397923af.pth with loss.vgg_weights=FILE or "
        "GSQ_VGG_WEIGHTS=FILE (loss.perceptual_fallback=error refuses)",
    ]
    assert [line for line in (eval_out + eval_err).splitlines() if "unavailable:" in line] == [
        "gsq eval: rfid unavailable: no pretrained weights for InceptionV3 (rFID): offline or github.com unreachable "
        "([Errno -2] Name or service not known); give the weights file with --inception-weights FILE or "
        "GSQ_INCEPTION_WEIGHTS=FILE",
        "gsq eval: lpips unavailable: no pretrained weights for LPIPS (AlexNet): offline or download.pytorch.org "
        "unreachable ([Errno -2] Name or service not known); give torchvision's alexnet-owt-7be5be79.pth with "
        "--alexnet-weights FILE or GSQ_ALEXNET_WEIGHTS=FILE",
    ]


def test_a_cached_weights_file_is_used_without_the_network(tmp_path, monkeypatch):
    import torch

    from gsq.pretrained import hub_file

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / "example-0123abcd.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"w": torch.ones(1)}, cached)
    assert hub_file("https://download.pytorch.org/models/example-0123abcd.pth") == str(cached)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_no_tracked_file_of_the_test_suite_is_left_out_of_the_sdist():
    tracked = subprocess.run(
        ["git", "ls-files", "tests", "benchmarks", "docs", "csrc"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    missing = sorted(set(tracked) - _manifest_files())
    assert not missing, f"tracked but not in the sdist: {missing}"


def test_the_reachability_probe_tells_offline_from_a_host_that_answers(monkeypatch):
    import urllib.error
    import urllib.request

    from gsq.pretrained import HubUnreachable, check_reachable

    def answers(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 405, "Method Not Allowed", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", answers)
    check_reachable("https://example.org/weights.pth")  # reachable: the download reports what is wrong

    def offline(request, timeout):
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(HubUnreachable, match=r"^offline or example.org unreachable \(\[Errno -2\] Name or service"):
        check_reachable("https://example.org/weights.pth")
