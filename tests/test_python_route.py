"""The Python route (docs/python.md): `ddpm_lightning.run` and `build` train as the command does, and the notebook
examples/train_from_python.ipynb runs headless from the checkout (trains on the shipped photos, resumes, samples and
loads the result in plain diffusers), shrunk to 16 px and a few steps through the environment variables it reads."""

from __future__ import annotations

import json

import pytest

import ddpm_lightning
from ddpm_lightning import build, run

from conftest import NO_SAVES, REPO, child_env, fit_args, max_steps, run_cli, scalars, step_of


@pytest.mark.slow
def test_run_and_build_give_the_commands_loss_at_every_step(twelve, tmp_path):
    def args(name: str) -> list[str]:
        return fit_args(twelve, tmp_path / name, *max_steps(3), *NO_SAVES)

    command = run_cli(*args("command"), cwd=tmp_path)
    assert command.returncode == 0, command.stderr[-3000:]
    cli = run(args("run"))
    assert cli.trainer.global_step == 3 and isinstance(cli.model, ddpm_lightning.DDPMModule)
    built = build(args("build")[1:])  # fit's arguments, without the word fit
    assert built.trainer.global_step == 0 and isinstance(built.datamodule, ddpm_lightning.ImageDataModule)
    built.trainer.fit(built.model, datamodule=built.datamodule)
    losses = {name: scalars(tmp_path / name / "logs", "train/loss") for name in ("command", "run", "build")}
    assert sorted(losses["command"]) == [0, 1, 2]  # (Lightning logs step 1's loss at step 0)
    for name in ("run", "build"):
        assert losses[name].keys() == losses["command"].keys()
        for step, loss in losses["command"].items():
            assert losses[name][step] == pytest.approx(loss, rel=1e-6), (name, step)
    assert float(cli.trainer.callback_metrics["train/loss"]) == pytest.approx(losses["command"][2], rel=1e-6)
    # build's trainer is the command's: its progress bar, its config saved where the command saves it
    assert type(built.trainer.progress_bar_callback).__name__ == type(cli.trainer.progress_bar_callback).__name__
    assert (tmp_path / "build" / "logs" / "config.yaml").is_file()


@pytest.mark.slow  # (the trained fixture runs fit)
def test_run_raises_the_commands_error_and_returns_a_commands_result(trained, tmp_path):
    with pytest.raises(ValueError, match="--grid.eval_batch_size 0: images in a grid must be positive"):
        run(["fit", "-c", str(REPO / "configs" / "tiny.yaml"), "--grid.eval_batch_size", "0"])
    paths = run(["sample", str(trained / "run"), "--num_images", "2", "--num_inference_steps", "2"])
    assert [p.name for p in paths] == ["000000.png", "000001.png"] and all(p.is_file() for p in paths)
    assert (tmp_path / "samples" / "grid.png").is_file()


@pytest.mark.slow
def test_the_notebook_trains_resumes_samples_and_loads_in_diffusers(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for name, value in {
        **child_env(),  # this checkout first on the kernel's PYTHONPATH
        "DDPM_NOTEBOOK_REPO": str(REPO),
        "DDPM_NOTEBOOK_IMAGE_SIZE": "16",
        "DDPM_NOTEBOOK_STEPS": "2",
        "DDPM_NOTEBOOK_SAMPLING_STEPS": "2",
        "DDPM_NOTEBOOK_ARGS": json.dumps(
            [
                *["--data.train_batch_size", "4", "--data.num_workers", "0", "--grid.eval_batch_size", "4"],
                *["--quality.num_samples", "0", "--trainer.enable_progress_bar", "false"],
                # validation runs, on 2 of the 50 batches of held-out photos (10 timesteps each, twice: most of
                # the test's time otherwise)
                *["--trainer.limit_val_batches", "2"],
            ]
        ),
    }.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(REPO / "examples" / "train_from_python.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()

    out = tmp_path / "ddpm-notebook"  # where the notebook ran: its own folder in a user's checkout
    assert step_of(tmp_path / "checkpoints" / "ddpm-notebook" / "last.ckpt") == 4  # 2 steps, then resumed to 4
    assert json.loads((out / "run_summary.json").read_text())["optimizer_steps"] == 4
    # the held-out photos scored at the end of each part (Lightning logs step n at n - 1)
    assert sorted(scalars(out / "logs", "val/loss")) == [1, 3]
    assert sorted(p.name for p in (out / "more-samples").iterdir()) == [f"00000{i}.png" for i in range(4)] + [
        "grid.png"
    ]
    printed = [  # each code cell's text output
        "".join(o.get("text", "") for o in cell.outputs) for cell in notebook.cells if cell.cell_type == "code"
    ]
    assert "\nstep 2: train/loss " in printed[1] and "\nstep 4: train/loss " in printed[2]
    assert "DDPMPipeline UNet2DModel [(16, 16), (16, 16)]" in printed[4]
    assert any("image/png" in o.get("data", {}) for o in notebook.cells[-1].outputs)  # the image diffusers drew
