"""Nothing lost, nothing hangs, nothing silently wrong: the trainer's checkpoints under kill -9 and a
full disk, resuming from a damaged run, outputs that must not replace the user's files, unreadable
and 16-bit images, and token files / checkpoints that are corrupt or edited."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import gsq.data
import gsq.tokens
from gsq import checkpoint as ckpt
from gsq.cli import main as gsq_main
from gsq.config import preset
from gsq.data import DataError, ImageFolderDataset, OutputExistsError, read_image, write_new
from gsq.evaluate import EvalConfig, evaluate_checkpoint
from gsq.tokens import encode_images
from gsq.train import train
from gsq_runs import SMALL, small_config

TESTS = Path(__file__).parent
REPOSITORY = TESTS.parent
# The least training that writes checkpoints at steps 1 and 2: no GAN, one validation image, no
# validation or grid between step 0 and the end.
FAST = [
    "discriminator.kind=none",
    "data.validation_images=1",
    "train.steps=2",
    "train.checkpoint_every=1",
    "train.eval_every=100",
    "train.grid_every=100",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny run that no test changes."""
    root = tmp_path_factory.mktemp("runs")
    train(small_config(root, *FAST, "train.name=run"), progress=False)
    return root / "run"


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def write(root: Path, step: int, value: float = 0.0, **kwargs) -> Path:
    """A small checkpoint without a model: weights filled with `value`."""
    t = torch.full((4,), float(value))
    return ckpt.write_checkpoint(
        root,
        f"step_{step:08d}",
        preset("tiny"),
        {"ema": {"w": t}, "generator": {"w": t}},
        {"step": step},
        {"x": t},
        **kwargs,
    )


def value_of(folder: Path) -> float:
    return float(ckpt.read_tensors(folder / "ema.safetensors")["w"][0])


def last_line(capsys) -> str:
    """The command's one-line error (warnings may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gsq ")]
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def run_script(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )


# ------------------------------------------------------------------------------------------------
# Outputs never replace a file the command did not create, unless --overwrite


def _photos(folder: Path, count: int = 3) -> Path:
    import skimage.data

    folder.mkdir()
    photo = skimage.data.astronaut()
    for i in range(count):
        Image.fromarray(photo[40 * i : 40 * i + 48, 30 * i : 30 * i + 56]).save(folder / f"photo{i}.png")
    return folder


def test_decode_into_the_source_folder_keeps_the_originals(run, tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    originals = {p.name: p.read_bytes() for p in photos.iterdir()}
    assert gsq_main(["encode", str(run), str(photos), str(tmp_path / "t.safetensors"), "--no-progress"]) == 0
    capsys.readouterr()
    assert gsq_main(["decode", str(tmp_path / "t.safetensors"), str(photos)]) == 2
    err = last_line(capsys)
    assert "photo0.png already exists" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == originals  # nothing written, nothing left over

    assert gsq_main(["decode", str(tmp_path / "t.safetensors"), str(tmp_path / "out")]) == 0
    assert gsq_main(["decode", str(tmp_path / "t.safetensors"), str(tmp_path / "out")]) == 2  # not twice either
    assert "already exists" in last_line(capsys)
    assert gsq_main(["decode", str(tmp_path / "t.safetensors"), str(photos), "--overwrite"]) == 0
    assert (photos / "photo0.png").read_bytes() == (tmp_path / "out" / "photo0.png").read_bytes()

    before = (tmp_path / "t.safetensors").read_bytes()
    assert (
        gsq_main(["encode", str(run), str(photos / "photo1.png"), str(tmp_path / "t.safetensors"), "--no-progress"])
        == 2
    )
    assert "t.safetensors already exists" in last_line(capsys)
    assert (tmp_path / "t.safetensors").read_bytes() == before
    assert (
        gsq_main(
            [
                "encode",
                str(run),
                str(photos / "photo1.png"),
                str(tmp_path / "t.safetensors"),
                "--no-progress",
                "--overwrite",
            ]
        )
        == 0
    )
    assert (tmp_path / "t.safetensors").read_bytes() != before


def test_a_file_made_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "report.json"

    def writer(temporary: Path) -> None:
        target.write_text("someone else's")  # appears after any check made before the work
        temporary.write_text("ours")

    with pytest.raises(OutputExistsError, match="report.json already exists; pass --overwrite"):
        write_new(target, writer, overwrite=False)
    assert target.read_text() == "someone else's" and leftovers(tmp_path) == []
    write_new(target, lambda temporary: temporary.write_text("ours"), overwrite=True)
    assert target.read_text() == "ours" and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Checkpoints: crash-safe writes, history, fallback, leftovers, full disk


def _crash(action, kill_before: int, partial_rmtree: bool = False) -> None:
    """Run action() in a forked child killed with SIGKILL just before its kill_before-th change of
    the folder (os.replace or shutil.rmtree, counted from 0); with partial_rmtree that rmtree removes
    one file first, as a removal cut short does."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            changes = [0]
            real_replace, real_rmtree = os.replace, shutil.rmtree

            def step(real, path, *args, **kwargs):
                if changes[0] == kill_before:
                    if partial_rmtree:
                        next(p for p in Path(path).iterdir()).unlink()
                    os.kill(os.getpid(), signal.SIGKILL)
                changes[0] += 1
                return real(path, *args, **kwargs)

            os.replace = lambda *a, **k: step(real_replace, *a, **k)
            shutil.rmtree = lambda *a, **k: step(real_rmtree, *a, **k)
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the child was not killed"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("kill_before,partial", [(0, False), (1, False), (2, False), (3, False), (3, True)])
def test_kill_9_at_every_step_of_replacing_the_latest_checkpoint(tmp_path, kill_before, partial):
    # The worst case: a run resumed from an earlier step rewrites the very folder `latest` names.
    root = tmp_path / "checkpoints"
    write(root, 1, value=1.0)
    write(root, 2, value=2.0)
    _crash(lambda: write(root, 2, value=20.0), kill_before, partial)  # F->old, T->F, latest, rmtree(old)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        folder = ckpt.resume_point(root)
    assert folder.name == "step_00000002"  # never lost, never fallen back to step 1
    assert value_of(folder) == (2.0 if kill_before == 0 else 20.0)  # old until the new one is in place
    ckpt.read_state(folder)
    assert leftovers(root) == []  # the dead writer's folders are gone (recovered or removed)
    write(root, 3, value=3.0)
    assert ckpt.find_checkpoint(root).name == "step_00000003" and leftovers(root) == []


@pytest.mark.slow  # trains twice: 27 s on the 2 shared CI cores under a load of 6
def test_kill_9_while_training_writes_a_checkpoint_then_resume(tmp_path, capsys):
    overrides = [*FAST, "train.name=run"]
    script = f"""
        import os, signal, sys
        from gsq import checkpoint
        from gsq.train import train
        from gsq_runs import small_config

        real, calls = checkpoint.save_file, [0]

        def save_file(tensors, path, metadata=None):
            calls[0] += 1
            if calls[0] == 5:  # the second checkpoint's second file (of 3), half written
                open(path, "wb").write(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tensors, path, metadata=metadata)

        checkpoint.save_file = save_file
        train(small_config(sys.argv[1], *{overrides!r}), progress=False)
        """
    result = run_script(script, str(tmp_path))
    assert result.returncode == -signal.SIGKILL, result.stderr
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert [name.split("-")[0] for name in leftovers(root)] == [".step_00000002.tmp"]

    assert gsq_main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert leftovers(root) == [] and ckpt.load_checkpoint(tmp_path / "run").step == 2


def test_stale_leftovers_of_dead_processes_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    write(root, 1)
    dead, alive = dead_pid(), os.getppid()
    stale = [
        f".step_00000003.tmp-{ckpt.HOST}-{dead}",
        f".step_00000003.tmp-{dead}",  # the second: older gsq's name
        f".step_00000002.del-{ckpt.HOST}-{dead}",
    ]
    kept = [f".step_00000003.tmp-{ckpt.HOST}-{alive}", f".step_00000003.tmp-elsewhere-{dead}"]
    for name in stale + kept:
        (root / name).mkdir()
        (root / name / "ema.safetensors").write_bytes(bytes(1 << 20))
    write(root, 2)
    assert leftovers(root) == sorted(kept)  # a live writer's, and another host's (its pid means nothing here)


def test_pruning_follows_the_runs_history_not_the_names(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40, 44):
        write(root, step)
        ckpt.prune_checkpoints(root, keep=2)
    # resumed from step 20: the new steps 21 and 22 are the newest, 40 and 44 the abandoned ones
    for step in (21, 22):
        write(root, step)
        ckpt.prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000021", "step_00000022"]
    assert ckpt.find_checkpoint(root).name == "step_00000022" and leftovers(root) == []


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (7, 2, 1):  # a run resumed twice from earlier steps: by history step 1 is the newest
        write(root, step, value=float(step))
    latest = root / "latest"
    for content, problem in [
        (b"\xff\xfe\x00", "is not text"),
        (b"\n", "is empty"),
        (b"step_00000099\n", "names step_00000099, which is missing"),
        (b"../../etc\n", "is not the name of a checkpoint folder"),
    ]:
        latest.write_bytes(content)
        with pytest.raises(ckpt.CheckpointError, match=problem) as error:
            ckpt.find_checkpoint(root)
        assert "names checkpoints" not in str(error.value)
        with pytest.warns(RuntimeWarning, match=f"{problem}.*resuming from .*step_00000001"):
            assert ckpt.resume_point(root).name == "step_00000001"

    latest.write_text("step_00000001\n")
    weights = root / "step_00000001" / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.warns(RuntimeWarning, match="generator.safetensors is corrupt or truncated.*step_00000002"):
        assert ckpt.resume_point(tmp_path / "checkpoints").name == "step_00000002"
    for folder in ("step_00000002", "step_00000007"):
        (root / folder / "config.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="truncated.*holds no other intact checkpoint"):
        ckpt.resume_point(root)


@pytest.mark.slow  # trains twice: 22 s on the 2 shared CI cores under a load of 6
def test_an_edited_state_json_is_detected_and_resume_falls_back(tmp_path, capsys):
    train(small_config(tmp_path, *FAST, "train.name=run"), progress=False)
    root = tmp_path / "run" / "checkpoints"
    state_file = root / "step_00000002" / "state.json"
    state_file.write_text(state_file.read_text().replace('"step": 2', '"step": 1'))
    with pytest.raises(ckpt.CheckpointError, match="was changed after it was written"):
        ckpt.read_state(root / "step_00000002")

    with pytest.warns(RuntimeWarning, match="changed after it was written.*resuming from .*step_00000001"):
        assert gsq_main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "resuming at step 1" in capsys.readouterr().out
    assert ckpt.load_checkpoint(tmp_path / "run").step == 2 and leftovers(root) == []  # step 2 written anew
    state = ckpt.read_state(root / "step_00000002")
    assert state["sequence"] == 3

    # no intact checkpoint left: a one-line error
    state_file.write_text(state_file.read_text().replace('"step": 2', '"step": 20'))
    (root / "step_00000001" / "state.json").write_text("{}")
    assert gsq_main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "holds no other intact checkpoint" in last_line(capsys)


def test_state_json_entries_must_be_complete(tmp_path):
    folder = write(tmp_path, 1)
    state = json.loads((folder / "state.json").read_text())
    del state["files"]["ema.safetensors"]["bytes"]
    state["checksum"] = ckpt._state_checksum(state)  # a consistent file, just incomplete
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match='"files" must map each file name to its "bytes"'):
        ckpt.read_state(folder)


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = ckpt.save_file, [0]

    def save_file(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] > 3:  # the second checkpoint
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    assert (
        gsq_main(["train", "tiny", *SMALL, *FAST, f"train.run_dir={tmp_path}", "train.name=run", "--no-progress"]) == 2
    )
    err = last_line(capsys)
    assert "not enough space to write checkpoint step_00000002" in err and "No space left on device" in err
    assert "MB free" in err and "the last complete checkpoint, step_00000001, is intact" in err
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.find_checkpoint(root).name == "step_00000001" and leftovers(root) == []
    ckpt.read_state(root / "step_00000001")

    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(ckpt.CheckpointError, match="checked before writing.*needs about 1.0 MB free, 0.0 MB are"):
        write(root, 6)
    assert not (root / "step_00000006").exists() and leftovers(root) == []


def test_a_file_size_limit_mid_write_is_a_clear_error(tmp_path):
    # The real error from the operating system: EFBIG under `ulimit -f`, as safetensors reports it.
    script = """
        import resource, signal, sys
        from pathlib import Path
        import torch
        from gsq import checkpoint as ckpt
        from gsq.config import preset

        root = Path(sys.argv[1])

        def write(step, size):
            t = torch.zeros(size)
            ckpt.write_checkpoint(root, f"step_{step:08d}", preset("tiny"), {"ema": {"w": t}}, {"step": step}, {"x": t})

        write(1, 16)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal ends the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            write(2, 1 << 16)
        except ckpt.CheckpointError as error:
            print(error)
        """
    result = run_script(script, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "not enough space to write checkpoint step_00000002" in result.stdout
    assert "File too large" in result.stdout and "step_00000001, is intact" in result.stdout
    assert ckpt.find_checkpoint(tmp_path).name == "step_00000001" and leftovers(tmp_path) == []


def test_a_checkpoint_never_replaces_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "notes.txt").write_text("mine")
    (tmp_path / "step_00000002").write_text("a file")
    (tmp_path / "step_00000003").symlink_to(tmp_path / "nowhere")
    for step, problem in [(1, "is not a gsq checkpoint folder"), (2, "is not a folder"), (3, "is not a folder")]:
        with pytest.raises(ckpt.CheckpointError, match=problem):
            write(tmp_path, step)
    assert (tmp_path / "step_00000001" / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Images: unreadable files are skipped by evaluation and counted exactly; 16-bit images


class MeanColor(nn.Module):
    """A stand-in for InceptionV3: uint8 images -> their mean red and green (2 features)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))[:, :2] / 255


class MeanAbsolute(nn.Module):
    def forward(self, x, y):
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_eval_skips_unreadable_images_and_lists_them(run, tmp_path, capsys):
    good, mixed = _photos(tmp_path / "good", count=6), tmp_path / "mixed"
    shutil.copytree(good, mixed)
    (mixed / "a0_empty.png").write_bytes(b"")
    (mixed / "a1_text.jpg").write_text("not an image")
    (mixed / "z_truncated.png").write_bytes((good / "photo0.png").read_bytes()[:100])
    bad = sorted(str(mixed / name) for name in ("a0_empty.png", "a1_text.jpg", "z_truncated.png"))

    def evaluate(data, output, **options):
        return evaluate_checkpoint(
            EvalConfig(
                checkpoint=str(run),
                data=str(data),
                image_size=32,
                resize=32,
                batch_size=2,
                num_workers=0,
                progress=False,
                output=str(output),
                **options,
            ),
            feature_extractor=MeanColor(),
            lpips_model=MeanAbsolute(),
        )

    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        report = evaluate(mixed, tmp_path / "mixed-report")
    assert report["images"] == 6 and report["skipped_unreadable"] == 3 and report["unreadable"] == bad
    clean = evaluate(good, tmp_path / "clean-report")
    for name in ("psnr", "ssim", "lpips", "rfid"):  # the same six images were scored, nothing else
        assert report["metrics"][name] == pytest.approx(clean["metrics"][name], rel=1e-6), name
    assert json.loads((tmp_path / "mixed-report" / "report.json").read_text())["unreadable"] == bad

    with pytest.raises(OutputExistsError, match="report.json already exists"):
        evaluate(good, tmp_path / "clean-report")
    evaluate(good, tmp_path / "clean-report", overwrite=True)
    assert gsq_main(["eval", str(run), "--data", str(good), "--output", str(tmp_path / "clean-report")]) == 2
    assert "--overwrite" in last_line(capsys)
    for path in good.iterdir():
        path.write_text("broken")
    with pytest.warns(RuntimeWarning), pytest.raises(DataError, match="none of the 6 images could be read"):
        evaluate(good, tmp_path / "none")


def test_training_counts_each_unreadable_image_once(tmp_path):
    Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "c_good.png")
    (tmp_path / "a_broken.png").write_bytes(b"")
    (tmp_path / "b_broken.png").write_bytes(b"")
    dataset = ImageFolderDataset(sorted(tmp_path.iterdir()), resize=16, crop=16)
    with pytest.warns(RuntimeWarning):
        samples = [dataset[i] for i in range(3)]
    assert [s["skipped"] for s in samples] == [1, 1, 0]  # two unreadable files drawn: 2, not 3
    assert all(torch.equal(s["image"], samples[2]["image"]) for s in samples)  # the trainer substitutes


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    expected = np.repeat(((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)[:, :, None], 3, axis=2)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    Image.fromarray(ramp.astype(">u2")).save(tmp_path / "gray16.tif")  # big-endian, mode I;16B
    Image.fromarray(expected).save(tmp_path / "gray8.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    reference = read_image(tmp_path / "gray8.png", 64, 64)
    for name in ("gray16.png", "gray16.tif"):
        image = read_image(tmp_path / name, 64, 64)
        assert torch.equal(image, reference), name  # mean near 0 in [-1, 1], not white (1)
    dataset = ImageFolderDataset([tmp_path / "gray16.png"], resize=32, crop=32, substitute=False)
    assert torch.equal(dataset[0]["image"], read_image(tmp_path / "gray8.png", 32, 32))
    assert gsq.tokens.read_image is gsq.data.read_image  # one home for reading images
    Image.fromarray(ramp.astype(np.float32) / 65535).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match="no defined white level"):
        read_image(tmp_path / "float.tif", 64, 64)


# ------------------------------------------------------------------------------------------------
# Token files and checkpoints that are corrupt: one-line errors


def _token_variant(source: Path, target: Path, indices=None, **metadata) -> Path:
    with safe_open(str(source), framework="pt") as f:
        stored, tensor = f.metadata(), f.get_tensor("indices")
    stored = {k: v for k, v in {**stored, **metadata}.items() if v is not None}
    save_file({"indices": (tensor if indices is None else indices).contiguous()}, str(target), metadata=stored)
    return target


def test_corrupt_token_files_are_one_line_errors(run, tmp_path, capsys):
    photos = _photos(tmp_path / "photos", count=1)
    good = encode_images(run, photos, tmp_path / "good.safetensors", progress=False)
    with safe_open(str(good), framework="pt") as f:
        indices, model = f.get_tensor("indices"), json.loads(f.metadata()["model"])
    cases = {
        "outside the codebook's \\[0, 64\\)": dict(indices=indices + 64),
        "from -1 to": dict(indices=torch.cat([indices[..., :1] * 0 - 1, indices[..., 1:]], dim=-1)),
        "expected \\(N, h, w, G\\)": dict(indices=indices[..., 0]),
        "have 2 groups per position": dict(indices=indices[..., :2].contiguous()),
        "metadata is not JSON": dict(model="{not json"),
        "metadata has no 'files'": dict(files=None),
        "names 0 source files for 1 images": dict(files="[]"),
        "holds no images": dict(indices=indices[:0], files="[]"),
        '"files" is not a list of file names': dict(files=json.dumps(["a\x00b.png"])),
        '"model" does not describe a model': dict(model=json.dumps({**model, "weights": "discriminator"})),
        "indices are float32, not integers": dict(indices=indices.float()),
        "indices are bool, not integers": dict(indices=indices.bool()),
    }
    for i, (problem, change) in enumerate(cases.items()):
        variant = _token_variant(good, tmp_path / f"bad{i}.safetensors", **change)
        assert gsq_main(["decode", str(variant), str(tmp_path / f"out{i}")]) == 2, problem
        err = last_line(capsys)
        assert re.search(problem, err), (problem, err)
        assert not (tmp_path / f"out{i}").exists()


def test_decoding_with_a_rewritten_checkpoint_names_it_once(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    folder = ckpt.find_checkpoint(copy)
    encode_images(copy, _photos(tmp_path / "photos", count=1), tmp_path / "t.safetensors", progress=False)
    loaded = ckpt.load_checkpoint(copy)
    weights = {
        name: {
            k: v + 0.01 if v.is_floating_point() else v
            for k, v in ckpt.read_tensors(folder / f"{name}.safetensors").items()
        }
        for name in ("ema", "generator")
    }
    ckpt.write_checkpoint(folder.parent, folder.name, loaded.config, weights, {"step": 2})
    assert gsq_main(["decode", str(tmp_path / "t.safetensors"), str(tmp_path / "out")]) == 2
    err = last_line(capsys)
    assert err.count(str(folder.resolve())) == 1 and "its weights changed since" in err and "--force" in err


def test_latest_that_is_not_text_is_a_one_line_error(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_bytes(b"\xff\xfe\xfa")
    assert gsq_main(["eval", str(copy), "--num-workers", "0", "--no-progress"]) == 2
    assert "latest is corrupt: it is not text" in last_line(capsys)
