"""The model card (README.md) of saved folders (publish/card.py): `write_model_card`, `SaveModel.save`'s call of it,
and the card every save of a real `fit` writes (`export`'s: test_commands.py)."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import ModelCard

from ddpm_lightning.callbacks import SaveModel
from ddpm_lightning.publish.card import write_model_card, write_run_card

from conftest import tiny_module, write_image

USAGE = (
    'from diffusers import DDPMPipeline\npipeline = DDPMPipeline.from_pretrained("{}")\nimage = pipeline().images[0]'
)


def yaml_block(text: str) -> dict:
    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_card_with_hub_dataset_grid_config_and_repo_id(tmp_path):
    grid = write_image(tmp_path / "grids" / "0009.png", size=(32, 32))
    config = {
        "model": {"learning_rate": 1e-4, "adam_betas": (0.9, 0.999), "_instantiator": "x"},
        "data": {"dataset": "huggan/smithsonian_butterflies_subset", "image_size": 128},
    }
    folder = tmp_path / "model"
    path = write_model_card(
        folder,
        config=config,
        dataset="huggan/smithsonian_butterflies_subset",
        steps=3150,
        grid_path=grid,
        repo_id="me/ddpm-butterflies-128",
    )
    assert path == folder / "README.md"

    card = ModelCard.load(path)
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.tags == ["pytorch", "diffusers", "unconditional-image-generation", "ddpm-lightning"]
    assert card.data.datasets == ["huggan/smithsonian_butterflies_subset"]
    text = path.read_text()
    assert text.startswith("---\n") and "\n---\n" in text
    assert USAGE.format("me/ddpm-butterflies-128") in text
    assert "](samples.png)" in text and (folder / "samples.png").read_bytes() == grid.read_bytes()
    assert "Steps trained: 3150" in text and "128 x 128 pixels" in text
    assert (
        "[huggan/smithsonian_butterflies_subset](https://huggingface.co/datasets/huggan/smithsonian_butterflies_subset)"
        in text
    )
    assert yaml_block(text) == {
        "model": {"learning_rate": 1e-4, "adam_betas": [0.9, 0.999]},  # "_" keys left out
        "data": {"dataset": "huggan/smithsonian_butterflies_subset", "image_size": 128},
    }


def test_card_of_a_local_dataset_without_grid_or_config(tmp_path):
    (tmp_path / "photos").mkdir()
    folder = tmp_path / "model"
    write_model_card(folder, config=None, dataset=str(tmp_path / "photos"), steps=None, grid_path=None, repo_id=None)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.datasets is None
    assert USAGE.format(folder) in card.text
    assert "samples.png" not in card.text and not (folder / "samples.png").exists()
    assert "a local data set" in card.text and "```yaml" not in card.text


class StubUploader:
    repo_id = "me/ddpm-tiny"

    def __init__(self):
        self.uploaded = []

    def wait(self):
        pass

    def upload(self, folder, message):
        self.uploaded.append((folder, message))


def test_save_names_the_upload_repo_in_the_card_before_uploading(tmp_path):
    save = SaveModel(output_dir=str(tmp_path / "out"))
    newest = write_image(tmp_path / "out" / "samples" / "0000.png", size=(8, 8), seed=1)
    write_image(tmp_path / "out" / "samples" / "0001.png", size=(8, 8), seed=2)
    data = write_image(tmp_path / "out" / "samples" / "data.png", size=(8, 8), seed=3)
    os.utime(newest, ns=(0, 2 * 10**18))  # written last (a resumed run's grid of an earlier epoch)
    os.utime(data, ns=(0, 3 * 10**18))  # the training images, newer still, are never the card's
    save.uploader = StubUploader()
    trainer = SimpleNamespace(
        global_rank=0,
        global_step=7,
        callbacks=[],
        datamodule=SimpleNamespace(hparams={"dataset": "huggan/smithsonian_butterflies_subset"}),
    )
    save.save(trainer, tiny_module(), "Epoch 0")
    assert save.uploader.uploaded == [(str(tmp_path / "out"), "Epoch 0")]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.datasets == ["huggan/smithsonian_butterflies_subset"]
    assert USAGE.format("me/ddpm-tiny") in card.text and "Steps trained: 7" in card.text
    assert yaml_block(card.text)["model"]["image_size"] == 16  # the hyperparameters, without the CLI
    assert (tmp_path / "out" / "samples.png").read_bytes() == newest.read_bytes() and "](samples.png)" in card.text


def test_a_card_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    trainer = SimpleNamespace(global_step=1, callbacks=[], datamodule=None)
    with caplog.at_level(logging.WARNING, logger="ddpm_lightning.publish.card"):
        assert write_run_card(trainer, tiny_module(), blocker) is None
    assert "Could not write the model card" in caplog.text


@pytest.mark.slow
def test_every_save_of_fit_writes_the_card_with_the_run_config_and_newest_grid(trained):
    out = trained / "run"
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.datasets is None  # a local folder
    newest = sorted((out / "samples").glob("[0-9]*.png"))[-1]
    assert (out / "samples.png").read_bytes() == newest.read_bytes() and "](samples.png)" in card.text
    assert "Steps trained: 3" in card.text and "16 x 16 pixels" in card.text
    assert f'pipeline = DDPMPipeline.from_pretrained("{out}")' in card.text
    config = yaml.safe_load(card.text.split("```yaml\n", 1)[1].split("```", 1)[0])  # the whole CLI config
    # a published card names local folders by their names, never by the training machine's paths
    assert config["data"]["dataset"] == "images" and config["data"]["image_size"] == 16
    assert config["trainer"]["max_epochs"] == 1 and config["output_dir"] == "run" and config["model"]["use_ema"] is True
