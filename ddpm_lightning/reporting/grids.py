"""Grids of images: their shape (`grid_shape`), the PNG (`save_grid`) and each logger's image (`log_image`).

They serve the epoch grids, `data.png` and `ddpm-lightning sample`'s grid.png.

    save_grid(images, Path("grid.png"))  # 4 x 4, no padding

    >>> grid_shape(16), grid_shape(12), grid_shape(12, rows=2)
    ((4, 4), (3, 4), (2, 6))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image


def grid_shape(n: int, rows: int | None = None) -> tuple[int, int]:
    """(rows, cols) of a grid of n images: `rows` if given, else as square as n allows (16 -> 4 x 4)."""
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    if rows < 1 or n % rows:
        raise ValueError(
            f"eval_batch_size={n} images do not fill a grid of {rows} rows: make it a multiple of grid_rows."
        )
    return rows, n // rows


def save_grid(
    images: torch.Tensor,
    path: Path,
    rows: int | None = None,
    loggers: Iterable[Logger] = (),
    tag: str = "samples",
    step: int = 0,
) -> Path:
    """Tile `images` ((n, C, H, W), floats in [0, 1] or uint8) into the PNG `path` and into each logger.

    The grid has no padding and `rows` rows (the squarest grid when left out); each logger gets it by `log_image`.
    """
    grid = make_grid(images, nrow=grid_shape(len(images), rows)[1], padding=0)
    if grid.dtype != torch.uint8:  # rounded as torchvision's save_image rounds
        grid = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    grid = grid.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.float() / 255, path)
    for logger in loggers:
        log_image(logger, tag, grid, step)
    return path


def log_image(logger: Logger, tag: str, grid: torch.Tensor, step: int) -> None:
    """`grid` ((C, H, W) uint8) to one Lightning logger through its own image call.

    That is TensorBoard's `add_image`, W&B's `log_image`, MLflow's `log_image` (as an image artifact with a step).
    Other loggers get no images.
    """
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, grid, global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_image(tag, [grid.permute(1, 2, 0).numpy()], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, grid.permute(1, 2, 0).numpy(), key=tag, step=step)
