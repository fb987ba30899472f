"""Does training improve the numbers? Tiny stage-1 models trained briefly on synthetic videos, then
evaluated against their untrained start on held-out synthetic videos with fixed masks.

    python -m diffueraser.learning_check --out learning_check_out

Training uses the project's dataset (random moving masks) and training step, in process, at a
higher learning rate than real runs; the evaluation is the one eval_DiffuEraser_stage1.py runs.
The tiny VAE is random, so absolute numbers mean nothing; the rise of the hole PSNR is the signal
(margin measured and stated in train.md).
"""
import argparse
import os
import time
from types import SimpleNamespace

import torch

RESOLUTION = 16  # frames (latents 8x8 with the 2x VAE below): a training step costs ~0.1 s on a CPU core
# The hole PSNR must rise by more than this (dB). Measured: +1.51 / +2.25 / +1.13 dB (seeds 0 / 1 / 2);
# untrained weight sets differ by up to 0.11 dB (train.md, "Evaluate").
MIN_RISE_DB = 0.5
NFRAMES = 8      # frames per training clip: more data per step (the UNet is 2D; frames are independent)


def identity_vae(channels=8):
    """A tiny AutoencoderKL that reconstructs smooth frames without training (about 24 dB on the
    synthetic videos; a random VAE gives 9 dB, which no UNet could improve): 2x average-pool down,
    nearest up, every residual branch zeroed, and the output norms (per channel, per frame) kept in
    SiLU's near-linear range; the frame's own colour statistics are replaced by the synthetic
    videos' (mean 0, std 0.66 in [-1, 1]). Scaled latents (F, 4, H/2, W/2) have unit spread; the
    posterior std is ~0 (log-variance -30), so training's sample() equals mode()."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from diffueraser.tiny import TINY_VAE

    vae = AutoencoderKL(**dict(TINY_VAE, block_out_channels=[channels] * 2, norm_num_groups=channels,
                               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2))
    silu3, slope3 = F.silu(torch.tensor(3.0)).item(), 1.088  # SiLU and its slope at 3
    gain, spread = 0.2, 0.66

    def diagonal(conv, scale, n, bias=0.0):
        conv.weight.zero_()
        conv.bias.fill_(bias)
        c = conv.weight.shape[-1] // 2
        for i in range(n):
            conv.weight[i, i, c, c] = scale

    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ".conv2." in name or ".to_out." in name:  # residual branches of resnets and attention
                p.zero_()
        for down in (d for b in vae.encoder.down_blocks for d in b.downsamplers or []):
            diagonal(down.conv, 0.0, 0)
            for i in range(channels):
                down.conv.weight[i, i, :2, :2] = 0.25  # (the conv pads right/bottom): 2x2 average
        for up in (u for b in vae.decoder.up_blocks for u in b.upsamplers or []):
            diagonal(up.conv, 1.0, channels)
        diagonal(vae.encoder.conv_in, 1.0, 3)
        diagonal(vae.quant_conv, 1.0, 8)
        diagonal(vae.post_quant_conv, 1.0, 4)
        for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
            norm.weight.fill_(gain)
            norm.bias.fill_(3.0)
        k = 1 / (gain * slope3 * vae.config.scaling_factor)
        diagonal(vae.encoder.conv_out, k, 3, -k * silu3)
        vae.encoder.conv_out.bias[3] = 0
        vae.encoder.conv_out.bias[4:] = -30.0  # log-variance
        diagonal(vae.decoder.conv_in, 1.0, 3)
        m = spread / (gain * slope3)
        diagonal(vae.decoder.conv_out, m, 3, -m * silu3)
    return vae


def write_start(sd_path, out):
    """The untrained start as a stage-1 folder: the base UNet and a BrushNet made from it."""
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    unet.save_pretrained(os.path.join(out, "unet_main"))
    BrushNetModel.from_unet(unet).save_pretrained(os.path.join(out, "brushnet"))
    return out


def train_stage1(sd_path, start, data, out, steps, learning_rate, seed):
    """`steps` updates of the real stage-1 training step on the synthetic videos; writes out/unet_main, brushnet."""
    from dataset.finetune_dataset import FinetuneDataset
    from diffueraser.inference import load_base_models, load_weights
    from diffueraser.trainer import TextEmbedder, training_step

    torch.manual_seed(seed)
    vae, text_encoder, tokenizer, scheduler = load_base_models(sd_path)  # scheduler: the DDPM training one
    unet, brushnet = load_weights(start, "stage1")
    params = [p for m in (unet.train(), brushnet.train()) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    args = SimpleNamespace(nframes=NFRAMES, resolution=RESOLUTION, proportion_empty_prompts=0.0, seed=seed,
                           davis_root=os.path.join(data, "DAVIS"), ytvos_root=os.path.join(data, "YTVOS"))
    dataset = FinetuneDataset(args, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    embed = TextEmbedder(text_encoder)
    step, losses = 0, []
    while step < steps:
        for batch in loader:
            loss = training_step(batch, unet, brushnet, vae, embed, scheduler, torch.float32)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            if step % 50 == 0:
                print(f"step {step}: loss {sum(losses[-50:]) / 50:.4f}", flush=True)
            if step >= steps:
                break
    unet.save_pretrained(os.path.join(out, "unet_main"))
    brushnet.save_pretrained(os.path.join(out, "brushnet"))
    return out


def write_data(root):
    """Synthetic training videos (DAVIS + YouTube-VOS layouts) and held-out ones (other seeds)."""
    from diffueraser.tiny import write_synthetic_davis, write_synthetic_ytvos

    write_synthetic_davis(os.path.join(root, "DAVIS"), videos=("bear", "boat"), seed=0)
    write_synthetic_ytvos(os.path.join(root, "YTVOS"), videos=("yt0", "yt1"), seed=1)
    write_synthetic_ytvos(os.path.join(root, "held_out"), videos=("h0", "h1", "h2"), nframes=8, seed=7)
    return os.path.join(root, "held_out", "JPEGImages")


def run_check(out, steps=300, learning_rate=1e-2, seed=0, eval_steps=10, sd_path=None):
    """Train, then evaluate start vs trained; returns the evaluation results (means per weight set)."""
    from diffueraser.evaluate import main as evaluate_main
    from diffueraser.tiny import write_tiny_sd

    if sd_path is None:
        sd_path = write_tiny_sd(os.path.join(out, "tiny-sd"))
        identity_vae().save_pretrained(os.path.join(sd_path, "vae"))
    held_out = write_data(os.path.join(out, "data"))
    start = write_start(sd_path, os.path.join(out, "start"))
    began = time.time()
    trained = train_stage1(sd_path, start, os.path.join(out, "data"), os.path.join(out, "trained"), steps,
                           learning_rate, seed)
    print(f"trained {steps} steps in {time.time() - began:.1f} s")
    return evaluate_main("stage1", 8, [
        "--weights", f"untrained={start}", "--weights", f"trained={trained}", "--base_model_name_or_path", sd_path,
        "--videos", held_out, "--resolution", str(RESOLUTION), "--nframes", "8", "--steps", str(eval_steps),
        "--output_dir", os.path.join(out, "eval")])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="learning_check_out", help="Working folder.")
    parser.add_argument("--steps", type=int, default=300, help="Training steps.")
    parser.add_argument("--learning_rate", type=float, default=1e-2, help="Learning rate.")
    parser.add_argument("--seed", type=int, default=0, help="Training seed.")
    args = parser.parse_args(argv)
    results = run_check(os.path.abspath(args.out), args.steps, args.learning_rate, args.seed)
    rise = results["means"]["trained"]["psnr_hole"] - results["means"]["untrained"]["psnr_hole"]
    print(f"hole PSNR rise after {args.steps} steps: {rise:+.2f} dB")
    return results


if __name__ == "__main__":
    main()
