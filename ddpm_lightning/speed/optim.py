"""AdamW for `DDPMModule`: plain, fused or compiled.

`make_adamw` picks plain, fused or compiled AdamW from the speed switches (`SpeedSwitches.adamw`) and refuses the
combination Lightning cannot run; `CompiledAdamW` is gradient clipping and the AdamW update as torch.compile'd code
(`speed.compile_optimizer`).

Eager, a step of the tutorial's UNet is hundreds of small kernels; under `mode="reduce-overhead"` on a GPU it is
two CUDA graphs, the clip and the update (torch's `Optimizer.step` breaks the graph at its entry, pytorch#104053).
- The LR is a device tensor the LR schedule fills in place (a float would be a constant of the graph: a recompile
  per step); `state_dict` saves it as a float, so a checkpoint is plain AdamW's and resumes with or without this.
- On a GPU `capturable=True` keeps the step count on the device; clipping by norm never reads back to the host.
- The gradients are the backward's outputs, freed after each step (`DDPMModule.optimizer_step`): under the
  compiled forward (speed/switches.py) they live in its CUDA graph pool, where this graph reads them without a copy
  (pytorch#107504). Zeroed in place instead of freed, they would be read after the next replay overwrote them.
The forward and backward (Lightning's closure) run before the compiled step. Under 16-mixed, GradScaler still
unscales first and skips the step on overflow (a host read per step; bf16 has none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision

MIN_LR = 1e-30


def make_adamw(
    parameters: Iterable[torch.nn.Parameter],
    adamw: dict[str, Any],
    fused_adamw: bool | None,
    compile_optimizer: bool,
    compile_mode: str,
    trainer: Trainer,
) -> torch.optim.AdamW:
    """AdamW with the `adamw` settings: compiled, fused or plain.

    Compiled with `compile_optimizer` (which `SpeedSwitches` refuses beside `fused_adamw`); fused with `fused_adamw`
    (by default on when the parameters are on a GPU and the step is not compiled). Refuses, with the fix, what
    would fail later.
    """
    parameters = list(parameters)
    on_gpu = parameters[0].device.type == "cuda"
    fused = fused_adamw if fused_adamw is not None else on_gpu and not compile_optimizer
    plugin = trainer.precision_plugin
    if fused and trainer.gradient_clip_val and type(plugin) is MixedPrecision:
        # Lightning's own plugin would raise at the first optimizer step; say it now, with the fixes.
        raise ValueError(
            f"Lightning's MixedPrecision ({plugin.precision}) cannot clip gradients for a fused AdamW. Train "
            "through the `ddpm-lightning` CLI (it installs ddpm_lightning.precision.FusedClipMixedPrecision), "
            "pass plugins=[FusedClipMixedPrecision(...)] to your Trainer, or set speed.fused_adamw false or "
            "trainer.gradient_clip_val null."
        )
    if compile_optimizer:
        clip = trainer.gradient_clip_val, trainer.gradient_clip_algorithm or "norm"
        return CompiledAdamW(parameters, *clip, compile_mode=compile_mode, **adamw)
    return torch.optim.AdamW(parameters, fused=fused or None, **adamw)


class CompiledAdamW(torch.optim.AdamW):
    """AdamW whose `step` clips the gradients and updates the weights in one compiled function.

    It clips by total norm or value, as Lightning's `gradient_clip_*` keys say. See the module docstring.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        clip_val: float | None = None,
        clip_algorithm: str = "norm",
        compile_mode: str = "default",
        **adamw: Any,
    ) -> None:
        super().__init__(params, foreach=None, fused=None, **adamw)
        self.clip_val = clip_val
        self.clip_algorithm = clip_algorithm
        self._compiled_step = torch.compile(self._clip_and_update, mode=compile_mode, dynamic=False)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure (forward and backward), then the compiled clip and update; return the closure's loss."""
        loss = None
        if closure is not None:  # Lightning's forward + backward: not part of the compiled function
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not isinstance(group["lr"], torch.Tensor):  # the first step, or just resumed from a checkpoint
                device = group["params"][0].device
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
                group["capturable"] = device.type == "cuda"
                for p in group["params"]:  # a resumed step count stays on the CPU (Lightning); capturable: beside p
                    if "step" in self.state.get(p, {}):
                        self.state[p]["step"] = self.state[p]["step"].to(device)
        self._compiled_step()
        return loss

    def _clip_and_update(self) -> None:
        if self.clip_val:
            grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            if self.clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(grads, self.clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(grads, self.clip_val)
        for group in self.param_groups:
            # AdamW with a tensor LR (capturable, and compiled on any device) divides by the step size: an LR of
            # exactly 0 (the warm-up's first step) gives 0/0 = NaN for a gradient that is exactly 0 (attention key
            # biases). A floor of 1e-30 moves no float32 weight that is not itself below 1e-23.
            group["lr"].clamp_(min=MIN_LR)
        super().step()

    def state_dict(self) -> dict[str, Any]:
        """Plain AdamW's state dict: a float LR, not capturable."""
        state = super().state_dict()
        for group in state["param_groups"]:  # plain AdamW's values: a float LR, not capturable
            group["lr"] = float(group["lr"])
            group["capturable"] = False
        return state
