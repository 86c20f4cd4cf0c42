"""Mutation check: plant known bugs in a temporary copy of the package, one at a time, and run the tests that
should catch each. Not a pytest module (the name does not match test_*.py) and not part of CI's default run.

    python tests/mutation_check.py              # every mutation, 2 at a time
    python tests/mutation_check.py --jobs 1 lr_extra_step no_fsync   # some of them, one at a time

Each mutation is (file, exact old text, new text). When the old text is no longer in the file (the code moved
on), the mutation is reported STALE and counts as a failure: update its text here. A mutation is CAUGHT when
its tests fail (pytest exit status 1), MISSED when they pass; any other exit status is an ERROR. The chosen
tests are first run once on the unmodified copy, which must pass. Exit status 0 only when every one is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

T = "tests/"
LR_TEST = T + "test_module.py::test_schedule_steps_once_per_optimizer_step_and_ends_at_zero_under_accumulation"
EMA_TEST = T + "test_ema.py::test_ema_follows_the_warmup_formula_once_per_optimizer_step"
TARGETS = T + "test_module.py::test_each_prediction_type_is_scored_against_its_own_target"
PIPELINE = T + "test_sampling.py::test_sample_equals_ddpm_pipeline_on_the_same_unet_scheduler_and_noise"
SWITCHES = T + "test_speed_switches.py::test_speed_switches_take_effect_in_a_training_step"
FIT_QUALITY = T + "test_callbacks.py::test_fit_logs_fid_kid_every_n_epochs_and_the_samples_image"
FID_AT_THE_END = (
    T + "test_callbacks.py::test_fit_reports_fid_offline_with_the_shipped_network_and_validate_reuses_its_features"
)
BETAS = T + "test_module.py::test_beta_schedule_reaches_the_noise_schedule"
HUB = T + "test_publish_hub.py::"
TRACKERS = T + "test_reporting_grids.py::test_grids_and_data_png_reach_wandb_mlflow_and_tensorboard"
FINE_TUNING = T + "test_end_to_end_fine_tuning.py::"
SIGNALS = T + "test_checkpointing_signals.py::"
MIN_SNR = T + "test_module.py::test_min_snr_weights_each_prediction_type_by_its_formula"
UPLOAD = (
    T + "test_publish_hub.py::test_an_upload_carries_the_model_the_card_and_the_grids_and_nothing_else_unless_asked"
)
DECODE = T + "test_data_decoding.py::"
SHARED_CACHE = T + "test_data_shared_cache.py::"
SHARDS = T + "test_data_shards.py::"
EMA_GUARD = "        if global_step == self.last_step:\n            return\n"
EMA_UPDATE = "        pl_module.ema.update(pl_module.unet, trainer.global_step)\n"
EMA_CALLBACK = "        return nan_check + ([UpdateEMA()] if self.ema is not None else [])\n"

# name: (file, old text, new text, tests that must fail)
MUTATIONS: dict[str, tuple[str, str, str, list[str]]] = {
    "compiled_step_float_lr": (  # a float LR is a constant of the compiled graph: one recompile per LR change
        "ddpm_lightning/speed/optim.py",
        'group["lr"] = torch.tensor(float(group["lr"]), device=device)',
        "pass",
        [T + "test_speed_optim.py::test_resume_with_the_compiled_optimizer_step_equals_the_straight_run"],
    ),
    "compiled_step_nan_at_zero_lr": (
        "ddpm_lightning/speed/optim.py",
        '            group["lr"].clamp_(min=MIN_LR)\n',
        "            pass\n",
        [T + "test_speed_optim.py::test_compiled_step_keeps_weights_finite_at_a_zero_lr_with_zero_gradients"],
    ),
    "compiled_step_skips_clipping": (
        "ddpm_lightning/speed/optim.py",
        "        if self.clip_val:\n",
        "        if False:\n",
        [T + "test_speed_precision.py::test_adamw_trains_with_clipping_under_every_precision[bf16-mixed-compiled]"],
    ),
    "compiled_step_saves_a_tensor_lr": (
        "ddpm_lightning/speed/optim.py",
        '            group["lr"] = float(group["lr"])\n',
        "",
        [
            T
            + "test_speed_optim.py::"
            + "test_compiled_step_follows_the_lr_schedule_without_recompiling_and_in_its_gpu_values"
        ],
    ),
    "gradients_kept_after_the_step": (
        "ddpm_lightning/module.py",
        "        self.unet.zero_grad(set_to_none=True)\n",
        "        pass\n",
        [
            T
            + "test_module.py::"
            + "test_gradients_are_freed_after_each_optimizer_step_and_kept_within_an_accumulation_window"
        ],
    ),
    "cuda_graphs_only_reduce_overhead": (
        "ddpm_lightning/speed/switches.py",
        'return compile_mode in ("reduce-overhead", "max-autotune")',
        'return compile_mode == "reduce-overhead"',
        [T + "test_speed_switches.py::test_each_compiled_call_starts_a_cuda_graph_step_in_the_modes_that_use_graphs"],
    ),
    "lr_extra_step": (
        "ddpm_lightning/module.py",
        '        self.log("train/lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)\n',
        '        self.log("train/lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)\n'
        "        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:\n"
        "            self.lr_schedulers().step()\n",
        [LR_TEST],
    ),
    "lr_length_in_micro_batches": (
        "ddpm_lightning/module.py",
        "total = self.trainer.estimated_stepping_batches\n",
        "total = self.trainer.estimated_stepping_batches * self.trainer.accumulate_grad_batches\n",
        [LR_TEST],
    ),
    "no_fsync": (
        "ddpm_lightning/checkpointing/writes.py",
        "                os.fsync(f.fileno())\n",
        "",
        [T + "test_checkpointing_writes.py::test_checkpoint_bytes_are_fsynced_before_the_rename"],
    ),
    "ema_ignores_inv_gamma": ("ddpm_lightning/ema.py", "inv_gamma=inv_gamma", "inv_gamma=1.0", [EMA_TEST]),
    "ema_per_micro_batch": ("ddpm_lightning/ema.py", EMA_GUARD, "", [EMA_TEST]),
    "ema_not_restored": (
        "ddpm_lightning/module.py",
        'self.ema.load_state_dict(checkpoint["ema"])',
        "pass",
        [T + "test_ema.py::test_ema_is_restored_on_resume_and_used_for_the_saved_model"],
    ),
    "ema_on_rank_0_only": (
        "ddpm_lightning/ema.py",
        EMA_UPDATE,
        "        if trainer.global_rank == 0:\n    " + EMA_UPDATE,
        [T + "test_ema.py::test_every_ddp_rank_holds_the_same_ema"],
    ),
    "ema_averaged_after_a_step_checkpoint": (  # in a module hook, which Lightning runs after ModelCheckpoint's
        "ddpm_lightning/module.py",
        EMA_CALLBACK,
        "        return nan_check\n\n    def on_train_batch_end(self, outputs, batch, batch_idx):\n"
        "        if self.ema is not None:\n"
        "            UpdateEMA().on_train_batch_end(self.trainer, self, outputs, batch, batch_idx)\n",
        [
            T
            + "test_ema.py::"
            + "test_a_checkpoint_in_the_middle_of_an_epoch_holds_that_steps_ema_and_resumes_to_the_straight_runs"
        ],
    ),
    "v_prediction_target_swapped": (
        "ddpm_lightning/module.py",
        "scheduler.get_velocity(clean, noise, timesteps)",
        "scheduler.get_velocity(noise, clean, timesteps)",
        [TARGETS + "[v_prediction]"],
    ),
    "sample_loss_without_snr_weight": (
        "ddpm_lightning/module.py",
        "return snr if self.gamma is None else snr.clamp(max=self.gamma)",
        "return None if self.gamma is None else snr.clamp(max=self.gamma)",
        [TARGETS + "[sample]"],
    ),
    # Min-SNR-gamma: each prediction type's weight min(SNR, gamma) / SNR, min(SNR, gamma), min(SNR, gamma) / (SNR + 1)
    "min_snr_epsilon_not_divided_by_snr": (
        "ddpm_lightning/module.py",
        "else (self.gamma / snr).clamp(max=1)",
        "else snr.clamp(max=self.gamma)",
        [MIN_SNR + "[epsilon]"],
    ),
    "min_snr_v_divided_by_snr": (  # the v weight before diffusers PR #5238
        "ddpm_lightning/module.py",
        "snr.clamp(max=self.gamma) / (snr + 1)",
        "snr.clamp(max=self.gamma) / snr",
        [MIN_SNR + "[v_prediction]"],
    ),
    "min_snr_sample_not_clipped": (
        "ddpm_lightning/module.py",
        "snr if self.gamma is None else snr.clamp(max=self.gamma)",
        "snr if self.gamma is None else snr",
        [MIN_SNR + "[sample]"],
    ),
    "validation_noise_not_fixed": (
        "ddpm_lightning/module.py",
        "[torch.randn(images.shape[1:], generator=g) for g in seeded]",
        "[torch.randn(images.shape[1:]) for g in seeded]",
        [T + "test_module.py::test_validation_loss_is_deterministic_and_monitorable"],
    ),
    "denoise_ignores_the_generator": (
        "ddpm_lightning/sampling.py",
        "image = sampler.step(model_output, t, image, generator=generator, return_dict=False)[0]",
        "image = sampler.step(model_output, t, image, return_dict=False)[0]",
        [PIPELINE + "[ddpm]"],
    ),
    "denoise_output_not_rescaled": (
        "ddpm_lightning/sampling.py",
        "return (image / 2 + 0.5).clamp(0, 1)",
        "return image.clamp(0, 1)",
        [PIPELINE + "[ddim]"],
    ),
    "compile_not_applied": (
        "ddpm_lightning/speed/switches.py",
        '"sample": torch.compile(predict, mode=mode, dynamic=False),',
        '"sample": predict,',
        [T + "test_speed_switches.py::test_compiled_unet_runs_and_matches_the_plain_one"],
    ),
    "channels_last_batch_not_converted": (
        "ddpm_lightning/speed/switches.py",
        "batch = batch.contiguous(memory_format=torch.channels_last)",
        "batch = batch.contiguous()",
        [SWITCHES],
    ),
    "gradient_checkpointing_not_enabled": (
        "ddpm_lightning/speed/switches.py",
        "unet.enable_gradient_checkpointing()",
        "unet.disable_gradient_checkpointing()",
        [SWITCHES],
    ),
    "rng_states_not_restored": (
        "ddpm_lightning/checkpointing/resume.py",
        'torch.set_rng_state(states["torch"])\n',
        "return\n",
        [T + "test_end_to_end_resume.py::test_stopped_and_resumed_run_equals_the_uninterrupted_one[memory]"],
    ),
    "beta_schedule_ignored": (
        "ddpm_lightning/module.py",
        "        chosen = {k: self.hparams[k] for k in NOISE_SCHEDULE}\n",
        '        chosen = {k: self.hparams[k] for k in NOISE_SCHEDULE} | {"beta_schedule": "linear"}\n',
        [BETAS + "[squaredcos_cap_v2]"],
    ),
    "samplers_rebuild_sigmoid_by_name": (
        "ddpm_lightning/sampling.py",
        "from_config(config, trained_betas=betas.tolist())",
        "from_config(config)",
        [BETAS + "[sigmoid]", T + "test_commands.py::test_sample_from_a_sigmoid_schedule_draws_what_the_module_draws"],
    ),
    "colour_conversion_through_grey": (
        "ddpm_lightning/data/images.py",
        'return image.convert("RGB")',
        'return image.convert("L").convert("RGB")',
        [T + "test_data.py::test_converts_grayscale_rgba_and_palette_images"],
    ),
    "val_split_ignored": (
        "ddpm_lightning/sources.py",
        'load_source(val_dataset, val_split, "--data.val_dataset")',
        'load_source(val_dataset, split, "--data.val_dataset")',
        [T + "test_sources.py::test_val_dataset_and_val_split_name_the_validation_images"],
    ),
    "cache_auto_ignores_the_size_cap": (
        "ddpm_lightning/data/images.py",
        "decoded_bytes(images) / 1e9 <= cache_max_gb",
        "True",
        [T + "test_data.py::test_cache_auto_keeps_small_data_in_memory_and_streams_above_cache_max_gb"],
    ),
    "cache_on_gpu_ignored": (
        "ddpm_lightning/data/datamodule.py",
        "self.images(train, hp.crop, device if on_gpu else None)",
        "self.images(train, hp.crop, None)",
        [T + "test_data.py::test_cache_on_gpu_puts_the_cached_pixels_on_the_training_device"],
    ),
    "single_parquet_file_read_as_json": (
        "ddpm_lightning/sources.py",
        'builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))',
        'builder = "json"',
        [T + "test_sources.py::test_a_single_parquet_file_is_a_data_set"],
    ),
    "no_samples_image_in_tensorboard": (
        "ddpm_lightning/reporting/grids.py",
        "logger.experiment.add_image(tag, grid, global_step=step)",
        "pass",
        [FIT_QUALITY],
    ),
    "fid_never_during_fit": (
        "ddpm_lightning/callbacks.py",
        "due = validating or is_due(trainer, self.measure_quality_epochs)",
        "due = validating",
        [FIT_QUALITY, FID_AT_THE_END],
    ),
    "fid_logged_as_nan": (
        "ddpm_lightning/callbacks.py",
        'logged = {f"val/{k}": v for k, v in scores.items()}',
        'logged = {f"val/{k}": v * float("nan") for k, v in scores.items()}',
        [T + "test_callbacks.py::test_fid_and_kid_through_validate_with_a_custom_extractor"],
    ),
    "more_images_change_the_first_ones": (
        "ddpm_lightning/commands.py",
        "[image_generator(seed, i) for i in indices]",
        "[image_generator(seed + num_images, i) for i in indices]",
        [T + "test_commands.py::test_asking_for_more_images_keeps_the_first_ones"],
    ),
    "hub_repo_created_public": (
        "ddpm_lightning/publish/hub.py",
        "private=self.private,",
        "private=False,",
        [HUB + "test_create_repo_asks_for_the_visibility_and_takes_the_full_repo_id"],
    ),
    "hub_failed_upload_raises": (
        "ddpm_lightning/publish/hub.py",
        "            self.failures += 1\n",
        "            raise\n",
        [HUB + "test_failed_upload_warns_counts_and_the_next_one_succeeds"],
    ),
    "hub_upload_does_not_wait_for_the_last": (
        "ddpm_lightning/publish/hub.py",
        "        self.wait()\n        allow = ",
        "        allow = ",
        [HUB + "test_failed_upload_warns_counts_and_the_next_one_succeeds"],
    ),
    "hub_intermediate_folders_published": (
        "ddpm_lightning/publish/hub.py",
        '"allow_patterns": allow}',
        '"allow_patterns": None}',
        [HUB + "test_save_model_creates_the_repo_uploads_the_saved_pipeline_and_waits_at_fit_end"],
    ),
    # the upload's allow-list: an upload carries what it names, nothing else
    "hub_upload_by_deny_list": (  # the old way: all but the logs, so validate/, a user's notes.txt, data.png went up
        "ddpm_lightning/publish/hub.py",
        '"allow_patterns": allow}',
        '"ignore_patterns": ["logs/*", "run_summary.json"]}',
        [UPLOAD],
    ),
    "hub_training_photos_published": (  # a grid pattern wide enough for data.png, 16 of the training images
        "ddpm_lightning/publish/hub.py",
        'f"{files.SAMPLES}/{files.GRIDS}",',
        'f"{files.SAMPLES}/*.png",',
        [UPLOAD],
    ),
    "hub_fit_end_does_not_wait": (
        "ddpm_lightning/callbacks.py",
        "    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:\n"
        '        """Wait for the upload in progress."""\n'
        "        if self.uploader is not None:\n            self.uploader.wait()\n",
        "    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:\n        pass\n",
        [HUB + "test_save_model_creates_the_repo_uploads_the_saved_pipeline_and_waits_at_fit_end"],
    ),
    "tutorial_config_value_changed": (
        "configs/butterflies.yaml",
        "max_epochs: 50 ",
        "max_epochs: 500",
        [T + "test_cli.py::test_print_config_shows_tutorial_keys"],
    ),
    # images reach every tracker; the quick start trains on the shipped sample data
    "wandb_gets_no_images": (
        "ddpm_lightning/reporting/grids.py",
        "logger.log_image(tag, [grid.permute(1, 2, 0).numpy()], step=step)",
        "pass",
        [TRACKERS],
    ),
    "mlflow_gets_no_images": (
        "ddpm_lightning/reporting/grids.py",
        "logger.experiment.log_image(logger.run_id, grid.permute(1, 2, 0).numpy(), key=tag, step=step)",
        "pass",
        [TRACKERS],
    ),
    "tiny_config_off_the_shipped_data": (
        "configs/tiny.yaml",
        "  dataset: ./data/heliconius ",
        "  dataset: ../shared/data/heliconius/train ",
        [T + "test_configs.py::test_the_quick_start_is_315_steps_on_the_shipped_photos_and_ends_with_grid_0004"],
    ),
    "sample_data_loses_file_names": (
        "tools/make_sample_data.py",
        '"path": path.name}',
        '"path": None}',
        [T + "test_sources.py::test_make_sample_data_rebuilds_a_hub_format_data_set"],
    ),
    # a full disk, a broken last.ckpt or a NaN never costs the last good checkpoint
    "link_and_removal_run_after_a_failed_write": (
        "ddpm_lightning/checkpointing/writes.py",
        "            if self._failure is None:\n",
        "            if True:\n",
        [
            T
            + "test_checkpointing_writes.py::"
            + "test_a_full_disk_keeps_the_last_good_checkpoint_and_stops_with_one_line[1.5]"
        ],
    ),
    "resume_from_a_dangling_last_starts_over": (
        "ddpm_lightning/checkpointing/resume.py",
        "        if not existing:  # a link whose file was deleted or never written\n",
        "        if False:\n",
        [
            T
            + "test_checkpointing_resume.py::"
            + "test_resume_from_a_broken_last_fails_before_training_naming_the_file_and_the_fresh_start"
            + "[break_dangling]"
        ],
    ),
    "checkpoint_written_after_a_nan_loss": (
        "ddpm_lightning/checkpointing/cadence.py",
        "        check_finite(trainer)  # (called on every rank before anything is written)\n",
        "        pass\n",
        [T + "test_stop_on_nan.py::test_no_checkpoint_grid_or_model_is_written_after_a_nan_loss"],
    ),
    # a stop signal during an epoch-end grid
    "stop_signal_waits_for_the_grid": (  # the grid runs to its end before the run stops
        "ddpm_lightning/checkpointing/signals.py",
        "    if trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):\n"
        "        raise SIGTERMException\n",
        "    pass\n",
        [
            SIGNALS
            + "test_a_stop_signal_during_an_epoch_end_grid_ends_it_at_the_next_step_then_saves_exits_0_and_resumes"
        ],
    ),
    "repeated_stop_signal_ends_the_process": (  # SIGTERM's default back after Lightning's teardown: exit 143
        "ddpm_lightning/checkpointing/signals.py",
        "            signal.signal(signal.SIGTERM, signal.SIG_IGN)\n",
        "            pass\n",
        [SIGNALS + "test_a_repeated_stop_signal_is_the_same_request_the_run_exits_0_with_its_checkpoint"],
    ),
    # fine-tuning from a pretrained model
    "pretrained_weights_not_loaded": (  # the pretrained architecture with random weights
        "ddpm_lightning/module.py",
        "            self.unet.load_state_dict(found.unet.state_dict())\n",
        "            pass\n",
        [FINE_TUNING + "test_fine_tunes_from_a_bare_unet_folder_with_the_default_schedule"],
    ),
    "pretrained_checkpoint_raw_not_ema_weights": (
        "ddpm_lightning/model_source.py",
        "            ema.copy_to(unet.parameters())\n",
        "            pass\n",
        [FINE_TUNING + "test_fine_tunes_from_a_checkpoint_s_ema_weights_as_a_new_run_with_ema_from_them"],
    ),
    "pretrained_schedule_ignored": (
        "ddpm_lightning/unet.py",
        "base = {k: v for k, v in pretrained.items() if k in known}",
        "base: dict = {}",
        [FINE_TUNING + "test_fine_tunes_from_the_google_ddpm_layout_with_its_schedule_unless_set"],
    ),
    # MFU against each GPU's dense peak; no host read per step for the progress bar
    "peak_flops_sparse_h200": (  # the datasheet's "with sparsity" figure: MFU half of what it is
        "ddpm_lightning/reporting/peak_flops.py",
        '(r"h200", 989.5e12)',
        '(r"h200", 1979e12)',
        [T + "test_reporting_peak_flops.py"],
    ),
    "peak_flops_nvl_as_sxm": (  # without its own line, an H200 NVL matches "h200": the SXM card's peak
        "ddpm_lightning/reporting/peak_flops.py",
        '    (r"h200 nvl", 835.5e12),',
        "",
        [T + "test_reporting_peak_flops.py"],
    ),
    "loss_on_the_bar_every_step": (  # a prog_bar value is read back to the host after every batch
        "ddpm_lightning/module.py",
        '        self.log("train/loss", loss)',
        '        self.log("train/loss", loss, prog_bar=True)',
        [T + "test_reporting_progress.py"],
    ),
    "images_per_sec_on_the_bar_every_step": (  # logged on log steps only, but read again after every batch
        "ddpm_lightning/reporting/monitor.py",
        'pl_module.log("img/s", rate, logger=False',
        'pl_module.log("img/s", rate, prog_bar=True, logger=False',
        [T + "test_reporting_progress.py"],
    ),
    # no host read per training step
    "nan_check_every_step": (  # the check reads the loss's NaN flag back from the device: a GPU sync per step
        "ddpm_lightning/stop_on_nan.py",
        "            trainer.global_step % self.every_n_steps == 0\n",
        "            True\n",
        [T + "test_speed_switches.py::test_no_host_read_per_training_step"],
    ),
    # the decoding pass that fills the cache
    "decode_keeps_per_image_worker_tensors": (  # each image its own shared-memory tensor, all alive: one file each
        "ddpm_lightning/data/images.py",
        "        indices, batch_size=32, num_workers=num_workers, collate_fn=images.try_load, "
        "generator=torch.Generator()\n    )\n    try:\n        for batch in loader:\n",
        "        indices, batch_size=1, num_workers=num_workers, collate_fn=images.try_load, "
        "generator=torch.Generator()\n    )\n    received = []\n    try:\n        for batch in loader:\n"
        "            received.append(batch)\n",
        [DECODE + "test_decoding_past_the_open_file_limit_in_workers_gives_the_pixels_of_decoding_here[squash]"],
    ),
    # a rank that read the shared cache would then draw other noise than one that decoded
    "decode_draws_on_the_training_rng": (
        "ddpm_lightning/data/images.py",
        "collate_fn=images.try_load, generator=torch.Generator()\n",
        "collate_fn=images.try_load\n",
        [SHARED_CACHE + "test_ddp_ranks_decode_once_resume_exactly_and_train_as_from_per_process_memory"],
    ),
    # the shared cache of decoded images: a key that misses a change serves stale pixels
    "shared_cache_key_ignores_image_size": (
        "ddpm_lightning/data/shared_cache.py",
        '"size": image_size,',
        '"size": None,',
        [SHARED_CACHE + "test_changed_images_size_or_crop_are_decoded_again_never_served_stale"],
    ),
    "shared_cache_key_ignores_when_the_file_changed": (  # both times: any change of a file moves its ctime too
        "ddpm_lightning/data/shared_cache.py",
        "{stat.st_size}\\0{stat.st_mtime_ns}\\0{stat.st_ctime_ns}\\0",
        "{stat.st_size}\\0",
        [SHARED_CACHE + "test_changed_images_size_or_crop_are_decoded_again_never_served_stale"],
    ),
    "shared_cache_key_ignores_the_bytes": (  # only their length: a changed image of the same length is stale
        "ddpm_lightning/data/shared_cache.py",
        "                digest.update(data)\n",
        "",
        [SHARED_CACHE + "test_images_stored_in_the_data_set_are_keyed_by_their_bytes_in_their_order"],
    ),
    "streamed_loader_draws_on_the_global_rng": (  # the workers' base seed then moves the noise's RNG
        "ddpm_lightning/data/shards.py",
        "        generator=torch.Generator().manual_seed(0),\n",
        "",
        [
            T
            + "test_data_shards.py::"
            + "test_ddp_from_prepared_shards_splits_each_epoch_and_resumes_exactly_or_on_one_process_with_a_warning"
        ],
    ),
    "streamed_epoch_after_a_resume_replays_it": (
        "ddpm_lightning/data/shards.py",
        "                self.restore = False\n",
        "                pass\n",
        [SHARDS + "test_each_epoch_streams_every_image_once_in_a_new_order_and_resumes_mid_epoch_exactly"],
    ),
    "world_size_change_unsaid": (
        "ddpm_lightning/checkpointing/resume.py",
        '        if not then or then["world_size"] == trainer.world_size:\n',
        "        if True:\n",
        [T + "test_checkpointing_resume.py::test_a_resume_on_another_number_of_processes_says_what_changes"],
    ),
    "posthoc_snapshots_kept_on_resume": (  # a resumed run's reconstruction would mix two histories
        "ddpm_lightning/posthoc_ema.py",
        "        for path in later:\n            path.unlink()\n",
        "        later = []\n",
        [T + "test_posthoc_ema.py::test_the_profiles_survive_a_kill_and_resume_bit_for_bit"],
    ),
    "last_step_of_a_skipped_epoch_unmeasured": (  # tiny.yaml validates every 5th epoch: a shorter run unmeasured
        "ddpm_lightning/callbacks.py",
        "            trainer.check_val_every_n_epoch = 1",
        "            pass",
        [
            T + "test_end_to_end_training.py::test_a_run_validating_every_third_epoch_still_validates_and_measures"
            "_its_last_step"
        ],
    ),
}

COPIED = ["ddpm_lightning", "tests", "configs", "data", "tools", "pyproject.toml", "README.md"]


def make_copy(root: Path) -> Path:
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, root / name)
    return root


def run_tests(root: Path, tests: list[str], threads: int) -> tuple[int, str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + str(root / "tests")
    env["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    return result.returncode, result.stdout + result.stderr, time.time() - start


def check(name: str, threads: int) -> tuple[str, str, float]:
    path, old, new, tests = MUTATIONS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        root = make_copy(Path(tmp))
        text = (root / path).read_text()
        if text.count(old) != 1:
            return "STALE", f"old text found {text.count(old)} times in {path}", 0.0
        (root / path).write_text(text.replace(old, new))
        code, log, seconds = run_tests(root, tests, threads)
    verdict = {1: "CAUGHT", 0: "MISSED"}.get(code, "ERROR")
    detail = "" if verdict == "CAUGHT" else log.strip().splitlines()[-1] if log.strip() else f"exit {code}"
    return verdict, detail, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"mutations to run (default: all): {', '.join(MUTATIONS)}")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (each gets cores / jobs threads)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not first run the tests unmodified")
    args = parser.parse_args()
    names = args.names or list(MUTATIONS)
    unknown = [n for n in names if n not in MUTATIONS]
    if unknown:
        parser.error(f"unknown mutations: {unknown}")
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    start = time.time()

    if not args.skip_baseline:
        tests = sorted({t for n in names for t in MUTATIONS[n][3]})
        with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
            code, log, seconds = run_tests(make_copy(Path(tmp)), tests, os.cpu_count() or 2)
        print(f"baseline: {len(tests)} tests on the unmodified copy, exit {code} ({seconds:.0f} s)", flush=True)
        if code != 0:
            print(log[-3000:])
            print("The tests must pass on the unmodified code first.")
            return 2

    failures = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, (verdict, detail, seconds) in zip(names, pool.map(lambda n: check(n, threads), names)):
            failures += verdict != "CAUGHT"
            print(f"{verdict:7} {name:40} {seconds:5.0f} s  {detail}", flush=True)
    print(f"{len(names) - failures} of {len(names)} planted bugs caught in {time.time() - start:.0f} s")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
