"""Checkpoints that cost little, survive interruptions and resume exactly: one subsystem in four files.

- writes.py: each checkpoint written atomically in a background thread; the previous one kept until it is whole.
- cadence.py: when (`PeriodicCheckpoint`: every 10 minutes of training, at the end, on a stop signal).
- signals.py: SIGTERM, SIGUSR1 and Ctrl-C save at the next optimizer step and stop (`PreemptionCheckpoint`).
- resume.py: what a resume restores beyond Lightning (`RNGStates`) and checks (`SameData`, `check_ckpt_path`).
"""

from .cadence import PeriodicCheckpoint
from .resume import RNGStates, SameData, check_ckpt_path
from .signals import STOP_SIGNALS, PreemptionCheckpoint, stop_if_signalled
from .writes import AtomicCheckpointIO, BackgroundCheckpointIO, CheckpointWriteError

__all__ = [
    "STOP_SIGNALS",
    "AtomicCheckpointIO",
    "BackgroundCheckpointIO",
    "CheckpointWriteError",
    "PeriodicCheckpoint",
    "PreemptionCheckpoint",
    "RNGStates",
    "SameData",
    "check_ckpt_path",
    "stop_if_signalled",
]
