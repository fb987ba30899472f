"""The compiled channels-last VAE encoder with F.group_norm vs `--vae_channel_norm`, side by side.

    python bench/vae_encode.py                  # SD1.5-size VAE, 44 images (stage 2) at 512, on a GPU
    python bench/vae_encode.py --tiny           # tiny VAE on CPU (the tests run this)

Times one GroupNorm + SiLU on a full-resolution activation, then the whole encoder (the path
`encode_latents` takes in training: fp16, no grad, compiled as one graph), each with both norms,
and prints ms per call, the ratio and the largest difference between the two outputs.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffueraser.speed import norms_by_channel  # noqa: E402
from diffueraser.trainer import place_frozen_encoders  # noqa: E402


def timed(fn, x, reps, warmup=2):
    """Median ms per call of fn(x), and its last output."""
    for _ in range(warmup):
        out = fn(x)
    times = []
    for _ in range(reps):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def main():
    from diffusers import AutoencoderKL

    from bench.train_step import SD15_VAE
    from diffueraser.tiny import TINY_VAE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny VAE on CPU.")
    parser.add_argument("--images", type=int, default=44, help="Images per call (stage 2: 22 frames + 22 masked).")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    if args.tiny:
        args.images, args.resolution, args.reps = 2, 32, 2
    torch.backends.cudnn.benchmark = True
    results = {}

    # one norm + SiLU, as in the encoder's first resnet
    torch.manual_seed(0)
    channels = 32 if args.tiny else 128
    norm = torch.nn.GroupNorm(32 if not args.tiny else 8, channels, eps=1e-6).to(device, dtype)
    x = torch.randn(args.images, channels, args.resolution, args.resolution, device=device, dtype=dtype)
    x = (x * 3 + 1).contiguous(memory_format=torch.channels_last)
    native = torch.compile(lambda t: F.silu(norm(t)), fullgraph=True, dynamic=False)
    by_channel_norm = norms_by_channel(copy.deepcopy(norm))
    by_channel = torch.compile(lambda t: F.silu(by_channel_norm(t)), fullgraph=True, dynamic=False)
    with torch.no_grad():
        results["norm_native_ms"], a = timed(native, x, args.reps)
        results["norm_by_channel_ms"], b = timed(by_channel, x, args.reps)
    results["norm_max_abs_diff"] = (a.float() - b.float()).abs().max().item()
    del x, a, b

    # the whole encoder, as training runs it
    torch.manual_seed(0)
    vae = AutoencoderKL(**(TINY_VAE if args.tiny else SD15_VAE)).requires_grad_(False).eval()
    pixels = torch.rand(args.images, 3, args.resolution, args.resolution, device=device, dtype=dtype) * 2 - 1
    outs = {}
    for name, flag in (("native", 0), ("by_channel", 1)):
        v = copy.deepcopy(vae)
        place_frozen_encoders(SimpleNamespace(compile=True, vae_channel_norm=flag), v, torch.nn.Linear(1, 1),
                              device, dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            results[f"encoder_{name}_ms"], outs[name] = timed(v.encoder, pixels, args.reps)
        if cuda:
            results[f"encoder_{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del v
    results["encoder_max_abs_diff"] = (outs["native"].float() - outs["by_channel"].float()).abs().max().item()
    results["encoder_output_abs_max"] = outs["native"].float().abs().max().item()
    results["norm_ratio"] = results["norm_native_ms"] / results["norm_by_channel_ms"]
    results["encoder_ratio"] = results["encoder_native_ms"] / results["encoder_by_channel_ms"]
    results.update(images=args.images, resolution=args.resolution, dtype=str(dtype),
                   device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__)
    print(json.dumps(results))
    print(f"GroupNorm+SiLU ({args.images}x{channels}x{args.resolution}^2): native {results['norm_native_ms']:.2f} ms, "
          f"by channel {results['norm_by_channel_ms']:.2f} ms ({results['norm_ratio']:.2f}x)")
    print(f"VAE encoder ({args.images} images): native {results['encoder_native_ms']:.1f} ms, "
          f"by channel {results['encoder_by_channel_ms']:.1f} ms ({results['encoder_ratio']:.2f}x); "
          f"outputs differ by at most {results['encoder_max_abs_diff']:.2e} (|out| <= {results['encoder_output_abs_max']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
