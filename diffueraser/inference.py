"""Inpaint whole videos with the stage pipelines; shared by evaluation and `run_diffueraser.py`.

A video longer than one clip is sampled in windows of `nframes` frames; consecutive windows overlap
by `overlap` frames (the last window is moved back to end on the last frame) and are blended
linearly across each overlap. Every window draws its own noise from a generator seeded by
(seed, key, window index), so two weight sets see the same noise. With a prior (e.g. ProPainter's
output), each window starts from the prior's latents noised to a step of the schedule instead of
from pure noise. Conventions: frames uint8 (F, H, W, 3); holes bool (F, H, W), True = hole (the
pipelines take kept = 1 - hole).
"""
import argparse
import os
import zlib
from contextlib import contextmanager

import cv2
import numpy as np
import torch

from diffueraser.checkpoints import MODEL_FILES, load_checkpoint_models, resolve_checkpoint
from diffueraser.convert import build_from_config, load_strict, load_unet2d, model_config_dir, run_info


def pick_device(dtype_flag=None):
    """(device, dtype): CUDA in `dtype_flag` (default fp16) when available, else CPU in float32."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if torch.cuda.is_available():
        return torch.device("cuda"), dtypes[dtype_flag or "fp16"]
    return torch.device("cpu"), dtypes[dtype_flag or "fp32"]


@contextmanager
def deterministic():
    """Same numbers on every run inside: deterministic cuDNN / cuBLAS kernels, no TF32 (a little slower
    on GPUs); the previous settings come back afterwards (tests share one process)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when CUDA starts
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def rounded_size(height, width, max_side=None, multiple=8):
    """(H, W) of the same aspect ratio, each a multiple of 8, the long side at most `max_side`."""
    scale = min(1.0, max_side / max(height, width)) if max_side else 1.0
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


# ----------------------------------------------------------------------------- weights
def unet_class_name(folder):
    from libs.unet_2d_condition import UNet2DConditionModel

    return UNet2DConditionModel.load_config(folder).get("_class_name")


def load_weights(path, stage, flag="--weights"):
    """(unet, brushnet) for `stage` ("stage1": 2D UNet, "stage2": motion UNet), float32 on the CPU.

    path: a folder with unet_main/ + brushnet/ (converted, released, or a finished run folder), or a
    training checkpoint (checkpoint-N, a run folder with checkpoints, <run>/latest). A released
    folder's motion UNet gives stage 1 its spatial layers.
    """
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_motion_model import UNetMotionModel

    unet_dir, brushnet_dir = os.path.join(path, "unet_main"), os.path.join(path, "brushnet")
    if os.path.isfile(os.path.join(unet_dir, "config.json")) and os.path.isfile(os.path.join(brushnet_dir,
                                                                                              "config.json")):
        if stage == "stage1":
            return load_unet2d(unet_dir), BrushNetModel.from_pretrained(brushnet_dir)
        if unet_class_name(unet_dir) != "UNetMotionModel":
            raise SystemExit(f"{flag}: {unet_dir} is a 2D UNet (stage 1); stage 2 needs a motion UNet "
                             "(use eval_DiffuEraser_stage1.py for it)")
        return UNetMotionModel.from_pretrained(unet_dir), BrushNetModel.from_pretrained(brushnet_dir)
    return load_checkpoint_weights(path, stage, flag)


def load_checkpoint_weights(path, stage, flag):
    """(unet, brushnet) from an accelerate checkpoint and its run folder's model_config/."""
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel
    from libs.unet_motion_model import UNetMotionModel

    run, leaf = os.path.split(os.path.normpath(path))
    try:
        checkpoint = resolve_checkpoint("latest", run) if leaf == "latest" else resolve_checkpoint(path, ".")
    except ValueError as e:  # e.g. a save that never finished
        raise SystemExit(f"{flag}: {e}") from None
    except FileNotFoundError:
        checkpoint = None
    if checkpoint is None:
        raise SystemExit(f"{flag}: {path} has neither unet_main/ + brushnet/ nor a complete training checkpoint")
    unet_config = model_config_dir(checkpoint, "unet_main")
    if unet_config is None:
        raise SystemExit(f"{flag}: {checkpoint}: its run folder has no model_config/ (convert it with "
                         f"save_checkpoint_{stage}.py first)")
    is_motion = unet_class_name(unet_config) == "UNetMotionModel"
    if is_motion != (stage == "stage2"):
        raise SystemExit(f"{flag}: {checkpoint} is a {'stage-2' if is_motion else 'stage-1'} checkpoint; "
                         f"evaluate it with eval_DiffuEraser_{'stage2' if is_motion else 'stage1'}.py")
    states = load_checkpoint_models(checkpoint)
    unet = load_strict(build_from_config(UNetMotionModel if is_motion else UNet2DConditionModel, unet_config),
                       states[0], f"{checkpoint}/{MODEL_FILES[0]}")
    if len(states) > 1:
        brushnet = load_strict(build_from_config(BrushNetModel, model_config_dir(checkpoint, "brushnet")),
                               states[1], f"{checkpoint}/{MODEL_FILES[1]}")
    else:  # stage 2 trains no BrushNet: the stage-1 folder the run started from holds it
        stage1 = run_info(checkpoint).get("pretrained_stage1")
        if not stage1:
            raise SystemExit(f"{flag}: {checkpoint} holds no BrushNet and its run_info.json names no stage-1 folder")
        brushnet = BrushNetModel.from_pretrained(os.path.join(stage1, "brushnet"))
    return unet, brushnet


def load_base_models(base_model, vae_path=None):
    """(vae, text_encoder, tokenizer, scheduler) from an SD1.5 folder, as training loads them."""
    from diffueraser.trainer import load_frozen_models

    args = argparse.Namespace(base_model_name_or_path=base_model, vae_path=vae_path, tokenizer_name=None,
                              revision=None, variant=None)
    tokenizer, text_encoder, vae, scheduler = load_frozen_models(args)
    return vae, text_encoder, tokenizer, scheduler


def build_pipeline(stage, unet, brushnet, base, device, dtype):
    """The stage's pipeline with every model on `device` in `dtype`, in eval mode, no progress bar."""
    from diffueraser.pipeline_diffueraser_stage1 import DiffuEraserPipelineStage1
    from diffueraser.pipeline_diffueraser_stage2 import DiffuEraserPipelineStage2

    vae, text_encoder, tokenizer, scheduler = base
    for m in (unet, brushnet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
        if m.dtype != dtype:  # (diffusers warns on every dtype cast, even a no-op one)
            m.to(dtype)
    cls = DiffuEraserPipelineStage2 if stage == "stage2" else DiffuEraserPipelineStage1
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, brushnet=brushnet,
               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- windows
def window_starts(num_frames, nframes, overlap=0):
    """First frame of each window of `nframes` covering 0..num_frames-1, consecutive ones sharing at
    least `overlap` frames; the last window ends on the last frame. One window if the video is short."""
    if num_frames <= nframes:
        return [0]
    if not 0 <= overlap < nframes:
        raise ValueError(f"overlap {overlap} must be in [0, nframes={nframes})")
    starts = list(range(0, num_frames - nframes + 1, nframes - overlap))
    if starts[-1] + nframes < num_frames:
        starts.append(num_frames - nframes)
    return starts


def window_weights(starts, length):
    """Per-window blending weights (length,) float32 that sum to 1 on every frame: consecutive windows
    cross-fade linearly over the frames they share, and a frame three windows cover (where the last,
    moved-back window reaches into an earlier cross-fade) is left to that earlier pair."""
    ends = [s + length for s in starts]
    weights = []
    for k, start in enumerate(starts):
        w = np.ones(length, np.float32)
        if k > 0:  # fade in over [lo, hi) shared with window k-1; nothing before lo
            lo, hi = max(start, ends[k - 2] if k > 1 else 0), ends[k - 1]
            w[:lo - start] = 0
            w[lo - start:hi - start] = np.arange(1, hi - lo + 1) / (hi - lo + 1)
        if k + 1 < len(starts):  # fade out over the range window k+1 fades in
            lo, hi = max(starts[k + 1], ends[k - 1] if k > 0 else 0), ends[k]
            w[lo - start:] = np.arange(hi - lo, 0, -1) / (hi - lo + 1)
        weights.append(w)
    return weights


def window_seed(seed, key, index):
    """A seed fixed by (seed, key, window index), the same on every machine and for every weight set."""
    return zlib.crc32(f"{seed}:{key}:{index}".encode())


def start_step(num_inference_steps, strength):
    """Schedule index a prior starts from: strength 1 = the first step (pure noise), 0.5 = half-way."""
    if not 0 < strength <= 1:
        raise ValueError(f"prior strength {strength} must be in (0, 1]")
    return min(num_inference_steps - 1, int(round(num_inference_steps * (1 - strength))))


def sample_video(pipe, frames, holes, nframes, overlap=0, seed=0, key="", num_inference_steps=20, prior=None,
                 prior_strength=0.5, on_window=None, **pipeline_kwargs):
    """Inpaint a whole video in windows; returns uint8 (N, H, W, 3) (not composited).

    frames, prior: uint8 (N, H, W, 3); holes: bool (N, H, W). on_window(k) is called after each window.
    """
    n, length = len(frames), min(nframes, len(frames))
    starts = window_starts(n, length, overlap)
    kept = (~np.asarray(holes, bool)).astype(np.float32)
    total = np.zeros(frames.shape, np.float32)
    weight_sum = np.zeros((n, 1, 1, 1), np.float32)
    for k, (start, w) in enumerate(zip(starts, window_weights(starts, length))):
        part = slice(start, start + length)
        extra = {}
        if prior is not None:
            pixels = torch.from_numpy(prior[part].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
            extra = dict(init_latents=pipe.encode_pixels(pixels, pipeline_kwargs.get("decode_chunk_size", 8)),
                         start_step=start_step(num_inference_steps, prior_strength))
        generator = torch.Generator().manual_seed(window_seed(seed, key, k))
        result = pipe(frames[part], kept[part], num_inference_steps=num_inference_steps, generator=generator,
                      **pipeline_kwargs, **extra)
        total[part] += result.astype(np.float32) * w[:, None, None, None]
        weight_sum[part] += w[:, None, None, None]
        if on_window:
            on_window(k)
    return np.clip(np.round(total / weight_sum), 0, 255).astype(np.uint8)


def composite(original, result, holes, blur=21):
    """The result pasted into the original frames: alpha = max(hole, Gaussian blur of the hole).

    The hole itself is all result (its soft edge falls outside it, where the original frame is
    trusted), so no original pixel of the hole leaks through. blur: odd kernel size, 0 = hard edge.
    original, result: uint8 (N, H, W, 3); holes: bool (N, H, W).
    """
    hole = np.asarray(holes, np.float32)
    if blur:
        soft = np.stack([cv2.GaussianBlur(h, (blur, blur), 0) for h in hole])
        hole = np.maximum(hole, soft)
    alpha = hole[..., None]
    out = original.astype(np.float32) * (1 - alpha) + result.astype(np.float32) * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def dilate_holes(holes, iterations):
    """Holes grown by a 3x3 square kernel `iterations` times (as validation dilates annotations)."""
    if iterations <= 0:
        return np.asarray(holes, bool)
    kernel = np.ones((3, 3), np.uint8)
    return np.stack([cv2.dilate(h.astype(np.uint8), kernel, iterations=iterations) for h in holes]).astype(bool)
