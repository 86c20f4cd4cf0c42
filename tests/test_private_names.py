"""Every private name of another library the package uses, in one list per library, each checked against the
installed release: an upgrade that removes or reshapes one fails here, naming it, instead of breaking a run
silently. Scans of the package's source find private names that are not in the lists.

pyproject.toml pins the ranges these pass on; a name that leaves a list should leave the code too.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

PACKAGE = Path(__file__).resolve().parents[1] / "ddpm_lightning"

# (where it is defined, the private name, the parameters the package calls or overrides it with (None: not a
# function), where the package uses it and why)
PRIVATE_NAMES: list[tuple[str, str, list[str] | None, str]] = [
    (
        "lightning.pytorch.trainer.connectors.signal_connector",
        "_SignalConnector",
        None,
        "checkpointing/signals.py: the connector's class is swapped so SIGTERM stops at an optimizer step",
    ),
    ("lightning.pytorch.Trainer", "_signal_connector", None, "checkpointing/signals.py: the connector swapped above"),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_remove_checkpoint",
        ["self", "trainer", "filepath"],
        "checkpointing/cadence.py: removals wait until the new file and link are in place",
    ),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_save_last_checkpoint",
        ["self", "trainer", "monitor_candidates"],
        "checkpointing/cadence.py",
    ),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_link_checkpoint",
        ["trainer", "filepath", "linkpath"],
        "checkpointing/cadence.py: atomic links",
    ),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_should_skip_saving_checkpoint",
        ["self", "trainer"],
        "checkpointing/cadence.py: save_now",
    ),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_monitor_candidates",
        ["self", "trainer"],
        "checkpointing/cadence.py: save_now",
    ),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_save_topk_checkpoint",
        ["self", "trainer", "monitor_candidates"],
        "checkpointing/cadence.py: save_now",
    ),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_save_checkpoint",
        ["self", "trainer", "filepath"],
        "checkpointing/cadence.py: save_now",
    ),
    (
        "lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop",
        "_should_accumulate",
        ["self"],
        "checkpointing/signals.py: no stop inside an accumulation window",
    ),
    (
        "lightning.pytorch.loops.fit_loop._FitLoop",
        "_should_accumulate",
        ["self"],
        "reporting/monitor.py: throughput on optimizer steps (as ThroughputMonitor reads it)",
    ),
    (
        "lightning.pytorch.Trainer",
        "_logger_connector",
        None,
        "reporting/monitor.py: log steps and logging (as ThroughputMonitor)",
    ),
    (
        "lightning.fabric.plugins.precision.amp",
        "_optimizer_handles_unscaling",
        ["optimizer"],
        "speed/precision.py: which optimizers MixedPrecision leaves unscaled",
    ),
    (
        "lightning.pytorch.cli.LightningCLI",
        "_add_subcommands",
        ["self", "parser", "kwargs"],
        "cli.py: sample/export in --help",
    ),
    (
        "lightning.pytorch.cli.LightningCLI",
        "_get",
        ["self", "config", "key", "default"],
        "cli.py: a subcommand's config value",
    ),
    ("lightning.pytorch.cli.LightningArgumentParser", "_subcommands_action", None, "cli.py (jsonargparse's): --help"),
]
# The public names of the private `_LoggerConnector` that reporting/monitor.py calls.
LOGGER_CONNECTOR = {"should_update_logs": None, "log_metrics": ["self", "metrics", "step"]}


def resolve(where: str):
    try:
        return importlib.import_module(where)
    except ImportError:
        module, _, name = where.rpartition(".")
        return getattr(importlib.import_module(module), name)


def instance_of(owner):
    """Attributes set in __init__ or setup exist only on an instance: a plain one of each class that has them."""
    if owner is Trainer:
        return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if owner.__name__ == "AsyncCheckpointIO":
        return owner()
    if owner.__name__ == "LightningArgumentParser":
        parser = owner()
        parser.add_subcommands()
        return parser
    return owner


@pytest.mark.parametrize(
    "where, name, parameters, used", PRIVATE_NAMES, ids=[f"{w.split('.')[-1]}.{n}" for w, n, *_ in PRIVATE_NAMES]
)
def test_each_private_lightning_name_still_exists_with_its_signature(where, name, parameters, used):
    owner = resolve(where)
    holder = instance_of(owner) if isinstance(owner, type) and not hasattr(owner, name) else owner
    assert hasattr(holder, name), f"Lightning no longer has {where}.{name} (used in {used}): adapt the package or pin"
    if parameters is not None:
        found = list(inspect.signature(getattr(owner, name)).parameters)
        assert found == parameters, f"{where}.{name} now takes {found}, the package expects {parameters} ({used})"


def test_the_logger_connector_still_has_what_monitor_calls():
    connector = instance_of(Trainer)._logger_connector
    for name, parameters in LOGGER_CONNECTOR.items():
        assert hasattr(connector, name), f"Lightning's _LoggerConnector no longer has {name} (reporting/monitor.py)"
        if parameters is not None:
            found = list(inspect.signature(getattr(type(connector), name)).parameters)
            assert found == parameters, f"_LoggerConnector.{name} now takes {found} (reporting/monitor.py)"


# Receivers that are Lightning objects wherever the package uses them: `<one of these>._name` is Lightning's.
LIGHTNING_RECEIVERS = {"trainer", "fit_loop", "epoch_loop", "strategy", "plugin", "parser", "checkpoint_io"}


def private_names_in(source: str) -> set[str]:
    """Private Lightning names in `source`, as far as its shape shows them:
    - `_x` names imported from lightning modules;
    - `<receiver>._x` where the receiver is named like a Lightning object (LIGHTNING_RECEIVERS), and `super()._x`;
    - `self._x` in a class with a Lightning base (imported from lightning), where the class neither defines nor
      assigns `_x` itself.
    Not seen: a Lightning object held under another name, getattr with a string, or a private reached through
    a call's result. So the list above is also checked by reading: grep for `\\._` when touching Lightning code."""
    tree = ast.parse(source)
    found: set[str] = set()
    from_lightning: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
            for alias in node.names:
                from_lightning.add(alias.asname or alias.name)
                if alias.name.startswith("_"):
                    found.add(alias.name)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        receiver = node.value
        if isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "super":
            found.add(node.attr)
        name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", None)
        if name in LIGHTNING_RECEIVERS:
            found.add(node.attr)
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        if not any(isinstance(b, ast.Name) and b.id in from_lightning for b in cls.bases):
            continue
        own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
        for node in ast.walk(cls):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        own.add(t.attr)
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):  # self.__dict__["_x"]
                own.add(str(node.slice.value))
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in own
            ):
                found.add(node.attr)
    return found


def test_the_package_uses_no_private_lightning_name_outside_the_list():
    listed = {name for _, name, _, _ in PRIVATE_NAMES}
    unlisted = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        extra = private_names_in(path.read_text()) - listed
        if extra:
            unlisted[str(path.relative_to(PACKAGE))] = sorted(extra)
    assert not unlisted, (
        f"private Lightning names used but not listed in PRIVATE_NAMES (add them, or use public API): {unlisted}"
    )


def test_each_listed_name_is_used_in_the_file_it_names():
    """A moved or renamed module leaves no stale "where it is used" in the list."""
    for _, name, _, used in PRIVATE_NAMES:
        path = PACKAGE / used.split(":")[0].split(" ")[0]
        assert path.is_file() and name in path.read_text(), f"{name}: not used in {path.relative_to(PACKAGE)}"


def test_the_scan_sees_each_kind_of_private_use():
    """The scan itself: it must find what it claims to find, or the test above passes vacuously."""
    source = (
        "from lightning.pytorch.x import _Hidden, Public\n"
        "from lightning.pytorch import Callback\n"
        "def f(trainer):\n    trainer._connector.go()\n    trainer.fit_loop._accumulate()\n"
        "class C(Callback):\n    def __init__(self):\n        self._mine = 1\n"
        "    def g(self):\n        return self._mine, self._theirs, super()._base()\n"
    )
    assert private_names_in(source) == {"_Hidden", "_connector", "_accumulate", "_theirs", "_base"}


# Private names of diffusers and torch, fenced like Lightning's: (where, name, the package's file that uses it, why).
OTHER_PRIVATE_NAMES = [
    (
        "diffusers.DDPMScheduler",
        "_use_default_values",
        "sampling.py",
        "make_sampler: which config values a scheduler took by default, so another scheduler takes its own",
    ),
    (
        "torch._inductor.runtime.cache_dir_utils",
        "default_cache_dir",
        "speed/compile_cache.py",
        "inductor's default cache folder, told apart from a user's TORCHINDUCTOR_CACHE_DIR (imported when compiling)",
    ),
]


@pytest.mark.parametrize("where, name, used_in, why", OTHER_PRIVATE_NAMES, ids=[n for _, n, *_ in OTHER_PRIVATE_NAMES])
def test_each_private_diffusers_and_torch_name_still_exists(where, name, used_in, why):
    owner = resolve(where)
    if name == "_use_default_values":  # a config entry, not an attribute: diffusers writes it for each scheduler
        assert name in owner().config, f"diffusers no longer records {name} in a scheduler's config ({used_in}: {why})"
        assert "_use_default_values" in owner.from_config({"beta_end": 0.03}).config
    else:
        assert callable(getattr(owner, name)), f"{where}.{name} is gone ({used_in}: {why})"


def test_private_diffusers_and_torch_names_stay_in_their_listed_files():
    listed = {(name, used_in) for _, name, used_in, _ in OTHER_PRIVATE_NAMES}
    for path in sorted(PACKAGE.rglob("*.py")):
        text, relative = path.read_text(), str(path.relative_to(PACKAGE))
        for token, name in (("_use_default_values", "_use_default_values"), ("torch._inductor", "default_cache_dir")):
            if token in text:
                assert (name, relative) in listed, f"{relative} uses {token}: list it in OTHER_PRIVATE_NAMES"
    compile_cache = (PACKAGE / "speed" / "compile_cache.py").read_text()
    module_level = [line for line in compile_cache.splitlines() if line.startswith(("import torch._", "from torch._"))]
    assert not module_level, "inductor is imported at module level: every command would load it at start-up"
