"""`--compile` (on by default with CUDA) keeps the numbers: compiled blocks and the compiled
channels-last VAE encoder against their eager selves, on CPU (inductor's C++ backend)."""
import copy
import pickle
from types import SimpleNamespace

import pytest
import torch

from diffueraser.tiny import TINY_MOTION_ADAPTER, TINY_UNET, TINY_VAE
from diffueraser.speed import compile_blocks, norms_by_channel
from diffueraser.trainer import encode_latents, place_frozen_encoders


def grads_of(block, run):
    block.zero_grad(set_to_none=True)
    out = run(block)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["cross_attention_down_block", "checkpointed_down_block", "channels_last_down_block",
                                  "motion_module"])
def test_compiled_blocks_match_eager(kind):
    from libs.unet_2d_condition import UNet2DConditionModel
    from libs.unet_motion_model import MotionAdapter, UNetMotionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    x = torch.randn(4, 4, 16, 16)
    if kind.endswith("down_block"):  # two resnets + two transformers (+ downsampler, eager)
        block, temb, text = unet.down_blocks[0], torch.randn(4, 16), torch.randn(4, 77, 20)
        def run(b):
            return b(x, temb, encoder_hidden_states=text)[0]
    else:
        motion = UNetMotionModel.from_unet2d(unet, MotionAdapter(**TINY_MOTION_ADAPTER))
        block = motion.down_blocks[0].motion_modules[0]
        def run(b):
            return b(x, num_frames=2)
    out, grads = grads_of(block, run)
    if kind.startswith("checkpointed"):  # compiled blocks called inside activation checkpoints
        unet.enable_gradient_checkpointing()
        assert block.gradient_checkpointing
    compiled = copy.deepcopy(block)
    if kind.startswith("channels_last"):  # --channels_last compiled: NHWC weights and input, GroupNorms by channel
        norms_by_channel(compiled.to(memory_format=torch.channels_last))
        x = x.contiguous(memory_format=torch.channels_last)
    compiled = compile_blocks(compiled)
    assert any(getattr(m, "_compiled_call_impl", None) is not None for m in compiled.modules())
    out_c, grads_c = grads_of(compiled, run)
    assert torch.allclose(out_c, out, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads.keys() and grads
    for name in grads:
        assert torch.allclose(grads_c[name], grads[name], rtol=1e-3, atol=1e-6), name
    assert compiled.state_dict().keys() == block.state_dict().keys()  # no _orig_mod. in checkpoints


def test_compiled_channels_last_vae_encoder_matches_eager():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval().requires_grad_(False)
    text = torch.nn.Linear(2, 2)
    pixels, masked = torch.rand(2, 1, 3, 32, 32) * 2 - 1, torch.rand(2, 1, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    ref = encode_latents(vae, pixels, masked)
    place_frozen_encoders(SimpleNamespace(compile=True), vae, text, torch.device("cpu"), torch.float32)
    assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    norms = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m).__name__ == "ChannelStatsGroupNorm" for m in norms)  # --vae_channel_norm, default
    torch.manual_seed(1)
    got = encode_latents(vae, pixels, masked)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, groups, affine", [((2, 32, 8, 8), 8, True), ((3, 16, 5, 7), 4, False),
                                                   ((2, 64, 40), 32, True)])  # 3D: the VAE attention's norm
def test_norms_by_channel_equal_group_norm(shape, groups, affine):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, shape[1], eps=1e-6, affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(shape) * 3 + 50  # a large mean: per-channel statistics must combine exactly
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    truth = copy.deepcopy(norm).double()(x.double())
    by_channel = norms_by_channel(copy.deepcopy(norm))
    got = by_channel(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert x.dim() == 3 or got.is_contiguous(memory_format=torch.channels_last)
    native_err = (norm(x).double() - truth).abs().max()
    assert (got.double() - truth).abs().max() <= max(native_err, 1e-5)  # at least as close as F.group_norm
    assert by_channel.state_dict().keys() == norm.state_dict().keys()
    assert torch.equal(pickle.loads(pickle.dumps(by_channel))(x), got)
    compiled = torch.compile(by_channel, fullgraph=True, dynamic=False)
    assert (compiled(x).double() - truth).abs().max() <= max(2 * native_err, 1e-5)
    half = by_channel.half()(x.half())  # fp16 in, fp16 out, as in the VAE
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), norm.half()(x.half()).float(), atol=1e-2)


def test_whole_model_compile_matches_eager(monkeypatch):
    """`--compile_scope model` (opt-in): the whole UNet traced as one graph, in place, keys unchanged. Inductor's code
    generation is the blocks' (above); here AOT autograd's eager backend stands in for it (the whole tiny UNet through
    inductor takes ~5 min on 2 cores), so what is tested is that the model traces, forward and backward, and keeps
    its numbers."""
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager", **kw))
    from libs.unet_2d_condition import UNet2DConditionModel
    from diffueraser.speed import compile_models

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 20)
    def run(m):
        return m(x, t, encoder_hidden_states=text).sample
    out, grads = grads_of(unet, run)
    compiled = copy.deepcopy(unet)
    compile_models(SimpleNamespace(compile_scope="model"), compiled)
    assert compiled._compiled_call_impl is not None
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in compiled.down_blocks.modules())
    out_c, grads_c = grads_of(compiled, run)
    assert torch.allclose(out_c, out, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads.keys() and grads
    for name in grads:
        assert torch.allclose(grads_c[name], grads[name], rtol=1e-3, atol=1e-6), name
    assert compiled.state_dict().keys() == unet.state_dict().keys()
