"""What makes a training step fast on a GPU, kept apart from the loop it speeds up.

None of it changes what a step computes beyond rounding: the choices between compiled and eager
(`--compile`, `--compile_scope`, the compile cache), a step captured as a CUDA graph
(`--cuda_graph`), norms that keep the activations' layout or dtype (`--vae_channel_norm`,
`--fast_norms`), memory format and attention backend (`--channels_last`, xformers), and the
gradient clip folded into the fused AdamW (`--fold_clip`). At the end, what the run reports
about its speed: steps/s and data wait per step (StepClock, which also dumps the stacks of a run
that stalls), timings, peak memory.
"""
import faulthandler
import gc
import os
import time

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import DistributedType

from diffueraser.validation import free_cached_memory, optimizer_state_in_host_memory

logger = get_logger("diffueraser")


def resolve_compile(choice, accelerator):
    """--compile unset: on with CUDA, except under DeepSpeed (compiled blocks not yet run there)."""
    if choice is not None:
        return bool(choice)
    return accelerator.device.type == "cuda" and accelerator.distributed_type != DistributedType.DEEPSPEED


def resolve_cuda_graph(choice, args, accelerator):
    """--cuda_graph unset: on where a captured step is valid; asked for where it is not: an error."""
    conflicts = [why for why, bad in (
        ("it needs a CUDA device", accelerator.device.type != "cuda"),
        (f"{accelerator.distributed_type.value} runs its own communication around backward (one plain process only)",
         accelerator.num_processes > 1 or accelerator.distributed_type != DistributedType.NO),
        ("--gradient_accumulation_steps > 1 accumulates into the gradients", args.gradient_accumulation_steps > 1),
        ("--gradient_checkpointing reads the RNG state on the host", args.gradient_checkpointing)) if bad]
    if choice is None:
        return not conflicts
    if choice and conflicts:
        raise SystemExit(f"--cuda_graph 1: {'; '.join(conflicts)}. Leave --cuda_graph unset or pass --cuda_graph 0.")
    return bool(choice)


def out_of_memory(error):
    """True where `error`, or an error it was raised while handling, is CUDA's out of memory (a capture
    whose end fails after an out of memory inside it raises the failed end, the out of memory as its context)."""
    seen, todo = set(), [error]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:  # `raise e from e` makes a cycle
            continue
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error):
            return True
        seen.add(id(error))
        todo += [error.__cause__, error.__context__]
    return False


def graphed(fn, params, accelerator, optimizer=None):
    """fn as a StepGraph (its capture may park the optimizer's state), and a line saying so."""
    graph = StepGraph(fn, params, optimizer=optimizer)
    accelerator.print(f"CUDA graph is on: step {graph.warmup + 1} captures the forward + backward, later "
                      "steps replay it; --cuda_graph 0 turns it off")
    return graph


class StepGraph:
    """`fn(batch)` -- forward and backward, returning the loss -- captured once as a CUDA graph
    and replayed for every later batch.

    Launching the ~9,000 kernels of a stage-1 step from Python takes the CPU longer than the GPU
    needs to run them (on an H200, 277 ms of kernels in a 395 ms step); a replay launches them
    all at once. The first `warmup` calls run `fn` as it is (they compile, let cuDNN pick its
    kernels and settle the loss scale); the next one captures. Each batch is copied into the
    buffers of the captured one, so it must have the same shapes. Random draws (noise,
    timesteps, VAE sampling) are new at every replay. The gradients are written into the same
    tensors at every replay and handed back to the parameters after it, since the optimizer's
    `zero_grad` drops them. The loss comes back detached: a caller holding a warm-up step's
    autograd graph would keep its gradient accumulators alive on the default stream, and a
    capture that meets them is invalidated.

    A capture that runs out of memory (it needs a little more than a step run as it is: run 26,
    stage 1 near a 46 GiB cap; run 27, under 43 GiB) is dropped with its pool and, given the
    `optimizer`, tried once more with the optimizer's state in host memory (the graph holds the
    forward and backward alone; stage 1's Adam moments are 14 GB). The state comes back after the
    capture; where it no longer fits beside the graph's pool, the graph goes instead. Without a
    graph, that step and every later one run as the warm-up steps did: the same results, launched
    from Python again (run 27: 1.33x the time of a replayed stage-1 step). Out of memory can also
    reach us as the CUDA error of the capture's end that follows it (run 28, under 43 GiB), and
    that failed end leaves the CUDA generator in capture mode, every later random draw an error:
    its state is put back after any failed capture.
    """

    def __init__(self, fn, params, warmup=3, optimizer=None):
        self.fn, self.params, self.warmup, self.optimizer = fn, list(params), warmup, optimizer
        self.calls, self.graph, self.static, self.grads, self.loss = 0, None, None, None, None
        self.eager = False  # set once a capture ran out of memory

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capturing(self, graph):
        # thread_local: the data loader's pin-memory thread may allocate pinned memory meanwhile,
        # which a global-mode capture would refuse (and be invalidated by)
        return torch.cuda.graph(graph, capture_error_mode="thread_local")

    def __call__(self, batch):
        self.calls += 1
        if self.calls <= self.warmup or self.eager:
            return self.fn(batch).detach()
        if self.graph is None:
            self.static = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
            if not self.capture():
                return self.fn(batch).detach()
        else:
            self.load(batch)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return self.loss

    def release(self):
        """Drop the captured graph and its private memory pool (validation ran out of memory beside
        it); the next call captures again, without warm-up (kernels and loss scale are settled)."""
        if self.graph is None:
            return
        for p in self.params:
            p.grad = None
        self.graph = self.static = self.grads = self.loss = None
        self.calls = self.warmup

    def load(self, batch):
        for key, buffer in self.static.items():
            if batch[key].shape != buffer.shape or batch[key].dtype != buffer.dtype:
                raise ValueError(f"--cuda_graph: batch[{key!r}] is {tuple(batch[key].shape)} {batch[key].dtype}, the "
                                 f"captured step's {tuple(buffer.shape)} {buffer.dtype}; every batch must match "
                                 "(or --cuda_graph 0)")
            buffer.copy_(batch[key], non_blocking=True)

    def capture(self):
        """Capture the step (a second time with the optimizer's state in host memory if the first ran
        out of memory); False where no graph came of it and the steps go on without one."""
        if not self.capture_once() and self.optimizer is not None:
            device = self.params[0].device.type
            with optimizer_state_in_host_memory(self.optimizer, device, free=self.drop_graph) as moved:
                if moved:  # nothing parked (host memory short): the same capture would fail the same way
                    logger.info("capturing the training step as a CUDA graph ran out of memory; trying once more "
                                "with the optimizer's state in host memory meanwhile")
                    self.capture_once(second=True)
        if self.graph is None:
            self.eager, self.static = True, None
            logger.warning("capturing the training step as a CUDA graph ran out of memory: the steps run without "
                           "the graph from here (the same results; the CPU launches every kernel again, slower). "
                           "To keep it, a step must need less memory (--vae_batch_size 4) or the card have more.")
            return False
        self.grads = [p.grad for p in self.params]
        return True

    def capture_once(self, second=False):
        for p in self.params:  # captured backward then assigns fresh gradient tensors of its own
            p.grad = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the warm-up steps' cached blocks: the graph gets a pool of its own
        self.graph, failed = self.new_graph(), False
        stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
        rng = torch.cuda.default_generators[torch.cuda.current_device()] if stream is not None else None
        rng_state = rng.clone_state() if rng is not None else None
        try:
            with self.capturing(self.graph):
                self.loss = self.fn(self.static).detach()
        except Exception as e:
            if rng is not None:  # a capture_end that raised leaves the generator in capture mode
                rng.graphsafe_set_state(rng_state)
            if not (second or out_of_memory(e)):
                raise RuntimeError(f"capturing the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                                   "run with --cuda_graph 0 (resume with --resume_from_checkpoint latest)") from e
            if second:  # the first attempt's error may have left CUDA unfit for a second: go on without the graph
                logger.warning(f"the second capture failed ({type(e).__name__}: {e})")
            failed = True  # the partial graph, its pool and the error's frames go before the memory is emptied
        finally:
            if stream is not None:  # a capture_end that raised leaves its capture stream current
                torch.cuda.set_stream(stream)
        if failed:
            self.drop_graph()
        return not failed

    def drop_graph(self):
        """The graph, its pool and its buffers go; the memory goes back to the card."""
        static = self.static
        self.release()
        self.static = static  # kept for a second capture of the same batch
        free_cached_memory()


def configure_cuda(args, accelerator):
    """cuDNN autotuning (the clip shape never changes within a run), TF32 where asked, and
    `--memory_cap_gib`: this process holds at most that much GPU memory, as on a smaller card (an
    allocation past it raises out of memory)."""
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    if accelerator.device.type != "cuda":
        return
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.memory_cap_gib:
        index = accelerator.device.index  # one process: plain "cuda", which torch's cap refuses
        index = torch.cuda.current_device() if index is None else index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), index)


def use_compile_cache(args, accelerator=None):
    """Keep torch.compile's cache (inductor's FX graphs, AOT autograd and Triton kernels) beside the
    checkpoints, in `--compile_cache` (default <output_dir>/compile_cache), so a resume on another
    machine reuses what the first run compiled instead of compiling for minutes again, and say so.
    Returns the folder in use, or None ('none': torch's own temporary folder)."""
    if not args.compile:
        return None
    if args.compile_cache != "none":  # read by inductor whenever it compiles (importing diffusers sets a default)
        folder = os.path.abspath(args.compile_cache or os.path.join(args.output_dir, "compile_cache"))
        os.makedirs(folder, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default folder")
    if accelerator is not None:
        accelerator.print("torch.compile is on: the first step compiles the blocks (validation stays eager) "
                          f"(minutes, once per shape; seconds with a warm cache in {cache}); --compile 0 turns it off")
    return cache


def compile_vae_encoder(args, vae):
    """Compile the VAE encoder whole (no grad, one shape: one graph) in channels_last.

    Compiled, its norms run in NHWC too, so channels_last pays here (124 -> 66 ms per stage-1
    batch on an H100); the decoder (validation only) stays eager, NCHW.
    """
    vae.encoder.to(memory_format=torch.channels_last)
    if getattr(args, "vae_channel_norm", 1):
        norms_by_channel(vae.encoder)
    vae.encoder.compile(fullgraph=True, dynamic=False)


class ChannelStatsGroupNorm(torch.nn.GroupNorm):
    """GroupNorm with its statistics taken per channel, then combined per group.

    Compiled, F.group_norm views each NHWC activation as (N, groups, C/groups * H * W), which
    copies it to NCHW order inside the reduction (strided reads: 3.4-10 ms per full-size norm of
    stage 2's 44 VAE images on an H200). A mean and variance per channel reduce over H, W and
    keep the layout; the group's variance is the mean of the channels' variances plus the spread
    of their means. The same result as F.group_norm, to fp32 rounding; the output keeps the
    input's dtype (under CUDA autocast F.group_norm would return fp32; the next layer casts either way).
    """

    def forward(self, x):
        n, c = x.shape[:2]
        var_c, mean_c = torch.var_mean(x.float(), dim=tuple(range(2, x.dim())), correction=0)  # (N, C)
        mean_c, var_c = mean_c.view(n, self.num_groups, -1), var_c.view(n, self.num_groups, -1)
        mean = mean_c.mean(-1, keepdim=True)
        var = (var_c + (mean_c - mean).square()).mean(-1, keepdim=True)
        scale = torch.rsqrt(var + self.eps).expand_as(mean_c).reshape(n, c)
        mean = mean.expand_as(mean_c).reshape(n, c)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        shape = (n, c) + (1,) * (x.dim() - 2)
        return (x.float() * scale.view(shape) + shift.view(shape)).to(x.dtype)


def norms_by_channel(model):
    """Every GroupNorm of `model` takes its statistics per channel (`--vae_channel_norm`); same
    parameters and keys, the class swapped in place."""
    for m in model.modules():
        if type(m) is torch.nn.GroupNorm:
            m.__class__ = ChannelStatsGroupNorm
    return model


def _norm_in_input_dtype(self, x):
    """GroupNorm / LayerNorm computed in the input's dtype (statistics still accumulate in fp32)."""
    with torch.autocast(x.device.type, enabled=False):
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if isinstance(self, torch.nn.GroupNorm):
            return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def half_precision_norms(model):
    """Under autocast, PyTorch runs every norm in fp32, so each one writes fp32 activations that
    the next layer casts back; this keeps them in half precision instead (`--fast_norms`)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.forward = _norm_in_input_dtype.__get__(m)
    return model


def configure_speed(args, unet, brushnet):
    """Attention backend (xformers), memory format (`--channels_last`: compiled, with the GroupNorms
    taking statistics per channel, as the VAE encoder's) and, on the trained nets, half-precision
    norms (`--fast_norms`)."""
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
            for m in (unet, brushnet):
                m.enable_xformers_memory_efficient_attention()
        except ImportError:
            logger.warning("xformers is not installed; using PyTorch SDPA attention (same memory, same speed)")
    for m in (unet, brushnet):
        if args.channels_last:
            m.to(memory_format=torch.channels_last)
            if args.compile:  # compiled, F.group_norm would read each NHWC activation in NCHW order
                norms_by_channel(m)
        if args.fast_norms and any(p.requires_grad for p in m.parameters()):
            half_precision_norms(m)


COMPILED_BLOCKS = ("ResnetBlock2D", "Transformer2DModel", "AnimateDiffTransformer3D")


def _allow_many_graphs():
    config = torch._dynamo.config  # every block shape is its own graph: allow enough of them
    for name, limit in (("cache_size_limit", 512), ("recompile_limit", 512), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def compile_blocks(model):
    """torch.compile every resnet, attention and motion block in place.

    Regional compilation: the block code is compiled once per shape and reused by every block
    of that shape, so it compiles in a fraction of the time of a whole-model compile, and the
    state-dict keys stay those of the released checkpoints (no `_orig_mod.` prefix).
    """
    _allow_many_graphs()
    for module in model.modules():
        if type(module).__name__ in COMPILED_BLOCKS:
            module.compile(dynamic=False)  # one static graph per shape: the clip shape is fixed
    return model


def compile_models(args, *models):
    """`--compile_scope blocks`: every block (see compile_blocks); `model`: each model as a whole,
    in place (keys unchanged; inside DDP the wrapped model)."""
    for m in models:
        if getattr(args, "compile_scope", "blocks") == "model":
            _allow_many_graphs()
            getattr(m, "module", m).compile(dynamic=False)
        else:
            compile_blocks(m)


def folds_clip(accelerator, args, optimizer):
    """True where the clip can be folded into the optimizer (fused_clip_step): torch's fused AdamW
    on one process or under DDP (whose gradients are already reduced), with `--fold_clip 1`."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return bool(getattr(args, "fold_clip", 1) and isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused")
                and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU))


def loss_scaler(accelerator):
    """The GradScaler of an fp16 run, else None."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def fused_clip_step(accelerator, args, params, optimizer, loss):
    """Clip the gradients' total norm to `--max_grad_norm` and step, in one pass over the weights.

    The norm is taken of the loss-scaled gradients, and the fused AdamW divides each gradient by
    (loss scale / clip coefficient) as it reads it. That replaces the unscale and the clip, two
    passes that read and write every gradient (stage 1: 1.75 B fp32). Nothing waits on the host: a
    non-finite `loss` (the step's, a tensor) or gradient norm skips the update inside the kernel.
    The loss scale backs off on a non-finite norm, as GradScaler.step + update would, and is left
    alone when the loss itself was not finite (the unfolded path skips before the scaler).

    Returns read_later([loss, 1.0 if the gradients were not finite, the gradients' norm (unscaled),
    the loss scale used]), copied before the step is queued: reading it waits for the norm, not for
    the update. Reading it also tells accelerate's optimizer wrapper whether the loss scaler skipped
    (note_skip).
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    scaler = loss_scaler(accelerator)
    grads = [p.grad for p in params if p.grad is not None]
    scale = scaler._scale if scaler else torch.ones((), device=loss.device)
    norm = torch.nn.utils.get_total_norm(grads).float() / scale
    bad, skip = ~torch.isfinite(norm), ~torch.isfinite(loss)
    found_inf = (bad | skip).float()
    coef = torch.clamp(args.max_grad_norm / (norm + 1e-6), max=1.0)  # torch's clip_grad_norm_ rule
    reading = read_later(torch.stack([loss.float(), bad.float(), norm, scale.float()]))
    inner.grad_scale, inner.found_inf = scale / coef, found_inf  # the fused AdamW reads both
    try:
        inner.step()
    finally:
        del inner.grad_scale, inner.found_inf
    optimizer._opt_called = True  # what torch's LR scheduler's wrapper of optimizer.step() records
    if scaler:  # GradScaler.update's own kernel: back off on non-finite gradients, grow after enough good steps
        before = scaler._scale.clone(), scaler._growth_tracker.clone()
        torch._amp_update_scale_(scaler._scale, scaler._growth_tracker, bad.float(), scaler._growth_factor,
                                 scaler._backoff_factor, scaler._growth_interval)
        for t, b in zip((scaler._scale, scaler._growth_tracker), before):  # a skipped step leaves it as it was
            t.copy_(torch.where(skip, b, t))

    def read():
        values = reading()
        if scaler:
            note_skip(optimizer, bool(values[1]))
        return values
    return read


def clip_stats(norm, scaler, optimizer):
    """[the gradients' norm before clipping, the loss scale (the norm again without a scaler), 1.0 where the
    scaler's unscale_ (in accelerate's clip) found non-finite gradients]: one tensor, to be read
    without waiting for the step (a fused AdamW is called even where GradScaler skips)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    found = scaler._per_optimizer_states[id(inner)]["found_inf_per_device"].values() if scaler else ()
    inf = sum((f.to(norm.device) for f in found), torch.zeros((), device=norm.device)).clamp(max=1)
    return torch.stack([norm.float(), (scaler._scale if scaler else norm).float(), inf])


def note_skip(optimizer, skipped):
    """Tell accelerate's optimizer wrapper whether the loss scaler skipped the update, so that its LR
    scheduler skips that step too, as the original's (non-fused) AdamW under GradScaler does: a fused
    AdamW is called even where GradScaler skips, so the wrapper cannot tell by itself. Returns skipped."""
    if hasattr(optimizer, "step_was_skipped"):
        optimizer._is_overflow = skipped
    return skipped


def read_later(t):
    """t.tolist() as a callable: copied now, read without waiting for GPU work queued after this call."""
    if t.device.type != "cuda":
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return lambda: (copied.synchronize(), host.tolist())[1]


# ----------------------------------------------------------------------------- what the run reports about its speed
class StepClock:
    """Steps per second, and seconds of each step spent waiting for data: from the end of one
    micro-batch (or of the last step's checkpoint and validation) to the next batch in hand.

    And a stall watch: `stall_s` seconds without a batch in hand or a step ended, every thread's
    Python stack is written to stderr (the run's log) once, by faulthandler's own thread, which
    needs no interpreter lock (a hang in C code still gets its stacks). A loader that stopped
    delivering shows the main thread in `_try_get_data`; a collective that never returns, in
    the step. Re-armed by every call; `stop()` disarms it. Dumps show the calling process's
    threads only (a loader worker's stack needs py-spy); with several processes, each dumps its own.
    A process forked while it is armed must leave through os._exit, as loader workers do."""

    def __init__(self, stall_s=0):
        self.stall_s = stall_s
        self.mark, self.started, self.waited = time.time(), None, 0.0
        self.watch()

    def watch(self):
        if self.stall_s > 0:
            try:
                faulthandler.dump_traceback_later(self.stall_s, exit=False)
            except (ValueError, OSError):  # stderr without a file descriptor (captured in-process): no watch
                self.stall_s = 0

    def stop(self):
        if self.stall_s > 0:
            faulthandler.cancel_dump_traceback_later()

    def batch_in_hand(self):
        now = time.time()
        self.started, self.waited = self.started or self.mark, self.waited + now - self.mark
        self.watch()

    def restart(self):
        self.mark = time.time()
        self.watch()

    def step_logs(self):
        """{"steps_per_s", "data_wait_s"} of the update just made; the next one starts now."""
        logs = {"steps_per_s": 1 / max(time.time() - self.started, 1e-9), "data_wait_s": self.waited}
        self.started, self.waited = None, 0.0
        return logs



def report_peak_memory(accelerator):
    """One line with this process's peak GPU memory (training and validation), where there is a GPU."""
    if accelerator.device.type == "cuda":
        gib = 2 ** 30
        accelerator.print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / gib:.1f} GiB allocated, "
                          f"{torch.cuda.max_memory_reserved() / gib:.1f} GiB reserved")



def timed(accelerator, what, fn, *args):
    """fn(*args), then a log line saying how long it took."""
    start = time.time()
    result = fn(*args)
    accelerator.print(f"{what}: {time.time() - start:.0f} s")
    return result
