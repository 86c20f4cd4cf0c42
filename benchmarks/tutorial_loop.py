"""The diffusers tutorial "Train a diffusion model", re-typed as the baseline that benchmark.py times.

Everything that costs time is the tutorial's, call for call: the set_transform preprocessing on a
`datasets.Dataset`, a plain DataLoader(shuffle=True), Accelerate (fp16 on CUDA), AdamW, the warm-up + cosine
schedule, add_noise, the loss, backward, clipping, the per-step `loss.detach().item()` and `accelerator.log`
for its progress bar, and DDPMPipeline for the grid. Only the stopping rule (a step count instead of epochs)
and the timing are added. The tqdm bar itself is left out: the `.item()` that feeds it is the part that costs.

`train_loop` is the tutorial's whole recipe instead, by epochs, for end_to_end.py: its `train_loop` and
`evaluate` as written (tqdm bar, a grid every `save_image_epochs` epochs and at the end, `save_pretrained` every
`save_model_epochs` epochs and at the end), with three optional additions that change nothing by default: seeding
the training (the tutorial seeds only its grid's generator), a list that receives each step's loss (the value the
tutorial already reads with `.item()`), and time stamps of the first and last steps.
"""

from __future__ import annotations

import os
import time

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.utils import make_image_grid
from torchvision import transforms
from tqdm.auto import tqdm

# The tutorial's UNet2DModel (its sample_size is the image size, 128 there).
TUTORIAL_UNET = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)


def tutorial_step(batch, model, noise_scheduler, accelerator, optimizer, lr_scheduler) -> torch.Tensor:
    """One step of the tutorial's train_loop, call for call."""
    clean_images = batch["images"]
    noise = torch.randn(clean_images.shape, device=clean_images.device)
    bs = clean_images.shape[0]
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (bs,), device=clean_images.device, dtype=torch.int64
    )
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

    with accelerator.accumulate(model):
        noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
        loss = F.mse_loss(noise_pred, noise)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return loss


def make_dataset(image_paths: list[str], image_size: int) -> datasets.Dataset:
    # The tutorial loads a Hub data set; a Dataset of image files decodes the same way, one JPEG per access.
    dataset = datasets.Dataset.from_dict({"image": image_paths}).cast_column("image", datasets.Image())
    preprocess = transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )

    def transform(examples):
        images = [preprocess(image.convert("RGB")) for image in examples["image"]]
        return {"images": images}

    dataset.set_transform(transform)
    return dataset


def run(
    unet: dict,
    image_paths: list[str],
    image_size: int,
    batch_size: int,
    num_workers: int,
    warmup: int,
    steps: int,
    logdir: str,
    grid_steps: int = 0,
) -> dict:
    """Train for warmup + steps steps; time the last `steps` (data loading included), the time from this call to
    the end of the first step (set-up, data, first kernels), and if asked one grid."""
    assert warmup >= 1, "the clock starts at the end of the last warm-up step"
    started = time.perf_counter()
    model = UNet2DModel(sample_size=image_size, **unet)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    train_dataloader = torch.utils.data.DataLoader(
        make_dataset(image_paths, image_size), batch_size=batch_size, shuffle=True, num_workers=num_workers
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=500, num_training_steps=warmup + steps
    )

    # --- the tutorial's train_loop, from here on ---
    accelerator = Accelerator(
        mixed_precision="fp16" if torch.cuda.is_available() else "no",  # the tutorial's fp16 needs a GPU
        gradient_accumulation_steps=1,
        log_with="tensorboard",
        project_dir=logdir,
    )
    accelerator.init_trackers("train_example")
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    cuda = accelerator.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    global_step, images, t0 = 0, 0, 0.0
    while global_step < warmup + steps:  # the tutorial's `for epoch in range(num_epochs)`: a new iterator each epoch
        for batch in train_dataloader:
            loss = tutorial_step(batch, model, noise_scheduler, accelerator, optimizer, lr_scheduler)

            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            accelerator.log(logs, step=global_step)
            global_step += 1
            # --- timing: from the end of the last warm-up step to the end of the last measured one ---
            if global_step == 1:
                sync()
                first_step_s = time.perf_counter() - started
            if global_step == warmup:
                sync()
                t0 = time.perf_counter()
            elif global_step > warmup:
                images += len(batch["images"])
            if global_step == warmup + steps:
                break
    sync()
    result = {"seconds": time.perf_counter() - t0, "images": images, "steps": steps, "first_step_s": first_step_s}
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    if grid_steps:
        # The tutorial's evaluate(): unwrap_model keeps Accelerate's autocast wrapper, so this samples in fp16.
        pipeline = DDPMPipeline(unet=accelerator.unwrap_model(model), scheduler=noise_scheduler)
        pipeline.set_progress_bar_config(disable=True)
        sync()
        t = time.perf_counter()
        pipeline(batch_size=16, generator=torch.Generator(device="cpu").manual_seed(0), num_inference_steps=grid_steps)
        sync()
        result["grid_seconds"] = time.perf_counter() - t
    accelerator.end_training()
    return result


def train_loop(
    unet: dict,
    image_paths: list[str],
    image_size: int,
    output_dir: str,
    num_epochs: int = 50,
    train_batch_size: int = 16,
    eval_batch_size: int = 16,
    num_workers: int = 0,
    learning_rate: float = 1e-4,
    lr_warmup_steps: int = 500,
    save_image_epochs: int = 10,
    save_model_epochs: int = 30,
    num_inference_steps: int = 1000,
    seed: int = 0,
    seed_training: bool = False,
    losses: list[float] | None = None,
    marks: dict[str, float] | None = None,
) -> dict[str, int]:
    """The tutorial from its data set to its last save (its TrainingConfig values are the defaults; the
    tutorial's DataLoader has no num_workers). Grids go to `<output_dir>/samples/{epoch:04d}.png`, the
    DDPMPipeline folder to `output_dir`, TensorBoard to `<output_dir>/logs`.

    Additions, all off by default: `seed_training` calls accelerate's set_seed(seed) first (weights, noise,
    timesteps, shuffling, flips); `losses` receives every step's loss; `marks` receives time.monotonic() at the
    end of the first and of the last training step ("first_step", "last_step": the loss's `.item()` has waited
    for the GPU there). Returns how many grids and saves were written.
    """
    if seed_training:
        set_seed(seed)
    # --- the tutorial's set-up cells: model, scheduler, data, optimizer, learning-rate schedule ---
    model = UNet2DModel(sample_size=image_size, **unet)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    train_dataloader = torch.utils.data.DataLoader(
        make_dataset(image_paths, image_size), batch_size=train_batch_size, shuffle=True, num_workers=num_workers
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=lr_warmup_steps,
        num_training_steps=(len(train_dataloader) * num_epochs),
    )
    written = {"grids": 0, "saves": 0}

    def evaluate(epoch, pipeline):
        images = pipeline(
            batch_size=eval_batch_size,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            num_inference_steps=num_inference_steps,  # the tutorial leaves DDPMPipeline's default, 1000
        ).images
        image_grid = make_image_grid(images, rows=4, cols=4)
        test_dir = os.path.join(output_dir, "samples")
        os.makedirs(test_dir, exist_ok=True)
        image_grid.save(f"{test_dir}/{epoch:04d}.png")
        written["grids"] += 1

    # --- the tutorial's train_loop ---
    accelerator = Accelerator(
        mixed_precision="fp16" if torch.cuda.is_available() else "no",  # the tutorial's fp16 needs a GPU
        gradient_accumulation_steps=1,
        log_with="tensorboard",
        project_dir=os.path.join(output_dir, "logs"),
    )
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        accelerator.init_trackers("train_example")
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    global_step = 0
    for epoch in range(num_epochs):
        progress_bar = tqdm(total=len(train_dataloader), disable=not accelerator.is_local_main_process)
        progress_bar.set_description(f"Epoch {epoch}")
        for _step, batch in enumerate(train_dataloader):
            loss = tutorial_step(batch, model, noise_scheduler, accelerator, optimizer, lr_scheduler)

            progress_bar.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            global_step += 1
            if losses is not None:
                losses.append(logs["loss"])
            if marks is not None:
                marks.setdefault("first_step", time.monotonic())
                marks["last_step"] = time.monotonic()
        progress_bar.close()

        # After each epoch, optionally a grid and a save.
        if accelerator.is_main_process:
            pipeline = DDPMPipeline(unet=accelerator.unwrap_model(model), scheduler=noise_scheduler)
            if (epoch + 1) % save_image_epochs == 0 or epoch == num_epochs - 1:
                evaluate(epoch, pipeline)
            if (epoch + 1) % save_model_epochs == 0 or epoch == num_epochs - 1:
                pipeline.save_pretrained(output_dir)
                written["saves"] += 1
    accelerator.end_training()
    return written
