"""Overfitting one clip with the real training step lowers the loss clearly, in both stages."""
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from diffueraser.tiny import TINY_SCHEDULER, TINY_VAE, tiny_stage_models
from diffueraser.trainer import TextEmbedder, training_step


def one_clip(f, r=32):
    g = torch.Generator().manual_seed(0)
    pixel = torch.rand(1, f, 3, r, r, generator=g) * 2 - 1
    masks = torch.ones(1, f, 1, r, r)
    masks[..., r // 4: r // 2, r // 4: r // 2] = 0
    return dict(pixel_values=pixel, conditioning_pixel_values=pixel * masks, masks=masks,
                input_ids=torch.randint(0, 100, (1, 77), generator=g))


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_overfit_one_clip(stage):
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=20, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2)).eval()
    unet, brushnet = tiny_stage_models(stage)
    f = 2 if stage == "stage1" else 4
    params = [p for m in (unet, brushnet) for p in m.parameters() if p.requires_grad]
    # Stage 2 moves only the motion modules (~40% of the parameters, all behind zero-ish
    # temporal attention), so it needs a larger step to fit the same clip in 40 updates.
    optimizer = torch.optim.AdamW(params, lr=2e-3 if stage == "stage1" else 1e-2)
    scheduler, embed, batch = DDPMScheduler(**TINY_SCHEDULER), TextEmbedder(text), one_clip(f)
    losses = []
    for _ in range(40):
        torch.manual_seed(1)  # same noise and timestep every step: a fixed target to fit
        loss = training_step(batch, unet, brushnet, vae, embed, scheduler, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # Measured: stage 1 falls to 0.32x, stage 2 to 0.69x of the first loss; a broken step
    # (no gradient reaching the trained parameters, wrong target) stays within a few percent.
    assert losses[-1] < (0.5 if stage == "stage1" else 0.85) * losses[0], losses
