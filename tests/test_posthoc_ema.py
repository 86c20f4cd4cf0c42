"""Post-hoc EMA (posthoc_ema.py): the profiles survive a kill and `--ckpt_path last` bit for bit, a resumed run
deletes the snapshots of the history it replaces, a reconstruction at a profile's own length is that profile,
`export --ema_length` writes a folder plain diffusers loads, and its sweep picks the length with the best KID."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from ema_pytorch import PostHocEMA
from lightning.pytorch import Callback

from ddpm_lightning import commands, posthoc_ema
from ddpm_lightning.cli import main
from ddpm_lightning.model_source import load_model

from conftest import NO_SAVES, TINY_UNET, fit_args, fit_offline, run_cli

POSTHOC = ["--posthoc_ema.enabled", "true", "--posthoc_ema.every_n_steps", "1", "--posthoc_ema.dtype", "float32"]
RUN = [*NO_SAVES, "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "3", *POSTHOC]


class KillAtStep(Callback):
    """SIGKILL to its own process once `step` optimizer steps are done
    (`--trainer.callbacks+=test_posthoc_ema.KillAtStep`): no handler, no save, what was being written stays as it is."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def profiles(ckpt: Path) -> dict:
    """A checkpoint's post-hoc EMA state."""
    state = posthoc_ema.checkpoint_state(torch.load(ckpt, weights_only=False, map_location="cpu"))
    assert state is not None
    return state


def profile(state: dict, index: int) -> dict[str, torch.Tensor]:
    """Profile `index`'s UNet weights in a checkpoint's post-hoc EMA state."""
    prefix = f"ema_models.{index}.ema_model."
    return {k[len(prefix) :]: v for k, v in state["profiles"].items() if k.startswith(prefix)}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A 6-step run with post-hoc EMA (a float32 snapshot every step), never stopped: its folder."""
    root = tmp_path_factory.mktemp("posthoc")
    fit_offline(root, "twelve", "straight", *RUN)
    return root


def test_bad_settings_are_one_line_each():
    with pytest.raises(ValueError, match=r"sigma_rels \[0.1\]: give at least two distinct"):
        posthoc_ema.PosthocEMA(enabled=True, sigma_rels=[0.1])
    with pytest.raises(ValueError, match=r"sigma_rels 0.3: an EMA length .* must be in \(0, 0.288\)"):
        posthoc_ema.PosthocEMA(enabled=True, sigma_rels=[0.05, 0.3])
    with pytest.raises(ValueError, match="every_n_steps 0: must be at least 1"):
        posthoc_ema.PosthocEMA(enabled=True, every_n_steps=0)
    posthoc_ema.PosthocEMA(sigma_rels=[0.1])  # off: not checked, nothing kept
    assert posthoc_ema.snapshots_planned(6, 3) == 2 and posthoc_ema.snapshots_planned(7, 3) == 3


def test_export_options_are_checked_before_any_model_is_loaded(tmp_path):
    with pytest.raises(commands.CommandError, match="a sweep needs --reference"):
        commands.export("missing.ckpt", str(tmp_path / "m"), ema_length="0.05,0.1")
    with pytest.raises(commands.CommandError, match="--reference scores an --ema_length sweep"):
        commands.export("missing.ckpt", str(tmp_path / "m"), ema_length=0.1, reference="x")
    with pytest.raises(commands.CommandError, match="--ema_length 0.05,x: give numbers separated by commas"):
        commands.export("missing.ckpt", str(tmp_path / "m"), ema_length="0.05,x")
    with pytest.raises(commands.CommandError, match="--ema_length 0.5: an EMA length"):
        commands.export("missing.ckpt", str(tmp_path / "m"), ema_length=0.5)
    assert commands.ema_lengths([0.05, 0.1]) == commands.ema_lengths("0.05,0.1") == [0.05, 0.1]


@pytest.mark.slow
def test_the_profiles_survive_a_kill_and_resume_bit_for_bit(straight, tmp_path, caplog):
    """A run killed (SIGKILL) after step 5 leaves the checkpoint of step 3 and snapshots up to step 5; resumed with
    `--ckpt_path last` (a snapshot every 2 steps now), it deletes those of steps 4 and 5 (another history) and ends
    with the straight run's profiles and snapshots, bit for bit. First, a run whose snapshots would take more than
    posthoc_ema.max_disk_gb does not start."""
    shutil.copytree(straight / "twelve", tmp_path / "twelve")
    with pytest.raises(
        ValueError,
        match=r"snapshots would take 6 snapshots x 2 profiles x 2.8 MB \(float32\) = "
        r"0.03 GB, over posthoc_ema.max_disk_gb 0.01",
    ):
        main(fit_args(tmp_path / "twelve", tmp_path / "too_big", *RUN, "--posthoc_ema.max_disk_gb", "0.01"))
    killed = fit_args(tmp_path / "twelve", tmp_path / "killed", *RUN)
    proc = run_cli(
        *killed, "--trainer.callbacks+=test_posthoc_ema.KillAtStep", "--trainer.callbacks.step", "5", cwd=tmp_path
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    folder = tmp_path / "checkpoints" / "killed" / posthoc_ema.SNAPSHOTS
    assert sorted(posthoc_ema.snapshots(folder)) == [(p, s) for p in (0, 1) for s in range(1, 6)]

    with caplog.at_level(logging.INFO, logger="ddpm_lightning"):
        main([*killed, "--ckpt_path", "last", "--posthoc_ema.every_n_steps", "2"])
    assert "posthoc_ema: deleted 4 snapshot(s) after step 3" in caplog.text
    assert_bitwise(
        profiles(straight / "checkpoints" / "straight" / "last.ckpt")["profiles"],
        profiles(tmp_path / "checkpoints" / "killed" / "last.ckpt")["profiles"],
    )
    expected = posthoc_ema.snapshots(straight / "checkpoints" / "straight" / posthoc_ema.SNAPSHOTS)
    found = posthoc_ema.snapshots(folder)
    # Steps 1-3 from before the kill; 4 and 6 from the resumed run (its cadence 2, and the end); none of step 5
    assert sorted(found) == [(p, s) for p in (0, 1) for s in (1, 2, 3, 4, 6)]
    for key, path in found.items():
        assert_bitwise(torch.load(expected[key]), torch.load(path))


@pytest.mark.slow
def test_a_reconstruction_at_a_profiles_length_is_that_profile_and_export_writes_it(straight, tmp_path, caplog):
    ckpt = straight / "checkpoints" / "straight" / "last.ckpt"
    state = profiles(ckpt)
    folder = ckpt.parent / posthoc_ema.SNAPSHOTS
    unet = load_model(str(ckpt)).unet
    for index, length in enumerate(state["sigma_rels"]):  # with float32 snapshots: bit for bit
        assert_bitwise(profile(state, index), posthoc_ema.reconstruct(unet, folder, state, 6, length))
    # At step 5 (from the snapshots alone), float32 snapshots: the profile's snapshot of step 5.
    at_5 = {"sigma_rels": state["sigma_rels"], "profiles": {}}
    for index in (0, 1):
        snapshot = torch.load(folder / f"{index}.5.pt")
        at_5["profiles"].update({f"ema_models.{index}.{k}": v for k, v in snapshot.items()})
    weights = posthoc_ema.reconstruct(unet, folder, at_5, 5, state["sigma_rels"][1])
    assert_bitwise(profile(at_5, 1), weights)
    # float16 snapshots (the default dtype): the profile up to float16 rounding
    half = tmp_path / "float16"
    half.mkdir()
    for path in posthoc_ema.snapshots(folder).values():
        torch.save({k: posthoc_ema.in_dtype(v, torch.float16) for k, v in torch.load(path).items()}, half / path.name)
    at_5_half = {"sigma_rels": state["sigma_rels"], "profiles": {}}
    for index in (0, 1):
        snapshot = torch.load(half / f"{index}.5.pt")
        at_5_half["profiles"].update({f"ema_models.{index}.{k}": v for k, v in snapshot.items()})
    weights = posthoc_ema.reconstruct(unet, half, at_5_half, 5, state["sigma_rels"][1])
    rounded = {k: v.half().float() for k, v in profile(at_5, 1).items()}
    assert any(not torch.equal(rounded[k], profile(at_5, 1)[k]) for k in rounded)
    for name, value in weights.items():
        torch.testing.assert_close(value, rounded[name], rtol=1e-6, atol=1e-8, msg=name)

    between = posthoc_ema.reconstruct(unet, folder, state, 6, 0.15)
    assert any(not torch.equal(between[k], profile(state, i)[k]) for k in between for i in (0, 1))
    with caplog.at_level(logging.INFO, logger="ddpm_lightning"):
        out = commands.export(str(ckpt), str(tmp_path / "model"), ema_length=0.15)
    assert "EMA length 0.15 reconstructed at step 6" in caplog.text
    assert "posthoc_ema:\n  ema_length: 0.15\n" in (out / "README.md").read_text()  # the card says which EMA
    pipeline = DDPMPipeline.from_pretrained(out)
    assert_bitwise(between, {k: v for k, v in pipeline.unet.state_dict().items()})


@pytest.mark.slow
def test_export_of_a_run_without_post_hoc_ema_says_so_in_one_line(straight, tmp_path):
    """A checkpoint of a run with posthoc_ema off (Lightning saves no state for its callback then): `export
    --ema_length`, one length or a sweep, stops with one line that names the problem and the fix, and writes nothing."""
    checkpoint = torch.load(straight / "checkpoints" / "straight" / "last.ckpt", weights_only=False)
    del checkpoint["callbacks"]["PosthocEMA"]
    ckpt = tmp_path / "last.ckpt"
    torch.save(checkpoint, ckpt)
    said = f"--ema_length: {ckpt} holds no post-hoc EMA profiles. Give the checkpoint of a run trained with"
    with pytest.raises(commands.CommandError, match=said):
        commands.export(str(ckpt), str(tmp_path / "one"), ema_length=0.1)
    done = run_cli("export", str(ckpt), "sweep", "--ema_length", "0.05,0.1", "--reference", "refs", cwd=tmp_path)
    assert done.returncode != 0 and said in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "one").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_the_sweep_writes_the_length_with_the_best_kid(straight, tmp_path, caplog):
    """Planted: every snapshot of profile 0 holds the run's weights, every one of profile 1 the same weights with
    the output's bias raised by 3 (saturated images). The reference images are the run's weights' own samples (other
    seeds), so the length of profile 0 has the lowest KID: the sweep writes it, though it comes last in the list."""
    run = tmp_path / "checkpoints" / "run"
    shutil.copytree(straight / "checkpoints" / "straight", run, symlinks=True)
    found = load_model(str(run / "last.ckpt"))
    good = {k: v.clone() for k, v in found.unet.state_dict().items()}
    bad = {k: v + 3 if k == "conv_out.bias" else v.clone() for k, v in good.items()}
    for (index, _), path in posthoc_ema.snapshots(run / posthoc_ema.SNAPSHOTS).items():
        state = torch.load(path)
        state.update({f"ema_model.{k}": v for k, v in (good if index == 0 else bad).items()})
        torch.save(state, path)
    checkpoint = torch.load(run / "last.ckpt", weights_only=False)
    held = checkpoint["callbacks"]["PosthocEMA"]["profiles"]
    for index, weights in ((0, good), (1, bad)):
        held.update({f"ema_models.{index}.ema_model.{k}": v for k, v in weights.items()})
    torch.save(checkpoint, run / "last.ckpt.planted")
    os.replace(run / "last.ckpt.planted", (run / "last.ckpt").resolve())
    # The checkpoint's model (`good`, as load_model gave it), other seeds than the sweep's
    commands.sample(
        str(run / "last.ckpt"),
        num_images=4,
        sampler="ddim",
        num_inference_steps=5,
        seed=1,
        output_dir=str(tmp_path / "reference"),
    )
    (tmp_path / "reference" / "grid.png").unlink()

    with caplog.at_level(logging.INFO, logger="ddpm_lightning"):
        out = commands.export(
            str(run / "last.ckpt"),
            str(tmp_path / "model"),
            ema_length="0.28,0.05",
            reference=str(tmp_path / "reference"),
            num_images=4,
        )
    said = [r.getMessage() for r in caplog.records]
    kids = [line for line in said if line.startswith("EMA length ") and ": KID " in line]
    assert len(kids) == 2 and all("(N=4 samples, M=4 reference images)" in line for line in kids)
    assert all("dpmsolver++, 20 steps" in line for line in kids), kids  # the end-of-run measurement's sampler
    assert "EMA length 0.05 has the lowest KID" in caplog.text
    assert_bitwise(good, DDPMPipeline.from_pretrained(out).unet.state_dict())


def test_the_profiles_weights_follow_the_unet_and_their_step_counters_stay_on_the_cpu(tmp_path):
    """ema_pytorch reads the counters with `.item()` at every update: on the UNet's GPU each read would wait for it.
    The meta device stands in for a GPU here: its tensors have no values, so `.item()` on one raises."""
    unet = UNet2DModel(**TINY_UNET, sample_size=8)
    profiles = PostHocEMA(
        unet,
        sigma_rels=(0.05, 0.28),
        update_every=1,
        checkpoint_every_num_steps="manual",
        checkpoint_folder=str(tmp_path),
    )
    unet.to("meta")
    posthoc_ema.move_weights(profiles, next(unet.parameters()).device)
    profiles.update()
    profiles.update()
    for profile in profiles.ema_models:
        assert {p.device.type for p in profile.ema_model.parameters()} == {"meta"}
        assert profile.step.device.type == "cpu" and profile.step.item() == 2
