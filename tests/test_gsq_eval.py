"""`gsq eval`, `gsq encode` / `gsq decode`: the metrics against independent computations (scipy,
scikit-image, closed forms), the evaluation pipeline end to end with small random networks in place
of InceptionV3 and LPIPS, the token round trip, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from gsq import checkpoint as ckpt
from gsq.cli import main as gsq_main
from gsq.evaluate import EvalConfig, build_inception, evaluate_checkpoint, to_uint8
from gsq.metrics import GRID_TITLE_HEIGHT, FeatureMoments, PSNRMeter, frechet_distance, ssim
from gsq.pretrained import WeightsFileError, WeightsUnavailable
from gsq.tokens import decode_tokens, encode_images, read_image, read_tokens, write_images
from gsq.train import train
from gsq_runs import small_config


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation (as pytorch-fid / torch-fidelity): scipy's general sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


def moments(features: np.ndarray, chunks: int = 3):
    accumulator = FeatureMoments(features.shape[1])
    for part in np.array_split(features, chunks):  # streamed in batches, as the evaluation does
        accumulator.update(torch.from_numpy(part))
    return accumulator.mean_and_covariance()


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 24)) @ rng.normal(size=(24, 24)) + 3.0
    b = rng.normal(size=(500, 24)) @ rng.normal(size=(24, 24)) * 0.7 + 2.5
    expected = scipy_frechet(a, b)
    assert frechet_distance(*moments(a), *moments(b)) == pytest.approx(expected, rel=1e-9)
    mean, covariance = moments(a)
    np.testing.assert_allclose(covariance.numpy(), np.cov(a, rowvar=False), rtol=1e-10)
    assert abs(frechet_distance(mean, covariance, mean, covariance)) < 1e-8
    # a pure shift: the distance is the squared shift
    shift = np.zeros(24)
    shift[3] = 2.0
    assert frechet_distance(*moments(a), *moments(a + shift)) == pytest.approx(4.0, rel=1e-8)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        moments(a[:1], chunks=1)


def test_psnr_pools_the_squared_error_over_all_pixels():
    meter = PSNRMeter()
    ones = torch.ones(1, 3, 8, 8)
    meter.update(ones * 0, ones * 0 + 0.2)  # [-1, 1]: 0.2 is 0.1 in [0, 1] -> MSE 0.01
    assert meter.compute()["psnr"] == pytest.approx(20.0)
    meter.update(ones * 0, ones * 0)  # a perfect image halves the pooled MSE: +3.01 dB
    assert meter.compute()["psnr"] == pytest.approx(10 * np.log10(1 / 0.005))
    meter.update(torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 5.0))  # reconstructions are clamped to [-1, 1]
    assert meter.compute()["mse"] == pytest.approx((0.01 * 192 + 0.25 * 192) / 576)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 40) * 2 - 1
    noisy = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    ours = ssim(images, noisy)
    for i in range(3):
        x = ((images[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        y = ((noisy[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        expected = structural_similarity(
            x, y, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        assert float(ours[i]) == pytest.approx(expected, abs=1e-9)
    assert torch.allclose(ssim(images, images), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------
# The pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(small_config(root, "train.steps=2", "train.name=run", "data.validation_images=6"), progress=False)
    return root / "run"


class RandomFeatures(nn.Module):
    """A small random stand-in for InceptionV3: uint8 images -> 4 features (fewer than the 6 test
    images, so that the covariances are not singular)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8
        return self.net(images.float() / 255)


class MeanAbsolute(nn.Module):
    """A stand-in for LPIPS with the same call: (reconstructions, images) -> (B, 1, 1, 1)."""

    def forward(self, x, y):
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_eval_pipeline_end_to_end(trained, tmp_path):
    features = RandomFeatures()
    report = evaluate_checkpoint(
        EvalConfig(
            checkpoint=str(trained), output=str(tmp_path), batch_size=4, max_images=6, num_workers=0, progress=False
        ),
        feature_extractor=features,
        lpips_model=MeanAbsolute(),
    )
    # recompute every metric independently from the same images and model
    loaded = ckpt.load_checkpoint(trained)
    from gsq.data import build_datasets

    dataset = build_datasets(loaded.config.data, 0).validation  # 6 images, as the run validated on
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        out = loaded.model(images)
        reconstructions = out.reconstruction.clamp(-1, 1)
        real, fake = features(to_uint8(images)).double().numpy(), features(to_uint8(reconstructions)).double().numpy()
    mse = (((images + 1) / 2 - (reconstructions + 1) / 2).double() ** 2).mean()
    m = report["metrics"]
    assert report["images"] == len(dataset) == 6
    assert m["psnr"] == pytest.approx(float(10 * torch.log10(1 / mse)), rel=1e-6)
    assert m["ssim"] == pytest.approx(float(ssim(images, reconstructions).mean()), rel=1e-6)
    assert m["lpips"] == pytest.approx(float((reconstructions - images).abs().mean()), rel=1e-5)
    assert m["rfid"] == pytest.approx(scipy_frechet(real, fake), rel=1e-4, abs=1e-9)
    assert 0 < m["usage_percent"] <= 100 and m["perplexity"] >= 1
    assert report["unavailable"] == {}
    assert json.loads((tmp_path / "report.json").read_text())["metrics"] == m
    assert Image.open(tmp_path / "grid.png").size == (6 * 32 + 7 * 2, GRID_TITLE_HEIGHT + 2 * 32 + 3 * 2)


def test_missing_inception_and_alexnet_are_reported_unavailable(trained, tmp_path, monkeypatch):
    from gsq import losses

    def offline(*args, **kwargs):
        raise OSError("offline (test)")

    monkeypatch.setattr("gsq.evaluate.hub_file", offline)  # InceptionV3's download
    monkeypatch.setattr(losses, "torchvision_state_dict", offline)
    for name in ("GSQ_INCEPTION_WEIGHTS", "GSQ_ALEXNET_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    assert gsq_main(["eval", str(trained), "--output", str(tmp_path), "--num-workers", "0", "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["rfid"] is None and report["metrics"]["lpips"] is None
    assert "InceptionV3" in report["unavailable"]["rfid"] and "AlexNet" in report["unavailable"]["lpips"]
    assert report["metrics"]["psnr"] > 0
    # a weights file that was asked for but cannot be used is an error, not "unavailable"
    assert (
        gsq_main(
            [
                "eval",
                str(trained),
                "--inception-weights",
                str(tmp_path / "nope.pth"),
                "--num-workers",
                "0",
                "--no-progress",
            ]
        )
        == 2
    )


def test_inception_and_alexnet_load_from_local_files(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module
    import torchvision

    from gsq.losses import build_lpips

    with monkeypatch.context() as patch:  # an untrained InceptionV3 with torch-fidelity's layout
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        random_inception = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(random_inception.state_dict(), tmp_path / "inception.pth")
    network, source = build_inception(str(tmp_path / "inception.pth"))
    assert source.startswith("option")
    assert network(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 2048)
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsFileError, match="InceptionV3"):
        build_inception(str(tmp_path / "wrong.pth"))

    alexnet = torchvision.models.alexnet().state_dict()
    torch.save(alexnet, tmp_path / "alexnet.pth")
    monkeypatch.setenv("GSQ_ALEXNET_WEIGHTS", str(tmp_path / "alexnet.pth"))
    model, source = build_lpips("alex")
    assert source.startswith("$GSQ_ALEXNET_WEIGHTS")
    assert torch.equal(model.net.slice1[0].weight, alexnet["features.0.weight"])
    value = model(torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64) * 0.5)
    assert value.shape == (1, 1, 1, 1) and float(value) > 0
    monkeypatch.setattr("gsq.losses.torchvision_state_dict", lambda url: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.delenv("GSQ_ALEXNET_WEIGHTS")
    with pytest.raises(WeightsUnavailable, match="AlexNet"):
        build_lpips("alex")


def _photo_folder(folder):
    import skimage.data

    folder.mkdir()
    photo = skimage.data.astronaut()
    for i, (top, left) in enumerate([(0, 0), (100, 150), (300, 200)]):
        Image.fromarray(photo[top : top + 70, left : left + 90]).save(folder / f"crop{i}.png")
    return folder


def test_encode_decode_round_trip_equals_the_reconstruction(trained, tmp_path):
    folder = _photo_folder(tmp_path / "images")
    tokens_file = encode_images(trained, folder, tmp_path / "tokens.safetensors", progress=False)
    tokens = read_tokens(tokens_file)
    loaded = ckpt.load_checkpoint(trained)
    groups, codebook = loaded.config.model.groups, loaded.config.model.codebook_size
    side = 32 // 2 ** (len(loaded.config.model.channel_multipliers) - 1)  # 32x32 crops
    assert tokens.indices.shape == (3, side, side, groups) and tokens.indices.dtype == torch.int64
    assert int(tokens.indices.max()) < codebook
    assert tokens.metadata["model"]["step"] == 2 and len(tokens.metadata["files"]) == 3
    images = torch.stack([read_image(folder / f"crop{i}.png", 32, 32) for i in range(3)])
    with torch.no_grad():
        out = loaded.model(images)
    assert torch.equal(tokens.indices, out.indices)
    decoded = decode_tokens(tokens)
    torch.testing.assert_close(decoded, out.reconstruction, rtol=0, atol=1e-5)
    written = write_images(decoded, tokens.metadata["files"], tmp_path / "decoded")
    assert [p.name for p in written] == ["crop0.png", "crop1.png", "crop2.png"]
    assert np.array_equal(np.asarray(Image.open(written[1])), to_uint8(decoded[1]).permute(1, 2, 0).numpy())

    # the same through the command line
    assert (
        gsq_main(
            ["encode", str(trained), str(folder / "crop1.png"), str(tmp_path / "one.safetensors"), "--no-progress"]
        )
        == 0
    )
    assert gsq_main(["decode", str(tmp_path / "one.safetensors"), str(tmp_path / "cli")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli" / "crop1.png")), np.asarray(Image.open(written[1])))


def test_token_bad_inputs(trained, tmp_path, capsys):
    folder = _photo_folder(tmp_path / "images")
    (folder / "broken.png").write_bytes(b"not a png")
    assert gsq_main(["encode", str(trained), str(folder), str(tmp_path / "t.safetensors"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err
    assert gsq_main(["encode", str(trained), str(tmp_path / "missing"), str(tmp_path / "t.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert gsq_main(["encode", str(tmp_path), str(folder / "crop0.png"), str(tmp_path / "t.safetensors")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert gsq_main(["encode", str(trained), str(folder / "crop0.png"), str(tmp_path / "t.pt")]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err
    assert (
        gsq_main(
            [
                "encode",
                str(trained),
                str(folder / "crop0.png"),
                str(tmp_path / "t.safetensors"),
                "--image-size",
                "34",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "divisible by the down-sampling factor 4" in capsys.readouterr().err

    encode_images(trained, folder / "crop0.png", tmp_path / "ok.safetensors", progress=False)
    other = tmp_path / "other"
    train(small_config(other, "train.steps=1", "train.name=run", "train.seed=7"), progress=False)
    assert (
        gsq_main(["decode", str(tmp_path / "ok.safetensors"), str(tmp_path / "x"), "--checkpoint", str(other / "run")])
        == 2
    )
    assert "the tokens were made by" in capsys.readouterr().err
    assert (
        gsq_main(
            [
                "decode",
                str(tmp_path / "ok.safetensors"),
                str(tmp_path / "x"),
                "--checkpoint",
                str(other / "run"),
                "--force",
            ]
        )
        == 0
    )
    (tmp_path / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert gsq_main(["decode", str(tmp_path / "garbage.safetensors"), str(tmp_path / "y")]) == 2
    assert "token file" in capsys.readouterr().err
    assert gsq_main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
