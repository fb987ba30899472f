"""Validation during training: load DAVIS-style clips, inpaint them, save GIFs, log to trackers.

Conventions: frames uint8 (F, R, R, 3); masks float32 (F, R, R) with hole = 0, kept = 1.
A GIF frame is [masked input | result | ground truth] side by side, the hole shown in grey.
"""
import ast
import contextlib
import gc
import os
import warnings

import cv2
import numpy as np
import psutil
import torch
from accelerate.logging import get_logger
from PIL import Image

logger = get_logger("diffueraser")
FRAME_EXTS = (".jpg", ".jpeg", ".png")
LOGGED_FRAMES = 4  # strips sent to the trackers per clip; the GIF on disk has every frame


def parse_path_list(value):
    """Paths as list[str] from "['a/bear', 'b/boat']" (the original scripts' form), a plain path or a list."""
    if isinstance(value, (list, tuple)):
        paths = list(value)
    elif isinstance(value, str) and value.strip().startswith("["):
        try:
            paths = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"not a Python list of paths: {value!r}") from err
    elif isinstance(value, str):
        paths = [value] if value.strip() else []
    else:
        raise TypeError(f"expected a path, a list of paths or a list literal, got {type(value).__name__}")
    if not all(isinstance(p, str) for p in paths):
        raise ValueError(f"every path must be a string: {value!r}")
    return [str(p) for p in paths]


def list_images(path, exts=FRAME_EXTS):
    """Sorted image files in folder `path` (or [path] for a file); FileNotFoundError naming it if none."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(exts))
    if not files:
        raise FileNotFoundError(f"no {'/'.join(exts)} images in {path}")
    return files


def read_hole(path, size, dilate):
    """Boolean hole (H, W) from a DAVIS annotation: any non-zero label (palette index) is hole.

    The hole is resized (nearest) to size=(W, H) when needed, then dilated with a 3x3 square kernel
    `dilate` times, as inference dilates masks to cover object borders.
    """
    mask = Image.open(path)
    if mask.mode not in ("P", "L"):  # RGB(A) annotations: any non-black pixel is hole
        mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.NEAREST)
    hole = (np.asarray(mask) > 0).astype(np.uint8)
    if dilate > 0:
        hole = cv2.dilate(hole, np.ones((3, 3), np.uint8), iterations=dilate)
    return hole.astype(bool)


def resize_center_crop(image, resolution, resample):
    """Resize a PIL image so its short side is `resolution`, then centre-crop a square of that side."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_validation_clip(image_dir, mask_dir, num_frames, resolution, dilate=4):
    """Load the first `num_frames` frames of a clip and their masks, resized and centre-cropped.

    image_dir: folder of .jpg/.png frames (sorted by name). mask_dir: folder of annotation PNGs
    matched to frames by sorted position (the last mask repeats when there are fewer; one PNG serves
    every frame), or a single PNG. Fewer frames than num_frames: all that exist.
    dilate: 3x3 dilation iterations on the hole, at the original resolution (0 = none).
    Returns frames uint8 (F, R, R, 3) and masks float32 (F, R, R), hole = 0, kept = 1.
    """
    frame_files = list_images(image_dir)[:max(1, num_frames)]
    mask_files = list_images(mask_dir, exts=(".png",))
    frames, masks = [], []
    for i, frame_file in enumerate(frame_files):
        frame = Image.open(frame_file).convert("RGB")
        hole = read_hole(mask_files[min(i, len(mask_files) - 1)], frame.size, dilate)
        kept = Image.fromarray(np.where(hole, 0, 255).astype(np.uint8))
        frames.append(np.asarray(resize_center_crop(frame, resolution, Image.BILINEAR)))
        masks.append(np.asarray(resize_center_crop(kept, resolution, Image.NEAREST)) / 255.0)
    return np.stack(frames).astype(np.uint8), np.stack(masks).astype(np.float32)


def make_strips(frames, masks, result):
    """Per-frame [masked input | result | ground truth] images: uint8 (F, H, 3W, 3), hole in grey."""
    kept = (np.asarray(masks, np.float32) > 0.5)[..., None]
    masked = np.where(kept, frames, 128).astype(np.uint8)
    return np.concatenate([masked, result, frames], axis=2)


def save_gif(path, frames_rows, duration=100):
    """Write uint8 images (F, H, W, 3) as a GIF looping forever, `duration` ms a frame; returns path.

    PIL merges identical consecutive frames into one longer frame.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    images = [Image.fromarray(np.asarray(row, np.uint8)) for row in frames_rows]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    return path


def log_to_trackers(trackers, name, strips, step):
    """Send the first LOGGED_FRAMES strips to the trackers that log images (tensorboard, wandb, ...)
    through their own log_images; failures only warn."""
    images = np.stack(strips[:LOGGED_FRAMES])  # (N, R, 3R, 3) uint8
    for tracker in trackers or []:
        if not hasattr(tracker, "log_images"):
            continue
        try:  # tensorboard's add_images expects NCHW unless told
            kwargs = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({f"validation/{name}": images}, step=step, **kwargs)
        except Exception as err:  # logging must never stop training
            warnings.warn(f"validation: logging {name} to {tracker.name} failed: {err!r}")


def run_validation(pipeline, clips, out_dir, step, seed, trackers=None, num_inference_steps=20, **pipeline_kwargs):
    """Inpaint each clip, write out_dir/sample-<step>/<name>.gif and log it; returns [(name, gif_path, strips)].

    clips: dicts with "name", "frames" uint8 (F, R, R, 3), "masks" (F, R, R), hole = 0, and optionally
    "prompt". Each clip uses its own torch.Generator seeded with `seed` (the global RNG is untouched),
    so a clip looks the same at every step but for what training changed. UNet and BrushNet run in
    eval mode and get their modes back. pipeline_kwargs go to the pipeline (prompt, guidance_scale,
    conditioning_scale, ...). strips: uint8 (F, R, 3R, 3).
    """
    if not clips:
        raise ValueError("run_validation: no validation clips")
    for i, clip in enumerate(clips):
        missing = {"name", "frames", "masks"} - set(clip)
        if missing:
            raise KeyError(f"run_validation: clip {i} lacks {sorted(missing)}")
    pipeline.set_progress_bar_config(disable=True)  # training owns the one progress bar
    modes = [(m, m.training) for m in (pipeline.unet, pipeline.brushnet)]
    try:
        for m, _ in modes:
            m.eval()
        return [validate_clip(pipeline, clip, out_dir, step, seed, trackers, num_inference_steps, pipeline_kwargs)
                for clip in clips]
    finally:
        for m, was_training in modes:
            m.train(was_training)


def validate_clip(pipeline, clip, out_dir, step, seed, trackers, num_inference_steps, pipeline_kwargs):
    """run_validation for one clip; returns (name, gif_path, strips)."""
    name = str(clip["name"]).replace(os.sep, "_")
    if "prompt" in clip:
        pipeline_kwargs = dict(pipeline_kwargs, prompt=clip["prompt"])
    generator = torch.Generator().manual_seed(seed)
    result = pipeline(clip["frames"], clip["masks"], num_inference_steps=num_inference_steps,
                      generator=generator, **pipeline_kwargs)
    strips = make_strips(clip["frames"], clip["masks"], result)
    gif_path = save_gif(os.path.join(out_dir, f"sample-{step}", f"{name}.gif"), strips)
    log_to_trackers(trackers, name, strips, step)
    return name, gif_path, strips


class Validator:
    """Runs the stage's sampler on the validation clips and writes GIFs; never stops training."""

    def __init__(self, args, stage, optimizer=None):
        self.args, self.stage, self.optimizer, self.clips, self.free_memory = args, stage, optimizer, [], None
        images = parse_path_list(args.validation_image) if args.validation_image else []
        masks = parse_path_list(args.validation_mask) if args.validation_mask else []
        if len(images) != len(masks):
            logger.warning(f"--validation_image has {len(images)} entries, --validation_mask {len(masks)}: "
                           "validation is off")
            return
        for image_dir, mask_dir in zip(images, masks):
            try:
                frames, hole_masks = load_validation_clip(image_dir, mask_dir, args.num_validation_frames,
                                                          args.resolution)
                self.clips.append(dict(name=os.path.basename(os.path.normpath(image_dir)),
                                       frames=frames, masks=hole_masks))
            except Exception as e:  # a bad path costs the preview, not the run
                logger.warning(f"validation clip {image_dir}: {e}; skipped")

    def __call__(self, accelerator, models, step):
        """Validate; out of GPU memory, try once more with the optimizer's state in host memory and what
        `free_memory` frees (the trainer sets it: the CUDA graph's pool) freed. True when the GIFs were written."""
        error = self.run(accelerator, models, step)
        if isinstance(error, torch.cuda.OutOfMemoryError):
            error = None  # drop the failed attempt before the next one
            graph = " and the CUDA graph's pool freed (captured again at the next step)" if self.free_memory else ""
            logger.warning(f"validation at step {step} ran out of GPU memory: trying once more with the optimizer's "
                           f"state in host memory meanwhile{graph}")
            with optimizer_state_in_host_memory(self.optimizer):
                (self.free_memory or free_cached_memory)()
                error = self.run(accelerator, models, step)
        if error is not None:
            logger.error(f"validation at step {step} failed: {type(error).__name__}: {error}; training goes on")
        return error is None

    def run(self, accelerator, models, step):
        """One validation; the exception it raised, or None."""
        if not self.clips or self.stage.pipeline_cls is None:
            return None
        unet, brushnet, vae, text_encoder, tokenizer, scheduler = models
        unet, brushnet = accelerator.unwrap_model(unet), accelerator.unwrap_model(brushnet)
        modes = [(m, m.training) for m in (unet, brushnet)]
        try:
            pipe = self.stage.pipeline_cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           brushnet=brushnet, scheduler=scheduler)
            prompts = _prompts(self.args.validation_prompt, len(self.clips))
            clips = [dict(c, prompt=p) for c, p in zip(self.clips, prompts)]
            out_dir = os.path.join(self.args.output_dir, self.args.logging_dir, "samples")
            # Eager, also in a compiled run: compiling the sampler's eval-mode shapes would add minutes to
            # every start for seconds saved per validation.
            with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
                run_validation(pipe, clips, out_dir, step, seed=self.args.seed or 0, trackers=accelerator.trackers,
                               num_inference_steps=self.args.validation_inference_steps,
                               decode_chunk_size=self.args.vae_batch_size or 8)  # --vae_batch_size: also here
            return None
        except Exception as e:
            e.__traceback__ = None  # let the failed attempt's tensors go
            return e
        finally:
            for m, was_training in modes:
                m.train(was_training)


@contextlib.contextmanager
def optimizer_state_in_host_memory(optimizer, device_type="cuda", free=None):
    """Meanwhile, the optimizer's state on `device_type` (Adam's moments: 14 GB for stage 1's fp32
    AdamW, 3.5 GB in 8 bits) waits in host memory and its GPU memory is free. Every state tensor
    stays the same object and gets its values back, so a fused or compiled optimizer step goes on as
    before; only the addresses change (the trainer's CUDA graph holds the forward and backward alone).
    Storages shared between parameters' states (bitsandbytes' quantisation maps) move once; none that
    a parameter or gradient uses moves; with less host memory free than the state and 2 GB, nothing
    moves. A state that cannot come back to the GPU ends the run with a RuntimeError: it cannot go on
    without it (its checkpoints are whole). `free` (default: the cached blocks) makes room when a
    tensor does not fit on its way back, before its second try."""
    inner = getattr(optimizer, "optimizer", optimizer)
    storages, used = {}, set()
    for group in getattr(inner, "param_groups", ()):
        for p in group["params"]:
            used.update(t.untyped_storage().data_ptr() for t in (p, p.grad) if t is not None)
    for state in (getattr(inner, "state", None) or {}).values():
        for t in (state.values() if isinstance(state, dict) else ()):
            if torch.is_tensor(t) and t.device.type == device_type and t.untyped_storage().nbytes():
                storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
    storages = [s for ptr, s in storages.items() if ptr not in used]
    total = sum(s.nbytes() for s in storages)
    if total and total + 2 * 2**30 > psutil.virtual_memory().available:  # a host out of memory kills the process
        warnings.warn(f"{total / 1e9:.1f} GB of optimizer state stays on the GPU (host memory short)")
        storages = []
    parked = []
    try:
        for storage in storages:
            try:
                host = _bytes_of(storage).to("cpu", copy=True)
                storage.resize_(0)
            except RuntimeError:  # a storage that cannot be resized: it stays
                continue
            parked.append((storage, host))
        yield len(parked)
    finally:
        _restore(parked, free or free_cached_memory)


def _restore(parked, free):
    free_cached_memory()  # what validation held goes back first
    lost = 0
    for storage, host in parked:
        for attempt in (1, 2):
            try:
                storage.resize_(host.numel())
                _bytes_of(storage).copy_(host)
                break
            except torch.cuda.OutOfMemoryError:
                lost += attempt == 2
                free()
    if lost:
        raise RuntimeError(f"{lost} of the optimizer's state tensors could not return to the GPU (out of memory); "
                           "the run cannot go on without them: resume from its last checkpoint "
                           "(--resume_from_checkpoint latest), perhaps with a larger --validation_steps")


def _bytes_of(storage):
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def free_cached_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prompts(spec, n):
    prompts = parse_path_list(spec) if spec else []
    return (prompts + [prompts[-1] if prompts else "clean background"] * n)[:n]
