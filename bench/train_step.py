"""Speed and memory of the real training step, per configuration, side by side in one run.

    python bench/train_step.py --json bench_step.json          # full SD1.5 size, on a GPU
    python bench/train_step.py --tiny                          # tiny models on CPU (the tests run this)
    python bench/train_step.py --configs s1-default,s1-24GB_compiled@22   # the preset under a 22 GiB cap

Builds SD1.5-size models with random weights from configs (UNet, BrushNet from it, VAE, CLIP text
encoder, motion adapter v1-5-2 layout), then for each configuration runs the project's own
`training_step` + `update` (the functions the training scripts use) on synthetic batches and
prints median/min/max s per step, peak allocated/reserved GiB (the steady step's, and in the JSON
each phase's: setup, every warm-up step, the timed steps, the FLOP count), TFLOP per step
(FlopCounterMode), achieved TFLOP/s and the fraction of the matmul peak measured in the same run.

On the device (no diffusers there), bring the wheels: see bench/RESULTS.md, "Measuring on the device".
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffueraser.tiny import SD15_TEXT, SD15_UNET, SD15_VAE  # noqa: E402
from diffueraser.speed import StepGraph, compile_models, resolve_cuda_graph  # noqa: E402
from diffueraser.trainer import (  # noqa: E402
    TextEmbedder, configure_models, make_optimizer, place_frozen_encoders, training_step, update, update_state)


# name -> (stage, options). "baseline" is our step with every speed change off and the
# original's per-step gc.collect()/empty_cache() put back, to show what each change buys.
CONFIGS = {
    "s1-baseline": ("stage1", dict(baseline=True)),
    "s1-default": ("stage1", dict()),  # the scripts' defaults: compiled and CUDA-graphed on a GPU
    "s1-eager": ("stage1", dict(compile=False, cuda_graph=False)),
    "s1-compile": ("stage1", dict(compile=True, cuda_graph=False)),
    "s1-no_fold": ("stage1", dict(fold_clip=0)),  # the default with accelerate's unscale + clip, then the step
    "s1-vae_native_norm": ("stage1", dict(vae_channel_norm=0)),  # the default with F.group_norm in the VAE
    "s1-graph_eager": ("stage1", dict(compile=False, cuda_graph=True)),
    "s1-no_cudnn_benchmark": ("stage1", dict(compile=False, cuda_graph=False, cudnn_benchmark=False)),
    "s1-channels_last": ("stage1", dict(compile=False, cuda_graph=False, channels_last=True)),
    "s1-fast_norms": ("stage1", dict(compile=False, cuda_graph=False, fast_norms=True)),
    "s1-fast_norms+cl": ("stage1", dict(compile=False, cuda_graph=False, fast_norms=True, channels_last=True)),
    "s1-compile+cl": ("stage1", dict(compile=True, channels_last=True)),
    "s1-compile_model": ("stage1", dict(compile=True, compile_scope="model")),
    "s1-compile+fast_norms": ("stage1", dict(compile=True, fast_norms=True)),
    "s1-24GB": ("stage1", dict(compile=False, gradient_checkpointing=True, use_8bit_adam=True, vae_batch_size=4)),
    "s1-24GB_compiled": ("stage1", dict(gradient_checkpointing=True, use_8bit_adam=True, vae_batch_size=4)),
    "s1-latent_cache": ("stage1", dict(latent_cache=True)),  # the default with the clean frames' moments cached
    "s1-lc_cl_norm": ("stage1", dict(latent_cache=True, channels_last=True)),  # compiled: per-channel norms (run 25)
    "s1-lc_model": ("stage1", dict(latent_cache=True, compile_scope="model")),
    "s2-baseline": ("stage2", dict(baseline=True)),
    "s2-default": ("stage2", dict()),
    "s2-eager": ("stage2", dict(compile=False, cuda_graph=False)),
    "s2-compile": ("stage2", dict(compile=True, cuda_graph=False)),
    "s2-no_fold": ("stage2", dict(fold_clip=0)),
    "s2-vae_native_norm": ("stage2", dict(vae_channel_norm=0)),
    "s2-graph_eager": ("stage2", dict(compile=False, cuda_graph=True)),
    "s2-fast_norms": ("stage2", dict(compile=False, cuda_graph=False, fast_norms=True)),
    "s2-compile+cl": ("stage2", dict(compile=True, channels_last=True)),
    "s2-compile_model": ("stage2", dict(compile=True, compile_scope="model")),
    "s2-24GB": ("stage2", dict(compile=False, gradient_checkpointing=True, vae_batch_size=4)),
    "s2-24GB_compiled": ("stage2", dict(gradient_checkpointing=True, vae_batch_size=4)),
    "s2-latent_cache": ("stage2", dict(latent_cache=True)),
    "s2-lc_cl_norm": ("stage2", dict(latent_cache=True, channels_last=True)),
    "s2-lc_model": ("stage2", dict(latent_cache=True, compile_scope="model")),
}
FRAMES = {"stage1": 10, "stage2": 22}


def build_models(stage, tiny, device):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffueraser.tiny import TINY_MOTION_ADAPTER, TINY_UNET, TINY_VAE
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel
    from libs.unet_motion_model import MotionAdapter, UNetMotionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        brushnet = BrushNetModel.from_unet(unet)
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
        text_cfg = dict(SD15_TEXT, **(dict(hidden_size=20, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=1000) if tiny else {}))
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
        if stage == "stage2":
            unet = UNetMotionModel.from_unet2d(unet, MotionAdapter(**(TINY_MOTION_ADAPTER if tiny else {})))
            unet.freeze_unet2d_params()
            brushnet.requires_grad_(False)
    return unet, brushnet, vae.requires_grad_(False).eval(), text.requires_grad_(False).eval()


def synthetic_batch(frames, resolution, device, latent_cache=False):
    """A random clip; with latent_cache, the clean frames as cached VAE moments (as the loader gives them)."""
    pixel = torch.rand(1, frames, 3, resolution, resolution, device=device) * 2 - 1
    masks = (torch.rand(1, frames, 1, resolution, resolution, device=device) > 0.2).float()
    batch = dict(pixel_values=pixel, conditioning_pixel_values=pixel * masks, masks=masks,
                 input_ids=torch.full((1, 77), 7, dtype=torch.long, device=device))
    if latent_cache:
        r = resolution // 8
        batch["latent_moments"] = torch.cat([torch.randn(1, frames, 4, r, r, device=device),
                                             torch.rand(1, frames, 4, r, r, device=device) * 0.1], dim=2).half()
        del batch["pixel_values"]
    return batch


def peak_gib():
    """[allocated, reserved] GiB at their peaks since the last reset."""
    return [round(torch.cuda.max_memory_allocated() / 2**30, 2), round(torch.cuda.max_memory_reserved() / 2**30, 2)]


def matmul_peak_tflops(device, n=8192, reps=20):
    """Dense fp16 matmul rate of this GPU, measured now."""
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def run_config(name, stage, opts, args, accelerator, where=None):
    """Time one configuration; returns a result dict. `where["phase"]` says what ran last (an error's place)."""
    where = {} if where is None else where
    where["phase"] = "building the models"
    from diffusers import DDPMScheduler

    device = accelerator.device
    cuda = device.type == "cuda"
    cap = opts.get("memory_cap_gib", args.memory_cap_gib)
    if cuda and cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
    peaks = where.setdefault("peaks", {})  # phase -> [allocated, reserved] GiB at its peak

    def measure(phase):
        """Close the running phase's peak (since the last call) under `phase`; start the next."""
        if cuda:
            torch.cuda.synchronize()
            peaks[phase] = peak_gib()
            torch.cuda.reset_peak_memory_stats()
    unet, brushnet, vae, text = build_models(stage, args.tiny, device)
    dtype = torch.float16 if accelerator.mixed_precision == "fp16" else (
        torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32)
    run_args = SimpleNamespace(enable_xformers_memory_efficient_attention=False,
                               cudnn_benchmark=opts.get("cudnn_benchmark", not opts.get("baseline")),
                               compile=opts.get("compile", cuda and not opts.get("baseline")),
                               gradient_checkpointing=opts.get("gradient_checkpointing", False),
                               channels_last=opts.get("channels_last", False), scale_lr=False,
                               fast_norms=opts.get("fast_norms", False),
                               compile_scope=opts.get("compile_scope", "blocks"),
                               vae_channel_norm=opts.get("vae_channel_norm", 1),
                               learning_rate=5e-6, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
                               adam_epsilon=1e-8, use_8bit_adam=opts.get("use_8bit_adam", False),
                               fused_adam=0 if opts.get("baseline") else 1, train_batch_size=1,
                               fold_clip=opts.get("fold_clip", 1),
                               gradient_accumulation_steps=1, max_grad_norm=1.0, max_bad_steps=20)
    graph = False if opts.get("baseline") else resolve_cuda_graph(opts.get("cuda_graph"), run_args, accelerator)
    torch.backends.cudnn.benchmark = bool(run_args.cudnn_benchmark)
    place_frozen_encoders(run_args, vae, text, device, dtype)
    configure_models(run_args, unet, brushnet)
    trained = [m for m in (unet, brushnet) if any(p.requires_grad for p in m.parameters())]
    frozen = [m for m in (unet, brushnet) if m not in trained]
    for m in frozen:
        m.to(dtype)
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(run_args, params, accelerator)
    *trained, optimizer = accelerator.prepare(*trained, optimizer)
    unet, brushnet = [trained.pop(0) if m not in frozen else m for m in (unet, brushnet)]
    if run_args.compile:
        compile_models(run_args, unet, brushnet)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    frames, res = (2 if args.tiny else FRAMES[stage]), (32 if args.tiny else args.resolution)
    batch = synthetic_batch(frames, res, device, opts.get("latent_cache", False))
    embed = TextEmbedder(text)
    lr_scheduler = SimpleNamespace(step=lambda: None)
    state = update_state()
    baseline = opts.get("baseline")
    vae_chunk = frames if baseline else opts.get("vae_batch_size", 0)  # baseline: two VAE calls

    def forward(b):
        return training_step(b, unet, brushnet, vae, embed, scheduler, dtype, vae_chunk)

    def forward_backward(b):
        loss = forward(b)
        accelerator.backward(loss)
        return loss
    graphed = StepGraph(forward_backward, params, max(0, args.warmup - 1), optimizer) if graph else None

    def step(mark=lambda name: None, eager=False):
        if baseline:  # the original: text encoder every step, gc + empty_cache every step
            embed.cache.clear()
            b = batch
        else:  # as the training loop: the caption's embedding from the cache, outside any graph
            b = dict(batch, text_embeds=embed(batch["input_ids"]))
        if graphed and not eager:  # one replay: forward and backward
            loss = graphed(b)
            mark("forward")
        else:
            loss = forward(b)
            mark("forward")
            accelerator.backward(loss)
        mark("backward")
        update(accelerator, run_args, state, loss, params, optimizer, lr_scheduler)
        mark("update")
        if baseline:
            for _ in range(5):
                gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    measure("setup")  # the models, the optimizer and the batch in place
    for i in range(args.warmup):
        compiling = " (compiling)" if i == 0 and run_args.compile else ""
        capture = " (the capture)" if graph and i == args.warmup - 1 else ""
        where["phase"] = f"warm-up step {i + 1} of {args.warmup}{compiling}{capture}"
        step()
        measure(where["phase"])
    times = []
    where["phase"] = "the timed steps"
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    measure(where["phase"])
    result = dict(config=name, stage=stage, frames=frames, resolution=res, options=opts,
                  compiled=bool(run_args.compile), cuda_graph=graph,
                  graph_replayed=bool(graphed and graphed.graph is not None),  # False: the capture failed, eager
                  median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                  trainable_params_M=sum(p.numel() for p in params) / 1e6)
    if cuda:  # the steady step's peak; a graph's also counts its capture, which fills the graph's pool
        steady = [peaks["the timed steps"]] + [v for k, v in peaks.items() if "(the capture)" in k]
        result.update(peak_allocated_gib=max(a for a, _ in steady), peak_reserved_gib=max(r for _, r in steady),
                      memory_cap_gib=cap, phase_peaks_gib=peaks)
    where["phase"] = "profiling"
    if args.profile and not graph:  # a replay runs no hooks: a graphed step has no phases
        result["phases_ms"] = phase_times(step, vae, dict(brushnet=brushnet, unet=unet), cuda)
    if args.kernel_table and cuda:
        result["kernel_table"] = kernel_table(step, f"{args.kernel_table}.{name}.txt")
    if args.profile or args.kernel_table:
        measure("profiling")
    from torch.utils.flop_counter import FlopCounterMode

    where["phase"] = "the FLOP count (one eager step)"
    if cuda and cap:  # eager needs more than compiled, and the count is no part of what the cap tests
        torch.cuda.set_per_process_memory_fraction(1.0)
    try:
        with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
            step(eager=True)  # compiled blocks run their eager code here, so the counter sees every op
        result["tflop_per_step"] = counter.get_total_flops() / 1e12
        measure(where["phase"])
    except torch.cuda.OutOfMemoryError:  # eager can need more than compiled: keep the timings
        result["flop_count"] = "out of memory in the eager step"
    del unet, brushnet, vae, text, optimizer, params, trained, batch, embed
    accelerator.free_memory()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return result


class Clock:
    """Time marks on the GPU stream (CUDA events) or, on CPU where ops run synchronously, the wall."""

    def __init__(self, cuda):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def phase_times(step, vae, modules, cuda, reps=3):
    """Mean ms per step in: the VAE encode, each trained/frozen net's forward, the rest of the
    forward (text, noise, loss), backward, and the update (clip + optimizer + zero_grad). Hooks go
    on the top-level modules only, so compiled blocks stay untouched; a model compiled whole
    (`--compile_scope model`) is not hooked and its forward counts in forward_other."""
    clock, spans, hooks = Clock(cuda), {}, []
    encode = vae.encode

    def timed_encode(*a, **k):
        begin = clock.mark()
        out = encode(*a, **k)
        spans.setdefault("vae", []).append((begin, clock.mark()))
        return out
    vae.encode = timed_encode
    for name, module in modules.items():
        module = getattr(module, "module", module)  # DDP
        if getattr(module, "_compiled_call_impl", None) is not None:
            continue  # a whole-model compile: hooks would run inside it and recompile it
        def pre(m, a, name=name):
            spans.setdefault(name, []).append([clock.mark(), None])
        def post(m, a, o, name=name):
            spans[name][-1][1] = clock.mark()
        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    marks = []
    try:
        clock.sync()
        for _ in range(reps):
            marks.append({"start": clock.mark()})
            step(lambda name: marks[-1].__setitem__(name, clock.mark()))
        clock.sync()
    finally:
        for h in hooks:
            h.remove()
        del vae.encode
    out = {name: sum(clock.ms(a, b) for a, b in pairs) / reps for name, pairs in spans.items()}
    mean = lambda a, b: sum(clock.ms(m[a], m[b]) for m in marks) / reps  # noqa: E731
    out["forward_other"] = mean("start", "forward") - sum(out.values())
    out["backward"] = mean("forward", "backward")
    out["update"] = mean("backward", "update")
    out["step_total"] = mean("start", "update")
    return out


def kernel_table(step, path, reps=2):
    """torch.profiler's top GPU operators over `reps` steps, written to `path`, with the GPU's busy
    time per step against the wall time (a gap means the GPU waited for the CPU); the chrome trace
    goes beside it (`path` with .trace.json for .txt)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / reps
    events = prof.key_averages()
    busy_ms = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / reps
    table = events.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90)
    with open(path, "w") as f:
        f.write(f"per step: wall {wall_ms:.1f} ms (profiled), GPU kernels {busy_ms:.1f} ms\n{table}")
    prof.export_chrome_trace(path.replace(".txt", "") + ".trace.json")
    return dict(path=path, wall_ms=wall_ms, gpu_busy_ms=busy_ms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Tiny models on CPU (a smoke run).")
    parser.add_argument("--configs", default=None, help="Comma-separated names (default: all); name@GiB runs that "
                        "one under its own memory cap. " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--mixed_precision", default=None, help="fp16 (GPU default), bf16 or no (CPU default).")
    parser.add_argument("--json", default=None, help="Write the results here.")
    parser.add_argument("--memory_cap_gib", type=float, default=None,
                        help="Cap this process's GPU memory (e.g. 24 to prove a preset fits a 24 GB card).")
    parser.add_argument("--kernel_table", default=None, help="Write torch.profiler tables to <this>.<config>.txt.")
    parser.add_argument("--profile", action="store_true", help="Also time the forward of each model (GPU).")
    args = parser.parse_args(argv)
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and not args.tiny
    accelerator = Accelerator(mixed_precision=args.mixed_precision or ("fp16" if cuda else "no"), cpu=not cuda)
    names = args.configs.split(",") if args.configs else [n for n in CONFIGS if not (args.tiny and ("compile" in n or "graph" in n))]  # CPU: no compile, no graphs
    for name in names:  # every name checked before the first configuration runs
        base, at, cap = name.partition("@")
        if base not in CONFIGS:
            parser.error(f"--configs: no configuration {base!r}; there are: {', '.join(CONFIGS)}")
        try:
            if at and not float(cap) > 0:
                raise ValueError
        except ValueError:
            parser.error(f"--configs: {name!r}: after @ comes a memory cap in GiB above 0, e.g. {base}@22")
    peak = matmul_peak_tflops(accelerator.device) if cuda else None
    results = []
    for name in names:
        base, _, cap = name.partition("@")  # name@GiB: this configuration under its own memory cap
        stage, opts = CONFIGS[base]
        opts = dict(opts, memory_cap_gib=float(cap)) if cap else opts
        # each configuration starts with nothing of the previous one reserved: the last one's CUDA
        # graph pool (freed only when run_config returned) inflated runs 10-14's second readings
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # an out-of-memory's peak is this configuration's own
        where = {}
        try:
            r = run_config(name, stage, opts, args, accelerator, where)
        except torch.cuda.OutOfMemoryError as e:
            where.setdefault("peaks", {})[where["phase"]] = peak_gib()
            r = dict(config=name, stage=stage, options=opts, error=f"out of memory in {where['phase']}: {str(e)[:200]}",
                     phase_peaks_gib=where["peaks"])
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)
        except Exception as e:  # noqa: BLE001 -- one broken configuration must not lose the others
            import traceback
            traceback.print_exc()
            r = dict(config=name, stage=stage, options=opts, error=f"{type(e).__name__}: {str(e)[:300]}")
        if "tflop_per_step" in r:
            r["achieved_tflops"] = r["tflop_per_step"] / r["median_s"]
            if peak:
                r["fraction_of_matmul_peak"] = r["achieved_tflops"] / peak
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.json:  # after every configuration: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                               matmul_peak_tflops=peak, results=results), f, indent=1)
    print_table(results, peak)
    return results


def print_table(results, peak):
    print(f"\nmatmul peak (fp16, measured): {peak:.0f} TFLOP/s" if peak else "\n(cpu run: no matmul peak)")
    head = f"{'config':18} {'s/step med':>10} {'min':>7} {'max':>7} {'alloc GiB':>9} {'resv GiB':>8} " \
           f"{'TFLOP':>7} {'TFLOP/s':>8} {'of peak':>7}"
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['config']:18} {r['error'][:80]}")
            continue
        print(f"{r['config']:18} {r['median_s']:10.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} "
              f"{r.get('peak_allocated_gib', 0):9.1f} {r.get('peak_reserved_gib', 0):8.1f} "
              f"{r.get('tflop_per_step', 0):7.1f} {r.get('achieved_tflops', 0):8.1f} "
              f"{r.get('fraction_of_matmul_peak', 0):7.1%}")


if __name__ == "__main__":
    main()
