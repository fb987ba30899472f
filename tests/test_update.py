"""The update: clip + loss scale folded into the fused AdamW equals the unfolded reference."""
import warnings
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from diffueraser.speed import folds_clip, fused_clip_step, read_later
from diffueraser.trainer import update, update_state

ARGS = dict(max_grad_norm=1.0, max_bad_steps=3)


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in ((7, 5), (5,), (3, 2, 2))]


def set_grads(params, step, scale=1.0, inf=False):
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen) * (3.0 if step % 2 else 0.05) * scale  # clipped / not
        if inf and i == 1:
            p.grad[0] = float("inf")


def fake_accelerator(scaler=None):
    return SimpleNamespace(scaler=scaler, distributed_type=DistributedType.NO, sync_gradients=True,
                           clip_grad_norm_=torch.nn.utils.clip_grad_norm_, gather=lambda t: t)


def adamw(params, fused):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, fused=fused)


@pytest.mark.parametrize("loss_scale", [None, 1024.0])
def test_folded_clip_matches_unscale_clip_step(loss_scale):
    """Folded: one fused AdamW call reading grads / (scale / clip coefficient). Reference: the
    documented GradScaler recipe (scale, unscale_, clip_grad_norm_, step, update). Five steps,
    clipping on every other one, and a step with an infinite gradient (skipped: weights and step
    count unchanged, loss scale halved)."""
    ours, ref = make_params(), make_params()
    opt_ours, opt_ref = adamw(ours, fused=True), adamw(ref, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=loss_scale, growth_interval=2) if loss_scale else None
               for _ in range(2)]
    accelerator = fake_accelerator(scalers[0])
    args = SimpleNamespace(fold_clip=1, **ARGS)
    assert folds_clip(accelerator, args, opt_ours)
    for step in range(5):
        inf = step == 3
        scale = 1.0
        if loss_scale:  # scale() starts the scalers' state as accelerator.backward does
            scale = scalers[0].scale(torch.ones(()))
            assert float(scalers[1].scale(torch.ones(()))) == float(scale)
        set_grads(ours, step, float(scale), inf)
        set_grads(ref, step, float(scale), inf)
        before = [p.detach().clone() for p in ours]
        loss, grads_bad, norm, used_scale = fused_clip_step(accelerator, args, ours, opt_ours, torch.tensor(0.5))()
        assert [loss, grads_bad, used_scale] == [0.5, float(inf), float(scale)]  # and the gradients were not finite
        if loss_scale:
            scalers[1].unscale_(opt_ref)
            ref_norm = torch.nn.utils.clip_grad_norm_(ref, ARGS["max_grad_norm"])
            assert norm == pytest.approx(float(ref_norm), rel=1e-5)  # the unscaled norm, as accelerate's clip returns
            scalers[1].step(opt_ref)
            scalers[1].update()
            assert scalers[0].get_scale() == scalers[1].get_scale()
            assert torch.equal(scalers[0]._growth_tracker, scalers[1]._growth_tracker)
        else:
            if not inf:  # without a scaler nothing skips: leave the reference alone there
                assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(ref, ARGS["max_grad_norm"])), rel=1e-5)
                opt_ref.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        if inf:
            assert all(torch.equal(a, b) for a, b in zip(ours, before))
        else:
            assert not any(torch.equal(a, b) for a, b in zip(ours, before))
    assert float(opt_ours.state[ours[0]]["step"]) == 4  # the skipped step is not counted
    if loss_scale:
        assert scalers[0].get_scale() == loss_scale  # halved once, doubled once (growth_interval 2)
    assert not hasattr(opt_ours, "grad_scale") and not hasattr(opt_ours, "found_inf")


def test_fold_only_where_it_holds():
    params = make_params()
    acc = fake_accelerator()
    on = SimpleNamespace(fold_clip=1, **ARGS)
    assert not folds_clip(acc, on, adamw(params, fused=False))  # foreach AdamW: no grad_scale input
    assert not folds_clip(acc, SimpleNamespace(fold_clip=0, **ARGS), adamw(params, fused=True))
    acc.distributed_type = DistributedType.DEEPSPEED  # its own clip and step
    assert not folds_clip(acc, on, adamw(params, fused=True))
    zero = SimpleNamespace(param_groups=[], state={})  # DeepSpeed's ZeRO optimizer: no `defaults`
    assert not folds_clip(acc, on, SimpleNamespace(optimizer=zero))
    acc.distributed_type = DistributedType.MULTI_GPU  # DDP: gradients are already reduced
    assert folds_clip(acc, on, SimpleNamespace(optimizer=adamw(params, fused=True)))  # accelerate's wrapper


def test_update_through_accelerate_with_fold_on_and_off():
    """update() with a real Accelerator (CPU, fp32) and fused AdamW: folded and not, the same weights,
    a step counted per finite loss and the logged loss the mean of the window's losses."""
    from accelerate import Accelerator

    weights, logged = {}, {}
    for fold in (0, 1):
        accelerator = Accelerator(cpu=True)
        params = make_params()
        opt = accelerator.prepare(adamw(params, fused=True))
        state = update_state()
        args = SimpleNamespace(fold_clip=fold, **ARGS)
        for step in range(3):
            set_grads(params, step)
            assert update(accelerator, args, state, torch.tensor(0.5 + step), params, opt,
                          SimpleNamespace(step=lambda: None))
            assert all(p.grad is None for p in params)
        weights[fold], logged[fold] = [p.detach().clone() for p in params], state
    for a, b in zip(weights[0], weights[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert logged[1]["step"] == 3 and logged[1]["loss"] == 2.5
    # the last update's gradient norm, the same read from the folded kernel's inputs as from accelerate's clip
    assert logged[0]["grad_norm"] > 0.1 and logged[1]["grad_norm"] == pytest.approx(logged[0]["grad_norm"], rel=1e-5)
    assert logged[0]["loss_scale"] is None and logged[1]["loss_scale"] is None and logged[1]["skipped"] == 0


def test_update_skips_a_non_finite_loss():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    params = make_params()
    opt = accelerator.prepare(adamw(params, fused=True))
    before = [p.detach().clone() for p in params]
    state = update_state()
    args = SimpleNamespace(fold_clip=1, **ARGS)
    for i in range(2):
        set_grads(params, 0)
        assert not update(accelerator, args, state, torch.tensor(float("nan")), params, opt,
                          SimpleNamespace(step=lambda: None))
    assert state["bad_steps"] == 2 and state["step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    set_grads(params, 0)
    with pytest.raises(SystemExit, match="3 skipped updates"):
        update(accelerator, args, state, torch.tensor(float("inf")), params, opt, SimpleNamespace(step=lambda: None))


def test_folded_update_skips_a_non_finite_loss_and_keeps_the_loss_scale():
    """Folded, the step is queued before the host sees the loss: a NaN loss must still leave the
    weights, the optimizer's step count and the loss scale alone (as the unfolded path, which skips
    before the scaler); a finite loss with an infinite gradient skips inside the kernel and halves
    the scale."""
    from accelerate import PartialState

    PartialState(cpu=True)  # the warning about the skipped step goes through accelerate's logger
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accelerator = fake_accelerator(scaler)
    params = make_params()
    opt = adamw(params, fused=True)
    args = SimpleNamespace(fold_clip=1, **ARGS)
    state = update_state()
    before = [p.detach().clone() for p in params]
    scale = scaler.scale(torch.ones(()))
    set_grads(params, 0, float(scale), inf=True)
    assert not update(accelerator, args, state, torch.tensor(float("nan")), params, opt,
                      SimpleNamespace(step=lambda: None))
    assert scaler.get_scale() == 1024.0 and int(scaler._growth_tracker) == 0 and state["bad_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and all(p.grad is None for p in params)
    set_grads(params, 0, float(scale), inf=True)
    assert update(accelerator, args, state, torch.tensor(0.25), params, opt, SimpleNamespace(step=lambda: None))
    assert scaler.get_scale() == 512.0 and state["bad_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert state["skipped"] == 2 and state["loss_scale"] == 1024.0  # ours, then the scaler's; the scale it used
    set_grads(params, 0, float(scale))
    assert update(accelerator, args, state, torch.tensor(0.25), params, opt, SimpleNamespace(step=lambda: None))
    assert state["skipped"] == 2 and state["loss_scale"] == 512.0 and state["grad_norm"] < 1e3
    assert not any(torch.equal(a, b) for a, b in zip(params, before))
    assert float(opt.state[params[0]]["step"]) == 1


def test_update_with_gradient_accumulation_fold_on_and_off():
    """Two micro-batches per update through accelerate (fp32, CPU, fused AdamW): the folded update
    steps only at the window's end, and ends with the weights of the unfolded one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    weights = {}
    for fold in (0, 1):
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = torch.nn.Linear(4, 3)
        with torch.no_grad():
            model.weight.copy_(torch.arange(12.0).view(3, 4) / 10)
            model.bias.zero_()
        params = list(model.parameters())
        model, opt = accelerator.prepare(model, adamw(params, fused=True))
        state = update_state()
        args = SimpleNamespace(fold_clip=fold, **ARGS)
        gen = torch.Generator().manual_seed(0)
        made = []
        for _ in range(6):
            with accelerator.accumulate(model):
                loss = model(torch.randn(2, 4, generator=gen) * 5).pow(2).mean()
                accelerator.backward(loss)
                before = [p.detach().clone() for p in params]
                made.append(update(accelerator, args, state, loss, params, opt, SimpleNamespace(step=lambda: None)))
                moved = any(not torch.equal(a, p) for a, p in zip(before, params))
                assert moved == made[-1]  # weights move only at the end of a window
        assert made == [False, True] * 3 and state["step"] == 3
        weights[fold] = [p.detach().clone() for p in params]
    for a, b in zip(weights[0], weights[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_non_finite_gradients_without_a_scaler_skip_and_count():
    """bf16/fp32 (no loss scaler): a finite loss with a non-finite gradient skips the update, is
    warned about and counted as a bad step, and the LR schedule does not move."""
    from accelerate import PartialState

    PartialState(cpu=True)
    accelerator = fake_accelerator()
    params = make_params()
    opt = adamw(params, fused=True)
    before = [p.detach().clone() for p in params]
    state = update_state()
    lr_steps = []
    set_grads(params, 0, inf=True)
    assert not update(accelerator, SimpleNamespace(fold_clip=1, **ARGS), state, torch.tensor(0.3), params, opt,
                      SimpleNamespace(step=lambda: lr_steps.append(1)))
    assert state["bad_steps"] == 1 and state["step"] == 0 and not lr_steps
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_folded_step_counts_as_an_optimizer_step_for_the_lr_scheduler():
    """torch's LR scheduler warns when it steps before optimizer.step(); the folded update calls the
    fused AdamW underneath the wrapper it watches, and must say it stepped."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    params = make_params()
    opt = accelerator.prepare(adamw(params, fused=True))  # the scheduler watches the wrapper's step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state = update_state()
    set_grads(params, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert update(accelerator, SimpleNamespace(fold_clip=1, **ARGS), state, torch.tensor(0.3), params,
                      opt, scheduler)



def test_lr_scheduler_skips_with_the_loss_scaler_fold_on_and_off():
    """fp16: an update the loss scaler skips (infinite gradients) is no LR step either, folded or not (accelerate's
    scheduler asks its optimizer wrapper; the folded update tells it). Found in review: folded, the warm-up ran on."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    Accelerator(cpu=True)  # the state the scheduler reads (processes); the scaler is the test's, as fp16's on a GPU
    counts, clip = {}, torch.nn.utils.clip_grad_norm_
    for fold in (0, 1):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(torch.ones(()))  # its scale tensor, as after the first scaled backward
        params = make_params()
        opt = AcceleratedOptimizer(adamw(params, fused=True), device_placement=False, scaler=scaler)
        scheduler = AcceleratedScheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0), opt)
        state, args = update_state(), SimpleNamespace(fold_clip=fold, **ARGS)
        for step, inf in enumerate((False, True, False)):
            set_grads(params, step, scaler.get_scale(), inf=inf)
            accelerator = fake_accelerator(scaler)  # its clip unscales first, as accelerate's
            accelerator.clip_grad_norm_ = lambda ps, m: (scaler.unscale_(opt.optimizer), clip(ps, m))[1]
            update(accelerator, args, state, torch.tensor(0.5), params, opt, scheduler)
        counts[fold] = scheduler.scheduler.last_epoch, state["skipped"], scaler.get_scale()
    assert counts[0] == counts[1] == (2, 1, 512.0)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_read_later_reads_the_value_at_the_call():
    """The copy is taken when read_later is called: work queued afterwards does not change it."""
    t = torch.full((2,), 3.0, device="cuda")
    read = read_later(t)
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(5):
        big = big @ big / 64  # keep the stream busy so a missing wait would show
    t.fill_(7.0)
    assert read() == [3.0, 3.0]
    assert read_later(t)() == [7.0, 7.0]
