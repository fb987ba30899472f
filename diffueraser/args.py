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
    g.add_argument("--set_grads_to_none", action="store_true", help="Free gradients between steps (default in torch).")
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
    g.add_argument("--channels_last", action="store_true", help="channels_last memory format for the UNet and BrushNet (measured slower; off).")
    g.add_argument("--fast_norms", action="store_true",
                   help="Run GroupNorm/LayerNorm of the trained nets in half precision under mixed precision.")
    g.add_argument("--compile", type=int, nargs="?", const=1, default=None, choices=[0, 1],
                   help="torch.compile the UNet, BrushNet and VAE encoder (default: on with CUDA, off on CPU and under "
                        "DeepSpeed; the first step then takes a few minutes to compile). --compile 0 turns it off.")
    g.add_argument("--vae_channel_norm", type=int, default=1, choices=[0, 1],
                   help="With --compile: the VAE encoder's GroupNorms take statistics per channel, then per group, "
                        "so the channels-last encoder never copies an activation to NCHW order (same result).")
    g.add_argument("--compile_scope", default="blocks", choices=["blocks", "model"],
                   help="What --compile compiles in the UNet and BrushNet: each block (default, measured) or each "
                        "whole model (longer compile, fusion across blocks; not yet measured on a GPU).")
    g.add_argument("--cuda_graph", type=int, nargs="?", const=1, default=None, choices=[0, 1],
                   help="Capture each step's forward + backward once as a CUDA graph and replay it, so the CPU no "
                        "longer launches thousands of kernels per step (default: on with one CUDA process, "
                        "--gradient_accumulation_steps 1, no --gradient_checkpointing, no DeepSpeed). "
                        "--cuda_graph 0 turns it off.")
    g.add_argument("--cudnn_benchmark", type=int, default=1, choices=[0, 1],
                   help="Let cuDNN pick the fastest convolution kernels for the fixed clip shape.")
    g.add_argument("--vae_batch_size", type=int, default=0,
                   help="Frames per VAE encode call (0 = all frames and masked frames in one call).")
    g.add_argument("--fused_adam", type=int, default=1, choices=[0, 1], help="Fused AdamW kernel on CUDA.")
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


def build_parser(description, output_dir_default, nframes_default):
    parser = argparse.ArgumentParser(description=description)
    add_model_args(parser)
    add_data_args(parser)
    add_optim_args(parser)
    add_speed_args(parser)
    add_run_args(parser, output_dir_default)
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
    resume = args.resume_from_checkpoint
    if resume and resume != "latest" and not os.path.isdir(resume) \
            and not os.path.isdir(os.path.join(args.output_dir, resume)):
        raise SystemExit(f"--resume_from_checkpoint: {resume} is not a checkpoint folder")
    if args.num_validation_frames is None:
        args.num_validation_frames = args.nframes
    return args
