"""The model folder (publish/folder.py): swapped in atomically, so a save killed mid-write leaves the previous model
loadable."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from conftest import child_env, tiny_module

KILLED_SAVE = """
import sys, time, safetensors.torch, torch
from conftest import tiny_module
from ddpm_lightning.publish import save_pipeline

torch.manual_seed(0)
module = tiny_module()
save_pipeline(module.unet, module.noise_scheduler, sys.argv[1])  # the old model, whole
real = safetensors.torch.save_file

def stalls(tensors, path, metadata=None):  # half of the new weights out, then hangs until killed
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2]); f.flush()
    print("writing", flush=True); time.sleep(600)

safetensors.torch.save_file = stalls
with torch.no_grad():
    for p in module.unet.parameters():
        p.add_(1.0)
save_pipeline(module.unet, module.noise_scheduler, sys.argv[1])
"""


@pytest.mark.slow
def test_a_model_save_killed_mid_write_leaves_the_previous_model_loadable(tmp_path):
    from diffusers import DDPMPipeline

    folder = tmp_path / "model"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(folder)], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    loaded = DDPMPipeline.from_pretrained(folder).unet  # loads: no half-written weights beside the old config
    torch.manual_seed(0)
    old = tiny_module().unet.state_dict()
    assert all(torch.equal(value, old[name]) for name, value in loaded.state_dict().items())  # the old model
    assert [p.name for p in folder.glob(".*")] == [f".model.partial-{writer.pid}"]  # removed by the next fit
