"""Evaluate weight sets side by side on held-out videos: the core of eval_DiffuEraser_stage{1,2}.py.

Every weight set sees the same clips, masks, windows and noise. Each video is inpainted in
windows of `--nframes` (see diffueraser/inference.py), pasted into the clean frames through the
hole (hard edge by default, as the standard evaluation) and scored against them: PSNR and SSIM over
the whole frame (the standard tables' convention) and inside the hole, LPIPS where available,
and one VFID per weight set over all videos (I3D, one vector per video). Means are over all
frames of all videos. With `--annotations` (object removal) there is no ground truth: pictures only.
Outputs in --output_dir: results.json, results.md, means.png, gifs/<video>.gif
(masked input | each weight set | ground truth).
"""
import argparse
import json
import math
import os
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dataset.utils import random_shape_masks
from diffueraser.inference import (build_pipeline, composite, load_base_models, load_weights,
                                   deterministic, pick_device, sample_video, window_starts)
from diffueraser.validation import list_images, make_strips, read_hole, resize_center_crop, save_gif

METRICS = ("psnr", "ssim", "psnr_hole", "ssim_hole", "lpips")
LABELS = {"psnr": "PSNR", "ssim": "SSIM", "psnr_hole": "PSNR hole", "ssim_hole": "SSIM hole", "lpips": "LPIPS",
          "vfid": "VFID"}
GIF_HEIGHT = 256  # GIF panels are shrunk to this height at most


def add_eval_args(parser, nframes_default):
    """The evaluation flags (both stages)."""
    g = parser.add_argument_group("weights")
    g.add_argument("--weights", action="append", required=True, metavar="NAME=PATH",
                   help="A weight set to evaluate, repeatable: a converted folder (unet_main/ + brushnet/), the "
                        "released DiffuEraser folder, or a training checkpoint (checkpoint-N, run folder, "
                        "<run>/latest).")
    g.add_argument("--base_model_name_or_path", required=True,
                   help="Stable Diffusion 1.5 folder (text encoder, tokenizer, scheduler, VAE).")
    g.add_argument("--vae_path", default=None, help="VAE folder (sd-vae-ft-mse). Default: the base model's vae/.")
    g.add_argument("--i3d_weights", default=None, help="i3d_rgb_imagenet.pt for VFID (skipped without it).")
    g.add_argument("--i3d_eval_mode", action="store_true",
                   help="Run I3D with its stored BatchNorm statistics. Default: each video's own batch statistics, "
                        "as the standard evaluation (and published VFIDs) does.")
    g.add_argument("--lpips_weights", default=None,
                   help="torchvision's ImageNet AlexNet file (alexnet-owt-7be5be79.pth) for LPIPS (skipped with a note "
                        "without it).")
    g = parser.add_argument_group("videos and masks")
    g.add_argument("--davis_root", default=None, help="DAVIS-2017 root: the videos of ImageSets/2017/<--split>.txt.")
    g.add_argument("--split", default="val", help="DAVIS ImageSets/2017 list (default val: no video seen in training).")
    g.add_argument("--videos", default=None, help="Instead of DAVIS: a folder of frame folders, one per video.")
    g.add_argument("--max_videos", type=int, default=None, help="Evaluate only the first N videos.")
    g.add_argument("--max_frames", type=int, default=None, help="Use only the first N frames of each video.")
    g.add_argument("--mask_seed", type=int, default=0, help="Seed of the generated masks (one stream per video name).")
    g.add_argument("--write_masks", default=None, metavar="DIR",
                   help="Write the generated masks as DIR/<video>/%%05d.png (white = hole) to reuse with --masks.")
    g.add_argument("--masks", default=None, metavar="DIR", help="Read masks DIR/<video>/*.png (white = hole).")
    g.add_argument("--annotations", action="store_true",
                   help="Object removal: DAVIS Annotations/480p as holes (dilated); no ground truth, so no scores.")
    g.add_argument("--dilate", type=int, default=4, help="3x3 dilations of --annotations holes.")
    g = parser.add_argument_group("sampling")
    g.add_argument("--resolution", type=int, default=512, help="Square centre crop of this side, as in training.")
    g.add_argument("--native", action="store_true", help="Each video's own size, rounded to a multiple of 8.")
    g.add_argument("--size", default=None, metavar="WxH", help="Resize to WxH, e.g. 432x240 (the standard tables').")
    g.add_argument("--nframes", type=int, default=nframes_default, help="Frames per window.")
    g.add_argument("--overlap", type=int, default=0, help="Frames shared by consecutive windows (blended).")
    g.add_argument("--steps", type=int, default=20, help="Denoising steps (UniPC).")
    g.add_argument("--guidance_scale", type=float, default=0.0, help="Classifier-free guidance (0 = off).")
    g.add_argument("--prompt", default="clean background", help="Caption (the training one).")
    g.add_argument("--seed", type=int, default=0, help="Noise seed (the same noise for every weight set).")
    g.add_argument("--blur", type=int, default=0,
                   help="Gaussian kernel (odd) of a soft edge outside the hole when pasting the result, as "
                        "run_diffueraser.py does; default 0: the hard paste of the standard evaluation.")
    g.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                   help="Model dtype (default fp16 on CUDA, fp32 on the CPU).")
    g.add_argument("--output_dir", default="eval_out", help="Where results and GIFs go.")
    return parser


def check_eval_args(parser, args):
    """Parse NAME=PATH pairs and check paths and flag combinations; errors name the flag."""
    weights = {}
    for spec in args.weights:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--weights: {spec!r} is not NAME=PATH")
        if name in weights:
            parser.error(f"--weights: the name {name!r} is given twice")
        if not os.path.isdir(path):
            parser.error(f"--weights: {path} does not exist")
        weights[name] = path
    args.weights = weights
    if bool(args.davis_root) == bool(args.videos):
        parser.error("give one of --davis_root or --videos")
    if args.annotations and not args.davis_root:
        parser.error("--annotations needs --davis_root (its Annotations/480p)")
    if sum(map(bool, (args.masks, args.annotations, args.write_masks))) > 1:
        parser.error("--masks, --write_masks and --annotations exclude each other")
    if args.size:
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            parser.error(f"--size: {args.size!r} is not WxH")
        if w % 8 or h % 8 or w <= 0 or h <= 0:
            parser.error(f"--size: {args.size} must be multiples of 8")
        args.size = (w, h)
    if args.resolution % 8:
        parser.error(f"--resolution: {args.resolution} is not a multiple of 8")
    for flag in ("masks", "i3d_weights", "lpips_weights", "davis_root", "videos"):
        value = getattr(args, flag)
        if value and not os.path.exists(value):
            parser.error(f"--{flag}: {value} does not exist")
    if args.blur < 0 or (args.blur and args.blur % 2 == 0):
        parser.error(f"--blur: {args.blur} must be odd (or 0)")
    if not 0 <= args.overlap < args.nframes:
        parser.error(f"--overlap: {args.overlap} must be in [0, --nframes {args.nframes})")
    return args


# ----------------------------------------------------------------------------- videos and masks
def list_videos(args):
    """[(name, frame folder)] of the benchmark, in list order, at most --max_videos."""
    if args.davis_root:
        listing = os.path.join(args.davis_root, "ImageSets", "2017", f"{args.split}.txt")
        if not os.path.isfile(listing):
            raise SystemExit(f"--davis_root: {args.davis_root} has no ImageSets/2017/{args.split}.txt")
        with open(listing) as f:
            names = [line.strip() for line in f if line.strip()]
        videos = [(n, os.path.join(args.davis_root, "JPEGImages", "480p", n)) for n in names]
    else:
        videos = sorted((n, os.path.join(args.videos, n)) for n in os.listdir(args.videos)
                        if os.path.isdir(os.path.join(args.videos, n)))
    if not videos:
        raise SystemExit(f"--{'davis_root' if args.davis_root else 'videos'}: no videos found")
    return videos[:args.max_videos]


def fit(image, args, resample):
    """A PIL image brought to the evaluation size: square crop (--resolution), --native or --size."""
    if args.size:
        return image.resize(args.size, resample)
    if args.native:
        w, h = image.size
        return image.resize((max(8, round(w / 8) * 8), max(8, round(h / 8) * 8)), resample)
    return resize_center_crop(image, args.resolution, resample)


def load_frames(folder, args):
    """uint8 (N, H, W, 3) frames of a video at the evaluation size, and their file paths."""
    files = images_in(folder, f"--{'davis_root' if args.davis_root else 'videos'}")[:args.max_frames]
    frames = [np.asarray(fit(Image.open(f).convert("RGB"), args, Image.BILINEAR)) for f in files]
    return np.stack(frames), files


def images_in(folder, flag, exts=None):
    """list_images, with a missing or empty folder as a one-line error naming the flag."""
    try:
        return list_images(folder, exts) if exts else list_images(folder)
    except FileNotFoundError as e:
        raise SystemExit(f"{flag}: {e}") from None


def generated_holes(name, n, height, width, seed):
    """The moving-mask generator's holes for one video, bool (N, H, W), fixed by (seed, video name)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return random_shape_masks(n, height, width, rng=rng) > 0


def write_masks(folder, holes):
    os.makedirs(folder, exist_ok=True)
    for i, hole in enumerate(holes):
        Image.fromarray(hole.astype(np.uint8) * 255).save(os.path.join(folder, f"{i:05d}.png"))


def read_masks(folder, n, height, width):
    """bool (N, H, W) holes from PNGs (non-zero = hole); sizes and counts must match the frames."""
    files = images_in(folder, "--masks", (".png",))
    if len(files) < n:
        raise SystemExit(f"--masks: {folder} has {len(files)} masks for {n} frames")
    holes = np.stack([np.asarray(Image.open(f).convert("L")) > 0 for f in files[:n]])
    if holes.shape[1:] != (height, width):
        raise SystemExit(f"--masks: {folder} has {holes.shape[2]}x{holes.shape[1]} masks, the frames are "
                         f"{width}x{height} (write and read masks at the same --resolution / --size)")
    return holes


def annotation_holes(args, name, frame_files):
    """Dilated DAVIS annotation holes at the evaluation size, bool (N, H, W)."""
    files = images_in(os.path.join(args.davis_root, "Annotations", "480p", name), "--annotations", (".png",))
    holes = []
    for i, frame_file in enumerate(frame_files):
        with Image.open(frame_file) as im:
            size = im.size
        hole = read_hole(files[min(i, len(files) - 1)], size, args.dilate)
        holes.append(np.asarray(fit(Image.fromarray(hole.astype(np.uint8) * 255), args, Image.NEAREST)) > 127)
    return np.stack(holes)


def video_holes(args, name, frames, files):
    n, h, w = frames.shape[:3]
    if args.annotations:
        return annotation_holes(args, name, files)
    if args.masks:
        return read_masks(os.path.join(args.masks, name), n, h, w)
    holes = generated_holes(name, n, h, w, args.mask_seed)
    if args.write_masks:
        write_masks(os.path.join(args.write_masks, name), holes)
    return holes


# ----------------------------------------------------------------------------- metrics
class Scorer:
    """Per-frame scores against the ground truth, plus I3D vectors for VFID; notes say what was skipped."""

    def __init__(self, args, device):
        from diffueraser import metrics

        self.metrics, self.notes = metrics, []
        self.i3d = metrics.load_i3d(args.i3d_weights, device) if args.i3d_weights else None
        self.batch_stats = not args.i3d_eval_mode
        if self.i3d is None:
            self.notes.append("VFID skipped: no --i3d_weights")
        else:
            self.notes.append("VFID: I3D with " + ("each video's own BatchNorm statistics (train mode, as the "
                                                   "standard evaluation and published VFIDs)" if self.batch_stats
                                                   else "its stored BatchNorm statistics (eval mode; not comparable "
                                                        "with published VFIDs)"))
        self.lpips = self.load_lpips(args.lpips_weights, device)

    def load_lpips(self, path, device):
        ok, note = self.metrics.lpips_available(path)
        if not ok:
            self.notes.append(note)
            return None
        model = self.metrics.load_lpips(path, device)
        return lambda gt, pred: self.metrics.lpips_distance(model, gt, pred)

    def frame_scores(self, gt, comp, holes):
        """{metric: [value per frame]} (SSIM nan for frames under 65 px, with a note)."""
        m, out = self.metrics, {k: [] for k in METRICS}
        for g, c, h in zip(gt, comp, holes):
            out["psnr"].append(m.psnr(g, c))
            out["psnr_hole"].append(m.masked_psnr(g, c, h))
            try:
                values = m.ssim_map(g, c)  # one map for both SSIMs
                out["ssim"].append(float(values.mean()))
                out["ssim_hole"].append(m.hole_mean(values, h))
            except ValueError:
                self.note_once("SSIM skipped: frames under 65 px")
                out["ssim"].append(math.nan)
                out["ssim_hole"].append(math.nan)
            out["lpips"].append(self.lpips(g, c) if self.lpips else math.nan)
        return out

    def activations(self, frames):
        if self.i3d is None:
            return None
        return self.metrics.i3d_activations(self.i3d, frames, batch_stats=self.batch_stats)

    def note_once(self, text):
        if text not in self.notes:
            self.notes.append(text)


def mean(values):
    """Mean of finite-or-inf values ignoring nan; nan if none."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


# ----------------------------------------------------------------------------- the run
def evaluate(args, stage):
    """Run the evaluation; returns the results dict also written to results.json."""
    with deterministic():
        return run_evaluation(args, stage)


def run_evaluation(args, stage):
    start_time = time.time()
    videos = list_videos(args)
    flag = f"--{'davis_root' if args.davis_root else 'videos'}"
    lengths = [len(images_in(folder, flag)[:args.max_frames]) for _, folder in videos]
    for name, _ in videos if args.masks else []:  # a missing mask folder stops before any model loads
        images_in(os.path.join(args.masks, name), "--masks", (".png",))
    total = sum(len(window_starts(n, min(args.nframes, n), args.overlap)) for n in lengths)
    device, dtype = pick_device(args.dtype)
    base = load_base_models(args.base_model_name_or_path, args.vae_path)
    pipes = {}
    for name, path in args.weights.items():
        unet, brushnet = load_weights(path, stage, f"--weights {name}")
        # the base models are shared: one copy on the device serves every weight set
        pipes[name] = build_pipeline(stage, unet, brushnet, base, device, dtype)
    scorer = None if args.annotations else Scorer(args, device)
    os.makedirs(args.output_dir, exist_ok=True)
    progress = tqdm(total=total * len(pipes), desc=f"evaluate {stage}", unit="clip")
    per_video, frames_scores, acts = {}, {n: {k: [] for k in METRICS} for n in pipes}, {"gt": []}
    sampling_time, gifs = 0.0, []

    def finish_video(video, frames, holes, results, seconds):  # GIF and scores: CPU work beside the next sampling
        gifs.append(write_gif(args.output_dir, video, frames, holes, results))
        per_video[video] = {"frames": len(frames), "seconds": seconds}
        if scorer:
            per_video[video].update(score_video(scorer, frames, holes, results, frames_scores, acts))
        tqdm.write(f"{video}: {len(frames)} frames, {seconds:.1f} s ({seconds / len(pipes):.1f} s per weight set)")

    pending = None
    with ThreadPoolExecutor(max_workers=1) as worker:  # one worker: videos finish in order, two in memory at most
        for video, folder in videos:
            frames, files = load_frames(folder, args)
            holes = video_holes(args, video, frames, files)
            video_start, results = time.time(), {}
            for name, pipe in pipes.items():
                raw = sample_video(pipe, frames, holes, args.nframes, args.overlap, args.seed, video, args.steps,
                                   on_window=lambda k: progress.update(1), prompt=args.prompt,
                                   guidance_scale=args.guidance_scale)
                results[name] = composite(frames, raw, holes, args.blur)
            seconds = time.time() - video_start
            sampling_time += seconds
            if pending:
                pending.result()  # raises what the previous video's scoring raised
            pending = worker.submit(finish_video, video, frames, holes, results, seconds)
        if pending:
            pending.result()
    progress.close()
    results = summarize(args, stage, device, dtype, per_video, frames_scores, acts, scorer, frames.shape[1:3])
    results["timing"] = dict(total_s=time.time() - start_time, sampling_s=sampling_time, clips_per_weight_set=total,
                             clips_per_s=total * len(pipes) / sampling_time,
                             s_per_video_per_weight_set=sampling_time / len(videos) / len(pipes))
    results["gifs"] = gifs
    write_outputs(args.output_dir, results)
    print_results(results)
    return results


def score_video(scorer, frames, holes, results, frames_scores, acts):
    """Scores of one video per weight set ({name: {metric: mean}}); collects per-frame scores and I3D vectors."""
    out = {}
    gt_act = scorer.activations(frames)
    if gt_act is not None:
        acts["gt"].append(gt_act)
    for name, comp in results.items():
        scores = scorer.frame_scores(frames, comp, holes)
        for k, v in scores.items():
            frames_scores[name][k] += v
        out[name] = {k: mean(v) for k, v in scores.items()}
        if gt_act is not None:
            acts.setdefault(name, []).append(scorer.activations(comp))
    return out


def summarize(args, stage, device, dtype, per_video, frames_scores, acts, scorer, size):
    names = list(args.weights)
    means = {}
    if scorer:
        for name in names:
            means[name] = {k: mean(frames_scores[name][k]) for k in METRICS}
            if acts["gt"]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    means[name]["vfid"] = scorer.metrics.vfid(np.stack(acts["gt"]), np.stack(acts[name]))
                if len(acts["gt"]) < 2:
                    scorer.note_once("VFID is nan: it needs at least 2 videos")
    h, w = size
    mask_source = ("DAVIS annotations, dilated (object removal: no ground truth, no scores)" if args.annotations
                   else f"read from {args.masks}" if args.masks else f"generated, seed {args.mask_seed} per video name")
    settings = dict(stage=stage, weights=args.weights, videos=len(per_video),
                    frames=sum(row["frames"] for row in per_video.values()),
                    size=("native (multiple of 8)" if args.native else f"{w}x{h}"), nframes=args.nframes,
                    overlap=args.overlap, steps=args.steps, guidance_scale=args.guidance_scale, prompt=args.prompt,
                    seed=args.seed, masks=mask_source, composite_blur=args.blur, device=str(device),
                    dtype=str(dtype).replace("torch.", ""))
    return dict(settings=settings, means=means, videos=per_video, notes=scorer.notes if scorer else [])


# ----------------------------------------------------------------------------- outputs
def write_gif(out_dir, video, frames, holes, results):
    """gifs/<video>.gif: masked input | each weight set | ground truth, shrunk to GIF_HEIGHT."""
    strips = make_strips(frames, ~holes, np.concatenate(list(results.values()), axis=2))
    h, w = strips.shape[1:3]
    if h > GIF_HEIGHT:
        size = (round(w * GIF_HEIGHT / h), GIF_HEIGHT)
        strips = np.stack([np.asarray(Image.fromarray(s).resize(size, Image.BILINEAR)) for s in strips])
    return save_gif(os.path.join(out_dir, "gifs", f"{video}.gif"), strips)


def fmt(value, metric):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if metric in ("ssim", "ssim_hole", "lpips") else f"{value:.2f}"


def table_rows(results):
    """Markdown table lines: per video and weight set, then the means."""
    metrics = list(METRICS) + (["vfid"] if any("vfid" in m for m in results["means"].values()) else [])
    lines = ["| video | weights | " + " | ".join(LABELS[m] for m in metrics) + " |",
             "|---|---|" + "---:|" * len(metrics)]
    for video, row in results["videos"].items():
        for name in results["settings"]["weights"]:
            if name in row:
                lines.append(f"| {video} | {name} | " + " | ".join(fmt(row[name].get(m), m) for m in metrics) + " |")
    for name, values in results["means"].items():
        lines.append(f"| **mean** | **{name}** | " + " | ".join(fmt(values.get(m), m) for m in metrics) + " |")
    return lines


def print_results(results):
    t, s = results["timing"], results["settings"]
    print("\n".join(table_rows(results)) if results["means"] else "object removal: no scores (see the GIFs)")
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"{s['videos']} videos, {t['clips_per_weight_set']} clips of {s['nframes']} frames per weight set, "
          f"{len(s['weights'])} weight set(s): {t['clips_per_s']:.3f} clips/s, "
          f"{t['s_per_video_per_weight_set']:.1f} s per video per weight set, total {t['total_s']:.1f} s")


def write_outputs(out_dir, results):
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    s = results["settings"]
    lines = [f"# Evaluation, {s['stage']}", "",
             f"{s['videos']} videos, {s['frames']} frames at {s['size']}, windows of {s['nframes']} frames "
             f"(overlap {s['overlap']}), {s['steps']} steps, masks {s['masks']}, {s['device']} {s['dtype']}.",
             "PSNR/SSIM: whole composited frame vs the clean one (the standard tables' convention); "
             "'hole': inside the hole only. Means over all frames of all videos.", ""]
    lines += table_rows(results) if results["means"] else ["Object removal: no ground truth, no scores."]
    lines += [""] + [f"- {n}" for n in results["notes"]]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if results["means"]:
        bar_chart(os.path.join(out_dir, "means.png"), results["means"])


def bar_chart(path, means, panel=(160, 200)):
    """A PNG bar chart of the means: one panel per metric (own scale), one bar per weight set."""
    from PIL import ImageDraw

    names = list(means)
    metrics = [m for m in list(METRICS) + ["vfid"] if any(math.isfinite(means[n].get(m, math.nan)) for n in names)]
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    pw, ph = panel
    image = Image.new("RGB", (max(1, len(metrics)) * pw, ph + 20 + 14 * len(names)), "white")
    draw = ImageDraw.Draw(image)
    for i, metric in enumerate(metrics):
        values = [means[n].get(metric, math.nan) for n in names]
        finite = [v for v in values if math.isfinite(v)]
        top = max(finite + [1e-12])
        x0, bar = i * pw + 10, (pw - 20) // max(1, len(names))
        draw.text((x0, 4), LABELS[metric], fill="black")
        for j, v in enumerate(values):
            if not math.isfinite(v):
                continue
            height = int((ph - 50) * max(v, 0) / top)
            box = (x0 + j * bar + 2, ph - height, x0 + (j + 1) * bar - 2, ph)
            draw.rectangle(box, fill=colours[j % len(colours)])
            draw.text((box[0], box[1] - 12), fmt(v, metric), fill="black")
    for j, name in enumerate(names):
        draw.rectangle((10, ph + 10 + 14 * j, 20, ph + 20 + 14 * j), fill=colours[j % len(colours)])
        draw.text((26, ph + 8 + 14 * j), name, fill="black")
    image.save(path)
    return path


def main(stage, nframes_default, argv=None, description=None):
    """Entry point of both eval scripts."""
    parser = add_eval_args(argparse.ArgumentParser(description=description), nframes_default)
    args = check_eval_args(parser, parser.parse_args(argv))
    return evaluate(args, stage)
