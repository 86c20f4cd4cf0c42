"""The benchmark scripts' CPU modes, run for real: the GPU smoke check (every shipped config through the CLI,
SIGTERM, resume, sample, export), benchmark.py's tiny step-rate and end-to-end rows, and data.py's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import yaml
from PIL import Image

from conftest import REPO


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))  # tests/: conftest's classes
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_smoke_cpu_mode_passes_every_shipped_config(tmp_path, heliconius_photos):
    configs = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))  # a config added later is run too
    # Two halves of the configs in two scripts at once: most of a step's time on the CPU is its process importing
    # torch, Lightning and diffusers on one core, so two scripts take about the time of one.
    halves = {tmp_path / f"smoke-{i}": configs[i::2] for i in range(2)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    scripts = [
        subprocess.Popen(
            [
                sys.executable,
                "benchmarks/gpu_smoke.py",
                "--cpu",
                "--images",
                str(heliconius_photos),
                "--work-dir",
                str(work),
                "--configs",
                ",".join(names),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for work, names in halves.items()
    ]
    outputs = [script.communicate(timeout=600) for script in scripts]
    for script, (stdout, stderr) in zip(scripts, outputs):
        assert script.returncode == 0, stdout[-8000:] + stderr[-4000:]
    for (work, names), (stdout, _) in zip(halves.items(), outputs):
        lines = [line for line in stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]
        assert lines[-1].startswith("PASS  all: 0 failed")
        for config in names:
            for step in ("fit", "resume", "sample", "export"):
                assert any(line.split()[:3] == ["PASS", config, step] for line in lines), (config, step, stdout)
            # the stop was a real SIGTERM mid-run, and the resumed run ended at the last step
            fit = next(line for line in lines if line.split()[1:3] == [config, "fit"])
            assert "SIGTERM after step" in fit and "last.ckpt at step" in fit, fit
            stopped = int(fit.split("last.ckpt at step ")[1].split()[0])
            assert 4 <= stopped < 10, fit
            assert (work / config / "export" / "model_index.json").is_file()
            assert (work / config / "samples" / "grid.png").is_file()
    assert sorted(name for names in halves.values() for name in names) == configs


@pytest.mark.slow
def test_gpu_smoke_fails_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_script("benchmarks/gpu_smoke.py", "--cpu", "--images", str(tmp_path / "empty"), timeout=120)
    assert done.returncode == 2 and "No images under" in done.stderr


@pytest.mark.slow
def test_benchmark_tiny_with_end_to_end_row(tmp_path, heliconius_photos):
    """benchmark.py --tiny: one batch size, the tutorial baseline with 0 workers beside a project run with its
    --project-args, the checkpoint cadence inside the window, and the end-to-end row over one epoch with the
    held-out val/loss of each side's saved model."""
    out, out_dir, val = tmp_path / "report.json", tmp_path / "e2e", tmp_path / "val"
    val.mkdir()
    for photo in sorted(heliconius_photos.iterdir())[-4:]:  # not among the first 12, which train
        (val / photo.name).symlink_to(photo)
    done = run_script(
        "benchmarks/benchmark.py", "--tiny", "--images", str(heliconius_photos), "--max-images", "12",
        "--batch-sizes", "4", "--workers", "0", "--warmup", "1", "--steps", "3", "--grid-steps", "2",
        "--fast-steps", "2", "--project-args", "--trainer.precision bf16-mixed",
        "--epochs", "1", "--last-n", "3", "--out-dir", str(out_dir), "--out", str(out), "--val-images", str(val),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    report = json.loads(out.read_text())
    runs = [r["run"] for r in report["training"]]
    assert runs == ["tutorial nw=0", "project --trainer.precision bf16-mixed"]
    assert all(r["images_per_s"] > 0 and "vs_baseline" in r for r in report["training"])
    assert report["training"][0]["vs_baseline"] == 1
    # The window keeps the checkpoint cadence users get (no ModelCheckpoint turned off): by default a save every
    # 10 minutes, so none lands in a window of a few seconds, and the column says so.
    assert all(r["raw"]["checkpoints"] == 0 for r in report["training"][1:])
    e2e = report["end_to_end"]
    assert [r["run"] for r in e2e["runs"]] == ["tutorial nw=0", "project --trainer.precision bf16-mixed"]
    assert all(r["steps"] == 3 and r["wall_s"] > 0 for r in e2e["runs"])
    held_out = [r["held_out_loss"] for r in e2e["runs"]]  # one epoch of 3 steps: both still near the noise's MSE
    assert all(0.1 < loss < 10 for loss in held_out), held_out
    assert e2e["comparisons"][0]["held_out_ratio"] == held_out[1] / held_out[0]
    assert "held-out val/loss" in report["markdown"] and "4 held-out images" in report["markdown"]
    assert len(e2e["comparisons"]) == 1 and "End to end" in report["markdown"]
    welch = e2e["comparisons"][0]["loss_test"]  # scipy's Welch test ran (scipy is in the test extra)
    assert 0 <= welch["p"] <= 1 and welch["within_noise"] == (welch["p"] > 0.01) and "Welch t =" in report["markdown"]
    assert report["settings"]["unet"] == yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["model"]["unet"]
    assert (out_dir / "grids.png").is_file() and (out_dir / "end_to_end.json").is_file()
    # each side's files are named after its log, not its run name (a user's `-c configs/x.yaml` has a slash)
    assert sorted(p.name for p in out_dir.glob("grid-*.png")) == ["grid-project-0.png", "grid-tutorial-nw0.png"]


@pytest.mark.slow
def test_quality_benchmark_tiny(tmp_path, heliconius_photos):
    """benchmarks/quality.py on 12 photos at 16 px, 2 steps per variant, a tiny feature extractor: every variant
    (a built-in one, one given with --variant) trains, is scored (FID/KID, held-out val/loss and noise MSE, times)
    and lands in the table; the first with every sampler; each draw at two sample counts (--score-at: its first N),
    against the training images and the held-out ones. A second call with --reuse-runs scores the same runs without
    training them again: a draw of 2 there scores as the first 2 of the draw of 4."""
    train, val = tmp_path / "train", tmp_path / "val"
    for folder, photos in (
        (train, sorted(heliconius_photos.iterdir())[:12]),
        (val, sorted(heliconius_photos.iterdir())[-4:]),
    ):
        folder.mkdir()
        for photo in photos:
            (folder / photo.name).symlink_to(photo)
    unet = (
        '{"layers_per_block": 1, "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "DownBlock2D"], '
        '"up_block_types": ["UpBlock2D", "UpBlock2D"]}'
    )
    fit_args = (
        f"--data.dataset {train} --data.image_size 16 --data.train_batch_size 4 --data.num_workers 0 "
        f"--model.unet '{unet}' --grid.eval_batch_size 2 --grid.num_inference_steps 2 "
        "--trainer.enable_progress_bar false --trainer.enable_model_summary false --trainer.accelerator cpu"
    )
    out = tmp_path / "report.json"
    done = run_script(
        "benchmarks/quality.py", "--steps", "2", "--variants", "tutorial,v+min-snr,my-ema",
        "--samplers", "ddim-2,dpmsolver++-2",
        "--variant", "my-ema=--model.use_ema true --model.ema_power 0.5 --posthoc_ema.enabled true "
        "--posthoc_ema.every_n_steps 1", "--raw-too", "--posthoc-lengths", "0.2",
        "--num-samples", "4", "--score-at", "2,4", "--held-out-too", "--max-reference", "5",
        "--val-dataset", str(val), "--val-split", "train", "--feature", "conftest.TinyFeatures",
        "--fit-args", fit_args, "--out-dir", str(tmp_path / "runs"), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    report = json.loads(out.read_text())
    rows = [(r["variant"], r["steps"], r["sampler"]) for r in report["rows"][::2]]
    assert rows == [
        ("tutorial", 2, "ddim-2"), ("tutorial", 2, "dpmsolver++-2"), ("v+min-snr", 2, "ddim-2"),
        ("my-ema", 2, "ddim-2"), ("my-ema/raw", 2, "ddim-2"),  # EMA on and off from one run (--raw-too)
        ("my-ema/posthoc-0.2", 2, "ddim-2"),  # its post-hoc EMA at one length (--posthoc-lengths)
    ]  # fmt: skip
    assert "no post-hoc EMA profiles" in done.stdout  # the other variants: trained without them
    for first, whole in zip(report["rows"][::2], report["rows"][1::2]):  # one draw (its sample_s), two counts
        same = ("variant", "sampler", "sample_s", "features_s", "val_loss")
        assert [first[k] for k in same] == [whole[k] for k in same], (first, whole)
        assert (first["num_samples"], whole["num_samples"]) == (2, 4), (first, whole)
    for row in report["rows"]:
        assert row["fid"] > 0 and 0 < row["val_loss"] < 10 and row["train_s"] > 0 and row["sample_s"] > 0, row
        assert 0 < row["val_eps_mse"] < 10 and row["fid_held_out"] > 0 and row["kid_std_held_out"] >= 0, row
        assert (row["num_reference"], row["num_held_out"]) == (5, 4), row
        assert 0 <= row["copied_share"] <= 1 and row["copy_threshold"] > 0, row  # the copy check, per N
    first_2, all_4 = report["rows"][:2]
    assert first_2["fid"] != all_4["fid"] and first_2["fid_held_out"] != first_2["fid"], (first_2, all_4)
    assert "| tutorial | 2 | ddim-2 | 2 |" in report["markdown"] and "| copied |" in report["markdown"]
    assert "| tutorial | 2 | ddim-2 | 4 |" in report["markdown"]
    tutorial = report["rows"][0]  # epsilon, uniform weighting: its val/loss is the noise MSE
    assert abs(tutorial["val_loss"] - tutorial["val_eps_mse"]) < 1e-6, tutorial
    assert report["settings"]["num_reference"] == 5 and report["settings"]["steps"] == [2]
    config = yaml.safe_load((tmp_path / "runs" / "v+min-snr-2-seed0" / "logs" / "config.yaml").read_text())["model"]
    assert (config["prediction_type"], config["loss_weighting"]) == ("v_prediction", "min_snr")
    config = yaml.safe_load((tmp_path / "runs" / "my-ema-2-seed0" / "logs" / "config.yaml").read_text())["model"]
    assert (config["use_ema"], config["ema_power"]) == (True, 0.5)
    assert "| my-ema | 2 | ddim-2 |" in report["markdown"] and "| my-ema/raw | 2 | ddim-2 |" in report["markdown"]
    ema, raw, posthoc = report["rows"][6:12:2]
    assert ema["val_loss"] != raw["val_loss"] and ema["train_s"] == raw["train_s"], (ema, raw)
    # the reconstruction's own weights, neither the raw ones nor the fixed-decay EMA's
    assert len({r["val_loss"] for r in (ema, raw, posthoc)}) == 3, (ema, raw, posthoc)
    assert "| my-ema/posthoc-0.2 | 2 | ddim-2 |" in report["markdown"]

    # the same runs scored again, not retrained: a draw of 2, the first 2 images of the draw of 4 (each from its own
    # generator), scores as the first row did
    again = tmp_path / "again.json"
    done = run_script(
        "benchmarks/quality.py", "--steps", "2", "--variants", "tutorial", "--num-samples", "2", "--reuse-runs",
        "--samplers", "ddim-2", "--max-reference", "5", "--val-dataset", str(val), "--val-split", "train",
        "--feature", "conftest.TinyFeatures", "--fit-args", fit_args, "--out-dir", str(tmp_path / "runs"),
        "--out", str(again),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    assert "reusing" in done.stdout
    (row,) = json.loads(again.read_text())["rows"]
    assert row["train_s"] == tutorial["train_s"] and abs(row["val_loss"] - tutorial["val_loss"]) < 1e-6, row
    assert row["num_samples"] == 2 and row["kid_mean"] == pytest.approx(first_2["kid_mean"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_quality_benchmark_refuses_a_post_hoc_length_out_of_range():
    """--posthoc-lengths is checked before any training: one line naming the length and the range."""
    done = run_script("benchmarks/quality.py", "--posthoc-lengths", "0.05,0.5", "--steps", "2", timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        "--posthoc-lengths 0.5: an EMA length (EDM2's sigma_rel) must be in (0, 0.288), e.g. 0.05 or 0.1."
    ), done.stderr[-3000:]


@pytest.mark.slow
def test_quality_benchmark_scores_elsewhere_what_it_drew_without_the_network(tmp_path, heliconius_photos):
    """--defer-fid (a machine without the FID network: the GPU one cannot carry it): every sampled set goes to a zip
    of PNGs and its row has no FID yet; --score on another machine fills in FID/KID from those zips against the
    report's own training images, and the table then has them."""
    train = tmp_path / "train"
    train.mkdir()
    for photo in sorted(heliconius_photos.iterdir())[:8]:
        (train / photo.name).symlink_to(photo)
    fit_args = (
        f"--data.dataset {train} --data.image_size 16 --data.train_batch_size 4 --data.num_workers 0 "
        "--grid.eval_batch_size 2 --grid.num_inference_steps 2 --trainer.enable_progress_bar false "
        "--trainer.enable_model_summary false --trainer.accelerator cpu"
    )
    common = ["--feature", "conftest.TinyFeatures", "--samples-dir", str(tmp_path / "samples")]
    drawn, scored = tmp_path / "drawn.json", tmp_path / "scored.json"
    done = run_script(
        "benchmarks/quality.py", "--steps", "2", "--variants", "v+min-snr", "--samplers", "ddim-2",
        "--num-samples", "3", "--max-reference", "5", "--val-dataset", str(train), "--val-split", "train",
        "--fit-args", fit_args, "--out-dir", str(tmp_path / "runs"), "--defer-fid", "--out", str(drawn), *common,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    (row,) = json.loads(drawn.read_text())["rows"]
    # NaN: not yet scored; the name in the characters a lent machine brings back
    assert row["fid"] != row["fid"] and row["samples"] == "v_min-snr-2-seed0-ddim-2.zip", row
    with zipfile.ZipFile(tmp_path / "samples" / row["samples"]) as archive:
        assert archive.namelist() == ["000000.png", "000001.png", "000002.png"]
        assert Image.open(archive.open("000000.png")).size == (16, 16)

    done = run_script(
        "benchmarks/quality.py", "--score", str(drawn), "--out-dir", str(tmp_path / "scoring"), "--out", str(scored),
        *common,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    report = json.loads(scored.read_text())
    (row,) = report["rows"]
    assert row["fid"] > 0 and row["kid_mean"] == row["kid_mean"] and row["val_loss"] > 0, row
    assert report["settings"]["num_reference"] == 5 and "--score" in report["settings"]["score_command"]
    kid = f"{row['kid_mean']:.4f} ± {row['kid_std']:.4f}"
    assert f"| v+min-snr | 2 | ddim-2 | 3 | {kid} | {row['fid']:.2f} |" in report["markdown"]


def test_data_benchmark_measures_each_rank(tmp_path):
    """benchmarks/data.py on 48 tiny images, shared and streamed by 2 ranks (its most involved rows): a figure per
    rank."""
    args = ["--images", "48", "--size", "16", "--workers", "0", "--ranks", "2", "--paths", "shared,streamed"]
    done = run_script("benchmarks/data.py", *args, "--work-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    for path in ("shared", "streamed"):
        rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith(f"| {path} ")]
        assert len(rows) == 1 and rows[0][1] == "2"
        setup, together, own, rss, speed = rows[0][3:]
        assert all(len(cell.split(" / ")) == 2 for cell in (setup, rss, speed))
        assert float(together) > float(own) > 0
    assert len(list((tmp_path / "decoded").glob("*.pt"))) == 1
