"""Prepared shards (shards.py, `ddpm-lightning prepare`): the cached path's pixels resized once, their settings
enforced, streamed with LitData per rank and per worker in a new order each epoch, resumed exactly mid-epoch (and
on another world size with a warning), from a folder or an S3 stand-in on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_lightning.cli import main
from ddpm_lightning.commands import prepare
from ddpm_lightning.data import ImageDataModule
from ddpm_lightning.data.images import ResizedImages, Strips, decode_all
from ddpm_lightning.data.shards import first_images
from ddpm_lightning.sources import load_source
from ddpm_lightning.unet import to_model_range

from conftest import NO_SAVES, child_env, ddp_fit_command, fit_args, max_steps, write_image
from s3_standin import s3_standin, silent_endpoint, unreachable_endpoint

SMALL_SHARDS = ["--num_workers", "1", "--chunk_mb", "0.004"]  # about 5 images of 16 px a shard: several shards


def photos(folder: Path, n: int) -> Path:
    for i in range(n):
        write_image(folder / f"{i}.png", seed=i)  # 20 x 24: not square, so the crop matters
    return folder


def prepared(tmp_path: Path, n: int = 24, *extra: str) -> Path:
    out = tmp_path / "shards"
    main(["prepare", str(photos(tmp_path / "photos", n)), str(out), "--image_size", "16", *SMALL_SHARDS, *extra])
    return out


def key(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


def name(image: torch.Tensor) -> float:
    """An image as conftest.RecordBatches names it: the sum of its pixels in [-1, 1]."""
    return round(float(to_model_range(image).double().sum()), 3)


def data_module(dataset: Path, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(dataset=str(dataset), **{"image_size": 16, "train_batch_size": 4, **kwargs})
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("crop", ["center", "random"])
def test_prepare_stores_the_cached_paths_pixels_and_records_size_crop_and_count(tmp_path, caplog, crop):
    """The images decode_all would cache (`load`, its decoding of each image), the unreadable one skipped and counted;
    random crops keep each image's strip, cut per batch as the cached path's are."""
    source = photos(tmp_path / "photos", 12)
    (source / "broken.png").write_text("not a PNG")
    out = tmp_path / "shards"
    main(["prepare", str(source), str(out), "--image_size", "16", "--crop", crop, *SMALL_SHARDS])
    settings = json.loads((out / "ddpm_prepared.json").read_text())
    assert settings == {"image_size": 16, "crop": crop, "images": 12, "source": str(source), "split": "train"}
    assert "Skipped 1 of 13 images" in caplog.text
    images = ResizedImages(load_source(str(source)), "image", 16, crop)
    cached = [images.load(i)[0] for i in range(13) if images.rows[i]["image"]["path"] != str(source / "broken.png")]
    streamed = first_images(str(out), 100)
    assert len(streamed) == 12 and sorted(map(key, streamed)) == sorted(map(key, cached))
    batch = next(iter(data_module(out, crop=crop, num_workers=0).train_dataloader()))
    assert isinstance(batch, Strips) if crop == "random" else batch.shape == (4, 3, 16, 16)
    with pytest.raises(SystemExit, match="already holds prepared shards: train from it"):  # never mixed in
        main(["prepare", str(source), str(out), "--image_size", "16"])


def test_a_run_at_another_size_or_crop_refuses_prepared_shards_in_one_line_naming_the_fix(tmp_path):
    shards = prepared(tmp_path, 6)
    for size, crop in ((32, "squash"), (16, "center")):
        expected = (
            r"prepared at image_size 16 with crop squash, not .*--data.image_size 16 --data.crop squash, or prepare"
        )
        with pytest.raises(ValueError, match=expected) as err:
            data_module(shards, image_size=size, crop=crop)
        assert "\n" not in str(err.value)
    (tmp_path / "partial").mkdir()
    for part in ("index.json", "chunk-0-0.bin"):  # a preparation that did not finish
        shutil.copy(shards / part, tmp_path / "partial")
    with pytest.raises(ValueError, match="holds an unfinished preparation.*ddpm-lightning prepare SOURCE"):
        data_module(tmp_path / "partial")
    with pytest.raises(ValueError, match="--data.val_dataset"):
        data_module(shards, val_fraction=0.5)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_streams_every_image_once_in_a_new_order_and_resumes_mid_epoch_exactly(tmp_path, workers):
    """With loader workers, each reads its own shards. Batches are drawn as Lightning draws them: the epoch's
    length, no more. The state after 2 batches of the second epoch, given to a new data module (as a checkpoint
    does), continues with exactly that epoch's other batches, then the third epoch."""
    shards = prepared(tmp_path, 24)
    every = sorted(map(key, first_images(str(shards), 100)))

    def epoch(loader, batches: int = 6) -> list[list[bytes]]:
        return [[key(image) for image in batch] for batch in itertools.islice(iter(loader), batches)]

    loader = data_module(shards, num_workers=workers).train_dataloader()
    assert len(loader) == 6
    epochs = [epoch(loader) for _ in range(3)]
    for images in epochs:
        assert len(images) == 6 and sorted(sum(images, [])) == every
    assert epochs[0] != epochs[1] != epochs[2]

    loader = data_module(shards, num_workers=workers).train_dataloader()
    epoch(loader)
    drawn = epoch(loader, 2)
    state = {"stream": loader.state_dict()}
    resumed = ImageDataModule(dataset=str(shards), image_size=16, train_batch_size=4, num_workers=workers)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    loader = resumed.train_dataloader()
    assert (drawn, epoch(loader, 4), epoch(loader)) == (epochs[1][:2], epochs[1][2:], epochs[2])


def recorded(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"batches_rank{rank}.jsonl").read_text().splitlines()]


def run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    return log


def weights(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = torch.load(ckpt, weights_only=False, map_location="cpu")
    return checkpoint["global_step"], checkpoint["state_dict"]


@pytest.mark.slow
def test_ddp_from_prepared_shards_splits_each_epoch_and_resumes_exactly_or_on_one_process_with_a_warning(tmp_path):
    """2 processes (gloo), 24 images, batch 4: 3 steps an epoch, 3 epochs. Each rank's batches are its own and
    together they are the epoch; stopped at step 4 (in the second epoch) and resumed, the run draws the straight
    run's batches (the third epoch's too) and ends with its very weights. The same checkpoint resumed on 1
    process says what changes and streams the rest of that epoch, each image once."""
    shards = prepared(tmp_path, 24)
    every = sorted(name(image) for image in first_images(str(shards), 100))
    common = [*NO_SAVES, "--trainer.max_epochs", "3", "--trainer.callbacks+=conftest.RecordBatches"]
    (tmp_path / "straight").mkdir()
    run(ddp_fit_command(shards, tmp_path / "out-straight", *common), tmp_path / "straight")
    straight = [recorded(tmp_path / "straight", rank) for rank in (0, 1)]
    for epoch in (0, 1, 2):
        steps = range(3 * epoch, 3 * epoch + 3)
        ranks = [sum((b["images"] for b in straight[rank] if b["step"] in steps), []) for rank in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 12 and sorted(ranks[0] + ranks[1]) == every
    assert [b["images"] for b in straight[0][:3]] != [b["images"] for b in straight[0][3:]]  # a new order

    (tmp_path / "stopped").mkdir()
    stop = ["--trainer.callbacks+=conftest.StopAtStep", "--trainer.callbacks.step", "4"]
    args = ddp_fit_command(shards, tmp_path / "out", *common)
    run([*args, *stop], tmp_path / "stopped")
    saved = tmp_path / "stopped" / "checkpoints" / "out" / "last.ckpt"
    assert weights(saved)[0] == 4
    layout = torch.load(saved, weights_only=False)["data_layout"]
    assert layout == {"world_size": 2, "global_batch": 8, "steps_per_epoch": 3}
    elsewhere = tmp_path / "one" / "checkpoints" / "out"
    elsewhere.mkdir(parents=True)
    shutil.copy(saved.resolve(), elsewhere / "last.ckpt")
    log = run([*args, "--ckpt_path", "last"], tmp_path / "stopped")
    assert "Resuming on" not in log
    step, resumed = weights(tmp_path / "stopped" / "checkpoints" / "out" / "last.ckpt")
    straight_step, straight_weights = weights(tmp_path / "straight" / "checkpoints" / "out-straight" / "last.ckpt")
    assert step == straight_step == 9
    for parameter, value in straight_weights.items():
        torch.testing.assert_close(resumed[parameter], value, rtol=0, atol=0, msg=parameter)
    for rank in (0, 1):
        assert recorded(tmp_path / "stopped", rank) == straight[rank]

    one = [*fit_args(shards, tmp_path / "out", *common), "--ckpt_path", "last"]
    with pytest.MonkeyPatch.context() as env:
        env.chdir(tmp_path / "one")
        with pytest.warns(UserWarning) as warned:
            main(one)
    message = next(str(w.message) for w in warned if "Resuming on" in str(w.message))
    assert message.startswith(
        "Resuming on 1 processes (devices x nodes) a run saved on 2: the global batch is 4 images instead of 8, "
        "an epoch is 6 optimizer steps instead of 3, and the images now come in another order"
    )
    seen = sum((b["images"] for rank in (0, 1) for b in straight[rank] if b["step"] == 3), [])  # epoch 1, step 3
    rest = sum((b["images"] for b in recorded(tmp_path / "one", 0)[:4]), [])
    assert sorted(seen + rest) == every  # the epoch's other 16 images, each once


@pytest.mark.slow
def test_prepare_straight_to_an_s3_bucket_and_train_from_it(tmp_path, monkeypatch):
    """`prepare` writes to s3:// and `fit` streams from it, through LitData's own transfers, against moto's S3
    server on 127.0.0.1 (started and stopped here); a run at another size is refused from the bucket's settings."""
    import boto3

    with s3_standin(tmp_path / "s3", monkeypatch):
        source = photos(tmp_path / "photos", 12)
        prepare(str(source), "s3://bucket/photos-16", image_size=16, num_workers=1, chunk_mb=0.004)
        stored = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="bucket")["Contents"]}
        assert {"photos-16/index.json", "photos-16/ddpm_prepared.json"} < stored
        assert any(k.startswith("photos-16/chunk-") for k in stored)
        with pytest.raises(ValueError, match="prepared at image_size 16 with crop squash, not 32"):
            data_module("s3://bucket/photos-16", image_size=32)
        monkeypatch.setenv("LITDATA_CACHE_DIR", str(tmp_path / "downloads"))  # the child's copies of the shards
        args = fit_args(
            "s3://bucket/photos-16", tmp_path / "out", *NO_SAVES, "--trainer.max_epochs", "2",
            "--trainer.callbacks+=conftest.RecordBatches",
        )  # fmt: skip
        log = run([sys.executable, "-m", "ddpm_lightning", *args], tmp_path)
    assert "Streaming 12 training images of 16 px from s3://bucket/photos-16" in log
    batches = recorded(tmp_path, 0)
    expected = sorted(name(image) for image in decode_all(ResizedImages(load_source(str(source)), "image", 16), 0))
    assert len(batches) == 6 and sorted(sum((b["images"] for b in batches[:3]), [])) == expected


def one_line_error(call) -> str:
    """What the command line would print of `call()`'s failure: one line raised by this package, else the test fails."""
    from ddpm_lightning.cli import raised_by_this_package

    with pytest.raises((SystemExit, ValueError, OSError)) as caught:
        call()
    said = str(caught.value)
    assert isinstance(caught.value, SystemExit) or raised_by_this_package(caught.value), said
    assert "\n" not in said.strip() and "Traceback" not in said, said
    return said


@pytest.mark.slow
def test_object_store_failures_end_in_one_line_naming_the_url_and_the_fix(tmp_path, monkeypatch):
    """Against the S3 server checking keys, then stopped: a missing bucket, a wrong secret or key id, a prefix that
    holds shards, finished or not, and the endpoint down are each one line with the URL and the fix, for `prepare`,
    `fit`, `validate` and a resume, within seconds (LitData alone retries for minutes)."""
    source = photos(tmp_path / "photos", 6)
    url = "s3://bucket/photos-16"
    monkeypatch.setenv("LITDATA_CACHE_DIR", str(tmp_path / "downloads"))
    monkeypatch.chdir(tmp_path)

    def prepare_to(out: str) -> str:
        return one_line_error(lambda: main(["prepare", str(source), out, "--image_size", "16", *SMALL_SHARDS]))

    runs = itertools.count()

    def fit_from(dataset: str, *extra: str, run: str = "") -> str:
        out = tmp_path / (run or f"failed-{next(runs)}")
        return one_line_error(lambda: main(fit_args(dataset, out, *NO_SAVES, *extra)))

    with s3_standin(tmp_path / "s3", monkeypatch, check_keys=True):
        for said in prepare_to("s3://nothere/photos"), fit_from("s3://nothere/photos"):
            assert "s3://nothere/photos: there is no bucket nothere at https://127.0.0.1:" in said
            assert "create it (aws s3 mb s3://nothere)" in said
        for variable, value, code in [
            ("AWS_SECRET_ACCESS_KEY", "wrong", "SignatureDoesNotMatch"),
            ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000", "InvalidAccessKeyId"),
        ]:
            with monkeypatch.context() as wrong:
                wrong.setenv(variable, value)
                for said in prepare_to(url), fit_from(url):
                    assert f"{url}: the object store at https://127.0.0.1:" in said
                    assert (
                        f"refused these credentials ({code}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in said
                    )
        with monkeypatch.context() as none:
            none.delenv("AWS_ACCESS_KEY_ID")
            none.delenv("AWS_SECRET_ACCESS_KEY")
            none.setenv("AWS_EC2_METADATA_DISABLED", "true")  # (no instance to ask either)
            for said in prepare_to(url), fit_from(url):
                assert f"{url}: no credentials for the object store at https://127.0.0.1:" in said
        main(["prepare", str(source), url, "--image_size", "16", *SMALL_SHARDS])
        said = prepare_to(url)
        assert f"{url} already holds prepared shards: train from it with --data.dataset {url}" in said
        main(fit_args(url, tmp_path / "run", *NO_SAVES, *max_steps(1)))  # streamed with keys checked
        main(fit_args(url, tmp_path / "run", *NO_SAVES, *max_steps(2), "--ckpt_path", "last"))  # and resumed
        import boto3

        boto3.client("s3").delete_object(Bucket="bucket", Key="photos-16/ddpm_prepared.json")  # as if stopped
        for said in prepare_to(url), fit_from(url):
            assert f"{url} holds an unfinished preparation (shards without ddpm_prepared.json" in said
            assert "aws s3 rm --recursive s3://bucket/photos-16" in said or "prepare" in said
    with unreachable_endpoint(monkeypatch) as endpoint:  # the server stopped
        calls = {
            "prepare": lambda: prepare_to(url),
            "fit": lambda: fit_from(url),
            "resume": lambda: fit_from(url, *max_steps(3), "--ckpt_path", "last", run="run"),
            "validate": lambda: one_line_error(
                lambda: main(
                    [
                        "validate",
                        *fit_args(url, tmp_path / "run")[1:],
                        "--data.val_dataset",
                        str(source),
                        "--ckpt_path",
                        "last",
                    ]
                )  # fmt: skip
            ),
        }
        for command, call in calls.items():
            start = time.monotonic()
            said = call()
            assert time.monotonic() - start < 30, command
            assert f"{url}: cannot reach the object store at {endpoint} (EndpointConnectionError" in said, command
            assert "check that it is up and that AWS_ENDPOINT_URL names it" in said


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prepare", "fit"])
def test_an_endpoint_that_never_answers_stops_in_one_line_after_the_timeout_never_hangs(tmp_path, monkeypatch, command):
    """A server that takes the connection and says nothing: `prepare` and `fit` stop after
    DDPM_LIGHTNING_STORAGE_TIMEOUT seconds a try, 3 tries, in one line (not minutes of LitData's retries)."""
    source = photos(tmp_path / "photos", 4)
    url = "s3://bucket/photos-16"
    with silent_endpoint(monkeypatch) as endpoint:
        args = ["prepare", str(source), url, "--image_size", "16"] if command == "prepare" else fit_args(url, tmp_path)
        env = {**child_env(), "DDPM_LIGHTNING_STORAGE_TIMEOUT": "1"}
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "ddpm_lightning", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=180,
        )  # fmt: skip
        waited = time.monotonic() - start
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith(f"ddpm-lightning {command}: error: {url}: cannot reach the object store at {endpoint}")
    assert "after 3 tries of up to 1 s" in last and "raise DDPM_LIGHTNING_STORAGE_TIMEOUT" in last
    assert waited < 120  # the child's start is most of it; LitData's own retries, unbounded, take minutes


def process_states() -> dict[int, tuple[int, str]]:
    """Every process's (parent, state letter), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # (ended meanwhile)
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return found


def descendants(pid: int) -> list[int]:
    states, found, todo = process_states(), [], [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, (ppid, _) in states.items() if ppid == parent]
        found += children
        todo += children
    return found


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has)."""
    state = process_states().get(pid)
    return state is not None and state[1] != "Z"


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_worker_behind_and_its_folder_is_refused_in_one_line(tmp_path):
    """`kill -9` of `prepare` while its 2 workers write: they die with it (nothing is written after), the folder
    (chunks, no ddpm_prepared.json) is named an unfinished preparation by `fit` and `prepare`, with the way on."""
    source = photos(tmp_path / "photos", 1200)  # seconds of work left at the kill
    out = tmp_path / "shards"
    args = ["prepare", str(source), str(out), "--image_size", "16", "--num_workers", "2", "--chunk_mb", "0.002"]
    child = subprocess.Popen(
        [sys.executable, "-m", "ddpm_lightning", *args], cwd=tmp_path, env=child_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(out.glob("chunk-*.bin"))):
        assert child.poll() is None and time.monotonic() < deadline, "prepare ended before a chunk was seen"
        time.sleep(0.02)
    workers = descendants(child.pid)
    child.kill()
    child.wait()
    assert workers  # (LitData's worker and writer processes)
    time.sleep(0.5)  # (killed with it, they are gone at once; left alone, they write on for a second or more)

    assert not [pid for pid in workers if running(pid)]
    left = sorted(p.name for p in out.iterdir())
    time.sleep(1)
    assert sorted(p.name for p in out.iterdir()) == left and "ddpm_prepared.json" not in left
    said = one_line_error(lambda: main(fit_args(out, tmp_path / "run")))
    assert f"{out} holds an unfinished preparation (shards without ddpm_prepared.json" in said
    assert f"delete it (rm -r {out}) and run the same `ddpm-lightning prepare SOURCE {out} ...` again" in said
    said = one_line_error(lambda: main(args))
    assert f"{out} holds an unfinished preparation" in said and f"delete it (rm -r {out})" in said


def test_a_storage_timeout_that_is_not_a_positive_number_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("DDPM_LIGHTNING_STORAGE_TIMEOUT", "ten")
    with pytest.raises(ValueError, match=r"^DDPM_LIGHTNING_STORAGE_TIMEOUT='ten': give the seconds .* e\.g\. 10\.$"):
        data_module("s3://bucket/photos-16")
