"""The model layer (unet.py): the tutorial's UNet by default, and the checks of a UNet against the images it gets
(sample size, halvings, channels)."""

from __future__ import annotations

import pytest

from ddpm_lightning.module import DDPMModule
from ddpm_lightning.unet import TUTORIAL_UNET

from conftest import TINY_UNET, fine_tune, google_layout


def test_tutorial_unet_by_default():
    unet = DDPMModule().unet
    assert list(unet.config.block_out_channels) == TUTORIAL_UNET["block_out_channels"]
    assert unet.config.sample_size == 128
    assert 113e6 < sum(p.numel() for p in unet.parameters()) < 114e6  # the tutorial's 113.7 M


def test_unet_sample_size_must_follow_image_size():
    with pytest.raises(ValueError, match="image_size"):
        DDPMModule(unet={**TINY_UNET, "sample_size": 32}, image_size=16)


def test_image_size_the_unet_cannot_halve_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"image_size=100 cannot be halved 5 times.*multiple of 32 \(e.g. 96\)"):
        DDPMModule(image_size=100)
    DDPMModule(unet=TINY_UNET, image_size=18)  # 2 levels: one halving, any even size


def test_a_misspelt_unet_argument_is_one_line_with_the_nearest():
    with pytest.raises(
        ValueError, match=r"^model.unet.dropuot: UNet2DModel has no such argument; did you mean model.unet.dropout\?$"
    ):
        DDPMModule(unet={**TINY_UNET, "dropuot": 0.1}, image_size=16)
    assert DDPMModule(unet={**TINY_UNET, "dropout": 0.1}, image_size=16).unet.config.dropout == 0.1


@pytest.mark.slow
def test_a_one_channel_model_on_rgb_photos_is_one_line_naming_both(images, tmp_path):
    google_layout(tmp_path / "grey", sample_size=16, in_channels=1)
    with pytest.raises(ValueError, match=r"model.pretrained grey takes 1-channel images .* data is 3-channel \(RGB\)"):
        fine_tune(images, tmp_path / "grey", tmp_path / "tuned")
    assert not list(tmp_path.rglob("*.ckpt"))  # before any training
