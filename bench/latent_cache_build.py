"""How long `--latent_cache`'s first start takes: the build (frames read and squared by 4 threads, VAE
encoder in fp16, files written) through dataset/latent_cache.py on synthetic DAVIS (480p) and
YouTube-VOS (720p) frame folders, frames per second per source.

    python bench/latent_cache_build.py OUT                    # on a GPU: SD1.5's VAE, 512 px
    python bench/latent_cache_build.py OUT --compile 0        # the encoder as --compile 0 runs it (eager)
    python bench/latent_cache_build.py OUT --tiny             # tiny VAE on the CPU (a check of the glue)

The VAE is placed as the scripts place it (place_frozen_encoders: channels-last, per-channel norms,
compiled). Videos as long as the real ones on average: DAVIS-2017 train 60 videos, ~4.2k frames (~70
each); YouTube-VOS-2019 train 3,471 videos, ~95k frames (~27 each, every 5th frame). The estimate
for both uses ~100k frames at the slower source's rate.
"""
import argparse
import json
import os
import shutil
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL_DATA_FRAMES = 100_000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--videos", type=int, default=8, help="DAVIS videos (YouTube-VOS: 3x as many)")
    parser.add_argument("--compile", type=int, default=1, choices=[0, 1])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch
    from diffusers import AutoencoderKL

    from dataset.latent_cache import LatentCache
    from dataset.sources import scan_davis, scan_ytvos
    from diffueraser.tiny import SD15_VAE, TINY_VAE, write_synthetic_davis, write_synthetic_ytvos
    from diffueraser.trainer import place_frozen_encoders

    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    resolution = 512 if not args.tiny else 64
    davis, ytvos = os.path.join(args.out, "DAVIS"), os.path.join(args.out, "YTVOS")
    small = args.tiny
    if not os.path.isdir(davis):  # a second run reuses the frames
        write_synthetic_davis(davis, videos=[f"d{i}" for i in range(args.videos)], nframes=70,
                              size=(64, 96) if small else (480, 854))
        write_synthetic_ytvos(ytvos, videos=[f"y{i}" for i in range(3 * args.videos)], nframes=27,
                              size=(72, 128) if small else (720, 1280))
    torch.manual_seed(0)
    vae = AutoencoderKL(**(TINY_VAE if args.tiny else SD15_VAE))
    place_frozen_encoders(SimpleNamespace(compile=cuda and args.compile, vae_channel_norm=1), vae,
                          torch.nn.Identity(), device, dtype)
    from dataset.latent_cache import BATCH
    start = time.perf_counter()
    with torch.no_grad():  # first-call costs apart (a compile: once per run)
        vae.encode(torch.zeros(BATCH, 3, resolution, resolution, device=device, dtype=dtype))
    print(f"first call {time.perf_counter() - start:.0f} s", flush=True)
    results = {}
    for source, scan in (("DAVIS", scan_davis(davis, 10, repeat=1)), ("YouTube-VOS", scan_ytvos(ytvos, 10))):
        cache_root = os.path.join(args.out, "cache")
        shutil.rmtree(cache_root, ignore_errors=True)
        cache = LatentCache(cache_root, resolution, vae).attach(scan.videos)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        encoded, bad = cache.build(scan.videos, vae, show=False)
        seconds = time.perf_counter() - start
        frames = sum(len(v.frames) for v in scan.videos)
        assert encoded == len(scan.videos) and not bad, (encoded, bad)
        results[source] = dict(frames=frames, seconds=seconds, frames_per_s=frames / seconds)
        print(f"{source:12s} {frames} frames in {seconds:.1f} s: {frames / seconds:.0f} frames/s", flush=True)
    slowest = min(r["frames_per_s"] for r in results.values())
    print(f"~{FULL_DATA_FRAMES // 1000}k frames (DAVIS + YouTube-VOS) at the slower rate: "
          f"{FULL_DATA_FRAMES / slowest / 60:.0f} min", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                           resolution=resolution, compile=args.compile, results=results), f, indent=1)


if __name__ == "__main__":
    main()
