"""Several processes (DDP over gloo on CPU): same update as one process, and the real scripts run."""
import os
import subprocess
import sys

import pytest
import torch

from tests.test_train_e2e import REPO, assets, flags  # noqa: F401  (session fixture reused)

LR = 1e-4
pytestmark = pytest.mark.xdist_group("port29500")  # debug_launcher and torchrun take port 29500: one at a time


def one_update(stage, out_file):
    """One real update on a fixed global batch of 2 clips, split over however many processes run."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from diffueraser.tiny import TINY_SCHEDULER, tiny_stage_models
    from diffueraser.trainer import diffusion_loss, is_trained, update, update_state

    accelerator = Accelerator()
    unet, brushnet = tiny_stage_models(stage)
    f = 2
    trained = [m for m in (unet, brushnet) if is_trained(m)]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    prepared = accelerator.prepare(*trained, optimizer)
    optimizer = prepared[-1]
    models = [prepared[trained.index(m)] if m in trained else m for m in (unet, brushnet)]
    assert not isinstance(brushnet, torch.nn.parallel.DistributedDataParallel) or stage == "stage1"
    g = torch.Generator().manual_seed(1)
    b = 2
    latents, cond, noise = (torch.randn(b * f, 4, 8, 8, generator=g) for _ in range(3))
    masks = (torch.rand(b * f, 1, 64, 64, generator=g) > 0.3).float()
    text = torch.randn(b, 77, 20, generator=g)
    timesteps = torch.tensor([100, 700])
    per = b // accelerator.num_processes
    rank = accelerator.process_index
    clip, frame = slice(rank * per, (rank + 1) * per), slice(rank * per * f, (rank + 1) * per * f)
    loss = diffusion_loss(*models, DDPMScheduler(**TINY_SCHEDULER), latents[frame], cond[frame], masks[frame],
                          text[clip], noise[frame], timesteps[clip], f)
    accelerator.backward(loss)
    state = update_state()
    args = type("A", (), dict(max_grad_norm=1e9, max_bad_steps=1))
    assert update(accelerator, args, state, loss, params, optimizer, type("S", (), dict(step=lambda self: None))())
    if accelerator.is_main_process:
        torch.save({n: p.detach().clone() for i, m in enumerate(trained) for n, p in
                    accelerator.unwrap_model(models[(unet, brushnet).index(m)]).named_parameters()
                    if p.requires_grad} | {"__loss": torch.tensor(state["loss"])}, out_file)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_two_processes_match_one(stage, tmp_path):
    from accelerate import debug_launcher

    one_update(stage, tmp_path / "one.pt")
    debug_launcher(one_update, args=(stage, tmp_path / "two.pt"), num_processes=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    # logged loss: the mean over processes equals the one-process mean over the same clips
    assert torch.allclose(one.pop("__loss"), two.pop("__loss"), rtol=1e-5)
    # Adam's first step moves every weight by about lr * sign(grad); float summation order
    # differs between the two runs, so allow a thousandth of that step.
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-3 * LR, worst


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_real_scripts_on_two_processes(assets, tmp_path, stage):  # noqa: F811
    out = tmp_path / stage
    extra = []
    if stage == "stage2":
        stage1 = tmp_path / "stage1-weights"
        subprocess.run([sys.executable, "train_DiffuEraser_stage1.py", *flags(assets, stage1, 1)], cwd=REPO,
                       check=True, capture_output=True)
        extra = ["--pretrained_stage1", str(stage1), "--motion_adapter_path", str(assets / "adapter")]
    # torchrun + ACCELERATE_USE_CPU gives accelerate's MULTI_CPU (gloo); on GPUs it is `accelerate launch --multi_gpu`
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           f"train_DiffuEraser_{stage}.py", *flags(assets, out, 2, nframes=2 if stage == "stage1" else 4,
                                                   latent_cache=tmp_path / "latent_cache"), *extra]  # as the scripts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    files = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    assert "random_states_0.pkl" in files and "random_states_1.pkl" in files
    assert files.count("model.safetensors") == 1
    assert ("model_1.safetensors" in files) == (stage == "stage1")  # a frozen BrushNet is never prepared
    assert (out / "unet_main" / "config.json").is_file() and (out / "brushnet" / "config.json").is_file()
    assert "2 process(es)" in proc.stdout + proc.stderr
    assert "videos encoded" in proc.stdout + proc.stderr  # the main process built the cache; both read it


def stop_agreement(out_file):
    """Only process 1 is asked to stop: both processes must agree to stop, at the same check."""
    from accelerate import Accelerator

    from diffueraser.stopping import StopRequest

    accelerator = Accelerator()
    stop = StopRequest.__new__(StopRequest)  # the flag alone: the launcher's threads own the signals
    stop.requested, stop.training = False, True
    seen = [stop.agreed(accelerator)]
    stop.requested = accelerator.process_index == 1
    seen.append(stop.agreed(accelerator))
    with open(f"{out_file}.{accelerator.process_index}", "w") as f:
        f.write(repr(seen))


def test_a_stop_on_one_process_stops_every_process(tmp_path):
    from accelerate import debug_launcher

    debug_launcher(stop_agreement, args=(tmp_path / "seen",), num_processes=2)
    assert [(tmp_path / f"seen.{rank}").read_text() for rank in (0, 1)] == ["[False, True]"] * 2
