"""A run's files: where each lives in the run folder, and how each is written (whole or not at all).

`RunFolder(output_dir)` hands out the path of everything a run writes there: its grids (`grid(epoch)`,
`newest_grid()`), the training images as the model gets them (`data_preview`), the copy check's pairs (`nearest`),
the cached features of the reference images (`fid_reference`), the logs and the summary; the model folder's card
and image are `CARD` and `CARD_IMAGE`. Whoever writes or reads one of them asks here, so the layout is spelled once.

A file is written beside its destination, under a hidden name with `PARTIAL` in it, and renamed into place
(`write_whole`): a reader sees the old file or the new one, never half of one. What a killed write leaves is swept
at the next start (`remove_partial_files`). A write that fails is told in one line: its error's first line
(`first_line`) and the space left where it wrote (`why_not_written`), and what to run next (`next_run`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

# The run folder (output_dir). The model folder a run saves there is diffusers' (model_index.json, unet/,
# scheduler/: publish/folder.py), with its card.
SAMPLES = "samples"  # the epoch grids, data.png and nearest.png
GRIDS = "[0-9]*.png"  # in SAMPLES: the epoch grids ({epoch:04d}.png), not data.png (training images) nor nearest.png
DATA_PREVIEW = "data.png"  # in SAMPLES: the first training images, as the model gets them
NEAREST = "nearest.png"  # in SAMPLES (`sample`: in its output folder): the samples nearest a training image
FID_REFERENCE = "fid_reference"  # the reference images' features, a cache
LOGS = "logs"  # fit's logs and config.yaml (validate's go to validate/)
CONFIG = "config.yaml"  # in LOGS: the run's config, as LightningCLI saved it
SUMMARY = "run_summary.json"
LOCK = ".ddpm-lightning.lock"  # held while a fit trains into the folder (run_folder.RunLock)
MODEL_INDEX = "model_index.json"  # the model folder's index, written last (publish/folder.py)
MODEL_FILES = (MODEL_INDEX, "unet", "scheduler")  # DDPMPipeline.save_pretrained's
CARD = "README.md"  # the model card, in the model folder
CARD_IMAGE = "samples.png"  # the grid the card shows, copied beside it


class RunFolder:
    """The paths of a run's files in its output_dir."""

    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir)
        self.samples = self.root / SAMPLES
        self.data_preview = self.samples / DATA_PREVIEW
        self.nearest = self.samples / NEAREST
        self.fid_reference = self.root / FID_REFERENCE
        self.logs = self.root / LOGS
        self.config = self.logs / CONFIG
        self.summary = self.root / SUMMARY
        self.lock = self.root / LOCK

    def grid(self, epoch: int) -> Path:
        """The grid drawn at the end of `epoch`."""
        return self.samples / f"{epoch:04d}.png"

    def grids(self) -> list[Path]:
        """The epoch grids there, by name (the epoch's order)."""
        return sorted(p for p in self.samples.glob(GRIDS) if p.is_file())

    def newest_grid(self) -> Path | None:
        """The grid written last (by modification time, then name); None before the first."""
        grids = self.grids()
        return max(grids, key=lambda p: (p.stat().st_mtime_ns, p.name)) if grids else None


PARTIAL = ".partial-"  # a write in progress: .<name>.partial-<pid> beside its destination


def write_whole(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(temporary path)`, then the file renamed to `path`.

    A failed write leaves `path` as it was and no partial file (a kill leaves a hidden
    `.<stem>.partial-<pid><suffix>`). The suffix is kept, so image writers find the format in the name.
    """
    path = Path(path)
    partial = path.with_name(f".{path.stem}{PARTIAL}{os.getpid()}{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def remove_partial_files(folder: str | Path | None) -> None:
    """Delete what writes killed mid-way left in `folder` (up to a checkpoint's size each).

    Call it only while holding the run's lock, so no write of another process is in progress there.
    """
    if folder is not None and Path(folder).is_dir():
        for path in Path(folder).glob(f".*{PARTIAL}*"):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def why_not_written(folder: Path, err: BaseException) -> str:
    """The first line of a failed write's error and the space left where it wrote.

    For example "... No space left on device (os error 28); 0 MiB free there".
    """
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "its folder cannot be read"
    return f"{first_line(err)}; {free}"


def next_run(has_checkpoint: bool) -> str:
    """What to run after a run stopped by a failed write: resume, or start again.

    With no checkpoint to resume from, the run starts again (the stopped run's logs and samples are there, so a
    fresh run needs --overwrite).
    """
    if has_checkpoint:
        return "resume with --ckpt_path last"
    return "start the run again with --overwrite true (no checkpoint was saved to resume from)"
