"""Attention kernels at the training step's own shapes, forward + backward, side by side.

    python bench/attention.py --json OUT.json   # SD1.5-size stage 1 and 2 shapes, fp16, on a GPU (~1 min)
    python bench/attention.py --tiny            # tiny models on CPU (the tests run this)

The shapes come from the step itself: `training_step` of each stage (latent cache on, as the
scripts run) on the meta device -- no memory, no compute -- with scaled_dot_product_attention
recording every call: query and key shapes (batch, heads, length, head dim), whether a gradient
flows through it, and how often it comes per step. Each distinct call is then timed with random
inputs under torch's own kernel choice, under each SDPA backend alone (cuDNN, flash,
memory-efficient) and as two matmuls with fp32 scores ("matmul"). The table gives ms per step
(ms per call x calls) and the best kernel against torch's choice. It says where a per-shape choice
would pay: cuDNN's kernels pad head dims 40 and 80 to 64 and 128 (run 16's kernel table), and the
VAE mid-block's one 512-wide head goes to the memory-efficient kernel.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def step_shapes(stage, tiny):
    """{(query shape, key shape, with gradient): calls} of one training step, recorded on the meta device."""
    from diffusers import DDPMScheduler

    from bench.train_step import FRAMES, build_models, synthetic_batch
    from diffueraser.trainer import training_step

    calls = collections.Counter()

    def record(q, k, v, *args, **kwargs):
        calls[(tuple(q.shape), tuple(k.shape), q.requires_grad or k.requires_grad or v.requires_grad)] += 1
        return q.new_empty(q.shape[:-1] + v.shape[-1:])
    unet, brushnet, vae, _ = build_models(stage, tiny, "meta")
    batch = synthetic_batch(2 if tiny else FRAMES[stage], 32 if tiny else 512, "meta", latent_cache=True)
    batch["text_embeds"] = torch.empty(1, 77, unet.config.cross_attention_dim, device="meta")
    real, F.scaled_dot_product_attention = F.scaled_dot_product_attention, record
    try:  # one dtype throughout: shapes are all that is recorded
        training_step(batch, unet.half(), brushnet.half(), vae.half(), None, DDPMScheduler(), torch.float16)
    finally:
        F.scaled_dot_product_attention = real
    return calls


def matmul_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return scores.softmax(-1).to(q.dtype) @ v


def time_call(q_shape, k_shape, grad, kernel, device, dtype, reps):
    """Median ms of one call (forward, and backward when a gradient flows), or None where the kernel refuses."""
    q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=grad) for s in (q_shape, k_shape, k_shape))

    def call():
        if kernel == "matmul":
            out = matmul_attention(q, k, v)
        elif kernel == "torch":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(BACKENDS[kernel]):
                out = F.scaled_dot_product_attention(q, k, v)
        if grad:
            out.backward(torch.ones_like(out))
    times = []
    try:
        for i in range(reps + 2):  # two warm-up calls
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    except RuntimeError:  # "No available kernel", or a shape the kernel does not take
        return None
    return statistics.median(times[2:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny models on CPU (fp32; only 'torch' and 'matmul').")
    parser.add_argument("--stages", default="stage1,stage2")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    kernels = ["torch", *BACKENDS, "matmul"] if cuda else ["torch", "matmul"]
    results = []
    for stage in args.stages.split(","):
        for (q_shape, k_shape, grad), calls in sorted(step_shapes(stage, args.tiny).items()):
            ms = {name: time_call(q_shape, k_shape, grad, name, device, dtype, 2 if args.tiny else args.reps)
                  for name in kernels}
            best = min((m, name) for name, m in ms.items() if m is not None)[1]
            results.append(dict(stage=stage, query=q_shape, key=k_shape, grad=grad, calls=calls, ms=ms, best=best))
    print(f"ms per step (ms per call x calls), {'forward + backward where a gradient flows' if cuda else 'CPU'}")
    print(f"{'stage':7} {'query (B, heads, L, dim)':26} {'keys':>5} {'grad':>5} {'calls':>5} "
          + " ".join(f"{k:>9}" for k in kernels) + "  best vs torch")
    for r in results:
        cells = " ".join(f"{r['calls'] * r['ms'][k]:9.2f}" if r["ms"][k] is not None else f"{'-':>9}" for k in kernels)
        print(f"{r['stage']:7} {str(r['query']):26} {r['key'][2]:5} {str(r['grad']):>5} {r['calls']:5} {cells}  "
              f"{r['best']} {r['ms']['torch'] / r['ms'][r['best']]:.2f}x")
    for stage in args.stages.split(","):
        rows = [r for r in results if r["stage"] == stage]
        now = sum(r["calls"] * r["ms"]["torch"] for r in rows)
        best = sum(r["calls"] * r["ms"][r["best"]] for r in rows)
        print(f"{stage}: attention {now:.1f} ms per step with torch's choice, {best:.1f} ms with the best per shape")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(dtype), results=results),
                      f, indent=1)
    return results


if __name__ == "__main__":
    main()
