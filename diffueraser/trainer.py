"""The training core shared by both DiffuEraser stages, in reading order: setup, the step, the
loop, checkpoints and the final save.

A stage script only says what differs (which models, which of their parameters train, which
pipeline validates) through a `Stage`; everything else lives here or in the modules the loop
calls: data.py (the loader), checkpoints.py (saving and resuming), validation.py, and speed.py
(compile, CUDA graph, the folded clip: nothing there changes what a step computes). Trained/frozen
is decided from `requires_grad`, never from the stage name.
"""
import datetime
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from dataset.latent_cache import sample_latents
from diffueraser import speed
from diffueraser.checkpoints import data_position, frozen_fingerprints, resume, save_checkpoint, warn_if_low_disk
from diffueraser.data import make_dataloader, scan_data, start_epoch, use_latent_cache
from diffueraser.stopping import StopRequest
from diffueraser.validation import Validator, free_cached_memory

logger = get_logger("diffueraser")
START = time.time()  # when the process imported the trainer: "first step after N s" counts from here

@dataclass
class Stage:
    """What a training stage is made of.

    build_models(args) -> (unet, brushnet) with `requires_grad` already set on what trains.
    pipeline_cls: the validation sampler, called with vae=, text_encoder=, tokenizer=, unet=, brushnet=, scheduler=.
    frozen_sources(args) -> {"brushnet": folder}: where a frozen model was loaded from; the final
    folder is a copy of it (the model itself runs in half precision).
    """
    name: str
    build_models: Callable
    pipeline_cls: Callable = None
    frozen_sources: Callable = None


# ----------------------------------------------------------------------------- setup
def make_accelerator(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        # every process shuffles with --seed alone (not seed + rank), so their shards of one order never overlap
        log_with=report_to, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # validation and checkpoint writes run on the main process while the others wait
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))],
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if args.seed is not None:
        set_seed(args.seed + accelerator.process_index)
    speed.configure_cuda(args, accelerator)
    return accelerator

def load_frozen_models(args):
    """Tokenizer, text encoder, VAE and the training noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    base = args.base_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name or os.path.join(base, "tokenizer"),
                                              revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=args.revision,
                                                 variant=args.variant)
    vae_root = args.vae_path or base  # the VAE folder itself or a folder with vae/ in it
    vae_dir = next((d for d in (vae_root, os.path.join(vae_root, "vae")) if os.path.isfile(f"{d}/config.json")), None)
    if vae_dir is None:
        raise FileNotFoundError(f"--vae_path: {vae_root} has no config.json (nor vae/config.json)")
    vae = AutoencoderKL.from_pretrained(vae_dir, revision=args.revision)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for m in (text_encoder, vae):
        m.requires_grad_(False).eval()
    return tokenizer, text_encoder, vae, noise_scheduler

def is_trained(model):
    return any(p.requires_grad for p in model.parameters())

class TextEmbedder:
    """Text encoder outputs cached per distinct caption (the caption is constant or empty, so
    after the first step this costs nothing)."""

    def __init__(self, text_encoder):
        self.text_encoder, self.cache = text_encoder, {}

    @torch.no_grad()
    def __call__(self, input_ids):  # (B, 77) -> (B, 77, D)
        rows = []
        for ids in input_ids:
            key = tuple(ids.tolist())
            if key not in self.cache:
                self.cache[key] = self.text_encoder(ids[None].to(self.text_encoder.device))[0][0]
            rows.append(self.cache[key])
        return torch.stack(rows)

def weight_dtype_of(accelerator):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

def place_frozen_encoders(args, vae, text_encoder, device, dtype):
    """VAE and text encoder on the device in the mixed-precision dtype (they never train)."""
    vae.to(device, dtype=dtype)
    text_encoder.to(device, dtype=dtype)
    if args.compile:
        speed.compile_vae_encoder(args, vae)

def configure_models(args, unet, brushnet):
    """Speed switches (speed.configure_speed), gradient checkpointing and train/eval mode."""
    speed.configure_speed(args, unet, brushnet)
    for m in (unet, brushnet):
        if is_trained(m):
            if args.gradient_checkpointing:
                m.enable_gradient_checkpointing()
            m.train()
        else:
            m.eval()

def make_optimizer(args, params, accelerator):
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise SystemExit("--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes)") from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    fused = bool(args.fused_adam) and accelerator.device.type == "cuda"
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)

def prepare(accelerator, args, stage, tokenizer, scan=None):
    """Models, optimizer, data and LR schedule, with only the trained nets handed to accelerate."""
    from diffusers.optimization import get_scheduler

    unet, brushnet = stage.build_models(args)
    configure_models(args, unet, brushnet)
    if accelerator.is_main_process:
        save_run_info(args, unet, brushnet)
    trained = [m for m in (unet, brushnet) if is_trained(m)]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, params, accelerator)
    dataloader = make_dataloader(args, tokenizer, scan)
    weight_dtype = weight_dtype_of(accelerator)
    for m in (unet, brushnet):  # frozen nets: half precision, no gradients, never wrapped
        if not is_trained(m):
            m.to(accelerator.device, dtype=weight_dtype)
    *trained, optimizer, dataloader = accelerator.prepare(*trained, optimizer, dataloader)
    unet, brushnet = [trained.pop(0) if is_trained(m) else m for m in (unet, brushnet)]
    if len(dataloader) == 0:
        raise SystemExit(f"the dataset has {len(dataloader.dataset)} clips, fewer than --train_batch_size "
                         f"{args.train_batch_size} x {accelerator.num_processes} process(es)")
    # Epochs are counted after prepare() split the data between processes.
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles,
        power=args.lr_power))
    if args.compile:
        speed.compile_models(args, unet, brushnet)
    return unet, brushnet, optimizer, dataloader, lr_scheduler, steps_per_epoch, params


# ----------------------------------------------------------------------------- the step
@torch.no_grad()
def encode_latents(vae, pixel_values, conditioning_pixel_values, chunk=0, moments=None):
    """VAE latents of frames and masked frames in one pass; with `moments` (B, F, 8, h, w) from the
    --latent_cache, the frames' latents are drawn from them and only the masked frames are encoded.

    pixel_values, conditioning_pixel_values: (B, F, 3, H, W) in [-1, 1].
    Returns two (B*F, 4, H/8, W/8) tensors, scaled by the VAE's scaling factor.
    """
    b, f = conditioning_pixel_values.shape[:2]
    frames = [conditioning_pixel_values] if moments is not None else [pixel_values, conditioning_pixel_values]
    x = torch.cat(frames).flatten(0, 1).to(vae.device, vae.dtype)
    chunks = x.split(chunk) if chunk else (x,)
    latents = torch.cat([vae.encode(c).latent_dist.sample() for c in chunks]) * vae.config.scaling_factor
    if moments is not None:
        return sample_latents(moments.flatten(0, 1).to(vae.device), vae.config.scaling_factor, vae.dtype), latents
    return latents[: b * f], latents[b * f:]

def diffusion_inputs(noise_scheduler, latents, conditioning_latents, masks, noise, timesteps, num_frames):
    """Noisy latents, per-frame timesteps and the 5-channel BrushNet condition.

    latents, conditioning_latents, noise: (B*F, 4, h, w); masks: (B*F, 1, H, W), hole = 0, kept = 1;
    timesteps: (B,), one per clip, shared by its frames.
    """
    latent_masks = F.interpolate(masks.to(latents.dtype), size=latents.shape[-2:])  # (B*F, 1, h, w)
    brushnet_cond = torch.cat([conditioning_latents, latent_masks], dim=1)  # (B*F, 5, h, w)
    frame_timesteps = timesteps.repeat_interleave(num_frames)  # (B*F,)
    noisy_latents = noise_scheduler.add_noise(latents, noise, frame_timesteps)
    return noisy_latents, frame_timesteps, brushnet_cond

def denoise(unet, brushnet, noisy_latents, frame_timesteps, encoder_hidden_states, brushnet_cond, num_frames):
    """BrushNet residuals into the UNet; both UNet kinds take the same call. Returns (B*F, 4, h, w)."""
    frozen = not is_trained(brushnet)
    with torch.no_grad() if frozen else torch.enable_grad():
        down, mid, up = brushnet(noisy_latents, frame_timesteps, encoder_hidden_states=encoder_hidden_states,
                                 brushnet_cond=brushnet_cond, return_dict=False)
    return unet(noisy_latents, frame_timesteps, encoder_hidden_states=encoder_hidden_states,
                down_block_add_samples=down, mid_block_add_sample=mid, up_block_add_samples=up,
                num_frames=num_frames, return_dict=False)[0]

def diffusion_loss(unet, brushnet, noise_scheduler, latents, conditioning_latents, masks, text_embeds,
                   noise, timesteps, num_frames):
    """MSE between the UNet's prediction and the scheduler's target (epsilon or v)."""
    noisy, frame_t, cond = diffusion_inputs(noise_scheduler, latents, conditioning_latents, masks, noise,
                                            timesteps, num_frames)
    encoder_hidden_states = text_embeds.repeat_interleave(num_frames, dim=0)  # (B*F, 77, D)
    pred = denoise(unet, brushnet, noisy, frame_t, encoder_hidden_states, cond, num_frames)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, frame_t)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config")
    return F.mse_loss(pred.float(), target.float())

def training_step(batch, unet, brushnet, vae, embed_text, noise_scheduler, weight_dtype, vae_batch_size=0):
    """Loss of one batch of clips (the same function the scripts and the bench use)."""
    b, f = batch["conditioning_pixel_values"].shape[:2]
    latents, conditioning_latents = encode_latents(vae, batch.get("pixel_values"), batch["conditioning_pixel_values"],
                                                   vae_batch_size, batch.get("latent_moments"))  # (B*F, 4, h, w)
    latents, conditioning_latents = latents.to(weight_dtype), conditioning_latents.to(weight_dtype)
    masks = batch["masks"].flatten(0, 1).to(latents.device)  # (B*F, 1, H, W)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device)
    text_embeds = batch["text_embeds"] if "text_embeds" in batch else embed_text(batch["input_ids"])
    return diffusion_loss(unet, brushnet, noise_scheduler, latents, conditioning_latents, masks, text_embeds,
                          noise, timesteps, f)

def update_state(step=0):
    """What update() carries between calls: the step count, bad steps in a row, the window's losses,
    updates skipped so far (non-finite loss or gradients, loss-scale backoffs included), and the last
    update's gradient norm and loss scale (None where unknown)."""
    return dict(step=step, bad_steps=0, window_ok=True, window_losses=[], skipped=0, grad_norm=None, loss_scale=None)

def clip_and_step(accelerator, args, params, optimizer):
    """accelerate's clip (unscaling fp16 gradients first), then the step: (gradient norm, loss scale, whether the
    loss scaler skipped it); the norm is copied before the step is queued: reading it does not wait for the update."""
    scaler = speed.loss_scaler(accelerator)
    norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)  # DeepSpeed: a number or None
    reading = speed.read_later(speed.clip_stats(norm, scaler, optimizer)) if torch.is_tensor(norm) else None
    optimizer.step()
    norm, scale, inf = reading() if reading else (norm, None, 0)
    skipped = speed.note_skip(optimizer, inf > 0) if scaler else bool(getattr(optimizer, "step_was_skipped", False))
    return norm, scale if scaler else None, skipped

def update(accelerator, args, state, loss, params, optimizer, lr_scheduler):
    """Clip, step and zero the gradients of one micro-batch; True once a whole update was made.

    The loss is averaged over processes (for logging and the finiteness check, so every process
    takes the same decision). A non-finite loss anywhere in the accumulation window skips the
    update, and so do non-finite gradients without a loss scaler (with one, fp16, they are its
    business: it skips and lowers the scale); `--max_bad_steps` skipped updates in a row stop the
    run. With the clip folded, the update is queued before the loss reaches the host (the kernel
    skips by itself), so the GPU goes from the backward straight into the update.
    """
    mean_loss = accelerator.gather(loss.detach()[None]).mean()
    fold = state["window_ok"] and accelerator.sync_gradients and speed.folds_clip(accelerator, args, optimizer)
    scaler = speed.loss_scaler(accelerator)
    if fold:
        value, grads_bad, norm, scale = speed.fused_clip_step(accelerator, args, params, optimizer, mean_loss)()
        finite = math.isfinite(value) and not (grads_bad and scaler is None)
        state.update(grad_norm=norm, loss_scale=scale if scaler else None)
        state["skipped"] += bool(grads_bad) and finite  # the loss scaler's skip inside the kernel
    else:
        value = mean_loss.item()
        finite = math.isfinite(value)
    state["window_losses"].append(value)
    state["window_ok"] = state["window_ok"] and finite
    if state["window_ok"]:
        if accelerator.sync_gradients and not fold:
            norm, scale, scaler_skipped = clip_and_step(accelerator, args, params, optimizer)
            state.update(grad_norm=norm, loss_scale=scale)
            state["skipped"] += scaler_skipped
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not accelerator.sync_gradients:
        return False
    ok, losses = state["window_ok"], state["window_losses"]
    state.update(window_ok=True, window_losses=[])
    if not ok:
        state["bad_steps"] += 1
        state["skipped"] += 1
        logger.warning(f"step {state['step']}: non-finite loss or gradients; update skipped")
        if state["bad_steps"] >= args.max_bad_steps:
            raise SystemExit(f"{state['bad_steps']} skipped updates (non-finite loss or gradients) in a row at step "
                             f"{state['step']}: lower --learning_rate, try --mixed_precision bf16 or no, or resume "
                             "from an earlier checkpoint")
        return False
    state.update(bad_steps=0, step=state["step"] + 1, loss=sum(losses) / len(losses))
    return True


# ----------------------------------------------------------------------------- the loop
def train(args, stage):
    """Run a stage from parsed and checked arguments."""
    stop = StopRequest()  # before anything slow: a stop during start-up ends the run
    accelerator = make_accelerator(args)
    args.compile = speed.resolve_compile(args.compile, accelerator)
    args.cuda_graph = speed.resolve_cuda_graph(args.cuda_graph, args, accelerator)
    os.makedirs(args.output_dir, exist_ok=True)
    speed.use_compile_cache(args, accelerator)
    scan = scan_data(args, accelerator.num_processes)  # before the models: a bad source costs seconds, not minutes
    tokenizer, text_encoder, vae, noise_scheduler = load_frozen_models(args)
    weight_dtype = weight_dtype_of(accelerator)
    place_frozen_encoders(args, vae, text_encoder, accelerator.device, weight_dtype)
    unet, brushnet, optimizer, dataloader, lr_scheduler, steps_per_epoch, params = prepare(
        accelerator, args, stage, tokenizer, scan)
    use_latent_cache(args, accelerator, dataloader.dataset, vae, (unet, brushnet))  # with --latent_cache
    if accelerator.is_main_process:
        warn_if_low_disk(args.output_dir, (unet, brushnet))
        accelerator.init_trackers(args.tracker_project_name,
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool))})
    sources = stage.frozen_sources(args) if stage.frozen_sources else {}
    frozen = frozen_fingerprints(sources)
    global_step, saved_position = resume(accelerator, args, frozen)
    marker = {"frozen_sources": frozen} if frozen else {}
    validate = Validator(args, stage, optimizer) if accelerator.is_main_process else None
    embed_text = TextEmbedder(text_encoder)
    accelerator.print(f"{stage.name}: {sum(p.numel() for p in params) / 1e6:.1f} M trainable parameters, "
                      f"{len(dataloader.dataset)} clips, {steps_per_epoch} steps/epoch, "
                      f"{args.max_train_steps} steps, {accelerator.num_processes} process(es)")
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc=stage.name,
                    disable=not accelerator.is_local_main_process)
    models = (unet, brushnet, vae, text_encoder, tokenizer, noise_scheduler)
    if validate and global_step == 0:
        speed.timed(accelerator, "validation at step 0", validate, accelerator, models, 0)
    state = update_state(global_step)
    epoch, skip = data_position(saved_position, global_step, steps_per_epoch, args, len(dataloader))
    trained = [m for m in (unet, brushnet) if is_trained(m)]

    def forward_backward(batch):
        loss = training_step(batch, unet, brushnet, vae, embed_text, noise_scheduler, weight_dtype,
                             args.vae_batch_size)
        accelerator.backward(loss)
        return loss
    step_fn = speed.graphed(forward_backward, params, accelerator, optimizer) if args.cuda_graph else forward_backward
    if validate and args.cuda_graph:  # out of memory, validation's retry also frees the graph's pool
        validate.free_memory = lambda: (step_fn.release(), free_cached_memory())

    def checkpoint(step):
        start = time.time()
        path = save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit,
                               dict(marker, data_position=position))
        accelerator.print(f"saved {path} in {time.time() - start:.0f} s")
    dataset = dataloader.dataset
    position = [epoch, skip]  # batches read, saved with each checkpoint: the resume point
    stop.training = True  # from here a stop saves a checkpoint after the current step
    loop_start = time.time()
    clock = speed.StepClock(args.stall_dump_minutes * 60)
    try:  # the stall watch ends with the run, however it ends
        while state["step"] < args.max_train_steps:  # skipped (non-finite) updates do not count as steps
            start_epoch(dataloader, epoch)
            batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            position, skip = [epoch, skip], 0
            for batch in batches:
                clock.batch_in_hand()
                position[1] += 1
                batch = dict(batch, text_embeds=embed_text(batch["input_ids"]))  # outside the graph: host-side cache
                with accelerator.accumulate(*trained):
                    loss = step_fn(batch)
                    made = update(accelerator, args, state, loss, params, optimizer, lr_scheduler)
                if not made:
                    clock.restart()
                    continue
                progress.update(1)
                if state["step"] == global_step + 1:
                    accelerator.print(f"first step done {time.time() - START:.0f} s after start, "
                                      f"{time.time() - loop_start:.0f} s of it in the step (compiling included)")
                logs = {"loss": state["loss"], "lr": lr_scheduler.get_last_lr()[0]}
                progress.set_postfix(**logs)
                # unreadable clips replaced so far (all workers); updates skipped so far
                logs.update(clock.step_logs(), skipped_clips=dataset.skipped_count, skipped_updates=state["skipped"])
                logs.update({k: state[k] for k in ("grad_norm", "loss_scale") if state[k] is not None})
                accelerator.log(logs, step=state["step"])
                stopping = stop.agreed(accelerator)
                if state["step"] % args.checkpointing_steps == 0 or stopping:
                    checkpoint(state["step"])
                if validate and state["step"] % args.validation_steps == 0:
                    validate(accelerator, models, state["step"])
                if stopping:
                    progress.close()
                    speed.report_peak_memory(accelerator)
                    accelerator.end_training()
                    accelerator.print(f"stopped at step {state['step']}; resume with --resume_from_checkpoint latest")
                    return state["step"]
                clock.restart()  # checkpoint and validation time is no data wait
                if state["step"] >= args.max_train_steps:
                    break
            epoch += 1
        global_step = state["step"]
        progress.close()
        if dataset.skipped_count:
            accelerator.print(f"data: {dataset.skipped_count} clips could not be read and were replaced by others "
                              f"({dataset.skipped_videos} videos skipped at the scan)")
        accelerator.wait_for_everyone()
        if global_step % args.checkpointing_steps:
            checkpoint(global_step)
        if validate and global_step % args.validation_steps:  # every run ends with a picture of its weights
            validate(accelerator, models, global_step)
        speed.report_peak_memory(accelerator)
        if accelerator.is_main_process:
            save_final_models(accelerator, unet, brushnet, args.output_dir, sources)
        accelerator.end_training()
        return global_step
    finally:
        clock.stop()


# ----------------------------------------------------------------------------- checkpoints and the final save
def save_run_info(args, unet, brushnet):
    """Model configs and arguments beside the checkpoints, so converters need no other paths."""
    for name, model in (("unet_main", unet), ("brushnet", brushnet)):
        model.save_config(os.path.join(args.output_dir, "model_config", name))
    with open(os.path.join(args.output_dir, "run_info.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
                  f, indent=1)

def save_final_models(accelerator, unet, brushnet, output_dir, frozen_sources=None):
    """Ready-to-use `unet_main/` and `brushnet/` folders (and `motion_modules/` for a motion UNet)."""
    unet, brushnet = accelerator.unwrap_model(unet), accelerator.unwrap_model(brushnet)
    for name, model in (("unet_main", unet), ("brushnet", brushnet)):
        target = os.path.join(output_dir, name)
        if not is_trained(model) and name in (frozen_sources or {}):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(frozen_sources[name], target)
        else:
            model.save_pretrained(target)
    if hasattr(unet, "save_motion_modules"):
        unet.save_motion_modules(os.path.join(output_dir, "motion_modules"))
    tqdm.write(f"final weights: {output_dir}/unet_main, {output_dir}/brushnet")
