"""Checkpoint bookkeeping: what counts as complete, `latest`, pruning, resolving user paths, a full disk."""
import errno
import os
from pathlib import Path

import pytest
import torch

from diffueraser.checkpoints import (checkpoint_step, find_latest_checkpoint, list_checkpoints, prune_checkpoints,
                                     resolve_checkpoint)


def make(root, name, complete=True):
    path = root / name
    path.mkdir()
    if complete:
        (path / "model.safetensors").write_bytes(b"")
    return path


def test_latest_ignores_partial_and_incomplete(tmp_path):
    make(tmp_path, "checkpoint-2")
    make(tmp_path, "checkpoint-10")
    make(tmp_path, "checkpoint-30", complete=False)       # cut short before the model was written
    make(tmp_path, "checkpoint-40.partial")               # a save in progress or killed
    make(tmp_path, "checkpoint-x")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 10]   # numeric, not string, order
    assert find_latest_checkpoint(str(tmp_path)).endswith("checkpoint-10")
    assert find_latest_checkpoint(str(tmp_path / "nothing")) is None


def test_prune_keeps_newest_and_removes_partials(tmp_path):
    for step in (1, 2, 3, 4):
        make(tmp_path, f"checkpoint-{step}")
    make(tmp_path, "checkpoint-5.partial")
    prune_checkpoints(str(tmp_path), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_data_position_of_a_resume():
    """Where the data goes on: the checkpoint's record ([epoch, batches read]; a whole epoch read is the
    next one's start), else, for a checkpoint without one, derived from the step."""
    from types import SimpleNamespace

    from diffueraser.checkpoints import data_position

    args = SimpleNamespace(gradient_accumulation_steps=2)
    assert data_position([1, 3], 10, 4, args, 8) == (1, 3)
    assert data_position([1, 8], 10, 4, args, 8) == (2, 0)
    assert data_position(None, 10, 4, args, 8) == (2, 4)      # 4 updates of 2 batches per epoch
    assert data_position(None, 8, 4, args, 8) == (2, 0)


def test_resolve_user_paths(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = make(run, "checkpoint-7")
    assert resolve_checkpoint("latest", str(run)) == str(ckpt)
    assert resolve_checkpoint(str(ckpt), "elsewhere") == str(ckpt)
    assert resolve_checkpoint("checkpoint-7", str(run)) == str(run / "checkpoint-7")
    assert resolve_checkpoint(str(run), "elsewhere") == str(ckpt)          # a run folder: its latest
    assert checkpoint_step(str(ckpt) + "/") == 7
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "missing"), str(run))


def test_marker_makes_a_checkpoint_complete_without_model_files(tmp_path):
    """DeepSpeed writes no model.safetensors; our completion marker is what counts."""
    path = make(tmp_path, "checkpoint-5", complete=False)
    assert find_latest_checkpoint(str(tmp_path)) is None
    (path / "checkpoint_complete.json").write_text('{"step": 5}')
    assert find_latest_checkpoint(str(tmp_path)) == str(path)


def test_abandon_newer_checkpoints(tmp_path):
    from diffueraser.checkpoints import abandon_newer_checkpoints

    for step in (2, 4, 6):
        make(tmp_path, f"checkpoint-{step}")
    abandon_newer_checkpoints(str(tmp_path), 2)
    assert find_latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    assert (tmp_path / "checkpoint-6.abandoned-at-2").is_dir()


def test_fingerprint_sees_head_and_tail_changes(tmp_path):
    """Size plus a hash of each weight file's first and last `edge` bytes; other files ignored."""
    from diffueraser.checkpoints import fingerprint

    data = bytearray(range(256)) * 40  # 10240 bytes: head, middle and tail with edge=1000
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))
    (tmp_path / "config.json").write_text("{}")
    base = fingerprint(str(tmp_path), edge=1000)
    assert list(base) == ["diffusion_pytorch_model.safetensors"]
    for offset, seen in ((10, True), (10240 - 10, True), (5000, False)):  # the middle is not read
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(bytes(changed))
        assert (fingerprint(str(tmp_path), edge=1000) != base) == seen, offset
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data) + b"x")  # size
    assert fingerprint(str(tmp_path), edge=1000) != base


def test_empty_or_missing_marker_reads_as_none(tmp_path):
    from diffueraser.checkpoints import read_marker

    path = make(tmp_path, "checkpoint-3")
    assert read_marker(str(path)) == {}
    (path / "checkpoint_complete.json").write_text("")  # left empty by a crash
    assert read_marker(str(path)) == {}
    (path / "checkpoint_complete.json").write_text('{"step": 3, "frozen_sources": {}}')
    assert read_marker(str(path)) == {"step": 3, "frozen_sources": {}}


def test_partial_checkpoint_is_refused_even_when_complete_looking(tmp_path):
    path = make(tmp_path, "checkpoint-4.partial")
    (path / "checkpoint_complete.json").write_text('{"step": 4}')
    for spec in (str(path), str(path) + "/", "checkpoint-4.partial"):
        with pytest.raises(ValueError, match="never finished"):
            resolve_checkpoint(spec, str(tmp_path))


class FakeAccelerator:
    """One process whose save_state writes a model file, or fails like a full disk."""
    is_main_process, num_processes = True, 1

    def __init__(self, error=None):
        self.error = error

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path)
        (Path(path) / "model.safetensors").write_bytes(b"x" * 100)
        if self.error:
            raise self.error


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9216 vs 9110"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_full_disk_during_a_save_stops_with_one_line(tmp_path, error):
    from diffueraser.checkpoints import save_checkpoint

    save_checkpoint(FakeAccelerator(), str(tmp_path), 2)
    with pytest.raises(SystemExit) as e:
        save_checkpoint(FakeAccelerator(error), str(tmp_path), 4, total_limit=1)
    message = str(e.value.code)
    assert message.startswith(f"no space left on {tmp_path} (") and "\n" not in message
    assert "stage-1 checkpoint needs ~20 GB (stage 2 ~8.3 GB)" in message and "checkpoint-4" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]   # kept; the half-written one removed
    with pytest.raises(ValueError, match="boom"):                            # other errors are not disguised
        save_checkpoint(FakeAccelerator(ValueError("boom")), str(tmp_path), 6)


def test_low_disk_warning_counts_weights_and_adam_moments(tmp_path, monkeypatch):
    """A checkpoint: every tensor of each trained model plus two AdamW moments per trained parameter;
    frozen models are not saved. The warning asks for room for two, less those already there."""
    import shutil
    from collections import namedtuple

    import torch

    from diffueraser.checkpoints import checkpoint_bytes, warn_if_low_disk

    trained, frozen = torch.nn.Linear(10, 10), torch.nn.Linear(100, 100).requires_grad_(False)
    trained.register_buffer("pe", torch.zeros(5))
    trained.bias.requires_grad_(False)                   # part of a trained model, frozen: weights only
    assert checkpoint_bytes([trained, frozen]) == (100 + 10 + 5) * 4 + 2 * 100 * 4
    need = checkpoint_bytes([trained])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 2 * need - 1))
    line = warn_if_low_disk(str(tmp_path), [trained])
    assert line.startswith(f"warning: {tmp_path} has ") and "a save will run out of space" in line
    make(tmp_path, "checkpoint-2")                        # one already written: room for one more is enough
    assert warn_if_low_disk(str(tmp_path), [trained]) is None


def save_with_full_disk_on_rank_1(output_dir):
    """Two processes save step 2, then step 4 with rank 1 out of space; each writes what it got."""
    import datetime

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from diffueraser.checkpoints import save_checkpoint

    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))])
    model = torch.nn.Linear(2, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    save_checkpoint(accelerator, output_dir, 2)
    if accelerator.process_index == 1:
        def full(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        accelerator.save_state = full
    try:
        save_checkpoint(accelerator, output_dir, 4)
        outcome = "saved"
    except SystemExit as e:
        outcome = str(e.code)
    Path(output_dir, f"rank{accelerator.process_index}.txt").write_text(outcome)


@pytest.mark.xdist_group("port29500")  # debug_launcher's fixed port: one such test at a time under -n
def test_full_disk_on_one_process_stops_every_process(tmp_path):
    """No process is left waiting at a barrier for one that ran out of space. Two CPU processes, forked
    from a fresh one with no GPU in sight (forked from pytest after a GPU test, they could not use CUDA)."""
    import subprocess
    import sys

    from tests.test_train_e2e import REPO

    call = ("from accelerate import debug_launcher; from tests.test_checkpoints import save_with_full_disk_on_rank_1 "
            f"as save; debug_launcher(save, args=({str(tmp_path)!r},), num_processes=2)")
    proc = subprocess.run([sys.executable, "-c", call], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(f"no space left on {tmp_path}")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the fused AdamW's refusal happens on CUDA"))])
def test_resume_under_the_other_channels_last_gives_the_moments_the_parameters_layout(tmp_path, device):
    """finetune_stage1.sh turned --channels_last on: a run begun before resumes with NHWC convolutions and
    NCHW Adam moments, which the fused AdamW on a GPU refuses. The moments take the parameters' layout, same
    values, and the fused step runs; 8-bit states (quantized in memory order) cannot: the run stops, naming
    the flag."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from diffueraser.checkpoints import optimizer_as_this_run, resume, save_checkpoint

    conv = torch.nn.Conv2d(3, 4, 3)
    accelerator = Accelerator(cpu=device == "cpu")
    optimizer = torch.optim.AdamW(conv.parameters(), fused=device == "cuda" or None)
    conv, optimizer = accelerator.prepare(conv, optimizer)
    conv(torch.randn(2, 3, 8, 8, device=device)).square().mean().backward()
    optimizer.step()
    saved = {k: v.clone() for k, v in optimizer.optimizer.state[conv.weight].items()}
    save_checkpoint(accelerator, str(tmp_path), 2)
    conv.to(memory_format=torch.channels_last)  # the resumed run's --channels_last 1
    assert resume(accelerator, SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(tmp_path)))[0] == 2
    state = optimizer.optimizer.state[conv.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].stride() == conv.weight.stride() and torch.equal(state[key], saved[key]), key
    conv(torch.randn(2, 3, 8, 8, device=device).to(memory_format=torch.channels_last)).square().mean().backward()
    optimizer.step()  # the fused AdamW on CUDA refused NCHW moments beside NHWC weights
    assert int(state["step"]) == 2
    state["state1"] = torch.zeros(conv.weight.shape, dtype=torch.uint8, device=device)  # bitsandbytes' 8-bit state, NCHW
    with pytest.raises(SystemExit, match=r"ckpt: its optimizer state \(state1\).*--channels_last"):
        optimizer_as_this_run(optimizer, "ckpt")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="where the step counts live matters on CUDA"))])
def test_resume_under_the_other_fused_adam_keeps_this_runs_kernel(tmp_path, device):
    """Saved by one AdamW kernel, resumed by the other through accelerate: the same state, and each run
    keeps its own kernel (torch's load_state_dict would take the saved groups' fused/foreach flags; a
    foreach AdamW then refuses the folded clip's grad_scale) with its step counts where that kernel reads
    them (fused: the parameters' device; foreach: the host)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from diffueraser.checkpoints import resume, save_checkpoint

    makers = {"fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2, fused=True),
              "foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2, foreach=True)}

    def net_and_loss(step):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 2))
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        return net, lambda m: m(x.to(device)).square().mean()

    for saver, loader in (("fused", "foreach"), ("foreach", "fused")):
        out = tmp_path / f"{saver}-{loader}"
        accelerator = Accelerator(cpu=device == "cpu")
        net, loss = net_and_loss(0)
        net, opt = accelerator.prepare(net, makers[saver](net.parameters()))
        loss(net).backward()
        opt.step()
        saved = [{k: v.clone() for k, v in opt.optimizer.state[p].items()} for p in net.parameters()]
        save_checkpoint(accelerator, str(out), 1)
        accelerator._optimizers.clear(), accelerator._models.clear()  # the resumed run's own, as in a new process
        net2, loss = net_and_loss(1)
        net2, opt2 = accelerator.prepare(net2, makers[loader](net2.parameters()))
        assert resume(accelerator, SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(out)))[0] == 1
        inner = opt2.optimizer
        assert {k: inner.param_groups[0][k] for k in ("fused", "foreach")} == \
            {k: inner.defaults[k] for k in ("fused", "foreach")}, (saver, loader)
        for p, before in zip(net2.parameters(), saved):
            for key, value in before.items():
                assert torch.equal(inner.state[p][key].float().cpu(), value.float().cpu()), (saver, loader, key)
            assert inner.state[p]["step"].device.type == (device if loader == "fused" else "cpu")
        loss(net2).backward()
        opt2.step()  # each steps with its own kernel from the other's state
        assert all(int(inner.state[p]["step"]) == 2 for p in net2.parameters())
        accelerator._optimizers.clear(), accelerator._models.clear()
