"""The run folder's life cycle: its checks before training, its lock while training, its removal after a failed start.

`fit` checks that `output_dir` can be written (`check_writable`) and that a fresh run does not merge into another
(`check_fresh_run`), removes what a run that failed before its first step wrote (`remove_unstarted_run`), and holds
the run's lock while it trains (`RunLock`).

One process at a time on a run: `fit` holds an exclusive lock on `<output_dir>/.ddpm-lightning.lock` while it
trains, and a second `fit` on the same output_dir fails at once, naming the process that holds it. It also locks its
checkpoint folder (the folder itself: no file in it), which two output_dirs of one name share by default
(`checkpoints/<output_dir's name>`).

The lock is `fcntl.flock`: the kernel drops it when its process ends, however it ends (a crash, `kill -9`), so a
lock is never left stuck; the file stays behind, unlocked. Where fcntl is missing (Windows) there is no lock.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import yaml

from .files import CARD, LOGS, MODEL_FILES, SAMPLES, RunFolder

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import ModelCheckpoint

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class RunInUseError(RuntimeError):
    """Another process is training into this output_dir."""


class RunLock:
    """The locks on a run's output_dir and its checkpoint folder.

    `acquire` takes both or raises RunInUseError (one line: who holds it, and what to do) holding neither; `release`
    drops them.
    """

    def __init__(self, folder: str | Path, checkpoint_dir: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.file: TextIO | None = None
        self.checkpoint_fd: int | None = None

    def acquire(self) -> None:
        """Lock the output_dir, then the checkpoint folder (where fcntl exists)."""
        if fcntl is None:
            return
        self.lock_output_dir()
        if self.checkpoint_dir is not None and self.checkpoint_dir.resolve() != self.folder.resolve():
            fd = os.open(self.checkpoint_dir, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.release()
                raise RunInUseError(
                    f"--checkpoint.dirpath {self.checkpoint_dir} is in use by another ddpm-lightning run, training "
                    f"into it now (by default two output_dirs named {self.folder.name} share it): give this run "
                    "its own --checkpoint.dirpath, or wait for the other to end."
                ) from None
            self.checkpoint_fd = fd

    def lock_output_dir(self) -> None:
        """Lock the output_dir's lock file, and write who holds it there."""
        file = open(RunFolder(self.folder).lock, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunInUseError(
                f"output_dir {self.folder} is in use by {holder} (training into it now). Wait for it to end, or "
                "stop it (kill -TERM <its PID> saves a checkpoint and exits) and resume with --ckpt_path last; or "
                "choose another --output_dir."
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"ddpm-lightning PID {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}\n")
        file.flush()
        self.file = file

    def release(self) -> None:
        """Drop both locks."""
        if self.file is not None:
            self.file.close()  # closing the file drops the lock
            self.file = None
        if self.checkpoint_fd is not None:
            os.close(self.checkpoint_fd)
            self.checkpoint_fd = None


def check_writable(folder: str, option: str = "--output_dir") -> None:
    """Create the folder now, so a bad path fails before any training, naming the folder and the fix."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise RuntimeError(
            f"Cannot start training: {option.lstrip('-')} {folder} is not a writable folder ({err}). "
            f"Choose another {option}."
        ) from err


def check_outside_data(output_dir: str, datasets: dict[str, str | None]) -> None:
    """Refuse an output_dir inside a local data folder ({option: value}).

    A folder's images are every image file under it, so the run's grids would become training (or held-out) images
    of the next run.
    """
    out = Path(output_dir).expanduser().resolve()
    for option, dataset in datasets.items():
        folder = Path(dataset).expanduser() if dataset else None
        if folder is not None and folder.is_dir() and out.is_relative_to(folder.resolve()):
            raise ValueError(
                f"--output_dir {output_dir} is inside --{option} {dataset}: the run's grids (samples/*.png) would "
                "be read as images of that data set. Choose an --output_dir outside the data folder."
            )


# What a run writes into output_dir: a fresh run refuses a folder that holds any of them (see check_fresh_run).
RUN_FILES = (LOGS, SAMPLES, *MODEL_FILES, CARD)


def check_fresh_run(folder: str, checkpoint: ModelCheckpoint | None, overwrite: bool) -> None:
    """A fresh run (no --ckpt_path) never merges into another run's logs or `last`, nor replaces a file silently.

    A run that saved nothing but its logs and grids (`saved_nothing`) is started again, with a line that says so.
    """
    out = Path(folder)
    found = run_files(out)
    ckpt_dir = Path(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else None
    ckpts = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir is not None and ckpt_dir.is_dir() else []
    if ckpts:  # last.ckpt is a link to one of the others: files counted once
        found.append(f"{len({c.resolve() for c in ckpts})} checkpoint(s) in {ckpt_dir}")
    if not found:
        return
    log = logging.getLogger("ddpm_lightning")
    if not overwrite and saved_nothing(out, found):
        log.info(
            f"output_dir {folder} holds a run that saved no checkpoint and no model (stopped before its first "
            f"checkpoint): nothing of it can be resumed, so it starts again from step 0 ({' and '.join(found)} "
            "replaced)."
        )
    elif not overwrite:
        raise FileExistsError(
            f"output_dir {folder} already holds a run ({', '.join(found)}). Resume it with --ckpt_path last, "
            "choose another --output_dir, or pass --overwrite true to start it again (its logs, samples and "
            "checkpoints are deleted; its model files and README.md are rewritten at the first save)."
        )
    for name in (LOGS, SAMPLES):
        shutil.rmtree(out / name, ignore_errors=True)
    for ckpt in ckpts:
        ckpt.unlink()
    if overwrite:
        log.info(f"--overwrite: deleted the old run's logs, samples, checkpoints in {folder}")


def run_files(out: Path) -> list[str]:
    """The RUN_FILES that `out` holds."""
    return [name for name in RUN_FILES if (out / name).exists()]


def saved_nothing(out: Path, found: list[str]) -> bool:
    """Whether the run in `out` left only its logs and grids (`found`: its RUN_FILES), no model and no checkpoint.

    No checkpoint in this run's checkpoint folder (`found` would name them) nor in the one its saved config names
    (logs/config.yaml's checkpoint.dirpath).

    Such a run (killed before its first checkpoint, 10 minutes of training by default) cannot be resumed, and
    starting it again loses nothing trained.
    """
    if not set(found) <= {LOGS, SAMPLES}:
        return False
    try:
        config = yaml.safe_load(RunFolder(out).config.read_text()) or {}
        dirpath = (config.get("checkpoint") or {}).get("dirpath")
    except (OSError, yaml.YAMLError, AttributeError):
        dirpath = None  # no config saved yet (killed during the start-up), or not one of ours
    return not (dirpath and Path(dirpath).is_dir() and any(Path(dirpath).glob("*.ckpt")))


def remove_unstarted_run(folder: str, checkpoint: ModelCheckpoint | None) -> None:
    """Remove what a fresh run wrote before failing ahead of its first optimizer step (its logs, samples/data.png).

    These are folders check_fresh_run found absent (or --overwrite emptied), so nothing of another run's; they are
    kept if the run saved a checkpoint after all.
    """
    ckpt_dir = Path(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else None
    if ckpt_dir is not None and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
        return
    for name in (LOGS, SAMPLES):
        shutil.rmtree(Path(folder) / name, ignore_errors=True)
