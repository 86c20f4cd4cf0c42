"""ddpm-lightning: train an unconditional diffusion model (diffusers UNet2DModel + DDPM) with PyTorch Lightning.

From Python (docs/python.md): `run([...])` runs a subcommand as the command line would and returns what it built;
`build([...])` returns the Trainer, module and data module that `fit` would train, unrun.
"""

from .callbacks import MeasureQuality, SampleGrid, SaveModel
from .cli import build, run
from .data import ImageDataModule
from .module import DDPMModule
from .reporting.monitor import ImagesThroughput, RunReport
from .reporting.progress import TrainingProgressBar
from .speed import SpeedSwitches

__all__ = [
    "DDPMModule",
    "ImageDataModule",
    "ImagesThroughput",
    "MeasureQuality",
    "RunReport",
    "SampleGrid",
    "SaveModel",
    "SpeedSwitches",
    "TrainingProgressBar",
    "build",
    "run",
]
