"""StepLosses: the callback end_to_end.py adds to the project's run (through --trainer.callbacks) to record every
training step's loss and when the first and last steps ended.

A module of its own, importing only torch and lightning, so that the process running the tutorial side of
end_to_end.py never pays for importing Lightning.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback

RUNS: list[dict] = []  # one entry per fit: cli.main returns nothing, so the callback hands its record over here


class StepLosses(Callback):
    """Keeps each step's loss on its device (a detached 0-d tensor: no wait for the GPU per step, so the
    project keeps its asynchronous steps) and copies them to the host once, when training ends.

    time.monotonic() marks: "first_step" and "last_step", each after waiting for the device once.
    """

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.marks: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and (
            trainer.current_epoch + 1 >= trainer.max_epochs or trainer.global_step >= trainer.max_steps > 0
        )
        if len(self.losses) == 1 or last:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.marks.setdefault("first_step", time.monotonic())
            self.marks["last_step"] = time.monotonic()

    def on_train_end(self, trainer, pl_module) -> None:
        losses = torch.stack(self.losses).float().cpu().tolist() if self.losses else []
        RUNS.append({"losses": losses, "marks": dict(self.marks)})
