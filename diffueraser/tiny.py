"""Tiny random models, a tiny CLIP tokenizer and a synthetic video tree for tests and the demo.

Nothing here downloads anything: every model is built from a config with random weights.
The layouts match Stable Diffusion 1.5 folders (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`) so the training scripts load them exactly like the real weights.
"""
import json
import os

import numpy as np

# The reference fixtures' tiny UNet (shared/reference/tiny_stage1/cases.json).
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=[4, 8, 16, 32], layers_per_block=2,
    norm_num_groups=2, norm_eps=1e-5, cross_attention_dim=20, attention_head_dim=2,
)
TINY_MOTION_ADAPTER = dict(
    block_out_channels=[4, 8, 16, 32], motion_layers_per_block=2, motion_mid_block_layers_per_block=1,
    motion_num_attention_heads=2, motion_norm_num_groups=2, motion_max_seq_length=32,
    use_motion_mid_block=True,
)
# Smaller still, for compiled runs on a CPU (every block shape is compiled on its own): one level of
# one layer, so the down, mid and up blocks share shapes (tests/test_gpu_e2e.py's compile: 254 s with
# two levels, 93 s with one); width 32 because the motion up block always has 32 norm groups.
MICRO_UNET = dict(TINY_UNET, down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
                  block_out_channels=[32], layers_per_block=1, norm_num_groups=4)
MICRO_MOTION_ADAPTER = dict(TINY_MOTION_ADAPTER, block_out_channels=[32], motion_layers_per_block=1,
                            motion_norm_num_groups=4)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.18215,
)
TINY_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon",
)
# SD1.5 sizes (the rest are the classes' defaults, which are SD1.5's): bench/ and the GPU smoke run
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
WORDS = ["clean", "background", "a", "the", "video", "of", "bear", "boat"]


def write_tiny_tokenizer(path):
    """Write a CLIPTokenizer folder (vocab.json + merges.txt) whose vocabulary covers every byte
    plus a few whole words, so any caption tokenizes without a hub download."""
    os.makedirs(path, exist_ok=True)
    chars = byte_symbols()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + "</w>" if i == len(word) - 1 else ch
            merges.append(f"{piece} {nxt}")
            piece = piece + nxt
            if piece not in vocab:
                vocab.append(piece)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(dict.fromkeys(vocab))}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f)
    return path


def byte_symbols():
    """The 256 printable symbols byte-level BPE uses for the bytes 0..255 (GPT-2's byte map)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_tokenizer(path):
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(path)
    return CLIPTokenizer.from_pretrained(path)


def build_device():
    """Where random models are built: the GPU if there is one (SD1.5-size initialisation on a CPU
    takes minutes), else the CPU. The saved files are the same either way but for the RNG."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_tiny_sd(path, seed=0, size="tiny"):
    """Write a random SD1.5-layout base model folder, size "tiny", "micro" or "full" (SD1.5's);
    returns its path.

    The tokenizer is always the tiny one (no download); its ids fit both text encoders.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from libs.unet_2d_condition import UNet2DConditionModel

    torch.manual_seed(seed)
    write_tiny_tokenizer(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, "tokenizer", "vocab.json")) as f:
        vocab = len(json.load(f))
    full = size == "full"
    if full:
        text_cfg = CLIPTextConfig(**SD15_TEXT)
    else:
        text_cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=20, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=2, max_position_embeddings=77, projection_dim=20)
    text_cfg.bos_token_id, text_cfg.eos_token_id = vocab - 2, vocab - 1
    with torch.device(build_device()):
        unet = dict(tiny=TINY_UNET, micro=MICRO_UNET, full=SD15_UNET)[size]
        UNet2DConditionModel(**unet).save_pretrained(os.path.join(path, "unet"))
        AutoencoderKL(**(SD15_VAE if full else TINY_VAE)).save_pretrained(os.path.join(path, "vae"))
        CLIPTextModel(text_cfg).save_pretrained(os.path.join(path, "text_encoder"))
    DDPMScheduler(**TINY_SCHEDULER).save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return path


def write_tiny_motion_adapter(path, seed=0, size="tiny"):
    """Write a random MotionAdapter folder, size "tiny", "micro" or "full" (v1-5-2's); returns its path."""
    import torch

    from libs.unet_motion_model import MotionAdapter

    torch.manual_seed(seed)
    with torch.device(build_device()):
        MotionAdapter(**dict(tiny=TINY_MOTION_ADAPTER, micro=MICRO_MOTION_ADAPTER, full={})[size]).save_pretrained(path)
    return path


def _video_frames(rng, n, h, w):
    """n frames of a smooth moving pattern, uint8 (n, h, w, 3)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 2 * np.pi, size=3)
    frames = []
    for t in range(n):
        chans = [127 + 120 * np.sin(xx / (7 + 3 * c) + yy / (11 + 2 * c) + base[c] + 0.3 * t) for c in range(3)]
        frames.append(np.stack(chans, -1).clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def write_synthetic_davis(root, videos=("bear", "boat"), nframes=12, size=(64, 96), seed=0):
    """A DAVIS-2017 tree: ImageSets/2017/train.txt, JPEGImages/480p/<v>/%05d.jpg, Annotations/480p."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "2017", "train.txt"), "w") as f:
        f.write("\n".join(videos) + "\n")
    h, w = size
    for v in videos:
        jdir = os.path.join(root, "JPEGImages", "480p", v)
        adir = os.path.join(root, "Annotations", "480p", v)
        os.makedirs(jdir, exist_ok=True)
        os.makedirs(adir, exist_ok=True)
        for i, frame in enumerate(_video_frames(rng, nframes, h, w)):
            Image.fromarray(frame).save(os.path.join(jdir, f"{i:05d}.jpg"), quality=92)
            ann = np.zeros((h, w), np.uint8)
            ann[h // 4:h // 2, w // 4 + i:w // 2 + i] = 1
            Image.fromarray(ann, "L").save(os.path.join(adir, f"{i:05d}.png"))
    return root


def write_synthetic_ytvos(root, videos=("yt0", "yt1"), nframes=12, size=(64, 96), seed=1):
    """A YouTube-VOS tree: JPEGImages/<v>/%05d.jpg."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    for v in videos:
        jdir = os.path.join(root, "JPEGImages", v)
        os.makedirs(jdir, exist_ok=True)
        for i, frame in enumerate(_video_frames(rng, nframes, h, w)):
            Image.fromarray(frame).save(os.path.join(jdir, f"{i:05d}.jpg"), quality=92)
    return root


def tiny_stage_models(stage, seed=0):
    """(unet, brushnet) of a tiny training stage, random weights, `requires_grad` set as that stage
    trains them: stage1 everything; stage2 only the motion modules, BrushNet frozen."""
    import torch

    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel
    from libs.unet_motion_model import MotionAdapter, UNetMotionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    brushnet = BrushNetModel.from_unet(unet)
    if stage == "stage2":
        unet = UNetMotionModel.from_unet2d(unet, MotionAdapter(**TINY_MOTION_ADAPTER))
        unet.freeze_unet2d_params()
        brushnet.requires_grad_(False)
    return unet, brushnet
