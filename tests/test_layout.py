"""The package's shape, as docs/architecture.md draws it: imports run only down its layers, with no circle; the data
layer loads no sampler and no logger; what writes no checkpoint imports nothing from checkpointing/; every module has
its test file (docs/development.md); and a wheel built from the tree holds every module and trains."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import HELICONIUS, REPO, TINY_CONFIG, TINY_RUN_ARGS, max_steps

PACKAGE = REPO / "ddpm_lightning"

# docs/architecture.md's layers, top (command line) to bottom (foundations): each module's own, by dotted name
# under the package (a subpackage's modules take the subpackage's layer).
LAYERS = {
    "cli": 4,
    "commands": 4,
    "run_folder": 4,
    "callbacks": 3,
    "publish": 3,
    "module": 2,
    "checkpointing": 1,
    "speed": 1,
    "data": 1,
    "sampling": 1,
    "model_source": 1,
    "unet": 0,
    "sources": 0,
    "ema": 0,
    "posthoc_ema": 0,
    "stop_on_nan": 0,
    "metrics": 0,
    "reporting": 0,
    "files": 0,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> set[str]:
    """The package's modules that the file at `path` imports (relative imports, at any depth), as dotted names."""
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_of(source: str, name: str, is_package: bool) -> set[str]:
    here = name.split(".") if name else []
    package = here if is_package else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:  # `from . import commands` imports a module; `from .x import name` imports x
                whole = ".".join([*target, alias.name])
                found.add(
                    whole if (PACKAGE / Path(*whole.split("."))).with_suffix(".py").exists() else ".".join(target)
                )
    return {name for name in found if name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): package_imports(p) for p in PACKAGE.rglob("*.py") if module_name(p) not in ("", "__main__")}


def layer(name: str) -> int:
    return LAYERS[name.split(".")[0]]


def test_every_module_has_a_layer_and_imports_run_only_down():
    modules = graph()
    expected = {"unet", "model_source", "checkpointing.signals", "speed.switches", "publish.hub", "data.shards"}
    assert set(modules) >= expected
    upward = [
        f"{name} -> {target}" for name, targets in modules.items() for target in targets if layer(target) > layer(name)
    ]
    assert not upward, f"imports that run up a layer (docs/architecture.md): {upward}"


def test_there_is_no_import_circle():
    modules = graph()
    # Subpackages as one node each, as a reader sees them (a face re-exporting its own files is no circle).
    node = lambda name: name.split(".")[0]  # noqa: E731
    edges = {node(n): set() for n in modules}
    for name, targets in modules.items():
        edges[node(name)] |= {node(t) for t in targets} - {node(name)}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in edges[n]:
            assert state.get(m) != 1, f"import circle: {' -> '.join([*path, n, m])}"
            if m not in state:
                visit(m, [*path, n])
        state[n] = 2

    for n in edges:
        if n not in state:
            visit(n, [])


def test_the_data_layer_imports_no_sampler_and_no_logger():
    files = [PACKAGE / "sources.py", *(PACKAGE / "data").glob("*.py")]
    assert len(files) >= 5
    for path in files:
        imported = package_imports(path)
        assert not imported & {"sampling", "reporting.monitor", "reporting.grids", "callbacks"}, (path, imported)
        assert "lightning.pytorch.loggers" not in path.read_text()


def test_what_writes_no_checkpoint_imports_nothing_from_checkpointing():
    """A grid, a card, a model folder or `sample`'s images are written through files.py, not checkpointing/."""
    files = [PACKAGE / "commands.py", *(PACKAGE / "publish").glob("*.py"), *(PACKAGE / "reporting").glob("*.py")]
    assert len(files) >= 9
    for path in files:
        imported = package_imports(path)
        assert not any(name.split(".")[0] == "checkpointing" for name in imported), (path, imported)


# Modules whose tests live in another file than the mirror's (docs/development.md, "Where the tests are"): a
# subpackage's face re-exports its files; `python -m ddpm_lightning` is cli.main (test_cli.py); the data module's
# tests exercise the images it caches, so both share test_data.py.
TESTED_ELSEWHERE = {
    "__init__.py": None,
    "__main__.py": "test_cli.py",
    "data/datamodule.py": "test_data.py",
    "data/images.py": "test_data.py",
}


def mirror_file(module: Path) -> str:
    """The mirror's test file of a package module: x.py -> test_x.py, sub/y.py -> test_sub_y.py."""
    return "test_" + "_".join(module.relative_to(PACKAGE).with_suffix("").parts) + ".py"


def test_every_module_has_its_test_file():
    modules = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(modules) >= 40
    missing = []
    for module in modules:
        relative = module.relative_to(PACKAGE).as_posix()
        elsewhere = TESTED_ELSEWHERE.get(module.name if module.name == "__init__.py" else relative, mirror_file(module))
        if elsewhere is not None and not (REPO / "tests" / elsewhere).is_file():
            missing.append(f"{relative}: tests/{elsewhere}")
    assert not missing, f"modules without their test file (docs/development.md, Where the tests are): {missing}"
    # every exception names a module that exists, so the list cannot outlive what it excuses
    assert {name for name in TESTED_ELSEWHERE if name != "__init__.py"} <= {
        m.relative_to(PACKAGE).as_posix() for m in modules
    }


def test_the_checks_see_an_upward_import_and_a_nested_one():
    """The checks themselves: a foundation module importing the CLI, and a subpackage's file importing up two
    levels, are both found."""
    assert imports_of("from .cli import main\n", "unet", False) == {"cli"}
    assert imports_of("def f():\n    from ..callbacks import SampleGrid\n", "speed.switches", False) == {"callbacks"}
    assert imports_of("from . import commands\n", "cli", False) == {"commands"}


@pytest.mark.slow
def test_a_wheel_built_from_the_tree_holds_every_module_and_trains_from_a_fresh_venv(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("ddpm_lightning-*.whl")
    packed = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("ddpm_lightning/")}
    modules = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")}
    assert modules <= packed, f"missing from the wheel: {sorted(modules - packed)}"

    # A fresh venv with the wheel alone, its dependencies seen from this one (no download, no copy of the repo).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = Path(
        subprocess.check_output(
            [venv / "bin" / "python", "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "--no-deps",
            "--ignore-installed",
            "-q",
            wheel,
        ],
        check=True,
    )
    run = tmp_path / "run"
    done = subprocess.run(
        [
            venv / "bin" / "python",
            "-c",
            "import ddpm_lightning, sys; print(ddpm_lightning.__file__); "
            "from ddpm_lightning.cli import main; sys.argv[0] = 'ddpm-lightning'; main()",
            "fit",
            "-c",
            TINY_CONFIG,
            *TINY_RUN_ARGS,
            *max_steps(2),
            "--data.dataset",
            HELICONIUS,
            "--output_dir",
            run,
            "--checkpoint.dirpath",
            tmp_path / "checkpoints",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(site) in done.stdout.splitlines()[0]  # the wheel's copy trained, not the checkout's
    assert (run / "model_index.json").is_file()
