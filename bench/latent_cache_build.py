"""How long `--latent_cache`'s first start takes: the build (frames read and squared by 4 threads, VAE
encoder in fp16, files written) through dataset/latent_cache.py on synthetic DAVIS (480p) and
YouTube-VOS (720p) frame folders, frames per second per source.

    python bench/latent_cache_build.py OUT                    # on a GPU: SD1.5's VAE, 512 px
    python bench/latent_cache_build.py OUT --tiny             # tiny VAE on the CPU (a check of the glue)

The VAE is placed as the scripts place it (place_frozen_encoders: channels-last, per-channel norms,
compiled; the build itself runs it eagerly). The estimate for the whole data set uses ~100k frames
(DAVIS-2017 train ~4.2k, YouTube-VOS-2019 train ~95k).
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
    parser.add_argument("--videos", type=int, default=6, help="videos per source")
    parser.add_argument("--frames", type=int, default=80, help="frames per video")
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
    names = [f"v{i}" for i in range(args.videos)]
    davis, ytvos = os.path.join(args.out, "DAVIS"), os.path.join(args.out, "YTVOS")
    small = args.tiny
    write_synthetic_davis(davis, videos=names, nframes=args.frames, size=(64, 96) if small else (480, 854))
    write_synthetic_ytvos(ytvos, videos=names, nframes=args.frames, size=(72, 128) if small else (720, 1280))
    torch.manual_seed(0)
    vae = AutoencoderKL(**(TINY_VAE if args.tiny else SD15_VAE))
    place_frozen_encoders(SimpleNamespace(compile=cuda, vae_channel_norm=1), vae, torch.nn.Identity(), device, dtype)
    from dataset.latent_cache import BATCH
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # as the build runs it; first-call costs apart
        vae.encode(torch.zeros(BATCH, 3, resolution, resolution, device=device, dtype=dtype))
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
                           resolution=resolution, results=results), f, indent=1)


if __name__ == "__main__":
    main()
