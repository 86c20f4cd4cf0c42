"""One process at a time on a run: `fit` holds an exclusive lock on `<output_dir>/.ddpm-lightning.lock` while it
trains, and a second `fit` on the same output_dir fails at once, naming the process that holds it. It also locks its
checkpoint folder (the folder itself: no file in it), which two output_dirs of one name share by default
(`checkpoints/<output_dir's name>`).

The lock is `fcntl.flock`: the kernel drops it when its process ends, however it ends (a crash, `kill -9`), so a
lock is never left stuck; the file stays behind, unlocked. Where fcntl is missing (Windows) there is no lock.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TextIO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".ddpm-lightning.lock"


class RunInUseError(RuntimeError):
    """Another process is training into this output_dir."""


class RunLock:
    """The locks on a run's output_dir and its checkpoint folder: `acquire` takes both or raises RunInUseError
    (one line: who holds it, and what to do) holding neither; `release` drops them."""

    def __init__(self, folder: str | Path, checkpoint_dir: str | Path | None = None):
        self.folder = Path(folder)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.file: TextIO | None = None
        self.checkpoint_fd: int | None = None

    def acquire(self) -> None:
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
        file = open(self.folder / LOCK_NAME, "a+")
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
        if self.file is not None:
            self.file.close()  # closing the file drops the lock
            self.file = None
        if self.checkpoint_fd is not None:
            os.close(self.checkpoint_fd)
            self.checkpoint_fd = None
