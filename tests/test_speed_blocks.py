"""The per-block compile (`speed.compile_blocks`, speed/blocks.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ddpm_lightning.cli import main
from ddpm_lightning.module import DDPMModule
from ddpm_lightning.speed.compile_cache import VARIABLE

from conftest import MICRO_UNET, fit_args, scalars


@pytest.mark.slow
def test_block_compile_compiles_each_block_once_gives_the_eager_losses_and_keeps_the_cache(
    image_folder, tmp_path, monkeypatch
):
    """12 images in batches of 5 (a short last batch of 2), validation, a grid: each of the 3 blocks compiles once,
    for the training batch; the rest runs eagerly. Mode reduce-overhead (CUDA graphs on a GPU, none on a CPU):
    each compiled training step marks a new CUDA-graph step, once. Inductor's files land beside the checkpoints."""
    args = ["--model.unet", json.dumps(MICRO_UNET), "--data.train_batch_size", "5", "--data.val_dataset"]
    args += [str(image_folder), "--trainer.max_epochs", "1", "--grid.save_image_epochs", "1"]
    main(fit_args(image_folder, tmp_path / "eager", *args))

    monkeypatch.delenv(VARIABLE)  # as for a user who never set it (the test's env is restored after)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = ["--speed.compile_blocks", "true", "--speed.compile_mode", "reduce-overhead"]
    main(fit_args(image_folder, tmp_path / "blocks", *args, *compiled))

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # down, mid, up: no recompile
    assert len(marks) == 2  # the two full batches
    eager, blocks = (scalars(tmp_path / run / "logs", "train/loss") for run in ("eager", "blocks"))
    assert len(blocks) == 3 and blocks == pytest.approx(eager, rel=1e-3)
    assert (tmp_path / "blocks" / "samples" / "0000.png").exists()
    cache = tmp_path / "checkpoints" / "compile-cache"
    assert os.environ[VARIABLE] == str(cache) and any(p.is_file() for p in cache.rglob("*"))
    # The weights keep their names: the checkpoint loads into a plain module.
    state = torch.load(tmp_path / "checkpoints" / "blocks" / "last.ckpt", weights_only=False)["state_dict"]
    plain = DDPMModule(unet=MICRO_UNET, image_size=16)
    assert plain.load_state_dict(state) is not None and set(state) == set(plain.state_dict())
