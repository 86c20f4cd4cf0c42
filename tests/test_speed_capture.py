"""`speed.cuda_graph_capture` (speed/capture.py): its refusals on the CPU, each one line, and what it captures and
when, with `torch.cuda.make_graphed_callables` stood in for (the capture itself needs a GPU: not run here)."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.cli import main, raised_by_this_package
from ddpm_lightning.speed import capture
from ddpm_lightning.speed import switches as speed

from conftest import fit_args, tiny_module


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "speed.cuda_graph_capture needs a CUDA GPU; this run trains on cpu"),
        (["--trainer.accumulate_grad_batches", "2"], "speed.cuda_graph_capture cannot accumulate gradients"),
    ],
)
def test_capture_refuses_a_cpu_and_gradient_accumulation_in_one_line(extra, message, image_folder, tmp_path):
    with pytest.raises(ValueError, match=message) as err:
        main(fit_args(image_folder, tmp_path / "run", "--speed.cuda_graph_capture", "true", *extra))
    assert "\n" not in str(err.value) and raised_by_this_package(err.value)
    assert not list(tmp_path.rglob("*.ckpt"))  # before any training


@pytest.mark.slow
def test_captured_once_for_the_first_training_batch_and_eager_otherwise(monkeypatch):
    """The batch the graphs are captured on, from copies of its inputs, once; a smaller batch, or no gradients,
    runs the plain UNet; the gradients match the plain forward's."""
    captures, replays = [], []

    def graphed_stand_in(module, inputs):
        captures.append(inputs)

        def replay(*args):
            replays.append(args)
            return module(*args)

        return replay

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", graphed_stand_in)
    model, forward = tiny_module(), capture.CapturedForward()
    plain = tiny_module()
    plain.load_state_dict(model.state_dict())
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 100, 999])
    for _ in range(2):
        forward(model.unet, x, t).square().mean().backward()
    plain.unet(x, t).sample.square().mean().backward()
    plain.unet(x, t).sample.square().mean().backward()
    [(sample, timesteps)] = captures
    assert sample is not x and torch.equal(sample, x) and not sample.requires_grad and torch.equal(timesteps, t)
    assert len(replays) == 2
    forward(model.unet, x[:2], t[:2])  # an epoch's short last batch
    with torch.no_grad():
        forward(model.unet, x, t)  # validation, sampling
    assert len(captures) == 1 and len(replays) == 2
    for p, q in zip(model.unet.parameters(), plain.unet.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.slow
def test_a_fit_trains_through_the_capture_on_its_full_batches(image_folder, tmp_path, monkeypatch):
    """The switch in a real fit, with the device check passed and the capture stood in for (as on a GPU): 12 images
    in batches of 5 capture once and replay on the 2 full batches; the short last one runs the plain UNet."""
    captures, replays = [], []

    def graphed_stand_in(module, inputs):
        captures.append(inputs)
        return lambda *args: replays.append(args) or module(*args)

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", graphed_stand_in)
    monkeypatch.setattr(speed, "check_capture", lambda trainer: None)
    args = ["--speed.cuda_graph_capture", "true", "--data.train_batch_size", "5", "--trainer.max_epochs", "1"]
    main(fit_args(image_folder, tmp_path / "run", *args))
    assert len(captures) == 1 and len(replays) == 2 and captures[0][0].shape == (5, 3, 16, 16)
