"""The trainer on CPU: a few steps write the run folder; an interrupted (SIGINT) and resumed run
gives exactly the losses and weights of an uninterrupted one; bad configs, data, checkpoints and
weights files give clear errors; pretrained weights load from local files."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from gsq import checkpoint as ckpt
from gsq.cli import main as gsq_main
from gsq.config import ConfigError, RunConfig, apply_overrides, leaf_keys, preset
from gsq.data import DataError, ImageFolderDataset, list_images
from gsq.metrics import GRID_TITLE_HEIGHT
from gsq.pretrained import WeightsFileError, WeightsUnavailable
from gsq.train import train
from gsq_runs import small_config


class LossRecorder:
    def __init__(self, interrupt_at: int | None = None) -> None:
        self.losses: dict[int, dict[str, float]] = {}
        self.interrupt_at = interrupt_at

    def __call__(self, step: int, losses: dict) -> None:
        self.losses[step] = {name: float(value) for name, value in losses.items()}
        if step == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the loop finishes this step, saves, stops


def test_a_few_steps_write_the_run_folder(tmp_path):
    recorder = LossRecorder()
    result = train(small_config(tmp_path, "train.name=run"), progress=False, callbacks=(recorder,))
    assert result.stop_reason == "finished" and result.step == 6
    run = tmp_path / "run"
    assert {"reconstruction", "quantizer", "adversarial", "discriminator"} <= set(recorder.losses[6])
    assert "adversarial" not in recorder.losses[2] and "adversarial" in recorder.losses[3]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 6 and kinds.count("eval") == 3 and kinds[-1] == "summary"
    saved = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert saved == small_config(tmp_path, "train.name=run")
    assert sorted(p.name for p in (run / "grids").iterdir()) == [
        "step_00000000.png",
        "step_00000003.png",
        "step_00000006.png",
    ]
    grid = Image.open(run / "grids" / "step_00000006.png")
    # 4 validation tiles, originals over reconstructions, under a caption strip that names the step
    assert grid.size == (4 * 32 + 5 * 2, GRID_TITLE_HEIGHT + 2 * 32 + 3 * 2)
    caption = np.asarray(grid)[:GRID_TITLE_HEIGHT]
    assert (caption < 128).any() and (np.asarray(grid)[GRID_TITLE_HEIGHT : GRID_TITLE_HEIGHT + 2] == 255).all()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    loaded = ckpt.load_checkpoint(run)
    assert loaded.step == 6 and loaded.weights == "ema"
    assert "fallbacks" in json.loads((run / "run_info.json").read_text())


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    whole = LossRecorder()
    train(small_config(tmp_path, "train.name=whole"), progress=False, callbacks=(whole,))

    first = LossRecorder(interrupt_at=4)
    config = small_config(tmp_path, "train.name=parts")
    result = train(config, progress=False, callbacks=(first,))
    assert result.interrupted and result.step == 4
    assert (tmp_path / "parts" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    second = LossRecorder()
    assert train(config, resume=tmp_path / "parts", progress=False, callbacks=(second,)).step == 6

    assert sorted(first.losses) == [1, 2, 3, 4] and sorted(second.losses) == [5, 6]
    assert {**first.losses, **second.losses} == whole.losses  # bit-identical on CPU
    for name in ("ema", "generator", "discriminator"):
        a = ckpt.read_tensors(tmp_path / "whole" / "checkpoints" / "step_00000006" / f"{name}.safetensors")
        b = ckpt.read_tensors(tmp_path / "parts" / "checkpoints" / "step_00000006" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the resumed run's metrics file holds each step once
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cli_rejects_bad_overrides(capsys):
    assert gsq_main(["train", "train.stepz=5"]) == 2
    assert "unknown config key 'train.stepz'; did you mean train.steps" in capsys.readouterr().err
    assert gsq_main(["train", "tiny", "train.steps=many"]) == 2
    assert "train.steps must be an integer, got 'many'" in capsys.readouterr().err
    assert gsq_main(["train", "tiny", "model.groups=3"]) == 2
    assert "model.latent_channels=16 is not divisible by model.groups=3" in capsys.readouterr().err
    assert gsq_main(["train", "tinny"]) == 2
    assert "unknown preset 'tinny' (did you mean 'tiny'?)" in capsys.readouterr().err
    assert gsq_main(["train", "tiny", "model.channel_multipliers=1,2", "train.steps=7", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["channel_multipliers"] == [1, 2] and printed["train"]["steps"] == 7
    assert len(leaf_keys()) == len(set(leaf_keys()))
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(preset("tiny"), ["train.steps"])


def test_paper_presets_need_a_data_folder(tmp_path, capsys):
    assert gsq_main(["train", "F8-D64-G16-V8k", f"train.run_dir={tmp_path}"]) == 2
    assert "data.path=/path/to/imagenet/train" in capsys.readouterr().err
    assert gsq_main(["train", "tiny", f"data.path={tmp_path / 'nowhere'}", f"train.run_dir={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_image_folder_skips_and_counts_unreadable_files(tmp_path):
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (i * 60, 10, 200)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "nested").mkdir()
    Image.new("L", (50, 50), 128).save(tmp_path / "nested" / "gray.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    files = list_images(tmp_path)
    assert [f.name for f in files] == ["broken.jpg", "gray.jpg", "ok0.png", "ok1.png", "ok2.png"]
    dataset = ImageFolderDataset(files, resize=24, crop=16)
    with pytest.warns(RuntimeWarning, match="skipping unreadable image .*broken.jpg"):
        sample = dataset[0]
    assert sample["skipped"] == 1 and sample["image"].shape == (3, 16, 16)
    assert -1 <= sample["image"].min() and sample["image"].max() <= 1
    with pytest.raises(DataError, match="no images"):
        (tmp_path / "empty").mkdir()
        list_images(tmp_path / "empty")


def test_image_folder_training_counts_skipped_images(tmp_path):
    data, validation = tmp_path / "images", tmp_path / "validation"
    data.mkdir()
    validation.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 40), (20 * i, 100, 50)).save(data / f"{i:02d}.png")
        Image.new("RGB", (40, 40), (100, 20 * i, 50)).save(validation / f"{i:02d}.png")
    (data / "00_broken.png").write_bytes(b"garbage")
    # 4 files, batches of 4: every step reads the broken file once (and takes the next one instead)
    config = small_config(
        tmp_path, f"data.path={data}", f"data.validation_path={validation}", "train.steps=2", "train.name=folder"
    )
    with pytest.warns(RuntimeWarning, match="unreadable"):
        train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "folder" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in records if r["kind"] == "train"] == [1, 1]
    assert json.loads((tmp_path / "folder" / "run_info.json").read_text())["data"].startswith(str(data))


def test_corrupt_and_mismatched_checkpoints(tmp_path, capsys):
    config = small_config(tmp_path, "train.name=run", "train.steps=3")
    train(config, progress=False)
    run = tmp_path / "run"
    assert gsq_main(["train", "--resume", str(run), "model.groups=2", "--no-progress"]) == 2
    assert "does not match this run's config: model.groups: 4 in the checkpoint, 2 now" in capsys.readouterr().err
    assert gsq_main(["train", "F8-D64-G16-V8k", "--resume", str(run)]) == 2
    assert "continues a tiny run" in capsys.readouterr().err

    weights = run / "checkpoints" / "step_00000003" / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert gsq_main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "generator.safetensors is corrupt or truncated" in capsys.readouterr().err

    (run / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(ckpt.CheckpointError, match="names step_00000099, which is missing"):
        ckpt.find_checkpoint(run)
    with pytest.raises(ckpt.CheckpointError, match="is not a checkpoint folder"):
        ckpt.find_checkpoint(tmp_path)

    # weights of another architecture: the error names a tensor and both shapes
    other = apply_overrides(config, ["model.codebook_size=32", "train.name=other"])
    train(other, progress=False)
    model = ckpt.load_checkpoint(tmp_path / "other").model
    with pytest.raises(ckpt.CheckpointError, match=r"quantizer.codebook: \(32, 4\) in the file, \(64, 4\) in"):
        ckpt.load_weights(type(model)(config.model), ckpt.find_checkpoint(tmp_path / "other") / "ema.safetensors")


def test_pretrained_weights_from_local_files(tmp_path, monkeypatch):
    import torchvision

    from gsq import losses
    from gsq.models import discriminators

    def offline(*args, **kwargs):
        raise OSError("offline (test)")

    monkeypatch.setattr(losses, "torchvision_state_dict", offline)
    monkeypatch.setattr(discriminators, "dino_from_hub", offline)
    monkeypatch.delenv("GSQ_VGG_WEIGHTS", raising=False)
    monkeypatch.delenv("GSQ_DINO_WEIGHTS", raising=False)

    with pytest.raises(WeightsUnavailable, match="no pretrained weights for LPIPS"):
        losses.build_lpips_vgg("")
    vgg = torchvision.models.vgg16().state_dict()
    torch.save(vgg, tmp_path / "vgg16.pth")
    model, source = losses.build_lpips_vgg(str(tmp_path / "vgg16.pth"))
    assert source == f"option: {tmp_path / 'vgg16.pth'}"
    assert torch.equal(model.net.slice1[0].weight, vgg["features.0.weight"])
    monkeypatch.setenv("GSQ_VGG_WEIGHTS", str(tmp_path / "vgg16.pth"))
    assert losses.build_lpips_vgg("")[1].startswith("$GSQ_VGG_WEIGHTS")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsFileError, match="features.0.weight has shape"):
        losses.build_lpips_vgg(str(tmp_path / "wrong.pth"))

    with pytest.raises(WeightsUnavailable, match="DINOv2"):
        discriminators.build_dino_backbone("", resolution=28)
    dino = discriminators.create_dino_backbone(resolution=518).state_dict()
    torch.save(dino, tmp_path / "dino.pth")
    backbone, source = discriminators.build_dino_backbone(str(tmp_path / "dino.pth"), resolution=28)
    assert source.startswith("option") and not any(p.requires_grad for p in backbone.parameters())
    assert torch.equal(backbone.blocks[11].mlp.fc2.weight, dino["blocks.11.mlp.fc2.weight"])
    assert backbone.pos_embed.shape[1] == 2 * 2  # resampled from 37x37 to the 2x2 patch grid


def test_missing_discriminator_weights_fall_back_loudly_or_refuse(tmp_path, monkeypatch):
    from gsq.models import discriminators

    monkeypatch.setattr(discriminators, "dino_from_hub", lambda resolution: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.delenv("GSQ_DINO_WEIGHTS", raising=False)
    config = small_config(tmp_path, "discriminator.kind=dino", "train.steps=1", "train.name=fallback")
    with pytest.warns(RuntimeWarning, match="DINO DISCRIMINATOR UNAVAILABLE"):
        train(config, progress=False)
    info = json.loads((tmp_path / "fallback" / "run_info.json").read_text())
    assert "dino_discriminator_unavailable" in info["fallbacks"] and "FALLBACK" in info["discriminator"]
    refuse = apply_overrides(config, ["discriminator.dino_fallback=error", "train.name=refuse"])
    with pytest.raises(WeightsUnavailable):
        train(refuse, progress=False)


def test_dino_discriminator_trains_and_resumes_from_a_local_weights_file(tmp_path):
    from gsq.models.discriminators import create_dino_backbone

    torch.save(create_dino_backbone(resolution=518).state_dict(), tmp_path / "dino.pth")
    config = small_config(
        tmp_path,
        "discriminator.kind=dino",
        f"discriminator.dino_weights={tmp_path / 'dino.pth'}",
        "discriminator.dino_resolution=28",
        "discriminator.start_step=0",
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.name=dino",
    )
    recorder = LossRecorder()
    train(config, progress=False, callbacks=(recorder,))
    assert recorder.losses[1]["adversarial"] > 0 and recorder.losses[1]["discriminator"] > 0
    saved = ckpt.read_tensors(tmp_path / "dino" / "checkpoints" / "step_00000002" / "discriminator.safetensors")
    assert saved and not any(name.startswith("backbone.") for name in saved)  # the frozen DINOv2 is not copied
    resumed = LossRecorder()
    longer = apply_overrides(config, ["train.steps=3"])
    assert train(longer, resume=tmp_path / "dino", progress=False, callbacks=(resumed,)).step == 3
    assert sorted(resumed.losses) == [3]
