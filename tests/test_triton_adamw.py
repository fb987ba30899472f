"""--fused_adam 2: the Triton AdamW against torch's fused AdamW (on CPU through Triton's interpreter, on a
GPU compiled), its checkpoints interchangeable with torch's, and its refusals.

The interpreter is a process-wide switch of Triton's (TRITON_INTERPRET=1 before it is imported, and while
kernels run), so the CPU checks run in their own process."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.test_train_e2e import REPO


def interpreted(call):
    """Run `call` (an expression over this module's names) in a process with Triton's interpreter on."""
    proc = subprocess.run([sys.executable, "-c", f"from tests.test_triton_adamw import *; {call}"], cwd=REPO,
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def nets(device):
    """The same small net twice: a channels-last convolution, and a weight of 1.5 blocks (whole and tail)."""
    def one():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 3).to(device, memory_format=torch.channels_last)
        return torch.nn.ModuleList([conv, torch.nn.Linear(96, 64).to(device)])  # 6144 = 1.5 x 4096
    return one(), one()


def loss_of(net, step, device):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(2, 3, 6, 6, generator=gen).to(device, memory_format=torch.channels_last)
    h = net[0](x).flatten(1)[:, :96]
    return net[1](h).square().mean() * 100


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled kernel needs a GPU"))])
def test_matches_torch_fused_adamw_with_loss_scale_and_skips(device):
    """Five steps, the loss scale and clip coefficient dividing the gradients, one step skipped on
    found_inf (weights, moments and step count unchanged): the same weights as torch's fused AdamW."""
    if device == "cpu":
        interpreted("check_matches_torch_fused_adamw('cpu')")
    else:
        check_matches_torch_fused_adamw("cuda")


def check_matches_torch_fused_adamw(device):
    from diffueraser.triton_adamw import TritonAdamW

    ours, ref = nets(device)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    opt, opt_ref = TritonAdamW(ours.parameters(), device=device, **kw), torch.optim.AdamW(ref.parameters(), fused=True, **kw)
    for step in range(5):
        for net, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            loss_of(net, step, device).backward()
            o.grad_scale = torch.tensor(3.0, device=device)
            o.found_inf = torch.tensor(float(step == 2), device=device)
            o.step()
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):  # Adam is nearly blind to the gradients' scale: these are not
                # torch's CPU kernel takes 1 - beta2 in fp32 (0.00099998713, 1.3e-5 off); its CUDA one in double, as ours
                ref_value = opt_ref.state[b][key]  # near-zero sums (cancellation): to the tensor's own scale
                torch.testing.assert_close(opt.state[a][key], ref_value, rtol=2e-5 if device == "cpu" else 1e-6,
                                           atol=1e-6 * float(ref_value.abs().max()))
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert float(opt.state[p]["step"]) == float(opt_ref.state[q]["step"]) == 4  # the skipped step not counted
        assert opt.state[p]["exp_avg"].stride() == p.stride()


def test_checkpoints_move_between_it_and_torchs_adamw(tmp_path):
    """Saved by one, resumed by the other through accelerate: the same state, and each run keeps its own
    kernel (torch's load_state_dict would take the saved groups' fused/foreach/capturable flags)."""
    interpreted(f"check_checkpoints_move({str(tmp_path)!r})")


def check_checkpoints_move(tmp_path):
    from pathlib import Path

    from accelerate import Accelerator

    from diffueraser.checkpoints import resume, save_checkpoint
    from diffueraser.triton_adamw import TritonAdamW

    tmp_path = Path(tmp_path)
    kw = dict(lr=1e-2, weight_decay=1e-2)
    makers = {"triton": lambda ps: TritonAdamW(ps, device="cpu", **kw),
              "fused": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
              "foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **kw)}
    for saver, loader in (("triton", "fused"), ("foreach", "triton"), ("triton", "foreach")):
        out = tmp_path / f"{saver}-{loader}"
        accelerator = Accelerator(cpu=True)
        net, _ = nets("cpu")
        net, opt = accelerator.prepare(net, makers[saver](net.parameters()))
        loss_of(net, 0, "cpu").backward()
        opt.step()
        saved = [{k: v.clone() for k, v in opt.optimizer.state[p].items()} for p in net.parameters()]
        save_checkpoint(accelerator, str(out), 1)
        accelerator._optimizers.clear(), accelerator._models.clear()  # the resumed run's own, as in a new process
        net2, _ = nets("cpu")
        net2, opt2 = accelerator.prepare(net2, makers[loader](net2.parameters()))
        assert resume(accelerator, SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(out)))[0] == 1
        inner = opt2.optimizer
        assert {k: inner.param_groups[0][k] for k in ("fused", "foreach", "capturable")} == \
            {k: inner.defaults[k] for k in ("fused", "foreach", "capturable")}, (saver, loader)
        for p, before in zip(net2.parameters(), saved):
            for key, value in before.items():
                torch.testing.assert_close(inner.state[p][key].float(), value.float(), rtol=0, atol=0)
        loss_of(net2, 1, "cpu").backward()
        opt2.step()  # each steps with its own kernel from the other's state
        accelerator._optimizers.clear(), accelerator._models.clear()


def test_refusals_name_the_flag():
    interpreted("check_refuses_moments_in_another_layout()")
    if os.environ.get("TRITON_INTERPRET") != "1":
        from diffueraser.triton_adamw import TritonAdamW

        with pytest.raises(SystemExit, match="--fused_adam 2: the Triton AdamW needs a CUDA GPU"):
            TritonAdamW(torch.nn.Linear(2, 2).parameters(), device="cpu")


def check_refuses_moments_in_another_layout():
    from diffueraser.triton_adamw import TritonAdamW

    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = TritonAdamW(conv.parameters(), device="cpu")
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    opt.step()
    opt.state[conv.weight]["exp_avg"] = opt.state[conv.weight]["exp_avg"].contiguous()  # NCHW beside NHWC
    with pytest.raises(ValueError, match=r"parameter 0 of group 0 .*--fused_adam 1"):
        opt.step()
