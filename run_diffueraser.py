"""Inpaint a video with DiffuEraser weights: remove what a mask covers, write an mp4.

    python run_diffueraser.py --video in.mp4 --mask mask.mp4 --weights converted_weights/diffuEraser-model-stage2 \
        --base_model_name_or_path weights/stable-diffusion-v1-5 --vae_path weights/sd-vae-ft-mse --output out.mp4

Masks are white = hole (the DAVIS / ProPainter convention). The model runs at the video's aspect
ratio rounded to a multiple of 8 (long side at most --max_side) on windows of --nframes frames,
blended across --overlap frames; its result is pasted back into the original frames through a
blurred edge of the dilated mask, so everything outside the mask stays as it was. See train.md,
"Use the weights".
"""
import argparse
import os
import time

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffueraser.inference import (build_pipeline, composite, dilate_holes, load_base_models, load_weights,
                                   deterministic, pick_device, rounded_size, sample_video,
                                   unet_class_name, window_starts)
from diffueraser.validation import list_images


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", required=True, help="Input video: an .mp4 (any format OpenCV reads) or a frame folder.")
    p.add_argument("--mask", required=True,
                   help="Mask: an .mp4, a frame folder (one mask per frame) or one image for every frame; "
                        "white = hole, black = kept, as DAVIS annotations and ProPainter masks (PNG: any non-zero "
                        "pixel is hole; mp4/JPEG: above 127).")
    p.add_argument("--weights", required=True,
                   help="unet_main/ + brushnet/ folder: converted (stage 1 or 2) or the released DiffuEraser one.")
    p.add_argument("--base_model_name_or_path", required=True, help="Stable Diffusion 1.5 folder.")
    p.add_argument("--vae_path", default=None, help="VAE folder (sd-vae-ft-mse). Default: the base model's vae/.")
    p.add_argument("--output", default="diffueraser_result.mp4", help="Output .mp4 (mp4v codec).")
    p.add_argument("--save_frames", default=None, metavar="DIR", help="Also write every frame as DIR/%%05d.png.")
    p.add_argument("--prior", default=None, metavar="DIR",
                   help="Prior frames (a folder or .mp4, e.g. ProPainter's result): each window starts from their "
                        "latents noised part-way instead of from pure noise.")
    p.add_argument("--prior_strength", type=float, default=0.5,
                   help="With --prior: how much noise (1 = from pure noise, 0.5 = half the schedule).")
    p.add_argument("--prior_steps", type=int, default=None,
                   help="With --prior: denoising steps to run from the prior (overrides --prior_strength).")
    p.add_argument("--dilate", type=int, default=4, help="3x3 dilations of the mask (covers object borders).")
    p.add_argument("--blur", type=int, default=21,
                   help="Gaussian kernel of the pasted result's soft edge (odd; 0 = hard).")
    p.add_argument("--height", type=int, default=None, help="Model height (multiple of 8). Default: from the video.")
    p.add_argument("--width", type=int, default=None, help="Model width (multiple of 8). Default: from the video.")
    p.add_argument("--max_side", type=int, default=960, help="Long side the video is scaled down to, at most.")
    p.add_argument("--nframes", type=int, default=None, help="Frames per window (default 22 for stage-2 weights, 10 "
                                                              "for stage-1).")
    p.add_argument("--overlap", type=int, default=4, help="Frames shared by consecutive windows, blended linearly.")
    p.add_argument("--steps", type=int, default=20, help="Denoising steps (UniPC).")
    p.add_argument("--guidance_scale", type=float, default=0.0, help="Classifier-free guidance (0 = off).")
    p.add_argument("--prompt", default="clean background", help="Caption (the training one).")
    p.add_argument("--seed", type=int, default=0, help="Noise seed.")
    p.add_argument("--fps", type=float, default=None, help="Output frame rate (default: the input mp4's, else 24).")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                   help="Model dtype (default fp16 on CUDA, fp32 on the CPU).")
    return p


def read_frames(path, flag):
    """uint8 RGB frames (N, H, W, 3) and the frame rate (None for a folder) of an .mp4 or a frame folder."""
    if os.path.isdir(path):
        files = list_images(path)
        frames = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        fps = None
    elif os.path.isfile(path) and not path.lower().endswith((".png", ".jpg", ".jpeg")):
        cap = cv2.VideoCapture(path)
        fps, frames = cap.get(cv2.CAP_PROP_FPS) or None, []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        cap.release()
    elif os.path.isfile(path):
        frames, fps = [np.asarray(Image.open(path).convert("RGB"))], None
    else:
        raise SystemExit(f"{flag}: {path} does not exist")
    if not frames:
        raise SystemExit(f"{flag}: no frames could be read from {path}")
    if len({f.shape for f in frames}) > 1:
        raise SystemExit(f"{flag}: frames of {path} differ in size")
    return np.stack(frames), fps


def read_holes(path, count, size):
    """bool (N, H, W) holes from --mask (PNGs: any non-zero pixel, as DAVIS palettes; mp4 / JPEG: above
    127); one image serves every frame.
    Refuses a count or size that does not match the video."""
    masks, _ = read_frames(path, "--mask")
    image = os.path.isfile(path) and path.lower().endswith((".png", ".jpg", ".jpeg"))
    files = list_images(path) if os.path.isdir(path) else [path]
    lossless = all(f.lower().endswith(".png") for f in files)
    holes = masks.max(axis=-1) > (0 if lossless else 127)  # black in an mp4 or a JPEG is not exactly 0
    if len(holes) == 1 and image:
        holes = np.repeat(holes, count, axis=0)
    if len(holes) != count:
        raise SystemExit(f"--mask: {path} has {len(holes)} frames, --video has {count}")
    if holes.shape[1:] != size:
        raise SystemExit(f"--mask: {path} is {holes.shape[2]}x{holes.shape[1]}, --video is {size[1]}x{size[0]}")
    return holes


def resize_all(frames, size, interpolation):
    h, w = size
    return np.stack([cv2.resize(f, (w, h), interpolation=interpolation) for f in frames])


def write_outputs(args, frames, fps):
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(args.output, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise SystemExit(f"--output: cannot write {args.output} (OpenCV's mp4v writer failed)")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    if args.save_frames:
        os.makedirs(args.save_frames, exist_ok=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(os.path.join(args.save_frames, f"{i:05d}.png"))


def work_size(args, height, width):
    if args.height or args.width:
        h, w = args.height or height, args.width or width
        if h % 8 or w % 8:
            raise SystemExit(f"--height/--width: {h}x{w} must be multiples of 8")
        return h, w
    return rounded_size(height, width, args.max_side)


def inpaint(args):
    """Read, inpaint in windows at the model size, paste back into the original frames, write."""
    started = time.time()
    frames, fps = read_frames(args.video, "--video")
    n, size = len(frames), frames.shape[1:3]
    holes = dilate_holes(read_holes(args.mask, n, size), args.dilate)
    prior = None
    if args.prior:
        prior, _ = read_frames(args.prior, "--prior")
        if prior.shape != frames.shape:
            raise SystemExit(f"--prior: {args.prior} has {len(prior)} frames of {prior.shape[2]}x{prior.shape[1]}, "
                             f"--video {n} of {size[1]}x{size[0]}")
    for sub in ("unet_main", "brushnet"):
        if not os.path.isfile(os.path.join(args.weights, sub, "config.json")):
            raise SystemExit(f"--weights: {args.weights} has no {sub}/config.json")
    stage = "stage2" if unet_class_name(os.path.join(args.weights, "unet_main")) == "UNetMotionModel" else "stage1"
    nframes = args.nframes or (22 if stage == "stage2" else 10)
    if not 0 <= args.overlap < nframes:
        raise SystemExit(f"--overlap: {args.overlap} must be in [0, --nframes {nframes})")
    strength = args.prior_strength if args.prior_steps is None else args.prior_steps / args.steps
    if prior is not None and not 0 < strength <= 1:
        raise SystemExit(f"--prior_strength/--prior_steps: {strength:g} of --steps {args.steps} is not in (0, 1]")
    device, dtype = pick_device(args.dtype)
    unet, brushnet = load_weights(args.weights, stage)
    pipe = build_pipeline(stage, unet, brushnet, load_base_models(args.base_model_name_or_path, args.vae_path),
                          device, dtype)
    h, w = work_size(args, *size)
    small = resize_all(frames, (h, w), cv2.INTER_AREA)
    # any pixel the hole touches after the resize is hole: nothing of the object stays in view
    small_holes = resize_all(holes.astype(np.uint8) * 255, (h, w), cv2.INTER_LINEAR) > 0
    small_prior = None if prior is None else resize_all(prior, (h, w), cv2.INTER_AREA)
    windows = len(window_starts(n, min(nframes, n), args.overlap))
    with deterministic(), tqdm(total=windows, desc=f"inpaint ({stage}, {w}x{h})", unit="clip") as progress:
        result = sample_video(pipe, small, small_holes, nframes, args.overlap, args.seed, "", args.steps,
                              prior=small_prior, prior_strength=strength, on_window=lambda k: progress.update(1),
                              prompt=args.prompt, guidance_scale=args.guidance_scale)
    result = resize_all(result, size, cv2.INTER_CUBIC)
    out = composite(frames, result, holes, args.blur)
    write_outputs(args, out, args.fps or fps or 24)
    print(f"{n} frames ({size[1]}x{size[0]}, model at {w}x{h}, {windows} windows) -> {args.output} "
          f"in {time.time() - started:.1f} s")
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.blur and args.blur % 2 == 0:
        raise SystemExit(f"--blur: {args.blur} must be odd (or 0)")
    return inpaint(args)


if __name__ == "__main__":
    main()
