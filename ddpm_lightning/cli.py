"""The `ddpm-lightning` command: LightningCLI over ImageDataModule and DDPMModule with the grid, save and
quality callbacks (fit, validate, ...), plus the plain `sample` and `export` commands (commands.py).

    ddpm-lightning fit -c configs/butterflies.yaml
    ddpm-lightning fit -c configs/butterflies.yaml --ckpt_path last        # resume
    ddpm-lightning fit -c configs/tiny.yaml --print_config                 # every key, with its value

Outputs: grids in <output_dir>/samples, the diffusers folder in <output_dir>, TensorBoard logs and the run's
config in <output_dir>/logs, checkpoints (last.ckpt kept) in ./checkpoints.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from . import commands
from .callbacks import SampleGrid, SampleQualityMetrics, SaveModel
from .checkpointing import AtomicCheckpointIO, PreemptionCheckpoint, check_ckpt_path
from .data import ImageDataModule
from .module import DDPMModule
from .monitor import ImagesThroughput, RunReport


class DDPMLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output_dir", default="ddpm-butterflies-128", help="Where grids, the saved model and the logs go."
        )
        parser.add_lightning_class_args(RunReport, "report")  # first: its clock brackets the grid and save hooks
        parser.add_lightning_class_args(ImagesThroughput, "throughput")
        parser.add_lightning_class_args(SampleGrid, "grid")
        parser.add_lightning_class_args(SaveModel, "save")
        parser.add_lightning_class_args(SampleQualityMetrics, "quality")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.dirpath": "checkpoints", "checkpoint.save_last": True})
        parser.link_arguments("output_dir", "report.output_dir")
        parser.link_arguments("output_dir", "grid.output_dir")
        parser.link_arguments("output_dir", "save.output_dir")
        parser.link_arguments("data.image_size", "model.image_size")  # one value: the UNet's sample_size

    def instantiate_trainer(self, **kwargs):
        trainer, data = self._get(self.config, "trainer"), self._get(self.config, "data")
        # Unless the config names a logger (or turns logging off), TensorBoard writes to <output_dir>/logs,
        # the same folder on every run, so a resumed run continues its curves instead of starting version_1.
        if trainer.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(save_dir=self._get(self.config, "output_dir"), name="logs", version="")
        if trainer.get("plugins") is None:
            kwargs["plugins"] = [AtomicCheckpointIO()]  # (not a config default: an instance would not serialize)
        if data.val_dataset is None and not data.val_fraction and trainer.limit_val_batches is None:
            kwargs["limit_val_batches"] = 0  # no held-out images: no validation loop at all
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI reads the checkpoint's hyperparameters, which torch.load would fail on obscurely.
        subcommand = self.config.get("subcommand")
        check_ckpt_path(self.config[subcommand].get("ckpt_path") if subcommand else None, None)

    def before_fit(self) -> None:
        check_ckpt_path(self._get(self.config, "ckpt_path"), self.trainer.checkpoint_callback)
        check_writable(self._get(self.config, "output_dir"))


def check_writable(folder: str) -> None:
    """Create the output folder now, so a bad path fails before any training, naming the folder and the fix."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise RuntimeError(f"Cannot start training: output_dir {folder} is not a writable folder ({err}). "
                           "Choose another --output_dir.") from err


def main(args: ArgsType = None) -> None:
    package_log = logging.getLogger("ddpm_lightning")
    if not package_log.handlers:  # show this package's INFO lines, as Lightning does for its own
        package_log.addHandler(logging.StreamHandler())
        package_log.setLevel(logging.INFO)
    if commands.is_command(args):  # `ddpm-lightning sample ...` / `export ...`: plain commands, outside LightningCLI
        commands.run(args)  # returns nothing: the console script would print it and exit 1
        return
    DDPMLightningCLI(
        DDPMModule,
        ImageDataModule,
        args=args,
        auto_configure_optimizers=False,  # the module owns AdamW and the warm-up + cosine schedule
        save_config_kwargs={"overwrite": True},  # a resumed run writes its config to the same folder
        trainer_defaults={"callbacks": [PreemptionCheckpoint()]},
    )


if __name__ == "__main__":
    main()
