"""The training core shared by both DiffuEraser stages.

A stage script only says what differs (which models, which of their parameters train, which
pipeline validates) through a `Stage`; everything else lives here: frozen models, data, the
step, the loop, checkpoints, validation and the final save. Trained/frozen is decided from
`requires_grad`, never from the stage name.
"""
import datetime
import gc
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
from accelerate.utils import (DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs, ProjectConfiguration,
                               set_seed)
from tqdm.auto import tqdm

from diffueraser.checkpoints import (abandon_newer_checkpoints, checkpoint_step, fingerprint, read_marker,
                                     resolve_checkpoint, save_checkpoint, warn_if_low_disk)
from diffueraser.stopping import StopRequest
from diffueraser.validation import Validator

logger = get_logger("diffueraser")
START = time.time()  # when the process imported the trainer: "first step after N s" counts from here


@dataclass
class Stage:
    """What a training stage is made of.

    build_models(args) -> (unet, brushnet) with `requires_grad` already set on what trains.
    pipeline_cls: the validation sampler class, built as pipeline_cls(vae=, text_encoder=,
    tokenizer=, unet=, brushnet=, scheduler=).
    frozen_sources(args) -> {"brushnet": folder}: where a frozen model was loaded from; the final
    folder is a copy of it (the model itself runs in half precision).
    """
    name: str
    build_models: Callable
    pipeline_cls: Callable = None
    frozen_sources: Callable = None


# ----------------------------------------------------------------------------- frozen models
def find_vae_folder(path):
    """The VAE folder: `path` itself or its `vae/` subfolder, whichever holds a config.json."""
    for candidate in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(f"--vae_path: {path} has no config.json (nor vae/config.json)")


def load_frozen_models(args):
    """Tokenizer, text encoder, VAE and the training noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    base = args.base_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name or os.path.join(base, "tokenizer"),
                                              revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=args.revision,
                                                 variant=args.variant)
    vae = AutoencoderKL.from_pretrained(find_vae_folder(args.vae_path or base), revision=args.revision)
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
        self.text_encoder = text_encoder
        self.cache = {}

    @torch.no_grad()
    def __call__(self, input_ids):  # (B, 77) -> (B, 77, D)
        rows = []
        for ids in input_ids:
            key = tuple(ids.tolist())
            if key not in self.cache:
                self.cache[key] = self.text_encoder(ids[None].to(self.text_encoder.device))[0][0]
            rows.append(self.cache[key])
        return torch.stack(rows)


# ----------------------------------------------------------------------------- the step
@torch.no_grad()
def encode_latents(vae, pixel_values, conditioning_pixel_values, chunk=0):
    """VAE latents of frames and masked frames in one pass.

    pixel_values, conditioning_pixel_values: (B, F, 3, H, W) in [-1, 1].
    Returns two (B*F, 4, H/8, W/8) tensors, scaled by the VAE's scaling factor.
    """
    b, f = pixel_values.shape[:2]
    x = torch.cat([pixel_values, conditioning_pixel_values]).flatten(0, 1).to(vae.device, vae.dtype)
    chunks = x.split(chunk) if chunk else (x,)
    latents = torch.cat([vae.encode(c).latent_dist.sample() for c in chunks]) * vae.config.scaling_factor
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
    b, f = batch["pixel_values"].shape[:2]
    latents, conditioning_latents = encode_latents(vae, batch["pixel_values"], batch["conditioning_pixel_values"],
                                                   vae_batch_size)  # (B*F, 4, h, w) each
    latents, conditioning_latents = latents.to(weight_dtype), conditioning_latents.to(weight_dtype)
    masks = batch["masks"].flatten(0, 1).to(latents.device)  # (B*F, 1, H, W)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device)
    text_embeds = batch["text_embeds"] if "text_embeds" in batch else embed_text(batch["input_ids"])
    return diffusion_loss(unet, brushnet, noise_scheduler, latents, conditioning_latents, masks, text_embeds,
                          noise, timesteps, f)


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
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)  # clip shapes never change within a run
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def resolve_compile(choice, accelerator):
    """--compile unset: on with CUDA, except under DeepSpeed (compiled blocks not yet run there)."""
    if choice is not None:
        return bool(choice)
    return accelerator.device.type == "cuda" and accelerator.distributed_type != DistributedType.DEEPSPEED


def resolve_cuda_graph(choice, args, accelerator):
    """--cuda_graph unset: on where a captured step is valid; asked for where it is not: an error."""
    conflicts = [why for why, bad in (
        ("it needs a CUDA device", accelerator.device.type != "cuda"),
        (f"{accelerator.distributed_type.value} runs its own communication around backward (one plain process only)",
         accelerator.num_processes > 1 or accelerator.distributed_type != DistributedType.NO),
        ("--gradient_accumulation_steps > 1 accumulates into the gradients", args.gradient_accumulation_steps > 1),
        ("--gradient_checkpointing reads the RNG state on the host", args.gradient_checkpointing)) if bad]
    if choice is None:
        return not conflicts
    if choice and conflicts:
        raise SystemExit(f"--cuda_graph 1: {'; '.join(conflicts)}. Leave --cuda_graph unset or pass --cuda_graph 0.")
    return bool(choice)


class StepGraph:
    """`fn(batch)` -- forward and backward, returning the loss -- captured once as a CUDA graph
    and replayed for every later batch.

    Launching the ~9,000 kernels of a stage-1 step from Python takes the CPU longer than the GPU
    needs to run them (bench run 9: 277 ms of kernels in a 395 ms step); a replay launches them
    all at once. The first `warmup` calls run `fn` as it is (they compile, let cuDNN pick its
    kernels and settle the loss scale); the next one captures. Each batch is copied into the
    buffers of the captured one, so it must have the same shapes. Random draws (noise,
    timesteps, VAE sampling) are new at every replay. The gradients are written into the same
    tensors at every replay and handed back to the parameters after it, since the optimizer's
    `zero_grad` drops them. The loss comes back detached: a caller holding a warm-up step's
    autograd graph would keep its gradient accumulators alive on the default stream, and a
    capture that meets them is invalidated (a test that held one failed so on the H200, run 11).
    """

    def __init__(self, fn, params, warmup=3):
        self.fn, self.params, self.warmup = fn, list(params), warmup
        self.calls, self.graph, self.static, self.grads, self.loss = 0, None, None, None, None

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capturing(self, graph):
        # thread_local: the data loader's pin-memory thread may allocate pinned memory meanwhile,
        # which a global-mode capture would refuse (and be invalidated by)
        return torch.cuda.graph(graph, capture_error_mode="thread_local")

    def __call__(self, batch):
        self.calls += 1
        if self.calls <= self.warmup:
            return self.fn(batch).detach()
        if self.graph is None:
            self.static = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
            self.capture()
        else:
            self.load(batch)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return self.loss

    def load(self, batch):
        for key, buffer in self.static.items():
            if batch[key].shape != buffer.shape or batch[key].dtype != buffer.dtype:
                raise ValueError(f"--cuda_graph: batch[{key!r}] is {tuple(batch[key].shape)} {batch[key].dtype}, the "
                                 f"captured step's {tuple(buffer.shape)} {buffer.dtype}; every batch must match "
                                 "(or --cuda_graph 0)")
            buffer.copy_(batch[key], non_blocking=True)

    def capture(self):
        for p in self.params:  # captured backward then assigns fresh gradient tensors of its own
            p.grad = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the warm-up steps' cached blocks: the graph gets a pool of its own
        self.graph = self.new_graph()
        try:
            with self.capturing(self.graph):
                self.loss = self.fn(self.static).detach()
        except Exception as e:
            raise RuntimeError(f"capturing the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                               "run with --cuda_graph 0 (resume with --resume_from_checkpoint latest)") from e
        self.grads = [p.grad for p in self.params]


def weight_dtype_of(accelerator):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def use_compile_cache(args):
    """Keep torch.compile's cache (inductor's FX graphs, AOT autograd and Triton kernels) beside the
    checkpoints, in `--compile_cache` (default <output_dir>/compile_cache), so a resume on another
    machine reuses what the first run compiled instead of compiling for minutes again.
    Returns the folder in use, or None ('none': torch's own temporary folder)."""
    if not args.compile:
        return None
    if args.compile_cache != "none":  # read by inductor whenever it compiles (importing diffusers sets a default)
        folder = os.path.abspath(args.compile_cache or os.path.join(args.output_dir, "compile_cache"))
        os.makedirs(folder, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default folder")


def place_frozen_encoders(args, vae, text_encoder, device, dtype):
    """VAE and text encoder on the device in the mixed-precision dtype (they never train)."""
    vae.to(device, dtype=dtype)
    text_encoder.to(device, dtype=dtype)
    if args.compile:  # no grad, one shape: one graph. Compiled, its norms run in NHWC too, so channels_last
        # pays here (124 -> 66 ms, bench runs 7-8); the decoder (validation only) stays eager, NCHW
        vae.encoder.to(memory_format=torch.channels_last)
        if getattr(args, "vae_channel_norm", 1):
            norms_by_channel(vae.encoder)
        vae.encoder.compile(fullgraph=True, dynamic=False)


class ChannelStatsGroupNorm(torch.nn.GroupNorm):
    """GroupNorm with its statistics taken per channel, then combined per group.

    Compiled, F.group_norm views each NHWC activation as (N, groups, C/groups * H * W), which
    copies it to NCHW order inside the reduction (strided reads: 3.4-10 ms per full-size norm of
    stage 2's 44 VAE images, bench run 16). A mean and variance per channel reduce over H, W and
    keep the layout; the group's variance is the mean of the channels' variances plus the spread
    of their means. The same result as F.group_norm, to fp32 rounding; the output keeps the
    input's dtype (under CUDA autocast F.group_norm would return fp32; the next layer casts either way).
    """

    def forward(self, x):
        n, c = x.shape[:2]
        var_c, mean_c = torch.var_mean(x.float(), dim=tuple(range(2, x.dim())), correction=0)  # (N, C)
        mean_c, var_c = mean_c.view(n, self.num_groups, -1), var_c.view(n, self.num_groups, -1)
        mean = mean_c.mean(-1, keepdim=True)
        var = (var_c + (mean_c - mean).square()).mean(-1, keepdim=True)
        scale = torch.rsqrt(var + self.eps).expand_as(mean_c).reshape(n, c)
        mean = mean.expand_as(mean_c).reshape(n, c)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        shape = (n, c) + (1,) * (x.dim() - 2)
        return (x.float() * scale.view(shape) + shift.view(shape)).to(x.dtype)


def norms_by_channel(model):
    """Every GroupNorm of `model` takes its statistics per channel (`--vae_channel_norm`); same
    parameters and keys, the class swapped in place."""
    for m in model.modules():
        if type(m) is torch.nn.GroupNorm:
            m.__class__ = ChannelStatsGroupNorm
    return model


def _norm_in_input_dtype(self, x):
    """GroupNorm / LayerNorm computed in the input's dtype (statistics still accumulate in fp32)."""
    with torch.autocast(x.device.type, enabled=False):
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if isinstance(self, torch.nn.GroupNorm):
            return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def half_precision_norms(model):
    """Under autocast, PyTorch runs every norm in fp32, so each one writes fp32 activations that
    the next layer casts back; this keeps them in half precision instead (`--fast_norms`)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.forward = _norm_in_input_dtype.__get__(m)
    return model


def configure_models(args, unet, brushnet):
    """Attention backend, gradient checkpointing and memory format for the trained nets."""
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
            for m in (unet, brushnet):
                m.enable_xformers_memory_efficient_attention()
        except ImportError:
            logger.warning("xformers is not installed; using PyTorch SDPA attention (same memory, same speed)")
    for m in (unet, brushnet):
        if args.channels_last:
            m.to(memory_format=torch.channels_last)
        if is_trained(m):
            if args.gradient_checkpointing:
                m.enable_gradient_checkpointing()
            if args.fast_norms:
                half_precision_norms(m)
            m.train()
        else:
            m.eval()


COMPILED_BLOCKS = ("ResnetBlock2D", "Transformer2DModel", "AnimateDiffTransformer3D")


def _allow_many_graphs():
    config = torch._dynamo.config  # every block shape is its own graph: allow enough of them
    for name, limit in (("cache_size_limit", 512), ("recompile_limit", 512), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def compile_blocks(model):
    """torch.compile every resnet, attention and motion block in place.

    Regional compilation: the block code is compiled once per shape and reused by every block
    of that shape, so it compiles in a fraction of the time of a whole-model compile, and the
    state-dict keys stay those of the released checkpoints (no `_orig_mod.` prefix).
    """
    _allow_many_graphs()
    for module in model.modules():
        if type(module).__name__ in COMPILED_BLOCKS:
            module.compile(dynamic=False)  # one static graph per shape: the clip shape is fixed
    return model


def compile_models(args, *models):
    """`--compile_scope blocks`: every block (see compile_blocks); `model`: each model as a whole,
    in place (keys unchanged; inside DDP the wrapped model)."""
    for m in models:
        if getattr(args, "compile_scope", "blocks") == "model":
            _allow_many_graphs()
            getattr(m, "module", m).compile(dynamic=False)
        else:
            compile_blocks(m)


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


def scan_data(args, num_processes=1):
    """The data scan's verdict before any model loads (dataset.finetune_dataset.DataScan): a
    missing source, nothing usable or --nframes longer than every video is one line, no traceback."""
    from dataset.finetune_dataset import DataScan

    try:
        scan = DataScan(args)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err))
    if len(scan.entries) < args.train_batch_size * num_processes:
        raise SystemExit(f"the dataset has {len(scan.entries)} clips, fewer than --train_batch_size "
                         f"{args.train_batch_size} x {num_processes} process(es)")
    return scan


def make_dataloader(args, tokenizer, scan=None):
    from dataset.finetune_dataset import FinetuneDataset

    dataset = FinetuneDataset(args, tokenizer, scan)
    # Its own generator: starting the loader (every epoch without workers, again on resume) would
    # otherwise draw its workers' base seed from the global RNG, which the training step draws from.
    # The order is the seedable sampler's, each sample a function of (seed, epoch, index).
    generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True, generator=generator,
        num_workers=args.dataloader_num_workers, persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=torch.cuda.is_available())


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


# ----------------------------------------------------------------------------- the loop
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
        compile_models(args, unet, brushnet)
    return unet, brushnet, optimizer, dataloader, lr_scheduler, steps_per_epoch, params


def frozen_fingerprints(sources):
    """{name: {"path", "files"}} of the folders the frozen models came from (stage 2: BrushNet)."""
    return {name: {"path": os.path.abspath(path), "files": fingerprint(path)} for name, path in sources.items()}


def resume(accelerator, args, frozen=None):
    """Restore the state named by --resume_from_checkpoint; returns (step, data position) to continue
    from: the position as saved, [epoch, batches read in it], or None for a checkpoint without one.

    A checkpoint only holds the trained models: a frozen one is loaded again from its folder, so
    if that folder changed since the checkpoint was written (stage 2's BrushNet re-converted),
    the run stops instead of silently pairing the checkpoint with another model.
    """
    if not args.resume_from_checkpoint:
        return 0, None
    path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if path is None:
        accelerator.print(f"no checkpoint in {args.output_dir} yet: starting from step 0")
        return 0, None
    marker = read_marker(path)
    saved = marker.get("frozen_sources", {})
    for name, now in (frozen or {}).items():
        if name in saved and saved[name]["files"] != now["files"]:
            raise SystemExit(f"{path} was trained against the frozen {name} in {saved[name]['path']} as it was "
                             f"then; {now['path']} now holds different weights. Point the run at the "
                             f"{name} it was trained with, or start a new run (an output_dir without checkpoints).")
    accelerator.print(f"resuming from {path}")
    accelerator.load_state(path)
    step = checkpoint_step(path)
    in_this_run = os.path.samefile(os.path.dirname(os.path.abspath(path)), args.output_dir)
    if accelerator.is_main_process and in_this_run:  # an older one of this run: set the newer aside
        abandon_newer_checkpoints(args.output_dir, step)
    accelerator.wait_for_everyone()
    return step, marker.get("data_position")


def data_position(saved, step, steps_per_epoch, args, batches_per_epoch):
    """(epoch, batches of it already read) to go on from: the checkpoint's own record, else (one
    written before it was kept) derived from the step, which is exact unless updates were skipped."""
    epoch, read = saved or (step // steps_per_epoch, (step % steps_per_epoch) * args.gradient_accumulation_steps)
    return (epoch + 1, 0) if read >= batches_per_epoch else (epoch, read)


def start_epoch(dataloader, epoch):
    """Sampler order and per-sample draws of `epoch`. accelerate's set_epoch tells the dataset only
    when one process runs with no batches skipped, so the dataset is told here."""
    dataloader.set_epoch(epoch)
    if hasattr(dataloader.dataset, "set_epoch"):
        dataloader.dataset.set_epoch(epoch)


def folds_clip(accelerator, args, optimizer):
    """True where the clip can be folded into the optimizer (fused_clip_step): torch's fused AdamW
    on one process or under DDP (whose gradients are already reduced), with `--fold_clip 1`."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return bool(getattr(args, "fold_clip", 1) and isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused")
                and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU))


def loss_scaler(accelerator):
    """The GradScaler of an fp16 run, else None."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def fused_clip_step(accelerator, args, params, optimizer, loss):
    """Clip the gradients' total norm to `--max_grad_norm` and step, in one pass over the weights.

    The norm is taken of the loss-scaled gradients, and the fused AdamW divides each gradient by
    (loss scale / clip coefficient) as it reads it. That replaces the unscale and the clip, two
    passes that read and write every gradient (stage 1: 1.75 B fp32). Nothing waits on the host: a
    non-finite `loss` (the step's, a tensor) or gradient norm skips the update inside the kernel.
    The loss scale backs off on a non-finite norm, as GradScaler.step + update would, and is left
    alone when the loss itself was not finite (the unfolded path skips before the scaler).

    Returns read_later([loss, 1.0 if the gradients were not finite]), copied before the step is
    queued: reading it waits for the norm, not for the update.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    scaler = loss_scaler(accelerator)
    grads = [p.grad for p in params if p.grad is not None]
    scale = scaler._scale if scaler else torch.ones((), device=loss.device)
    norm = torch.nn.utils.get_total_norm(grads).float() / scale
    bad, skip = ~torch.isfinite(norm), ~torch.isfinite(loss)
    found_inf = (bad | skip).float()
    coef = torch.clamp(args.max_grad_norm / (norm + 1e-6), max=1.0)  # torch's clip_grad_norm_ rule
    reading = read_later(torch.stack([loss.float(), bad.float()]))
    inner.grad_scale, inner.found_inf = scale / coef, found_inf  # the fused AdamW reads both
    try:
        inner.step()
    finally:
        del inner.grad_scale, inner.found_inf
    optimizer._opt_called = True  # what torch's LR scheduler's wrapper of optimizer.step() records
    if scaler:  # GradScaler.update's own kernel: back off on non-finite gradients, grow after enough good steps
        before = scaler._scale.clone(), scaler._growth_tracker.clone()
        torch._amp_update_scale_(scaler._scale, scaler._growth_tracker, bad.float(), scaler._growth_factor,
                                 scaler._backoff_factor, scaler._growth_interval)
        for t, b in zip((scaler._scale, scaler._growth_tracker), before):  # a skipped step leaves it as it was
            t.copy_(torch.where(skip, b, t))
    return reading


def read_later(t):
    """t.tolist() as a callable: copied now, read without waiting for GPU work queued after this call."""
    if t.device.type != "cuda":
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return lambda: (copied.synchronize(), host.tolist())[1]


def update_state(step=0):
    """What update() carries between calls: the step count, bad steps in a row, the window's losses."""
    return dict(step=step, bad_steps=0, window_ok=True, window_losses=[])


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
    fold = state["window_ok"] and accelerator.sync_gradients and folds_clip(accelerator, args, optimizer)
    if fold:
        value, grads_bad = fused_clip_step(accelerator, args, params, optimizer, mean_loss)()
        finite = math.isfinite(value) and not (grads_bad and loss_scaler(accelerator) is None)
    else:
        value = mean_loss.item()
        finite = math.isfinite(value)
    state["window_losses"].append(value)
    state["window_ok"] = state["window_ok"] and finite
    if state["window_ok"]:
        if accelerator.sync_gradients and not fold:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not accelerator.sync_gradients:
        return False
    ok, losses = state["window_ok"], state["window_losses"]
    state.update(window_ok=True, window_losses=[])
    if not ok:
        state["bad_steps"] += 1
        logger.warning(f"step {state['step']}: non-finite loss or gradients; update skipped")
        if state["bad_steps"] >= args.max_bad_steps:
            raise SystemExit(f"{state['bad_steps']} skipped updates (non-finite loss or gradients) in a row at step "
                             f"{state['step']}: lower "
                             "--learning_rate, try --mixed_precision bf16 or no, or resume from an earlier checkpoint")
        return False
    state.update(bad_steps=0, step=state["step"] + 1, loss=sum(losses) / len(losses))
    return True


def report_peak_memory(accelerator):
    """One line with this process's peak GPU memory (training and validation), where there is a GPU."""
    if accelerator.device.type == "cuda":
        gib = 2 ** 30
        accelerator.print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / gib:.1f} GiB allocated, "
                          f"{torch.cuda.max_memory_reserved() / gib:.1f} GiB reserved")


def timed(accelerator, what, fn, *args):
    """fn(*args), then a log line saying how long it took."""
    start = time.time()
    result = fn(*args)
    accelerator.print(f"{what}: {time.time() - start:.0f} s")
    return result


def train(args, stage):
    """Run a stage from parsed and checked arguments."""
    stop = StopRequest()  # before anything slow: a stop during start-up ends the run
    accelerator = make_accelerator(args)
    args.compile = resolve_compile(args.compile, accelerator)
    args.cuda_graph = resolve_cuda_graph(args.cuda_graph, args, accelerator)
    os.makedirs(args.output_dir, exist_ok=True)
    cache = use_compile_cache(args)
    scan = scan_data(args, accelerator.num_processes)  # before the models: a bad source costs seconds, not minutes
    tokenizer, text_encoder, vae, noise_scheduler = load_frozen_models(args)
    weight_dtype = weight_dtype_of(accelerator)
    place_frozen_encoders(args, vae, text_encoder, accelerator.device, weight_dtype)
    unet, brushnet, optimizer, dataloader, lr_scheduler, steps_per_epoch, params = prepare(
        accelerator, args, stage, tokenizer, scan)
    if accelerator.is_main_process:
        warn_if_low_disk(args.output_dir, (unet, brushnet))
        accelerator.init_trackers(args.tracker_project_name,
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool))})
    sources = stage.frozen_sources(args) if stage.frozen_sources else {}
    frozen = frozen_fingerprints(sources)
    global_step, saved_position = resume(accelerator, args, frozen)
    marker = {"frozen_sources": frozen} if frozen else {}
    validate = Validator(args, stage) if accelerator.is_main_process else None
    embed_text = TextEmbedder(text_encoder)
    if args.compile:
        accelerator.print("torch.compile is on: the first step and the first validation compile the blocks "
                          f"(minutes, once per shape; seconds with a warm cache in {cache}); --compile 0 turns it off")
    accelerator.print(f"{stage.name}: {sum(p.numel() for p in params) / 1e6:.1f} M trainable parameters, "
                      f"{len(dataloader.dataset)} clips, {steps_per_epoch} steps/epoch, "
                      f"{args.max_train_steps} steps, {accelerator.num_processes} process(es)")
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc=stage.name,
                    disable=not accelerator.is_local_main_process)
    models = (unet, brushnet, vae, text_encoder, tokenizer, noise_scheduler)
    if validate and global_step == 0:
        timed(accelerator, "validation at step 0 (compiling included)", validate, accelerator, models, 0)
    state = update_state(global_step)
    epoch, skip = data_position(saved_position, global_step, steps_per_epoch, args, len(dataloader))
    trained = [m for m in (unet, brushnet) if is_trained(m)]

    def forward_backward(batch):
        loss = training_step(batch, unet, brushnet, vae, embed_text, noise_scheduler, weight_dtype,
                             args.vae_batch_size)
        accelerator.backward(loss)
        return loss
    step_fn = forward_backward
    if args.cuda_graph:
        step_fn = StepGraph(forward_backward, params)
        accelerator.print(f"CUDA graph is on: step {step_fn.warmup + 1} captures the forward + backward, later "
                          "steps replay it; --cuda_graph 0 turns it off")
    dataset = dataloader.dataset
    position = [epoch, skip]  # batches read, saved with each checkpoint: the resume point
    stop.training = True  # from here a stop saves a checkpoint after the current step
    loop_start = time.time()
    while state["step"] < args.max_train_steps:  # skipped (non-finite) updates do not count as steps
        start_epoch(dataloader, epoch)
        batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        position, skip = [epoch, skip], 0
        for batch in batches:
            position[1] += 1
            # the caption's embedding outside any graph: its cache looks the ids up on the host
            batch = dict(batch, text_embeds=embed_text(batch["input_ids"]))
            with accelerator.accumulate(*trained):
                loss = step_fn(batch)
                if not update(accelerator, args, state, loss, params, optimizer, lr_scheduler):
                    continue
            progress.update(1)
            if state["step"] == global_step + 1:
                accelerator.print(f"first step done {time.time() - START:.0f} s after start, "
                                  f"{time.time() - loop_start:.0f} s of it in the step (compiling included)")
            logs = {"loss": state["loss"], "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            logs["skipped_clips"] = dataset.skipped_count  # unreadable clips replaced so far (all workers)
            accelerator.log(logs, step=state["step"])
            stopping = stop.agreed(accelerator)
            if state["step"] % args.checkpointing_steps == 0 or stopping:
                start = time.time()
                path = save_checkpoint(accelerator, args.output_dir, state["step"], args.checkpoints_total_limit,
                                       dict(marker, data_position=position))
                accelerator.print(f"saved {path} in {time.time() - start:.0f} s")
            if validate and state["step"] % args.validation_steps == 0:
                validate(accelerator, models, state["step"])
            if stopping:
                progress.close()
                report_peak_memory(accelerator)
                accelerator.end_training()
                accelerator.print(f"stopped at step {state['step']}; resume with --resume_from_checkpoint latest")
                return state["step"]
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
        start = time.time()
        path = save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit,
                               dict(marker, data_position=position))
        accelerator.print(f"saved {path} in {time.time() - start:.0f} s")
    if validate and global_step % args.validation_steps:  # every run ends with a picture of its weights
        validate(accelerator, models, global_step)
    report_peak_memory(accelerator)
    if accelerator.is_main_process:
        save_final_models(accelerator, unet, brushnet, args.output_dir, sources)
    accelerator.end_training()
    return global_step
