"""Data pipeline throughput: FinetuneDataset clips/s on one core and mask-generator ms per call.

    python bench/data_bench.py [--json out.json] [--skip_masks]

Builds synthetic JPEG videos (quality 90, 1/f-noise texture panning over time, so files are
about the size of real frames) and 1080p30 H.264 mp4s of the same texture with film grain (PyAV's
libx264, crf 20, B-frames; grain sets the bitrate: ~3.5 Mbit/s as web footage, ~12 as a phone;
a keyframe every 1 s as phones write them, or every 250 frames as x264 does by default) in a
temp dir, then times, single-threaded (torch and cv2 one thread):
one worker's clips/s at 10 frames from 854x480 and at 22 frames from 1280x720 JPEGs and from the
mp4s (the CSV source, stride 2 as the original's rule gives at 30 fps; beside it the same clips
read with OpenCV's FFmpeg backend, the alternative decoder), and
`create_random_shape_with_random_motion` ms per call next to the original's figures from
shared/reference/mask_stats.json. CPU time is reported too: on a shared machine wall time
counts other processes, CPU time does not; the load average is printed.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.finetune_dataset import FinetuneDataset  # noqa: E402
from dataset.utils import create_random_shape_with_random_motion  # noqa: E402
from diffueraser.tiny import tiny_tokenizer  # noqa: E402

MASK_STATS = Path(os.environ.get("DIFFUERASER_REFERENCE", REPO.parent / "shared" / "reference")) / "mask_stats.json"
DATA_CASES = [  # (name, width, height, nframes, clips timed)
    ("10 frames 854x480", 854, 480, 10, 30),
    ("22 frames 1280x720", 1280, 720, 22, 12),
]
VIDEO_CASES = [  # (name, film grain +-, keyframe interval, clips timed): 1080p30 H.264, 22 frames at stride 2
    ("1080p mp4 web g30", 3, 30, 12),  # ~3.5 Mbit/s: web / stock footage
    ("1080p mp4 phone g30", 8, 30, 6),  # ~12 Mbit/s: a phone camera
    ("1080p mp4 web g250", 3, 250, 6),  # x264's default keyframe interval: a long way back to the keyframe
]
VIDEO_FRAMES = 120  # 4 s at 30 fps
MASK_CALLS = 300


def pink_texture(rng, height, width, alpha=1.5):
    """Colour 1/f^alpha noise, uint8 (height, width, 3): natural-image-like spectrum."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    planes = []
    for _ in range(3):
        spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** alpha
        p = np.fft.irfft2(spec, (height, width))
        planes.append((p - p.mean()) / p.std())
    img = np.stack(planes, -1) @ np.array([[1, 0.8, 0.6], [0, 0.5, 0.3], [0, 0, 0.4]])
    return np.clip(127 + 45 * img, 0, 255).astype(np.uint8)


def write_jpeg_videos(root, width, height, nframes, videos=2, seed=0):
    """A YouTube-VOS-layout tree of panning-texture JPEG videos; returns mean file size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for v in range(videos):
        texture = pink_texture(rng, height + 4 * nframes, width + 8 * nframes)
        folder = os.path.join(root, "JPEGImages", f"video{v}")
        os.makedirs(folder, exist_ok=True)
        for i in range(nframes):
            path = os.path.join(folder, f"{i:05d}.jpg")
            Image.fromarray(texture[4 * i:4 * i + height, 8 * i:8 * i + width]).save(path, quality=90)
            sizes.append(os.path.getsize(path))
    return float(np.mean(sizes)) / 1024


def write_mp4_video(path, width, height, nframes, gop, grain, fps=30, seed=0):
    """A 1080p-style H.264 mp4: the panning texture plus film grain; returns its Mbit/s."""
    import av

    rng = np.random.default_rng(seed)
    texture = pink_texture(rng, height + 2 * nframes, width + 4 * nframes)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20", "g": str(gop)}
        for i in range(nframes):
            frame = texture[2 * i:2 * i + height, 4 * i:4 * i + width].astype(np.int16)
            frame += rng.integers(-grain, grain + 1, frame.shape, dtype=np.int16)
            image = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return os.path.getsize(path) * 8 / 1e6 / (nframes / fps)


def opencv_clip(path, first, nframes, stride, resolution):
    """The same clip through OpenCV's FFmpeg backend: open (as a sample does), seek, grab every
    frame of the span, retrieve (BGR, full size) the clip's frames, cut the centre square and
    resize (as FinetuneDataset)."""
    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    capture.set(cv2.CAP_PROP_POS_FRAMES, first)
    for k in range((nframes - 1) * stride + 1):
        if not capture.grab():
            raise OSError("video ended")
        if k % stride == 0:
            image = capture.retrieve()[1]
            h, w = image.shape[:2]
            side = min(h, w)
            square = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
            cv2.resize(cv2.resize(square, (side // 2, side // 2), interpolation=cv2.INTER_AREA),
                       (resolution, resolution), interpolation=cv2.INTER_LINEAR)


def time_opencv(path, nframes, clips, seed=0):
    """OpenCV's clips/s and clips per CPU second for random clips at stride 2."""
    starts = 2 * np.random.default_rng(seed).integers(0, (VIDEO_FRAMES - 1) // 2 - nframes + 2, size=clips)
    wall, cpu = time.perf_counter(), time.process_time()
    for first in starts:
        opencv_clip(path, int(first), nframes, 2, 512)
    return clips / (time.perf_counter() - wall), clips / (time.process_time() - cpu)


def bench_videos(tmp, tokenizer, nframes=22):
    rows = []
    for name, grain, gop, clips in VIDEO_CASES:
        folder = os.path.join(tmp, f"mp4_{grain}_{gop}")
        os.makedirs(folder)
        mbps = write_mp4_video(os.path.join(folder, "video.mp4"), 1920, 1080, VIDEO_FRAMES, gop, grain)
        with open(os.path.join(folder, "meta.csv"), "w") as f:
            f.write("video_path,caption\nvideo.mp4,a texture\n")
        args = argparse.Namespace(train_data_dir=folder, csv_file=os.path.join(folder, "meta.csv"), nframes=nframes,
                                  resolution=512, proportion_empty_prompts=0.0, seed=0)
        dataset = FinetuneDataset(args, tokenizer)
        wall, cpu = time_clips(dataset, clips)
        cv_wall, cv_cpu = time_opencv(os.path.join(folder, "video.mp4"), nframes, clips)
        rows.append(dict(case=f"{nframes} frames {name}", resolution=512, mbit_per_s=round(mbps, 1),
                         clips_per_s=round(wall, 2), clips_per_cpu_s=round(cpu, 2),
                         opencv_clips_per_s=round(cv_wall, 2), opencv_clips_per_cpu_s=round(cv_cpu, 2)))
    return rows


def time_clips(dataset, clips):
    """(clips/s wall, clips per CPU second) over `clips` samples after one warm-up."""
    dataset[0]
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(clips):
        dataset[i % len(dataset)]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return clips / wall, clips / cpu


def bench_data(tmp, tokenizer):
    rows = []
    for name, width, height, nframes, clips in DATA_CASES:
        root = os.path.join(tmp, f"{width}x{height}")
        kb = write_jpeg_videos(root, width, height, nframes + 4)
        args = argparse.Namespace(davis_root=None, ytvos_root=root, nframes=nframes, resolution=512,
                                  proportion_empty_prompts=0.0, seed=0)
        dataset = FinetuneDataset(args, tokenizer)
        wall, cpu = time_clips(dataset, clips)
        rows.append(dict(case=name, resolution=512, jpeg_kb=round(kb, 1), clips_per_s=round(wall, 2),
                         clips_per_cpu_s=round(cpu, 2)))
    return rows


def bench_masks():
    stats = json.loads(MASK_STATS.read_text())
    rows = []
    for size in stats["sizes"]:
        (height, width), length = size["image_hw"], size["video_length"]
        random.seed(size["seed_random_and_numpy"])
        np.random.seed(size["seed_random_and_numpy"])
        create_random_shape_with_random_motion(length, height, width)
        times = []
        for _ in range(MASK_CALLS):
            t = time.perf_counter()
            create_random_shape_with_random_motion(length, height, width)
            times.append(time.perf_counter() - t)
        ms, original = 1000 * float(np.mean(times)), size["ms_per_call"]["mean"]
        rows.append(dict(case=f"{height}x{width}x{length}", ms_per_call=round(ms, 3),
                         ms_p50=round(1000 * float(np.median(times)), 3),
                         original_ms_per_call=round(original, 2), speedup=round(original / ms, 1)))
    return rows


def format_table(data_rows, mask_rows):
    lines = ["FinetuneDataset, one worker (1 thread), R=512",
             f"  {'case':<30} {'size':>10} {'clips/s':>8} {'clips/CPU-s':>12}"]
    for r in data_rows:
        size = f"{r['jpeg_kb']:.0f} KB" if "jpeg_kb" in r else f"{r['mbit_per_s']:.1f} Mb/s"
        lines.append(f"  {r['case']:<30} {size:>10} {r['clips_per_s']:>8.2f} {r['clips_per_cpu_s']:>12.2f}"
                     + (f"   OpenCV: {r['opencv_clips_per_s']:.2f} / {r['opencv_clips_per_cpu_s']:.2f}"
                        if "opencv_clips_per_s" in r else ""))
    lines.append(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    lines += ["create_random_shape_with_random_motion, mean over calls",
              f"  {'case':<20} {'ms/call':>8} {'p50':>8} {'original':>9} {'speedup':>8}"]
    lines += [f"  {r['case']:<20} {r['ms_per_call']:>8.3f} {r['ms_p50']:>8.3f} {r['original_ms_per_call']:>9.2f} "
              f"{r['speedup']:>7.1f}x" for r in mask_rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--skip_masks", action="store_true", help="Time the data sources only.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(os.path.join(tmp, "tokenizer"))
        data_rows = bench_data(tmp, tokenizer) + bench_videos(tmp, tokenizer)
    mask_rows = [] if args.skip_masks else bench_masks()
    print(format_table(data_rows, mask_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(data=data_rows, masks=mask_rows, cpu_count=os.cpu_count(),
                           load_average=os.getloadavg()), f, indent=1)


if __name__ == "__main__":
    main()
