"""Post-hoc EMA (EDM2): power-function EMA profiles kept while training, any EMA length reconstructed after it.

`PosthocEMA`, the run's `posthoc_ema` group, keeps `ema_pytorch.PostHocEMA`'s profiles (one power-function EMA per
`sigma_rels` entry, EDM2's relative EMA length), averaged in after every optimizer step on rank 0. Every
`every_n_steps` steps, and at the end of training, it writes each profile's weights as a snapshot,
<checkpoint folder>/posthoc_ema/<profile>.<step>.pt, whole or not at all (`files.write_whole`). The profiles'
running state is this callback's state in every checkpoint, so `--ckpt_path last` continues them exactly; a run
resumed from an earlier checkpoint deletes the snapshots after its step (they belong to the history it replaces).

`reconstruct` solves EDM2's least squares over the snapshots up to a step (the library's `synthesize_ema_model`):
the weights of any EMA length, as if that EMA had been kept. `ddpm-lightning export --ema_length` uses it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from ema_pytorch import PostHocEMA
from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma
from lightning.pytorch import Callback, LightningModule, Trainer

from .files import remove_partial_files, write_whole

log = logging.getLogger(__name__)

SNAPSHOTS = "posthoc_ema"  # the snapshots' folder, beside the checkpoints
SNAPSHOT = re.compile(r"^(\d+)\.(\d+)\.pt$")  # <profile>.<step>.pt, the names ema_pytorch's synthesis reads
MAX_LENGTH = 0.288  # EDM2's sigma_rel above which the power function's exponent is not positive
DTYPES = {"float16": torch.float16, "float32": torch.float32}
Dtype = Literal["float16", "float32"]


def check_lengths(lengths: Sequence[float], option: str) -> None:
    """Each EMA length in (0, MAX_LENGTH): one line naming `option` otherwise."""
    for length in lengths:
        if not 0 < length < MAX_LENGTH or not sigma_rel_to_gamma(length) > 0:
            raise ValueError(
                f"{option} {length}: an EMA length (EDM2's sigma_rel) must be in (0, {MAX_LENGTH}), e.g. 0.05 or 0.1."
            )


class PosthocEMA(Callback):
    """The run's post-hoc EMA profiles (`--posthoc_ema.*`), from which `export --ema_length` reconstructs.

    Args:
        enabled: keep the profiles and write their snapshots (off by default).
        sigma_rels: the profiles' EMA lengths (EDM2's sigma_rel, the averaging window's width relative to the
            training time; at least two, distinct, each in (0, 0.288)). EDM2's pair by default.
        every_n_steps: write a snapshot of each profile every this many optimizer steps (and at the end).
        dtype: the snapshots' dtype. float16 halves their size; a reconstruction then equals a profile up to
            float16 rounding. float32: bit for bit.
        max_disk_gb: refuse to start when the snapshots planned for the run would take more than this (GB).
    """

    def __init__(
        self,
        enabled: bool = False,
        sigma_rels: Sequence[float] = (0.05, 0.28),
        every_n_steps: int = 1000,
        dtype: Dtype = "float16",
        max_disk_gb: float = 20.0,
    ) -> None:
        if enabled:
            check_lengths(sigma_rels, "posthoc_ema.sigma_rels")
            if len(set(sigma_rels)) < 2 or len(set(sigma_rels)) != len(sigma_rels):
                raise ValueError(
                    f"posthoc_ema.sigma_rels {list(sigma_rels)}: give at least two distinct EMA lengths, e.g. "
                    "[0.05, 0.28] (a reconstruction combines the profiles)."
                )
            if every_n_steps < 1:
                raise ValueError(f"posthoc_ema.every_n_steps {every_n_steps}: must be at least 1.")
            if dtype not in DTYPES:
                raise ValueError(f"posthoc_ema.dtype {dtype}: use one of {', '.join(DTYPES)}.")
        self.enabled, self.sigma_rels, self.every_n_steps = enabled, [float(s) for s in sigma_rels], every_n_steps
        self.dtype, self.max_disk_gb = dtype, max_disk_gb
        self.profiles: PostHocEMA | None = None  # rank 0's, while fitting
        self.folder: Path | None = None
        self.last_step: int | None = None  # the optimizer step last averaged in

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Build the profiles from the UNet (before a resume loads their state into them)."""
        if not self.enabled or stage != "fit" or not trainer.is_global_zero:
            return
        self.folder = snapshot_folder(trainer)
        self.profiles = PostHocEMA(
            pl_module.unet,
            sigma_rels=tuple(self.sigma_rels),
            update_every=1,  # EDM2's profiles average every step (the library's default is every 100th)
            checkpoint_every_num_steps="manual",  # the snapshots are written here, whole or not at all
            checkpoint_folder=str(self.folder),
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the planned disk cost, and delete the snapshots after the step this run starts from."""
        if not self.enabled:
            return
        # (finite: the module's learning-rate schedule has already refused a run without a set length)
        count = snapshots_planned(int(trainer.estimated_stepping_batches), self.every_n_steps)
        size = unet_bytes(pl_module.unet, DTYPES[self.dtype])
        cost = count * len(self.sigma_rels) * size
        said = (
            f"{count} snapshots x {len(self.sigma_rels)} profiles x {size / 1e6:.1f} MB ({self.dtype}) = "
            f"{cost / 1e9:.2f} GB"
        )
        if cost > self.max_disk_gb * 1e9:
            raise ValueError(
                f"posthoc_ema: the run's snapshots would take {said}, over posthoc_ema.max_disk_gb {self.max_disk_gb}: "
                "raise posthoc_ema.every_n_steps or posthoc_ema.max_disk_gb"
                + (", or use posthoc_ema.dtype float16." if self.dtype == "float32" else ".")
            )
        if self.profiles is None or self.folder is None:
            return
        move_weights(self.profiles, next(pl_module.unet.parameters()).device)
        self.last_step = trainer.global_step
        remove_partial_files(self.folder)  # (the run's lock is held: no other write is under way)
        later = [path for (_, step), path in snapshots(self.folder).items() if step > trainer.global_step]
        for path in later:
            path.unlink()
        if later:
            log.warning(
                f"posthoc_ema: deleted {len(later)} snapshot(s) after step {trainer.global_step} in {self.folder}: "
                "they were another history's (past the checkpoint this run starts from, or a run started again)."
            )
        checkpoint_bytes = len(self.sigma_rels) * unet_bytes(pl_module.unet, torch.float32)
        log.info(
            f"posthoc_ema: sigma_rels {self.sigma_rels}, a snapshot every {self.every_n_steps} steps into "
            f"{self.folder}: {said} for the run; each checkpoint holds the profiles too "
            f"(+{checkpoint_bytes / 1e6:.1f} MB)"
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Average the weights in once per optimizer step; write a snapshot every `every_n_steps`."""
        if self.profiles is None or trainer.global_step == self.last_step:
            return
        self.profiles.update()
        self.last_step = trainer.global_step
        if trainer.global_step % self.every_n_steps == 0:
            self.snapshot(trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A snapshot at the last step, for reconstructions at the end of training."""
        if self.profiles is not None and self.folder is not None and trainer.global_step > 0:
            if not (self.folder / f"0.{trainer.global_step}.pt").exists():
                self.snapshot(trainer.global_step)

    def snapshot(self, step: int) -> None:
        """Write each profile's weights as <folder>/<profile>.<step>.pt in the snapshot dtype."""
        assert self.profiles is not None and self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        for index, profile in enumerate(self.profiles.ema_models):
            state = {k: in_dtype(v, DTYPES[self.dtype]) for k, v in profile.state_dict().items()}
            write_whole(self.folder / f"{index}.{step}.pt", functools.partial(save_to, state))

    def state_dict(self) -> dict[str, Any]:
        """The profiles' running state (rank 0's; other ranks keep none)."""
        if self.profiles is None:
            return {}
        return {"sigma_rels": self.sigma_rels, "profiles": self.profiles.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpoint's profiles; a checkpoint without them starts the profiles from its weights."""
        if self.profiles is None:
            return
        if not state_dict:
            log.warning("posthoc_ema: the checkpoint holds no post-hoc EMA profiles: they start from its weights.")
            return
        if list(state_dict["sigma_rels"]) != self.sigma_rels:
            raise ValueError(
                f"posthoc_ema.sigma_rels {self.sigma_rels}: the checkpoint's profiles have {state_dict['sigma_rels']}; "
                "resume with those (a reconstruction mixes the snapshots of both)."
            )
        self.profiles.load_state_dict(state_dict["profiles"])


def move_weights(profiles: PostHocEMA, device: torch.device) -> None:
    """The profiles' weights to `device` (the UNet's); their step counters stay on the CPU.

    ema_pytorch reads each profile's counters with `.item()` three times a step: on a GPU each read would wait for
    the GPU to finish its queued work, every step.
    """
    for profile in profiles.ema_models:
        profile.ema_model.to(device)


def save_to(state: dict[str, torch.Tensor], path: Path) -> None:
    """torch.save(state, path), for `write_whole`."""
    torch.save(state, path)


def snapshot_folder(trainer: Trainer) -> Path:
    """<the checkpoint folder>/posthoc_ema (the trainer's root folder without checkpoints)."""
    checkpoint = trainer.checkpoint_callback
    dirpath = getattr(checkpoint, "dirpath", None) or trainer.default_root_dir
    return Path(dirpath) / SNAPSHOTS


def snapshots_planned(total_steps: int, every_n_steps: int) -> int:
    """The snapshots a run of `total_steps` writes: every `every_n_steps`, and one at the end."""
    return total_steps // every_n_steps + (1 if total_steps % every_n_steps else 0)


def unet_bytes(unet: torch.nn.Module, dtype: torch.dtype) -> int:
    """The size of the UNet's floating-point weights and buffers in `dtype`."""
    tensors = [*unet.parameters(), *unet.buffers()]
    return sum(t.numel() for t in tensors if t.is_floating_point()) * dtype.itemsize


def in_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU copy, floating-point values in `dtype` (the step counters keep theirs)."""
    return tensor.detach().to("cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def snapshots(folder: Path) -> dict[tuple[int, int], Path]:
    """The snapshots in `folder`, by (profile, step)."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = SNAPSHOT.match(path.name)
        if match:
            found[int(match[1]), int(match[2])] = path
    return found


def checkpoint_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's post-hoc EMA state (`PosthocEMA.state_dict`), or None without one."""
    state = (checkpoint.get("callbacks") or {}).get(PosthocEMA.__qualname__)
    return state or None


def reconstruct(
    unet: torch.nn.Module, folder: Path, state: Mapping[str, Any], step: int, length: float
) -> dict[str, torch.Tensor]:
    """The UNet weights of EMA length `length` (EDM2's sigma_rel) at `step`.

    EDM2's least squares (ema_pytorch's `synthesize_ema_model`) over the snapshots in `folder` before `step`
    and the checkpoint's own profiles (`state`, exact, at `step`); later snapshots (another run's history past the
    checkpoint) are left out.
    """
    sigma_rels = list(state["sigma_rels"])
    chosen = [path for (index, at), path in snapshots(folder).items() if at < step and index < len(sigma_rels)]
    with tempfile.TemporaryDirectory() as tmp:
        for path in chosen:
            os.symlink(path.resolve(), Path(tmp) / path.name)
        for index in range(len(sigma_rels)):
            prefix = f"ema_models.{index}."
            profile = {k[len(prefix) :]: v for k, v in state["profiles"].items() if k.startswith(prefix)}
            torch.save(profile, Path(tmp) / f"{index}.{step}.pt")
        profiles = PostHocEMA(
            unet.cpu(),
            sigma_rels=tuple(sigma_rels),
            update_every=1,
            checkpoint_every_num_steps="manual",
            checkpoint_folder=tmp,
        )
        synthesized = profiles.synthesize_ema_model(sigma_rel=length, step=step)
        return {k: v.detach().clone() for k, v in synthesized.ema_model.state_dict().items()}
