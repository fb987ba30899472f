"""--cuda_graph: when it is on, its errors, and (on a GPU) a replayed step against the same step run eagerly."""
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

from diffueraser.tiny import TINY_VAE, tiny_stage_models
from diffueraser.speed import StepGraph, resolve_cuda_graph
from diffueraser.trainer import denoise, diffusion_inputs, training_step
from diffueraser.validation import free_cached_memory
from tests.test_train_e2e import assets, flags  # noqa: F401 -- the tiny models and data of the end-to-end tests

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def fake_accelerator(device="cuda", processes=1, distributed="NO"):
    from accelerate.utils import DistributedType

    return SimpleNamespace(device=torch.device(device), num_processes=processes,
                           distributed_type=DistributedType[distributed])


def run_args(**kw):
    return SimpleNamespace(**dict(dict(gradient_accumulation_steps=1, gradient_checkpointing=False), **kw))


def test_cuda_graph_default_and_conflicts():
    assert resolve_cuda_graph(None, run_args(), fake_accelerator()) is True
    assert resolve_cuda_graph(0, run_args(), fake_accelerator()) is False
    for args, acc in ((run_args(), fake_accelerator("cpu")),
                      (run_args(), fake_accelerator(processes=2, distributed="MULTI_GPU")),
                      (run_args(), fake_accelerator(distributed="DEEPSPEED")),
                      (run_args(), fake_accelerator(distributed="FSDP")),
                      (run_args(gradient_accumulation_steps=2), fake_accelerator()),
                      (run_args(gradient_checkpointing=True), fake_accelerator())):
        assert resolve_cuda_graph(None, args, acc) is False  # unset: quietly off
        assert resolve_cuda_graph(0, args, acc) is False
        with pytest.raises(SystemExit, match="--cuda_graph 1"):  # asked for: says why not
            resolve_cuda_graph(1, args, acc)


class RecordedGraph(StepGraph):
    """StepGraph's bookkeeping without a GPU. The 'capture' runs the function with the RNG state
    put back afterwards (a real capture computes nothing); a 'replay' runs it again on the fixed
    buffers and writes the loss and gradients into the captured tensors, as a real replay does."""

    def new_graph(self):
        self.captures = getattr(self, "captures", 0) + 1

        def replay():
            for p in self.params:
                p.grad = None
            self.loss.copy_(self.fn(self.static).detach())
            for p, g in zip(self.params, self.grads):
                if g is not None:
                    g.copy_(p.grad)
                p.grad = None  # a replay writes into the captured tensors, never sets .grad
            self.replays += 1
        self.replays = getattr(self, "replays", 0)
        return SimpleNamespace(replay=replay)

    def capturing(self, graph):
        return torch.random.fork_rng(devices=[])


def test_step_graph_warms_up_then_replays_on_fixed_buffers():
    w = torch.nn.Parameter(torch.ones(3))
    seen = []

    def fn(b):
        seen.append(b["x"])
        loss = (w * b["x"]).sum()
        loss.backward()
        return loss

    graph = RecordedGraph(fn, [w], warmup=2)
    for i in range(2):  # warm-up: the caller's batch itself
        x = torch.full((3,), float(i))
        graph(dict(x=x))
        assert seen[-1] is x and graph.graph is None
    out = graph(dict(x=torch.full((3,), 5.0), name="clip"))  # captured: non-tensors are not buffered
    assert graph.graph is not None and set(graph.static) == {"x"}
    assert out.item() == 15.0 and seen[-1] is graph.static["x"] and out.grad_fn is None
    w.grad = None  # as the optimizer's zero_grad(set_to_none=True) does
    out = graph(dict(x=torch.full((3,), 2.0)))
    assert out.item() == 6.0 and seen[-1] is graph.static["x"] and w.grad is graph.grads[0]
    assert torch.equal(w.grad, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match=r"batch\['x'\] is \(4,\) torch.float32"):
        graph(dict(x=torch.zeros(4)))
    with pytest.raises(ValueError, match=r"batch\['x'\] is \(3,\) torch.float64"):
        graph(dict(x=torch.zeros(3, dtype=torch.float64)))


def out_of_memory_at_capture_end():
    """Run 28: out of memory inside the capture, then the capture's end fails; the end's error is raised."""
    try:
        raise torch.OutOfMemoryError("CUDA out of memory (a test)")
    except torch.OutOfMemoryError:
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture (a test)")


@pytest.mark.parametrize("how", ["out_of_memory", "at_capture_end"])
def test_capture_out_of_memory_runs_the_steps_without_the_graph(caplog, how):
    """Run 26: under a 46 GiB cap, --channels_last's stage-1 capture ran out of memory and the run
    died. Now that step and every later one run as the warm-up steps did, on the caller's batch;
    also where the out of memory comes as the context of the capture end's CUDA error (run 28)."""
    from accelerate import PartialState

    PartialState(cpu=True)  # accelerate's logger needs it, as in a run
    w = torch.nn.Parameter(torch.ones(3))
    seen, capturing = [], []

    def fn(b):
        seen.append(b["x"])
        if capturing and capturing.pop():
            w.grad = torch.zeros(3)  # what a partial capture leaves behind
            if how == "at_capture_end":
                out_of_memory_at_capture_end()
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        loss = (w * b["x"]).sum()
        loss.backward()
        return loss

    class OutOfMemoryAtCapture(RecordedGraph):
        def capturing(self, graph):
            capturing.append(True)
            return super().capturing(graph)

    graph = OutOfMemoryAtCapture(fn, [w], warmup=1)
    graph(dict(x=torch.ones(3)))
    w.grad = None
    with caplog.at_level("WARNING"):
        out = graph(dict(x=torch.full((3,), 2.0)))  # the capture fails; the step runs all the same
    assert "ran out of memory" in caplog.text and graph.eager and graph.graph is None and graph.static is None
    assert out.item() == 6.0 and torch.equal(w.grad, torch.full((3,), 2.0))
    for value in (3.0, 4.0):
        w.grad = None
        x = torch.full((3,), value)
        assert graph(dict(x=x)).item() == 3 * value and seen[-1] is x and torch.equal(w.grad, x)
    assert graph.captures == 1 and not capturing  # no second attempt
    graph.release()  # validation's out-of-memory retry: nothing to release, still without the graph
    assert graph(dict(x=torch.ones(3))).item() == 3.0 and graph.graph is None


def test_capture_error_other_than_out_of_memory_names_the_way_out():
    """A first capture that fails for another reason (an operation a graph cannot hold) stops the run
    with the way on: no silent switch to the slower eager steps."""
    w = torch.nn.Parameter(torch.ones(3))

    def fn(b):
        if torch.is_grad_enabled() and b["x"][0] == 2:
            raise RuntimeError("operation not permitted when stream is capturing (a test)")
        loss = (w * b["x"]).sum()
        loss.backward()
        return loss

    graph = RecordedGraph(fn, [w], warmup=1)
    graph(dict(x=torch.ones(3)))
    with pytest.raises(RuntimeError, match=r"CUDA graph failed \(RuntimeError: operation not permitted.*--cuda_graph 0"):
        graph(dict(x=torch.full((3,), 2.0)))


@pytest.mark.parametrize("second", ["fits", "state_does_not_fit_after", "fails", "host_memory_short"])
def test_capture_out_of_memory_tried_again_with_the_optimizer_state_in_host_memory(caplog, monkeypatch, second):
    """Run 27: under 43 GiB stage 1's capture most likely ran out of memory and the steps ran 1.33x slower
    without the graph. Given the optimizer, the capture is tried once more with Adam's moments in host memory;
    they come back after it, and where they do not fit beside the graph's pool, the graph goes instead. A second
    capture that fails otherwise (CUDA left unfit by the first?) leaves the steps without the graph, the run alive."""
    from accelerate import PartialState

    import diffueraser.validation as validation

    PartialState(cpu=True)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    moments = {k: v.clone() for k, v in opt.state[w].items()}
    parked_in_capture, capturing, real = [], [], validation._bytes_of

    def fn(b):
        if capturing:
            first = capturing.pop()
            parked_in_capture.append(opt.state[w]["exp_avg"].untyped_storage().nbytes() == 0)
            if first:
                raise torch.OutOfMemoryError("CUDA out of memory (a test)")
            if second == "fails":
                raise RuntimeError("operation not permitted when stream is capturing (a test)")
            if second == "state_does_not_fit_after":  # the moments' way back: out of memory once, beside the pool
                def once(s, failed=[]):
                    if not failed:
                        failed.append(1)
                        raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")
                    return real(s)
                monkeypatch.setattr(validation, "_bytes_of", once)
        loss = (w * b["x"]).sum()
        loss.backward()
        return loss

    class OutOfMemoryAtFirstCapture(RecordedGraph):
        def capturing(self, graph):
            capturing.append(self.captures == 1)
            return super().capturing(graph)

    graph = OutOfMemoryAtFirstCapture(fn, [w], warmup=1, optimizer=opt)
    graph(dict(x=torch.ones(3)))
    w.grad = None
    if second == "host_memory_short":  # nothing can be parked: no second capture, which would fail as the first
        monkeypatch.setattr(validation.psutil, "virtual_memory", lambda: SimpleNamespace(available=2**30))
    with caplog.at_level("INFO"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # host memory short
        out = graph(dict(x=torch.full((3,), 2.0)))
    if second == "host_memory_short":
        assert parked_in_capture == [False] and graph.captures == 1
    else:  # the second capture without the moments
        assert parked_in_capture == [False, True] and graph.captures == 2
    retried = "trying once more with the optimizer's state in host memory" in caplog.text
    assert retried == (second != "host_memory_short")
    for k, v in moments.items():  # back, with their values, either way
        assert torch.equal(opt.state[w][k], v), k
    total = w.detach().sum().item()
    assert out.item() == pytest.approx(2 * total) and torch.equal(w.grad, torch.full((3,), 2.0))
    w.grad = None
    assert graph(dict(x=torch.full((3,), 3.0))).item() == pytest.approx(3 * total)
    assert torch.equal(w.grad, torch.full((3,), 3.0))
    from bench.gpu_e2e import log_figures  # what the full-size smoke run reports from the trainer's log

    fate = log_figures(caplog.text)[-1]
    if second == "fits":
        assert graph.graph is not None and not graph.eager and graph.replays == 2
        assert fate.startswith("captured at the second try")
    else:
        assert graph.graph is None and graph.eager and graph.replays == 0 and graph.static is None
        assert fate.startswith("dropped")
        assert (second == "fails") == ("the second capture failed (RuntimeError" in caplog.text)
        assert (second == "host_memory_short") == (graph.captures == 1)


@gpu
def test_capture_out_of_memory_on_the_gpu():
    """The same with a real capture: an allocation too large for any card inside it (as run 26's under
    its cap), then the steps run without the graph, drawing new random numbers every time."""
    from accelerate import PartialState

    PartialState()
    w = torch.nn.Parameter(torch.ones(1024, device="cuda"))

    def fn(b):
        if torch.cuda.is_current_stream_capturing():
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB
        loss = (w * b["x"]).sum() + torch.randn((), device="cuda")
        loss.backward()
        return loss

    graph, losses = StepGraph(fn, [w], warmup=1), []
    for _ in range(4):
        w.grad = None
        losses.append(graph(dict(x=torch.ones(1024, device="cuda"))).item())
        assert torch.equal(w.grad, torch.ones(1024, device="cuda"))
    assert graph.eager and graph.graph is None and len(set(losses)) == 4



@gpu
def test_capture_end_failing_after_out_of_memory_on_the_gpu():
    """Run 28: under 43 GiB the capture ran out of memory and its end then failed (the capture was
    invalidated); the end's CUDA error, the out of memory as its context, and the CUDA generator left
    in capture mode made the next random draw fail. Now the steps run without the graph and draw."""
    from accelerate import PartialState

    PartialState()
    w = torch.nn.Parameter(torch.ones(1024, device="cuda"))
    ends = []

    def fn(b):
        if torch.cuda.is_current_stream_capturing():
            try:  # not allowed while capturing: the capture is invalidated, its end will fail
                torch.cuda.current_stream().synchronize()
            except Exception:
                pass
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB
        loss = (w * b["x"]).sum() + torch.randn((), device="cuda")
        loss.backward()
        return loss

    class Watched(StepGraph):
        def capturing(self, graph):
            real = super().capturing(graph)

            class Ctx:
                def __enter__(self):
                    return real.__enter__()

                def __exit__(self, *exc):
                    try:
                        return real.__exit__(*exc)
                    except Exception as e:
                        ends.append(e)
                        raise
            return Ctx()

    graph, losses = Watched(fn, [w], warmup=1), []
    for _ in range(3):
        w.grad = None
        losses.append(graph(dict(x=torch.ones(1024, device="cuda"))).item())
        assert torch.equal(w.grad, torch.ones(1024, device="cuda"))
    assert ends and isinstance(ends[0].__context__, torch.OutOfMemoryError)  # the case of run 28
    assert graph.eager and graph.graph is None and len(set(losses)) == 3
    torch.nn.Conv2d(4, 4, 3, device="cuda")  # run 28's next model: its init draws on the generator


@gpu
def test_capture_with_the_optimizer_state_in_host_memory_on_the_gpu():
    """The second capture on a real GPU: it fits only with Adam's moments parked (the stand-in: a 1 PiB
    allocation while they are on the GPU); they come back after it, and the replays are real ones."""
    from accelerate import PartialState

    PartialState()
    w = torch.nn.Parameter(torch.ones(1024, device="cuda"))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    w.grad = torch.ones(1024, device="cuda")
    opt.step()
    moments = {k: v.clone() for k, v in opt.state[w].items()}

    def fn(b):
        if torch.cuda.is_current_stream_capturing() and opt.state[w]["exp_avg"].untyped_storage().nbytes():
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB
        loss = (w * b["x"]).sum()
        loss.backward()
        return loss

    graph = StepGraph(fn, [w], warmup=1, optimizer=opt)
    for x in (1.0, 2.0, 3.0):
        w.grad = None
        loss = graph(dict(x=torch.full((1024,), x, device="cuda"))).item()
        assert loss == pytest.approx(x * w.detach().sum().item()) and torch.equal(w.grad, torch.full_like(w, x))
    assert graph.graph is not None and not graph.eager
    for k, v in moments.items():
        assert opt.state[w][k].is_cuda and torch.equal(opt.state[w][k], v), k
    opt.step()  # the fused step on the moments that came back

def _fixed_batch(gen, f, device, text_dim):
    """Everything random drawn outside the step, so a replay and an eager run can be compared."""
    r = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    return dict(latents=r(f, 4, 16, 16), cond=r(f, 4, 16, 16), noise=r(f, 4, 16, 16),
                masks=(torch.rand(f, 1, 128, 128, generator=gen) > 0.5).float().to(device),
                text=r(f, 77, text_dim), timesteps=torch.randint(0, 1000, (1,), generator=gen).to(device))


@gpu
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_replayed_step_matches_eager_step(stage):
    """Same batch, same weights: loss and every gradient of a replay equal an eager run, also after
    the optimizer changed the weights in place (a graph reads the live parameters)."""
    device, f = torch.device("cuda"), 2 if stage == "stage1" else 4
    unet, brushnet = (m.to(device) for m in tiny_stage_models(stage))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    params = [p for m in (unet, brushnet) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)

    def fn(b):
        with torch.autocast("cuda", dtype=torch.float16):
            noisy, t, cond = diffusion_inputs(scheduler, b["latents"], b["cond"], b["masks"], b["noise"],
                                              b["timesteps"], f)
            pred = denoise(unet, brushnet, noisy, t, b["text"], cond, f)
        loss = F.mse_loss(pred.float(), b["noise"])
        loss.backward()
        return loss

    graph, gen = StepGraph(fn, params, warmup=2), torch.Generator().manual_seed(0)
    for i in range(5):
        batch = _fixed_batch(gen, f, device, unet.config.cross_attention_dim)
        replayed = graph(batch).clone()
        grads = [p.grad.clone() for p in params]
        optimizer.zero_grad(set_to_none=True)
        eager = fn(batch).detach()  # no autograd graph left alive into the next capture
        torch.testing.assert_close(replayed, eager, rtol=1e-3, atol=1e-5)
        for g, p in zip(grads, params):
            torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert graph.graph is not None


@gpu
def test_graphed_training_step_trains():
    """The real step through accelerate (fp16, loss scaler, clip, fused AdamW): replays draw new
    noise every time, the loss stays finite and the weights move; a released graph (validation out
    of memory) gives its pool back and the next step captures anew."""
    from accelerate import Accelerator

    from diffueraser.trainer import TextEmbedder, make_optimizer, update, update_state

    accelerator = Accelerator(mixed_precision="fp16")
    unet, brushnet = tiny_stage_models("stage1")
    vae = AutoencoderKL(**TINY_VAE).to("cuda", torch.float16).requires_grad_(False)
    params = [p for m in (unet, brushnet) for p in m.parameters()]
    args = SimpleNamespace(learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0,
                           adam_epsilon=1e-8, use_8bit_adam=False, fused_adam=1, scale_lr=False,
                           max_grad_norm=1.0, max_bad_steps=20)
    optimizer = make_optimizer(args, params, accelerator)
    unet, brushnet, optimizer = accelerator.prepare(unet, brushnet, optimizer)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.float16)
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(1, 2, 3, 128, 128, generator=gen) * 2 - 1).cuda()
    masks = (torch.rand(1, 2, 1, 128, 128, generator=gen) > 0.3).float().cuda()
    batch = dict(pixel_values=pixels, conditioning_pixel_values=pixels * masks, masks=masks, text_embeds=text)

    def forward_backward(b):
        loss = training_step(b, unet, brushnet, vae, TextEmbedder(None), scheduler, torch.float16)
        accelerator.backward(loss)
        return loss

    graph = StepGraph(forward_backward, params, warmup=2)
    state = update_state()
    losses, before = [], [p.detach().clone() for p in params]
    for i in range(8):
        if i == 6:
            reserved = torch.cuda.memory_reserved()
            graph.release()
            free_cached_memory()
            assert graph.graph is None and torch.cuda.memory_reserved() < reserved
        loss = graph(batch)
        losses.append(loss.item())
        update(accelerator, args, state, loss, params, optimizer, SimpleNamespace(step=lambda: None))
    assert graph.graph is not None and all(torch.isfinite(torch.tensor(losses)))
    assert len(set(losses[2:])) == 6  # the same batch, new noise and timesteps at every replay
    assert state["step"] >= 2  # updates made (the first fp16 steps may skip while the loss scale settles)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_training_loop_with_the_graph_trains_as_without(assets, tmp_path, monkeypatch):
    """The real stage-1 loop (6 steps; step 4 captures, 5-6 replay) with the recorded stand-in for
    the graph ends with exactly the weights of the same run without it: the batch copies, the
    caption embedding outside the graph and the gradients handed back after each replay are right.
    In the graphed run the validation at step 5 runs out of memory once: the graph is released, the
    optimizer's state waits in host memory (here: another host buffer), validation runs again, and
    step 6 captures anew -- and still the weights are those of the run that never ran out."""
    import contextlib
    import train_DiffuEraser_stage1 as stage1
    from diffueraser import speed, validation
    from safetensors.torch import load_file

    graphs, validations, parked = [], [], []
    park = validation.optimizer_state_in_host_memory

    @contextlib.contextmanager
    def park_on_cpu(optimizer):  # what a GPU run parks, parked from CPU tensors
        with park(optimizer, device_type="cpu") as n:
            parked.append(n)
            yield n

    class Recorded(RecordedGraph):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            graphs.append(self)

    def run_validation(pipe, clips, out_dir, step, **kw):
        validations.append(step)
        assert kw["decode_chunk_size"] == 8  # --vae_batch_size unset; set, validation decodes that many frames at once
        if graphs and validations.count(5) == 1 and step == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")
    monkeypatch.setattr(validation, "optimizer_state_in_host_memory", park_on_cpu)
    monkeypatch.setattr(speed, "StepGraph", Recorded)
    monkeypatch.setattr(speed, "resolve_cuda_graph", lambda choice, args, accelerator: bool(choice))
    monkeypatch.setattr(validation, "run_validation", run_validation)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # bit-exact on CPU, also on a machine with a GPU
    clip = assets / "DAVIS" / "JPEGImages" / "480p" / "bear"
    weights = {}
    for graph in (0, 1):
        out = tmp_path / f"graph{graph}"
        validations.clear()
        stage1.main([str(a) for a in flags(assets, out, 6, checkpointing_steps=3, cuda_graph=graph, compile=0,
                                           dataloader_num_workers=0, validation_steps=5, validation_image=clip,
                                           validation_mask=str(clip).replace("JPEGImages", "Annotations"))])
        # graphed: step 5 twice, out of memory and then again after freeing
        assert validations == ([0, 5, 5, 6] if graph else [0, 5, 6])
        weights[graph] = {name: load_file(str(next((out / name).glob("*.safetensors"))))
                          for name in ("unet_main", "brushnet")}
    assert len(graphs) == 1 and graphs[0].captures == 2 and graphs[0].replays == 3
    assert len(parked) == 1 and parked[0] > 0  # the retry ran with Adam's moments parked
    for name in ("unet_main", "brushnet"):
        assert weights[0][name].keys() == weights[1][name].keys()
        for key, value in weights[0][name].items():
            assert torch.equal(value, weights[1][name][key]), f"{name}.{key}"
