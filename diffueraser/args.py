"""Command-line flags shared by both training stages, and their checks."""
import argparse
import os


def add_model_args(parser):
    g = parser.add_argument_group("models")
    g.add_argument("--base_model_name_or_path", type=str, required=True,
                   help="Stable Diffusion 1.5 folder (unet/, text_encoder/, tokenizer/, scheduler/).")
    g.add_argument("--vae_path", type=str, default=None,
                   help="VAE folder (sd-vae-ft-mse), itself or with a vae/ subfolder. Default: the base model's vae/.")
    g.add_argument("--revision", type=str, default=None, help="Revision of the pretrained models.")
    g.add_argument("--variant", type=str, default=None, help="Weight variant, e.g. fp16.")
    g.add_argument("--tokenizer_name", type=str, default=None, help="Tokenizer folder if not the base model's.")


def add_data_args(parser):
    g = parser.add_argument_group("data (sources mix: give any of DAVIS, YouTube-VOS, frame folders, CSV videos)")
    g.add_argument("--davis_root", type=str, default=None, help="DAVIS-2017 root (ImageSets/, JPEGImages/480p/).")
    g.add_argument("--ytvos_root", type=str, default=None, help="YouTube-VOS-2019 train root (JPEGImages/).")
    g.add_argument("--frames_root", type=str, default=None,
                   help="Any folder of frame folders: every folder (at any depth) holding images is a video.")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="The original's video folder: the CSV's video paths are relative to it "
                        "(default: the CSV's folder).")
    g.add_argument("--csv_file", type=str, default=None,
                   help="CSV(s) of videos with captions, one path or a Python-list string \"['a.csv', 'b.csv']\" "
                        "(the original's form).")
    g.add_argument("--video_column", type=str, default="video_path", help="CSV column of the video paths.")
    g.add_argument("--caption_column", type=str, default="caption", help="CSV column of the captions.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N CSV rows (debugging).")
    g.add_argument("--davis_repeat", type=int, default=10, help="How many times DAVIS videos are listed per epoch.")
    g.add_argument("--ytvos_repeat", type=int, default=1, help="How many times YouTube-VOS videos are listed.")
    g.add_argument("--frames_repeat", type=int, default=1, help="How many times --frames_root videos are listed.")
    g.add_argument("--video_repeat", type=int, default=1, help="How many times CSV videos are listed per epoch.")
    g.add_argument("--davis_stride", type=int, default=1,
                   help="Take every N-th DAVIS frame (DAVIS frames are every frame of the video).")
    g.add_argument("--ytvos_stride", type=int, default=1,
                   help="Take every N-th YouTube-VOS frame (its train JPEGs are already every 5th frame).")
    g.add_argument("--frames_stride", type=int, default=1, help="Take every N-th --frames_root frame.")
    g.add_argument("--video_stride", type=int, default=0,
                   help="Take every N-th frame of CSV videos; 0: the original's max(fps // 15, 1), about 15 fps.")
    g.add_argument("--caption", type=str, default="clean background",
                   help="Training caption of the frame sources (CSV videos use their own).")
    g.add_argument("--resolution", type=int, default=512, help="Square training size (multiple of 8).")
    g.add_argument("--nframes", type=int, default=10, help="Frames per training clip.")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Probability of replacing the caption with the empty string.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")


def add_optim_args(parser):
    g = parser.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    g.add_argument("--train_batch_size", type=int, default=1, help="Clips per GPU per step.")
    g.add_argument("--num_train_epochs", type=int, default=1, help="Epochs (ignored if --max_train_steps is set).")
    g.add_argument("--max_train_steps", type=int, default=None, help="Total optimisation steps.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per update.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations (saves memory).")
    g.add_argument("--learning_rate", type=float, default=5e-6, help="Initial learning rate.")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the LR by accumulation steps x batch size x number of processes.")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
                        '"constant_with_warmup".')
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the LR schedule.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (saves memory).")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    g.add_argument("--set_grads_to_none", action="store_true",
                   help="No effect, accepted for the original scripts: gradients are always set to None between steps.")
    g.add_argument("--max_bad_steps", type=int, default=20,
                   help="Stop after this many updates in a row skipped for a non-finite loss (or, without "
                        "fp16's loss scaler, non-finite gradients).")


def add_speed_args(parser):
    g = parser.add_argument_group("speed and memory")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Overrides accelerate's setting.")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Use xformers attention if installed (PyTorch SDPA is used otherwise; it is as fast).")
    g.add_argument("--channels_last", type=int, nargs="?", const=1, default=0, choices=[0, 1],
                   help="channels_last memory format for the UNet and BrushNet; compiled, their GroupNorms take "
                        "statistics per channel (as --vae_channel_norm). On an H200 stage 1 1.06x faster with "
                        "~1 GiB more memory (finetune_stage1.sh turns it on), stage 2 0.98x.")
    g.add_argument("--fast_norms", action="store_true",
                   help="Run GroupNorm/LayerNorm of the trained nets in half precision under mixed precision.")
    g.add_argument("--compile", type=int, nargs="?", const=1, default=None, choices=[0, 1],
                   help="torch.compile the UNet, BrushNet and VAE encoder (default: on with CUDA, off on CPU and under "
                        "DeepSpeed; the first step then takes a few minutes to compile). --compile 0 turns it off.")
    g.add_argument("--compile_cache", type=str, default=None,
                   help="Folder for torch.compile's cache (default <output_dir>/compile_cache; 'none': torch's own "
                        "temporary folder). Kept with the run, so a resume on a new machine starts in about a "
                        "minute instead of compiling again.")
    g.add_argument("--vae_channel_norm", type=int, default=1, choices=[0, 1],
                   help="With --compile: the VAE encoder's GroupNorms take statistics per channel, then per group, "
                        "so the channels-last encoder never copies an activation to NCHW order (same result).")
    g.add_argument("--compile_scope", default="blocks", choices=["blocks", "model"],
                   help="What --compile compiles in the UNet and BrushNet: each block (default, measured) or each "
                        "whole model (longer compile, fusion across blocks; H200: 1.02x / 1.03x, 1-2 GiB more).")
    g.add_argument("--cuda_graph", type=int, nargs="?", const=1, default=None, choices=[0, 1],
                   help="Capture each step's forward + backward once as a CUDA graph and replay it, so the CPU no "
                        "longer launches thousands of kernels per step (default: on with one CUDA process, "
                        "--gradient_accumulation_steps 1, no --gradient_checkpointing, no DeepSpeed). "
                        "--cuda_graph 0 turns it off.")
    g.add_argument("--cudnn_benchmark", type=int, default=1, choices=[0, 1],
                   help="Let cuDNN pick the fastest convolution kernels for the fixed clip shape.")
    g.add_argument("--vae_batch_size", type=int, default=0,
                   help="Frames per VAE encode call (0 = all frames and masked frames in one call); validation "
                        "also decodes this many at once (0: 8).")
    g.add_argument("--memory_cap_gib", type=float, default=None,
                   help="Hold at most this much GPU memory per process, as on a smaller card (to try a setting "
                        "for a 24 or 48 GB card on a larger one).")
    g.add_argument("--latent_cache", type=str, default=None, metavar="DIR",
                   help="Keep the clean frames' VAE moments in DIR (computed once, ~65 KB a frame at 512) and draw "
                        "their latents from them: only the masked frames are encoded per step. Frame folders only.")
    g.add_argument("--fused_adam", type=int, default=1, choices=[0, 1],
                   help="1: torch's fused AdamW kernel on CUDA; 0: its foreach form.")
    g.add_argument("--fold_clip", type=int, default=1, choices=[0, 1],
                   help="With the fused AdamW: unscale and clip the gradients inside its kernel (one pass over "
                        "the weights instead of three); 0: accelerate's clip_grad_norm_ then the step.")


def add_run_args(parser, output_dir_default):
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", type=str, default=output_dir_default, help="Checkpoints and final weights.")
    g.add_argument("--logging_dir", type=str, default="logs", help="Log folder, relative to --output_dir.")
    g.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    g.add_argument("--tracker_project_name", type=str, default="diffueraser", help="Tracker project name.")
    g.add_argument("--checkpointing_steps", type=int, default=2000, help="Save a checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder.')
    g.add_argument("--validation_prompt", type=str, default=None, help="Python-list string of prompts.")
    g.add_argument("--validation_image", type=str, default=None, help="Python-list string of frame folders.")
    g.add_argument("--validation_mask", type=str, default=None, help="Python-list string of mask folders.")
    g.add_argument("--validation_steps", type=int, default=2000, help="Validate every N steps (and at the start).")
    g.add_argument("--num_validation_frames", type=int, default=None, help="Frames per validation clip (--nframes).")
    g.add_argument("--validation_inference_steps", type=int, default=20, help="Sampler steps for validation.")
    g.add_argument("--stall_dump_minutes", type=float, default=20,
                   help="No step for this long (the first one compiles for minutes): every thread's stack goes to "
                        "the log once, to show where a hung run waits (0: never).")


def add_compat_args(parser):
    g = parser.add_argument_group("accepted for compatibility with the original scripts (no effect here)")
    g.add_argument("--cache_dir", type=str, default=None,
                   help="No effect: every model is read from a local folder, nothing is downloaded or cached.")
    g.add_argument("--hub_token", type=str, default=None, help="Ignored: this toolkit never uploads.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Ignored: this toolkit never uploads.")


def build_parser(description, output_dir_default, nframes_default):
    parser = argparse.ArgumentParser(description=description)
    add_model_args(parser)
    add_data_args(parser)
    add_optim_args(parser)
    add_speed_args(parser)
    add_run_args(parser, output_dir_default)
    add_compat_args(parser)
    parser.set_defaults(nframes=nframes_default)
    return parser


def _need_dir(flag, path, inside=None):
    if path is None:
        return
    target = os.path.join(path, inside) if inside else path
    if os.path.isfile(path):
        raise SystemExit(f"{flag}: {path} is a file, not a folder")
    if not os.path.exists(target):
        what = f"has no {inside}" if inside and os.path.isdir(path) else "does not exist"
        raise SystemExit(f"{flag}: {path} {what}")


DATA_SOURCES = ("davis_root", "ytvos_root", "frames_root", "csv_file")


def check_data_args(args):
    """The data flags' one-line errors (the scan then checks what the sources hold)."""
    if getattr(args, "train_data_dir", None) and not getattr(args, "csv_file", None):
        raise SystemExit(f"--train_data_dir: {args.train_data_dir} needs --csv_file (the CSV listing its videos)")
    if not any(getattr(args, flag, None) for flag in DATA_SOURCES):
        raise SystemExit("--davis_root / --ytvos_root / --frames_root / --csv_file: give at least one data source")
    for flag in ("davis_root", "ytvos_root", "frames_root", "train_data_dir"):
        value = getattr(args, flag, None)
        if value:
            _need_dir(f"--{flag}", value)
    for flag in ("davis_repeat", "ytvos_repeat", "frames_repeat", "video_repeat", "davis_stride", "ytvos_stride",
                 "frames_stride", "nframes"):
        if getattr(args, flag, 1) < 1:
            raise SystemExit(f"--{flag}: {getattr(args, flag)} must be at least 1")
    if getattr(args, "video_stride", 0) < 0:
        raise SystemExit(f"--video_stride: {args.video_stride} must be 0 (the original's rule) or more")
    if getattr(args, "max_train_samples", None) is not None and args.max_train_samples < 1:
        raise SystemExit(f"--max_train_samples: {args.max_train_samples} must be at least 1")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise SystemExit(f"--proportion_empty_prompts: {args.proportion_empty_prompts} is not in [0, 1]")


def check_args(args):
    """Fail fast, naming the flag and the value, before any model is loaded."""
    _need_dir("--base_model_name_or_path", args.base_model_name_or_path, "scheduler")
    _need_dir("--vae_path", args.vae_path)
    _need_dir("--tokenizer_name", args.tokenizer_name)
    check_data_args(args)
    if args.resolution % 8:
        raise SystemExit(f"--resolution: {args.resolution} is not a multiple of 8")
    for flag in ("nframes", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "validation_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag}: {getattr(args, flag)} must be at least 1")
    if not 0 <= args.stall_dump_minutes < 1e6:  # faulthandler takes seconds below ~2**63 ns
        raise SystemExit(f"--stall_dump_minutes: {args.stall_dump_minutes} must be 0 (never) or a number of minutes")
    check_optimizer_args(args)
    check_mixed_precision(args.mixed_precision)
    check_resume(args.resume_from_checkpoint, args.output_dir)
    note_ignored_flags(args)
    if args.num_validation_frames is None:
        args.num_validation_frames = args.nframes
    return args


def check_optimizer_args(args):
    """AdamW's own checks, as one line naming the flag instead of a traceback after loading models."""
    for flag, value, ok, rule in (
            ("learning_rate", args.learning_rate, args.learning_rate >= 0, "must be >= 0"),
            ("adam_beta1", args.adam_beta1, 0 <= args.adam_beta1 < 1, "must be in [0, 1)"),
            ("adam_beta2", args.adam_beta2, 0 <= args.adam_beta2 < 1, "must be in [0, 1)"),
            ("adam_epsilon", args.adam_epsilon, args.adam_epsilon >= 0, "must be >= 0"),
            ("adam_weight_decay", args.adam_weight_decay, args.adam_weight_decay >= 0, "must be >= 0"),
            ("max_grad_norm", args.max_grad_norm, args.max_grad_norm > 0, "must be > 0")):
        if not ok:  # a NaN fails every comparison, so it lands here too
            raise SystemExit(f"--{flag}: {value} {rule}")


def _env_true(name):
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def check_mixed_precision(flag_value):
    """fp16 needs a GPU: on the CPU accelerate accepts it and the first step fails on dtypes.
    The precision comes from --mixed_precision, else from `accelerate launch --mixed_precision` or
    its config file (both reach the script as ACCELERATE_MIXED_PRECISION)."""
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if (flag_value or env) != "fp16":
        return
    import torch

    accelerator = getattr(torch, "accelerator", None)  # CUDA, and XPU/MPS/NPU where accelerate supports fp16
    has_gpu = accelerator.is_available() if accelerator else torch.cuda.is_available()
    if has_gpu and not _env_true("ACCELERATE_USE_CPU"):
        return
    source = "--mixed_precision fp16" if flag_value else \
        "ACCELERATE_MIXED_PRECISION=fp16 (from accelerate launch --mixed_precision or its config)"
    raise SystemExit(f"{source}: fp16 needs a CUDA GPU and this run has none; use --mixed_precision bf16 or no "
                     "(finetune_stage*.sh pass fp16: add --mixed_precision bf16 at the end of their command line)")


def check_resume(resume, output_dir):
    if not resume or resume == "latest":
        return
    if os.path.basename(os.path.normpath(resume)).endswith(".partial"):
        raise SystemExit(f"--resume_from_checkpoint: {resume} is a checkpoint save that never finished (.partial); "
                         "give latest or a checkpoint-<step> folder")
    if not os.path.isdir(resume) and not os.path.isdir(os.path.join(output_dir, resume)):
        raise SystemExit(f"--resume_from_checkpoint: {resume} is not a checkpoint folder")


def note_ignored_flags(args):
    """One line per flag of the original scripts that means nothing here (first process only)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for flag in ("hub_token", "hub_model_id"):
        if getattr(args, flag, None):
            print(f"--{flag}: ignored: this toolkit never uploads")
    if getattr(args, "cache_dir", None):
        print(f"--cache_dir {args.cache_dir}: no effect: models are read from local folders only")
