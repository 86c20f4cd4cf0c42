"""ddpm-lightning: train an unconditional diffusion model (diffusers UNet2DModel + DDPM) with PyTorch Lightning."""

from .callbacks import SampleGrid, SaveModel
from .data import ImageDataModule
from .module import DDPMModule

__all__ = ["DDPMModule", "ImageDataModule", "SampleGrid", "SaveModel"]
