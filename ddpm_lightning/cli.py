"""The `ddpm-lightning` command: LightningCLI over ImageDataModule and DDPMModule, plus `sample` and `export`.

LightningCLI runs fit, validate, ... with the grid, save and quality callbacks; the plain `sample` and `export`
commands are commands.py's.

    ddpm-lightning fit -c configs/butterflies.yaml
    ddpm-lightning fit -c configs/butterflies.yaml --ckpt_path last        # resume
    ddpm-lightning fit -c configs/tiny.yaml --print_config                 # every key, with its value

Outputs: grids in <output_dir>/samples, the diffusers folder in <output_dir>, TensorBoard logs and the run's
config in <output_dir>/logs, checkpoints in ./checkpoints/<output_dir's name> (last.ckpt links to the latest), the
validation images' FID features (a cache) in <output_dir>/fid_reference.
Errors the product raises on purpose print as one line; `--debug` (or DDPM_LIGHTNING_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import signal
import sys
import threading
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any, ClassVar, NoReturn, Optional

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import SIGTERMException

from . import commands
from .callbacks import MeasureQuality, SampleGrid, SaveModel
from .checkpointing import (
    STOP_SIGNALS,
    BackgroundCheckpointIO,
    PeriodicCheckpoint,
    PreemptionCheckpoint,
    RNGStates,
    SameData,
    check_ckpt_path,
)
from .data import ImageDataModule
from .files import LOGS, remove_partial_files
from .module import DDPMModule
from .posthoc_ema import PosthocEMA
from .reporting.monitor import ImagesThroughput, RunReport
from .reporting.progress import TrainingProgressBar
from .run_folder import (
    RunLock,
    check_fresh_run,
    check_outside_data,
    check_writable,
    remove_unstarted_run,
    run_files,
    saved_nothing,
)
from .speed import COMPILING, RENAMED, FusedClipMixedPrecision, SpeedSwitches, keep_compile_cache
from .unet import check_norm_groups


class DDPMLightningCLI(LightningCLI):
    """LightningCLI with the run's folder, callbacks and checks: fit and validate only."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add --output_dir, --overwrite and the callbacks' groups, and link the values they share."""
        parser.add_argument("--output_dir", default="ddpm-butterflies-128", help="Where grids, model and logs go.")
        parser.add_lightning_class_args(RunReport, "report")  # first: its clock brackets the grid and save hooks
        parser.add_lightning_class_args(ImagesThroughput, "throughput")
        parser.add_lightning_class_args(SampleGrid, "grid")
        parser.add_lightning_class_args(SaveModel, "save")
        parser.add_lightning_class_args(MeasureQuality, "quality")
        parser.add_lightning_class_args(SpeedSwitches, "speed")
        parser.add_lightning_class_args(PosthocEMA, "posthoc_ema")
        add_renamed_keys(parser)
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Start a fresh run in an output_dir that already holds one: its logs, samples and checkpoints are "
            "deleted first; the model files and README.md are rewritten at the first save.",
        )
        parser.add_lightning_class_args(PeriodicCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.dirpath": None})  # None: checkpoints/<output_dir's name>, this run's own
        for group in ("report", "grid", "save", "quality"):
            parser.link_arguments("output_dir", f"{group}.output_dir")
        parser.link_arguments("data.image_size", "model.image_size")  # one value: the UNet's sample_size

    @staticmethod
    def subcommands() -> dict[str, set[str]]:  # test / predict have nothing to do for a diffusion model
        """Lightning's fit and validate subcommands, with their arguments."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, help in (
            ("sample", "Draw images from a checkpoint, a saved folder or a Hub model id."),
            ("export", "Write a checkpoint's model as a diffusers folder with a model card."),
            ("prepare", "Resize a data set once into shards that --data.dataset streams (a folder or s3:// / gs://)."),
        ):
            # Listed for --help only: main() hands `sample ...` / `export ...` / `prepare ...` to commands.run.
            parser._subcommands_action.add_subcommand(name, ArgumentParser(description=help), help=help)

    def before_instantiate_classes(self) -> None:
        """Check the values, and fill in the checkpoint folder from output_dir."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # (`build`: fit's keys at the top)
        move_renamed_keys(config, self.renamed_given)
        check_values(config)
        check_outside_data(
            config.output_dir, {f"data.{k}": config.get(f"data.{k}") for k in ("dataset", "val_dataset")}
        )
        if config.get("checkpoint") is not None and config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path("checkpoints") / Path(config.output_dir).resolve().name)
        speed = config.get("speed") or {}
        if config.get("checkpoint") is not None and any(speed.get(k) for k in COMPILING):
            keep_compile_cache(config.checkpoint.dirpath)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer with the run's logger, checkpoint writes, progress bar and precision plugin."""
        trainer, data = self._get(self.config, "trainer"), self._get(self.config, "data")
        # Unless the config names a logger (or turns logging off), TensorBoard writes to <output_dir>/logs,
        # the same folder on every run, so a resumed run continues its curves instead of starting version_1.
        if trainer.get("logger") in (None, True):
            # validate logs (and saves its config) to <output_dir>/validate: the run's logs/ stay the record of
            # training.
            name = log_folder(self.subcommand)
            kwargs["logger"] = TensorBoardLogger(save_dir=self._get(self.config, "output_dir"), name=name, version="")
        if trainer.get("plugins") is None:
            # Atomic writes in a background thread (not a config default: an instance would not serialize)
            kwargs["plugins"] = [BackgroundCheckpointIO()]
        held_out = data.val_dataset is not None or data.val_fraction
        if log_folder(self.subcommand) == LOGS and not held_out and trainer.limit_val_batches is None:
            kwargs["limit_val_batches"] = 0  # no held-out images: no validation loop at all
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar:  # Lightning's default: this one shows the loss without a sync per step
            trainer.callbacks[trainer.callbacks.index(bar)] = TrainingProgressBar()
        if type(trainer.strategy.precision_plugin) is MixedPrecision:  # 16-mixed / bf16-mixed: clip with fused AdamW
            trainer.strategy.precision_plugin = FusedClipMixedPrecision.replacing(trainer.strategy.precision_plugin)
        return trainer

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's parser, as a RunParser (its errors about the config files and keys are one line)."""
        self.parser_class = RunParser
        parser = super().init_parser(**kwargs)
        if not hasattr(self, "parsers"):
            self.parsers: list[RunParser] = []  # the root's and each subcommand's
        self.parsers.append(parser)
        parser.family = self.parsers  # the keys a typo is compared with are the subcommands'
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Check the YAML files, parse, then check --ckpt_path, and that validate has held-out images."""
        RunParser.config_files = config_files(sys.argv[1:] if args is None else args)
        for path in RunParser.config_files:
            check_yaml(path)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        # The renamed keys the user gave, before LightningCLI parses a --ckpt_path's hyperparameters over them.
        self.renamed_given = renamed_keys_given(self.config[subcommand] if subcommand else self.config)
        # Before LightningCLI reads the checkpoint's hyperparameters, which torch.load would fail on obscurely.
        check_ckpt_path(self.config[subcommand].get("ckpt_path") if subcommand else None, None)
        data = self.config[subcommand].get("data") if subcommand == "validate" else None
        if data is not None and data.get("val_dataset") is None and not data.get("val_fraction"):
            # (fit turns validation off without them; validate would silently do nothing)
            raise ValueError(
                "validate needs held-out images: set --data.val_dataset or --data.val_fraction "
                "(the same as the run used, e.g. -c <output_dir>/logs/config.yaml)."
            )

    def before_fit(self) -> None:
        """Check the folders, take the run's lock and check that the run can start or resume."""
        output_dir, checkpoint = self._get(self.config, "output_dir"), self.trainer.checkpoint_callback
        checkpoint_dir = checkpoint.dirpath if checkpoint is not None else None
        check_writable(output_dir)
        if checkpoint_dir and self.trainer.global_rank == 0:
            check_writable(checkpoint_dir, "--checkpoint.dirpath")
        # Rank 0 only: the other ranks of a run start after it (and are the same run) and would find its new files.
        rank_zero = self.trainer.global_rank == 0
        self.lock = RunLock(output_dir, checkpoint_dir)
        if rank_zero:
            self.lock.acquire()  # first: a second process on this run fails now, naming the one that holds it
        try:
            if rank_zero:  # the lock is held: no write of another process is in progress
                remove_partial_files(output_dir)
                remove_partial_files(checkpoint_dir)
            restarts = saved_nothing(Path(output_dir), run_files(Path(output_dir)))  # (the plain command's fix)
            check_ckpt_path(self._get(self.config, "ckpt_path"), checkpoint, self.trainer.max_epochs, restarts)
            if self._get(self.config, "ckpt_path") is None and rank_zero:
                check_fresh_run(output_dir, checkpoint, self._get(self.config, "overwrite"))
        except BaseException:
            self.lock.release()
            raise

    def fit(self, **kwargs: Any) -> None:
        """`trainer.fit` with the run's lock held.

        A fresh run that fails before its first optimizer step (a typo in the data set, ...) leaves nothing that
        would make the corrected command refuse to start.
        """
        try:
            self.trainer.fit(**kwargs)
        except BaseException:
            if kwargs.get("ckpt_path") is None and self.trainer.global_rank == 0 and self.trainer.global_step == 0:
                remove_unstarted_run(self._get(self.config, "output_dir"), self.trainer.checkpoint_callback)
            raise
        finally:
            self.lock.release()


DESCRIPTION = "Train an unconditional diffusion model (diffusers UNet2DModel + DDPM) with PyTorch Lightning."


def log_folder(subcommand: str | None) -> str:
    """The folder in output_dir that gets a subcommand's logs and config: `logs` for fit, else its name."""
    return LOGS if subcommand in (None, "fit") else subcommand


class SaveRunConfig(SaveConfigCallback):
    """Lightning's SaveConfigCallback, writing into `<output_dir>/logs/` (validate: `<output_dir>/validate/`).

    Lightning's writes into the logger's folder, which for W&B or MLflow is their own (the working directory by
    default), so `-c <output_dir>/logs/config.yaml` would not find it; here the folder is the same for every logger.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write config.yaml (rank 0), once."""
        if self.already_saved:  # type: ignore[has-type]  # (set by Lightning's __init__)
            return
        if trainer.is_global_zero:
            folder = Path(self.config.output_dir) / log_folder(stage)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / self.config_filename
            self.parser.save(
                self.config, str(path), skip_none=False, overwrite=self.overwrite, multifile=self.multifile
            )
        self.already_saved = True


class RunParser(LightningArgumentParser):
    """LightningCLI's parser, whose error on an unknown key is one line: the key, its file and line, the nearest key.

    (jsonargparse prints the whole usage, then a line that names neither the config file nor the key meant.)
    """

    config_files: ClassVar[list[str]] = []  # the -c files of the command being parsed, set by parse_arguments
    family: list[ArgumentParser]  # this CLI's parsers: the root's and each subcommand's (set by init_parser)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Raise a one-line ValueError for an unknown key; anything else as jsonargparse does."""
        key = unknown_key(message)
        if key is not None:
            keys = {k for parser in getattr(self, "family", [self]) for k in parser.get_defaults().keys()}
            raise ValueError(unknown_key_message(key, sorted(keys - {"config", "subcommand"}), self.config_files))
        super().error(message, ex)
        raise AssertionError("jsonargparse's error() returned")  # it exits or raises


def unknown_key(message: str) -> str | None:
    """The key that jsonargparse's error `message` says is unknown (`model.learnin_rate`), or None."""
    found = re.search(r"does not accept option '([^']+)'", message) or re.search(
        r"nrecognized arguments: --([\w.]+)", message
    )
    return found.group(1) if found else None


def unknown_key_message(key: str, keys: list[str], files: list[str]) -> str:
    """One line: where the unknown key is (a file and line, or the command line) and the nearest known key."""
    found = [(path, yaml_key_line(path, key)) for path in files]
    path, line = next(((p, n) for p, n in reversed(found) if n is not None), (None, None))  # the last file wins
    dashes = "" if path else "--"  # as the user wrote it: `--data.image_size` on the command line
    nearest = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"did you mean {dashes}{nearest[0]}?" if nearest else "`--help` after the subcommand lists the keys."
    where = f" in {path}, line {line}" if path else " (on the command line)"
    return f"unknown key {dashes}{key}{where}: {hint}"


def config_files(args: ArgsType) -> list[str]:
    """The paths given with -c / --config in a command line (none for a dict of values)."""
    if not isinstance(args, (list, tuple)):
        return []
    found = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            found.append(str(args[i + 1]))
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
    return [f for f in found if Path(f).is_file()]  # (an inline YAML string, or a missing file: jsonargparse's)


def check_yaml(path: str) -> None:
    """Fail in one line, naming the file, line and column, on a YAML syntax error (a tab names the tab)."""
    text = Path(path).read_text()
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is None:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        line = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
        if "\t" in line[: mark.column + 1]:
            problem = "a tab character: YAML indents with spaces only"
        else:
            problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ValueError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: {problem}.") from None


def yaml_key_line(path: str, key: str) -> int | None:
    """The line (from 1) of a dotted key (`model.learnin_rate`) in a YAML file, or None where it is absent."""
    try:
        node = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
        if match is None:
            return None
        key_node, node = match
    return key_node.start_mark.line + 1


def add_renamed_keys(parser: LightningArgumentParser) -> None:
    """Accept the old spelling of each renamed key (`speed.RENAMED`), hidden from --help and from saved configs.

    A checkpoint written before the renaming holds the old keys among its hyperparameters, which LightningCLI
    parses back on `--ckpt_path`; `move_renamed_keys` takes them out again before anything is built.
    """
    types = typing.get_type_hints(SpeedSwitches.__init__)
    for old, new in RENAMED.items():
        key = new.split(".", 1)[1]
        parser.add_argument(f"--{old}", type=Optional[types[key]], default=None, help=argparse.SUPPRESS)  # noqa: UP045


def renamed_keys_given(config: Namespace) -> dict[str, Any]:
    """The old keys set (not None) in `config`, with their values."""
    return {old: config.get(old) for old in RENAMED if config.get(old) is not None}


def move_renamed_keys(config: Namespace, given: dict[str, Any]) -> None:
    """Give each old key the user set to its new key, with a warning; drop the old keys from `config`.

    Old keys that only a checkpoint's hyperparameters hold (`--ckpt_path` of a run from before the renaming) are
    dropped silently: the speed switches do not change the model, and a resumed run takes them from its own
    config, as it does with a newer checkpoint.
    """
    for old, new in RENAMED.items():
        if old in given:
            warnings.warn(
                f"{old} is renamed {new} (the speed switches are their own group); the old name will stop working "
                "in a later release.",
                FutureWarning,
                stacklevel=2,
            )
            config[new] = given[old]
        if old in config:
            del config[old]


# Keys whose values must be positive, with what they are: checked before anything is built, so a 0 or a
# negative value fails with its key instead of deep inside a library ("max() arg is an empty sequence").
POSITIVE = {
    "data.train_batch_size": "images per batch",
    "data.val_batch_size": "held-out images per validation batch",
    "data.image_size": "the image side in pixels",
    "grid.eval_batch_size": "images in a grid",
    "grid.num_inference_steps": "denoising steps per grid",
    "grid.save_image_epochs": "epochs between grids",
    "save.save_model_epochs": "epochs between saves",
    "model.learning_rate": "the peak learning rate",
    "model.learning_rate_scale": "the factor on model.learning_rate",
}


def check_values(config: Namespace) -> None:
    """Fail, naming the key, on a value out of its range (POSITIVE's, the warm-up, val_fraction, norm groups)."""
    for key, what in POSITIVE.items():
        value = config.get(key)
        if value is not None and not value > 0:
            raise ValueError(f"--{key} {value}: {what} must be positive.")
    if config.get("model.lr_warmup_steps") is not None and config.model.lr_warmup_steps < 0:
        raise ValueError(f"--model.lr_warmup_steps {config.model.lr_warmup_steps}: must be 0 or more.")
    fraction = config.get("data.val_fraction")
    if fraction is not None and not 0 <= fraction < 1:
        raise ValueError(f"--data.val_fraction {fraction}: the share of images held out must be in [0, 1), e.g. 0.1.")
    check_norm_groups(config.get("model.unet"))


# Lines a user cannot act on in a plain run, silenced one by one (every other warning is left alone).
NOISE_WARNINGS = (
    r"'set_vital' is deprecated",  # torchdata's StatefulDataLoader calls it
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch's pytree, from Lightning's utilities
    r"Checkpoint directory .* exists and is not empty",  # every resume, by design
    r"LightningCLI's args parameter is intended to run from within Python",  # main() passes sys.argv on, edited
    r"The `local_dir_use_symlinks` argument is deprecated",  # diffusers' load_config passes it, for Hub ids
    r"Your `IterableDataset` has `__len__` defined",  # streamed shards: LitData gives each worker its own shards
    # A resume with another checkpoint cadence: the old cadence's state is left behind on purpose (cadence.py); only
    # when every callback it names is a PeriodicCheckpoint (another missing callback still warns).
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided during "
    r"`Trainer` instantiation. Please add the following callbacks: "
    r"\[\"PeriodicCheckpoint\{[^}]*\}\"(, \"PeriodicCheckpoint\{[^}]*\}\")*\]\.$",
)
NOISE_LOG_LINES = ("💡 Tip:", "TPU available:", "Loading `train_dataloader` to estimate")


def quiet_noise() -> None:
    """Silence NOISE_WARNINGS, and NOISE_LOG_LINES in Lightning's log."""
    for message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(getattr(f, "name", "") == "ddpm_lightning.noise" for f in rank_zero_log.filters):
        noise = logging.Filter("ddpm_lightning.noise")
        noise.filter = lambda record: not str(record.msg).lstrip().startswith(NOISE_LOG_LINES)  # type: ignore[method-assign]
        rank_zero_log.addFilter(noise)


def main(args: ArgsType = None) -> None:
    """The `ddpm-lightning` command.

    From the command line (args None), an error the product raises on purpose prints as one line and exits 1;
    `--debug` or DDPM_LIGHTNING_DEBUG=1 shows the traceback instead. From Python, `run` does the same work and
    returns what it built.
    """
    one_line = args is None
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else args
    if isinstance(argv, list) and "--debug" in argv:
        argv.remove("--debug")
        one_line = False
    one_line = one_line and os.environ.get("DDPM_LIGHTNING_DEBUG", "") in ("", "0")
    try:
        # (Its result is not returned: the console script would print it and exit 1.)
        run_subcommand(argv, restore_signals=args is not None)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as err:  # (FloatingPointError: StopOnNaN)
        if not (one_line and raised_by_this_package(err)):
            raise
        subcommand = next((a for a in argv if not a.startswith("-")), "fit") if isinstance(argv, list) else "fit"
        print(f"ddpm-lightning {subcommand}: error: {err} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def run(args: list[str] | dict) -> Any:
    """Run a subcommand from Python, as `ddpm-lightning *args` would on the command line; return what it built.

    `fit` and `validate` return the LightningCLI object once the run has ended: its `trainer` (with
    `callback_metrics`, `checkpoint_callback.last_model_path`, ...), `model` (the DDPMModule) and `datamodule`.
    `sample` returns the image paths, `export` the folder, `prepare` the settings. An error raises (a ValueError or
    OSError with the one line the command would print), and the caller's signal handlers come back after a run that
    Ctrl-C (SIGINT) stopped and saved.

        cli = run(["fit", "-c", "configs/tiny.yaml", "--trainer.max_steps", "20"])
        cli = run(["fit", "-c", "configs/tiny.yaml", "--trainer.max_steps", "40", "--ckpt_path", "last"])  # resume
        paths = run(["sample", "ddpm-tiny-32", "--num_images", "4", "--output_dir", "ddpm-tiny-32/more"])

    Args:
        args: the command line's arguments after `ddpm-lightning` (a subcommand first), as strings.
    """
    return run_subcommand(list(args) if not isinstance(args, dict) else args, restore_signals=True)


def build(args: list[str] | dict) -> DDPMLightningCLI:
    """The Trainer, DDPMModule and ImageDataModule that `ddpm-lightning fit *args` would train, built and not run.

    `args` are fit's arguments without the word `fit` (`-c`, `--trainer.max_steps 10`, ... in order, later ones
    winning, as on the command line). The result's `trainer`, `model` and `datamodule` are the CLI's own (its
    logger, callbacks, progress bar and precision plugin); `cli.trainer.fit(cli.model, datamodule=cli.datamodule)`
    trains them. That call skips what `run(["fit", ...])` adds around it: the run folder's checks and lock, and the
    clean-up of a fresh run that fails before its first step.

        cli = build(["-c", "configs/tiny.yaml", "--trainer.max_steps", "20"])
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    Args:
        args: fit's command-line arguments, as strings.
    """
    prepare_logging()
    argv = list(args) if not isinstance(args, dict) else args
    return DDPMLightningCLI(DDPMModule, ImageDataModule, args=argv, run=False, **cli_options())


def cli_options() -> dict[str, Any]:
    """What every route (the command line, `run`, `build`) gives LightningCLI beside the two classes."""
    return {
        "auto_configure_optimizers": False,  # the module owns AdamW and the warm-up + cosine schedule
        "save_config_callback": SaveRunConfig,  # into <output_dir>/logs whatever the logger
        "save_config_kwargs": {"overwrite": True},  # a resumed run writes its config to the same folder
        "trainer_defaults": {"callbacks": [PreemptionCheckpoint(), RNGStates(), SameData()]},
        "parser_kwargs": {"description": DESCRIPTION},  # the top-level --help's (Lightning's names its Trainer)
    }


def prepare_logging() -> None:
    """Show this package's INFO lines (as Lightning does for its own), and silence the noise."""
    package_log = logging.getLogger("ddpm_lightning")
    if not package_log.handlers:
        package_log.addHandler(logging.StreamHandler())
        package_log.setLevel(logging.INFO)
    quiet_noise()


def run_subcommand(argv: list[str] | dict, restore_signals: bool) -> Any:
    """Run `argv` (a subcommand first); return the LightningCLI object or the plain command's result.

    With `restore_signals`, the caller's stop-signal handlers come back after a stop; the command line's process
    ends ignoring a repeated one (checkpointing.signals._SignalAtOptimizerStep.teardown).
    """
    prepare_logging()
    if commands.is_command(argv):  # `ddpm-lightning sample ...` / `export ...`: plain commands, outside LightningCLI
        return commands.run(argv)  # type: ignore[arg-type]  # (a list: is_command checked)
    in_process = restore_signals and threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS} if in_process else {}
    try:
        return DDPMLightningCLI(DDPMModule, ImageDataModule, args=argv, **cli_options())
    except SIGTERMException:
        if PreemptionCheckpoint.interrupted:
            raise SystemExit(130) from None  # Ctrl-C: saved and stopped, but the run did not finish
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def raised_by_this_package(err: BaseException) -> bool:
    """Whether `err` comes from a raise statement in ddpm_lightning, rather than from deep inside a library.

    Such a message was written for the user.
    """
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(Path(__file__).resolve().parent)


if __name__ == "__main__":
    main()
