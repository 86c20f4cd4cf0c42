"""FID/KID through torchmetrics with a tiny fixed random extractor (no weights), and the missing-Inception path."""

from __future__ import annotations

import importlib.util
import socket
import time

import pytest
import torch
from torch import nn

from ddpm_lightning import metrics
from ddpm_lightning.metrics import (
    INCEPTION_WEIGHTS_FILE,
    InceptionWeightsUnavailable,
    SampleQuality,
    inception_available,
)

HAS_TORCH_FIDELITY = importlib.util.find_spec("torch_fidelity") is not None


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
        SampleQuality()
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
        SampleQuality(feature=2048)
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
