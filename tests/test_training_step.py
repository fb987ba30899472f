"""The training step's numerics: reference fixtures, and every speed option against the plain fp32 step."""
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from diffueraser.speed import configure_speed, half_precision_norms
from diffueraser.trainer import TextEmbedder, diffusion_inputs, diffusion_loss, encode_latents, training_step
from libs.brushnet_CA import BrushNetModel
from libs.unet_2d_condition import UNet2DConditionModel
from libs.unet_motion_model import UNetMotionModel

CASES = [("tiny_stage1", "main"), ("tiny_stage1", "odd"), ("tiny_stage2", "main"), ("tiny_stage2", "odd"),
         ("tiny_stage2", "b2")]
# tolerance_study.json: harmless changes (threads, SDPA vs classic attention, float64) move the
# original's own outputs by up to 1.4e-6; the loss is a mean of those, so 1e-5 is a safe bound.
ATOL = 1e-5


def load_case(reference, stage, case):
    tensors = load_file(str(reference / stage / f"case_{case}.safetensors"))
    meta = json.loads((reference / stage / "cases.json").read_text())
    scheduler = DDPMScheduler.from_config(meta["scheduler"]["config"])
    return tensors, meta["cases"][case], scheduler


def load_models(reference, stage):
    unet_cls = UNetMotionModel if stage == "tiny_stage2" else UNet2DConditionModel
    unet = unet_cls.from_pretrained(str(reference / stage / "unet_main")).eval()
    brushnet = BrushNetModel.from_pretrained(str(reference / "tiny_stage1" / "brushnet")).eval()
    return unet, brushnet


@pytest.mark.parametrize("stage,case", CASES)
def test_inputs_match_reference(reference, stage, case):
    t, info, scheduler = load_case(reference, stage, case)
    b, f = t["in.pixel_masks"].shape[:2]
    masks = t["in.pixel_masks"].flatten(0, 1).float()
    noisy, frame_t, cond = diffusion_inputs(scheduler, t["in.latents"], t["in.conditioning_latents"], masks,
                                            t["in.noise"], t["in.timesteps"], f)
    # 1e-6, the reference README's bound for prep.*: exact on the CI machines so far, 2.4e-7 off on an
    # AVX-512 Xeon (the scheduler's arithmetic rounds differently in its vectorised kernels)
    torch.testing.assert_close(noisy, t["prep.noisy_latents"], rtol=0, atol=1e-6)
    assert torch.equal(cond, t["prep.brushnet_cond"])
    assert torch.equal(cond[:, 4:], t["prep.latent_masks"].flatten(0, 1))
    if "prep.brushnet_timesteps" in t:
        assert torch.equal(frame_t, t["prep.brushnet_timesteps"])


@pytest.mark.parametrize("stage,case", CASES)
def test_loss_matches_reference(reference, stage, case):
    t, info, scheduler = load_case(reference, stage, case)
    unet, brushnet = load_models(reference, stage)
    if stage == "tiny_stage2":
        brushnet.requires_grad_(False)
    f = t["in.pixel_masks"].shape[1]
    with torch.no_grad():
        loss = diffusion_loss(unet, brushnet, scheduler, t["in.latents"], t["in.conditioning_latents"],
                              t["in.pixel_masks"].flatten(0, 1).float(), t["in.text_embeds"], t["in.noise"],
                              t["in.timesteps"], f)
    assert abs(loss.item() - info["loss"]) < ATOL
    assert abs(loss.item() - t["out.loss"].item()) < ATOL


def test_v_prediction_target(reference):
    t, _, scheduler = load_case(reference, "tiny_stage1", "main")
    scheduler = DDPMScheduler.from_config({**scheduler.config, "prediction_type": "v_prediction"})
    unet, brushnet = load_models(reference, "tiny_stage1")
    with torch.no_grad():
        args = (t["in.latents"], t["in.conditioning_latents"], t["in.pixel_masks"].flatten(0, 1).float(),
                t["in.text_embeds"], t["in.noise"], t["in.timesteps"], 2)
        v_loss = diffusion_loss(unet, brushnet, scheduler, *args)
    frame_t = t["in.timesteps"].repeat_interleave(2)
    target = scheduler.get_velocity(t["in.latents"], t["in.noise"], frame_t)
    expected = torch.nn.functional.mse_loss(t["out.unet_main.sample"], target)
    assert abs(v_loss.item() - expected.item()) < ATOL


# ----------------------------------------------------------------------------- speed options
def tiny_batch(b=1, f=2, r=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixel = torch.rand(b, f, 3, r, r, generator=g) * 2 - 1
    masks = (torch.rand(b, f, 1, r, r, generator=g) > 0.3).float()
    return dict(pixel_values=pixel, conditioning_pixel_values=pixel * masks, masks=masks,
                input_ids=torch.randint(0, 100, (b, 77), generator=g))


def step_loss_and_grads(reference, tmp_path, stage, *, checkpointing=False, channels_last=False, dtype=None,
                        vae_batch_size=0, fast_norms=False):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffueraser.tiny import TINY_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=20, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2)).eval()
    unet, brushnet = load_models(reference, stage)
    unet.train()
    if stage == "tiny_stage2":
        unet.freeze_unet2d_params()
        brushnet.requires_grad_(False)
    else:
        brushnet.train()
    trained = [m for m in (unet, brushnet) if any(p.requires_grad for p in m.parameters())]
    if channels_last:  # as a compiled --channels_last run: both nets NHWC, GroupNorms by channel
        configure_speed(SimpleNamespace(enable_xformers_memory_efficient_attention=False, channels_last=True,
                                        compile=True, fast_norms=False), unet, brushnet)
        assert any(type(m).__name__ == "ChannelStatsGroupNorm" for m in unet.modules())
    for m in trained:
        if checkpointing:
            m.enable_gradient_checkpointing()
        if fast_norms:
            half_precision_norms(m)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = training_step(tiny_batch(f=4 if stage == "tiny_stage2" else 2), unet, brushnet, vae, TextEmbedder(text),
                             scheduler, torch.float32, vae_batch_size)
    loss.backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(trained) for n, p in m.named_parameters()
             if p.requires_grad}
    return loss.item(), grads


def assert_close(a, b, rtol, atol):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert abs(loss_a - loss_b) <= atol + rtol * abs(loss_b)
    assert grads_a.keys() == grads_b.keys()
    num = torch.sqrt(sum(((grads_a[k] - grads_b[k]).float() ** 2).sum() for k in grads_a))
    den = torch.sqrt(sum((grads_b[k].float() ** 2).sum() for k in grads_b))
    assert num / den < rtol, f"relative gradient error {num / den:.2e}"


@pytest.mark.parametrize("stage", ["tiny_stage1", "tiny_stage2"])
def test_speed_options_keep_numerics(reference, tmp_path, stage):
    plain = step_loss_and_grads(reference, tmp_path, stage)
    # fp32 options: only the summation order changes.
    assert_close(step_loss_and_grads(reference, tmp_path, stage, checkpointing=True), plain, 1e-5, 1e-6)
    assert_close(step_loss_and_grads(reference, tmp_path, stage, channels_last=True), plain, 1e-4, 1e-6)
    # bf16 autocast: 8 mantissa bits, errors of a few 1e-3 per op compound through the nets.
    # oneDNN's bf16 convolution weight gradient on CPU (torch 2.14.1) returns NaNs now and then for
    # 1x1 inputs (the tiny nets' deepest downsampler) while its inputs and output gradient are
    # finite; PyTorch's own CPU convolution does not, so the bf16 steps run without oneDNN.
    with torch.backends.mkldnn.flags(enabled=False):
        bf16 = step_loss_and_grads(reference, tmp_path, stage, dtype=torch.bfloat16)
        # half-precision norms under bf16 autocast: no further from fp32 than plain bf16 autocast is
        fast = step_loss_and_grads(reference, tmp_path, stage, dtype=torch.bfloat16, fast_norms=True)
        nhwc = step_loss_and_grads(reference, tmp_path, stage, dtype=torch.bfloat16, channels_last=True)
    assert_close(bf16, plain, 0.1, 0.05)
    assert_close(fast, plain, 0.1, 0.05)
    assert_close(nhwc, plain, 0.1, 0.05)
    # ...and in fp32 they are exactly the plain norms
    assert_close(step_loss_and_grads(reference, tmp_path, stage, fast_norms=True), plain, 1e-6, 1e-7)


def test_text_embeddings_cached():
    from transformers import CLIPTextConfig, CLIPTextModel

    calls = []
    text = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=20, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2)).eval()
    text.register_forward_hook(lambda *a: calls.append(1))
    embed = TextEmbedder(text)
    ids = torch.randint(0, 100, (2, 77))
    first = embed(ids)
    second = embed(ids.flip(0))
    assert len(calls) == 2
    assert torch.equal(first, second.flip(0))
    with torch.no_grad():
        assert torch.allclose(first[0], text(ids[:1])[0][0])


def test_encode_latents_one_call_equals_two(tmp_path):
    from diffusers import AutoencoderKL

    from diffueraser.tiny import TINY_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    batch = tiny_batch(b=2, f=2)
    torch.manual_seed(3)
    lat, cond = encode_latents(vae, batch["pixel_values"], batch["conditioning_pixel_values"])
    assert lat.shape == cond.shape == (4, 4, 4, 4)
    chunked = encode_latents(vae, batch["pixel_values"], batch["conditioning_pixel_values"], chunk=3)
    assert chunked[0].shape == lat.shape and not torch.equal(chunked[0], lat)  # fresh samples
    sf = vae.config.scaling_factor
    with torch.no_grad():  # each half must be a sample of its own inputs' latent distribution
        for got, x in ((lat, batch["pixel_values"]), (cond, batch["conditioning_pixel_values"]),
                       (chunked[0], batch["pixel_values"]), (chunked[1], batch["conditioning_pixel_values"])):
            dist = vae.encode(x.flatten(0, 1)).latent_dist
            assert ((got - dist.mean * sf).abs() <= 6 * dist.std * sf + 1e-5).all()
