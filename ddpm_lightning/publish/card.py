"""The model card (README.md) of a saved model folder: Hub front matter, samples, data set, steps, config, usage.

    write_model_card("ddpm-butterflies-128", config={...}, dataset="huggan/smithsonian_butterflies_subset",
                     steps=3150, grid_path=Path("ddpm-butterflies-128/samples/0049.png"),
                     repo_id="me/ddpm-butterflies-128")

`SaveModel` writes one with every save (from the run's config, data set, global step and newest grid) and
`ddpm-lightning export` with every export; it lives in the folder, so it is uploaded with it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..files import CARD, CARD_IMAGE, write_whole
from ..sources import is_hub_id

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

log = logging.getLogger(__name__)

TAGS = ["pytorch", "diffusers", "unconditional-image-generation", "ddpm-lightning"]


def plain(value: Any) -> Any:
    """`value` in types that yaml.safe_dump writes: mappings, lists, str, numbers, bool, None; str for the rest.

    Keys starting with "_" (LightningCLI's `_instantiator`, `_class_path` in saved hyperparameters) are left out.
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_model_card(
    folder: str | Path,
    *,
    config: dict | None = None,
    dataset: str | None = None,
    steps: int | None = None,
    grid_path: Path | None = None,
    repo_id: str | None = None,
    base_model: dict | None = None,
) -> Path:
    """Write `folder/README.md`, a Hub model card, and copy `grid_path` into the folder as samples.png.

    Args:
        folder: the saved model folder (model_index.json, unet/, scheduler/).
        config: the training config, shown as YAML (keys starting with "_" are left out).
        dataset: the data set trained on; a Hub id also goes into the front matter's `datasets`.
        steps: optimizer steps trained.
        grid_path: an image of samples to show; copied in as samples.png.
        repo_id: the Hub repo the folder goes to; the usage snippet loads it (else the folder's path).
        base_model: what the run was fine-tuned from (`DDPMModule.base_model`): a Hub id goes into the front
            matter's `base_model`; a folder or checkpoint is named (never its absolute path), also in the config.

    Returns:
        The card's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if grid_path is not None:
        copy_grid(Path(grid_path), folder / CARD_IMAGE)
    config = published_config(config, base_model)
    lines = [f"# {repo_id or folder.resolve().name}", "", summary(config), ""]
    if grid_path is not None:
        lines += [f"![Samples drawn from the model]({CARD_IMAGE})", ""]
    lines += training_section(dataset, steps, base_model)
    lines += usage_section(repo_id or str(folder))
    lines += config_section(config)
    card = ModelCard(f"---\n{front_matter(dataset, base_model).to_yaml()}\n---\n\n" + "\n".join(lines))
    path = folder / CARD
    write_whole(path, card.save)
    return path


def copy_grid(grid_path: Path, target: Path) -> None:
    """The card's image: `grid_path` copied to `target`, whole or not at all (nothing to do when it is `target`)."""
    if not (target.exists() and target.samefile(grid_path)):
        write_whole(target, lambda partial: shutil.copyfile(grid_path, partial))


def front_matter(dataset: str | None, base_model: dict | None) -> ModelCardData:
    """The card's Hub metadata: the library, the task, the tags, and the Hub data set and base model, if any."""
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=list(TAGS),
        datasets=[dataset] if dataset and is_hub_id(dataset) else None,
        base_model=base_model["name"] if base_model and base_model.get("source") == "hub" else None,
    )


def published_config(config: dict | None, base_model: dict | None) -> dict | None:
    """The config as the card shows it: plain YAML types, no "_" keys, no local paths (the base model by name)."""
    config = without_local_paths(plain(config)) if config else None
    if config and base_model and isinstance(config.get("model"), dict) and config["model"].get("pretrained"):
        config["model"]["pretrained"] = base_model["name"]  # not the path it had on the training machine
    return config


def summary(config: dict | None) -> str:
    """The card's first paragraph: what the model is and does (and its image size, when the config has it)."""
    size = config and ((config.get("model") or {}).get("image_size") or (config.get("data") or {}).get("image_size"))
    return (
        "An unconditional image generation model: a diffusers `UNet2DModel` trained as a denoising diffusion "
        "probabilistic model (DDPM) with ddpm-lightning "
        "(PyTorch Lightning + diffusers). It turns Gaussian noise into new images"
        + (f" of {size} x {size} pixels" if isinstance(size, int) else "")
        + " like those it was trained on."
    )


def training_section(dataset: str | None, steps: int | None, base_model: dict | None) -> list[str]:
    """The card's "Training" lines: the data set (a local one by its name only), the steps, the base model."""
    if not dataset:
        data_line = "not recorded"
    elif is_hub_id(dataset):
        data_line = f"[{dataset}](https://huggingface.co/datasets/{dataset})"
    else:
        data_line = f"a local data set (`{Path(dataset).name}`)"  # its name: no local path on the Hub
    steps_line = steps if steps is not None else "not recorded"
    lines = ["## Training", "", f"- Data set: {data_line}", f"- Steps trained: {steps_line}"]
    if base_model:
        name, revision = base_model["name"], base_model.get("revision")
        if base_model.get("source") == "hub":
            at = f" at revision `{revision}`" if revision else ""
            lines += [f"- Fine-tuned from: [{name}](https://huggingface.co/{name}){at}"]
        else:
            lines += [f"- Fine-tuned from: `{name}` (a local {base_model.get('source', 'model')})"]
    return [*lines, ""]


def usage_section(source: str) -> list[str]:
    """The card's "Usage" lines: `DDPMPipeline.from_pretrained(source)` and one image."""
    load = f"pipeline = DDPMPipeline.from_pretrained({json.dumps(source)})"
    return [
        "## Usage",
        "",
        "```python",
        "from diffusers import DDPMPipeline",
        load,
        "image = pipeline().images[0]",
        "```",
        "",
    ]


def config_section(config: dict | None) -> list[str]:
    """The card's "Training config" lines: the config as YAML; none without a config."""
    if not config:
        return []
    dumped = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")
    return ["## Training config", "", "```yaml", dumped, "```", ""]


def without_local_paths(value: Any) -> Any:
    """The config with each absolute path replaced by its last part (a data folder by its name).

    A card is published, and a local path names the user and the machine's layout.
    """
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
        return Path(value).name
    return value


def run_config(trainer: Trainer, pl_module: LightningModule) -> dict | None:
    """The config the run was started with.

    That is LightningCLI's (as in <output_dir>/logs/config.yaml) when the run came from the CLI, else the model's
    and data module's hyperparameters.
    """
    from lightning.pytorch.cli import SaveConfigCallback

    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, SaveConfigCallback):
            try:
                config = yaml.safe_load(callback.parser.dump(callback.config, skip_none=False))
                if isinstance(config, dict):
                    return config
            except Exception as err:
                log.debug(f"Could not dump the CLI config ({err!r}); the card shows the hyperparameters instead.")
    config = {"model": dict(getattr(pl_module, "hparams", {}) or {})}
    data_hparams = getattr(getattr(trainer, "datamodule", None), "hparams", None)
    if data_hparams:
        config["data"] = dict(data_hparams)
    return config


def write_run_card(
    trainer: Trainer,
    pl_module: LightningModule,
    output_dir: str | Path,
    grid: Path | None = None,
    repo_id: str | None = None,
) -> Path | None:
    """The card of a saved folder during training (called by SaveModel.save), showing `grid` (none when None).

    Never raises: a card that cannot be written is a warning, training goes on.
    """
    try:
        datamodule = getattr(trainer, "datamodule", None)
        dataset = (getattr(datamodule, "hparams", None) or {}).get("dataset")
        config, dataset = run_config(trainer, pl_module), str(dataset) if dataset is not None else None
        base_model = getattr(pl_module, "base_model", None)
        return write_model_card(
            output_dir,
            config=config,
            dataset=dataset,
            steps=trainer.global_step,
            grid_path=grid,
            repo_id=repo_id,
            base_model=base_model,
        )
    except Exception as err:
        log.warning(f"Could not write the model card in {output_dir}: {err!r}")
        return None
