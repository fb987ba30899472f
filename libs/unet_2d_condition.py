"""SD1.5 UNet that takes BrushNet's per-layer residuals, plus the block walkers BrushNet shares.

Same config and state-dict keys as diffusers' `UNet2DConditionModel`; only `forward` differs. Blocks
are walked layer by layer where diffusers' modules live (`block.resnets`, `block.attentions`,
`block.downsamplers`, `block.upsamplers`) so a residual can be added after each layer.
"""
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import (
    UNet2DConditionModel as _DiffusersUNet2DConditionModel,
    UNet2DConditionOutput,
)


class StrictLoadingMixin:
    """`from_pretrained` that refuses checkpoints with missing, unexpected or misshapen tensors.

    diffusers only warns and initialises such tensors randomly; here the error names every key.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = [f"missing tensor {k}" for k in sorted(info["missing_keys"])]
        problems += [f"unexpected tensor {k}" for k in sorted(info["unexpected_keys"])]
        problems += [f"tensor {k} has shape {tuple(a)}, model expects {tuple(b)}" for k, a, b in info["mismatched_keys"]]
        if problems:
            raise ValueError(f"{cls.__name__}.from_pretrained({pretrained_model_name_or_path}): " + "; ".join(problems))
        return (model, info) if want_info else model


def layers(block):
    """(resnet, attention or None) pairs of a diffusers down/up block, in execution order."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    return zip(block.resnets, attentions)


def run_resnet(block, resnet, h, temb):
    """One resnet, checkpointed through the block's own gradient-checkpointing switch."""
    if torch.is_grad_enabled() and block.gradient_checkpointing:
        return block._gradient_checkpointing_func(resnet, h, temb)
    return resnet(h, temb)


def run_down_block(block, h, temb, context: dict, add_samples: list | None = None):
    """Run a down block layer by layer; returns `(h, per-layer outputs)` like `block.forward`.

    `context` holds the attention kwargs (`encoder_hidden_states`, masks, `cross_attention_kwargs`).
    `add_samples` (popped in place) gives one residual per resnet/attention pair and per downsampler.
    """
    outputs = ()
    for resnet, attn in layers(block):
        h = run_resnet(block, resnet, h, temb)
        if attn is not None:
            h = attn(h, return_dict=False, **context)[0]
        if add_samples is not None:
            h = h + add_samples.pop(0)
        outputs += (h,)
    for downsampler in block.downsamplers or []:
        h = downsampler(h)
        if add_samples is not None:
            h = h + add_samples.pop(0)
        outputs += (h,)
    return h, outputs


def run_up_block(block, h, skips, temb, context: dict, upsample_size=None, add_samples: list | None = None):
    """Run an up block layer by layer, consuming `skips` from the end; returns `(h, per-layer outputs)`.

    One output (and one popped residual) per resnet/attention pair and per upsampler.
    """
    outputs = ()
    for resnet, attn in layers(block):
        h = torch.cat([h, skips[-1]], dim=1)
        skips = skips[:-1]
        h = run_resnet(block, resnet, h, temb)
        if attn is not None:
            h = attn(h, return_dict=False, **context)[0]
        if add_samples is not None:
            h = h + add_samples.pop(0)
        outputs += (h,)
    for upsampler in block.upsamplers or []:
        h = upsampler(h, upsample_size)
        if add_samples is not None:
            h = h + add_samples.pop(0)
        outputs += (h,)
    return h, outputs


def run_mid_block(mid_block, h, temb, context: dict):
    """The mid block as diffusers calls it (cross-attention kwargs only if it has attention)."""
    if getattr(mid_block, "has_cross_attention", False):
        return mid_block(h, temb, **context)
    return mid_block(h, temb)


def run_decoder(up_blocks, h, skips, temb, context: dict, add_samples: list | None = None):
    """All up blocks; returns `(h, every per-layer output in order)`.

    `skips` are the down path's outputs, first = conv_in output (its size decides whether the
    upsamplers need an explicit output size, as in diffusers, for latents not divisible by 2**n).
    """
    factor = 2 ** sum(block.upsamplers is not None for block in up_blocks)
    forward_size = any(d % factor for d in skips[0].shape[-2:])
    outputs = ()
    for block in up_blocks:
        n = len(block.resnets)
        block_skips, skips = skips[-n:], skips[:-n]
        upsample_size = skips[-1].shape[2:] if forward_size and skips else None
        h, block_outputs = run_up_block(block, h, block_skips, temb, context, upsample_size, add_samples)
        outputs += block_outputs
    return h, outputs


def count_layers(blocks, samplers: str) -> int:
    """Number of per-layer outputs of `blocks` (resnet/attention pairs plus down/upsamplers)."""
    return sum(len(b.resnets) + len(getattr(b, samplers) or []) for b in blocks)


class UNet2DConditionModel(StrictLoadingMixin, _DiffusersUNet2DConditionModel):
    """diffusers' SD UNet whose forward also adds BrushNet's residuals layer by layer.

    Residuals (each the shape of the hidden state it is added to) go: after `conv_in`, after each
    down resnet/attention pair and downsampler, after the mid block, after each up resnet/attention
    pair and upsampler. SD1.5 layout: 12 down, 1 mid, 15 up.
    """

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        down_block_add_samples: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        mid_block_add_sample: torch.Tensor | None = None,
        up_block_add_samples: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        num_frames: int | None = None,
    ) -> UNet2DConditionOutput | tuple:
        """Predict noise for `sample` (N, C_in, H, W) at `timestep` (scalar or (N,)).

        encoder_hidden_states: (N, L, cross_attention_dim). down/mid/up_block_add_samples: BrushNet's
        residuals in its output order (already scaled). ControlNet residuals
        (`down_block_additional_residuals`, `mid_block_additional_residual`) work as in diffusers.
        `num_frames` is ignored (frames are batch entries), so this UNet and the motion UNet take the
        same call. FreeU, GLIGEN and T2I-adapter residuals are not supported.
        Returns `sample` (N, out_channels, H, W).
        """
        if down_intrablock_additional_residuals is not None or self.config.addition_embed_type == "image_hint":
            raise NotImplementedError("T2I-Adapter residuals and addition_embed_type='image_hint' are not supported")
        down_add = self._checked(down_block_add_samples, count_layers(self.down_blocks, "downsamplers") + 1, "down")
        up_add = self._checked(up_block_add_samples, count_layers(self.up_blocks, "upsamplers"), "up")

        # masks (1 = keep, 0 = discard) become additive biases with a query axis, as in diffusers
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        temb = self._embed_time(sample, timestep, timestep_cond, class_labels, encoder_hidden_states, added_cond_kwargs)
        encoder_hidden_states = self.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)
        context = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
        )

        h = self.conv_in(sample)  # (N, C0, H, W)
        skips = (h,)
        # As in the original (and so the released weights): the first skip is conv_in's output
        # *before* BrushNet's first residual; only the down path sees that residual.
        if down_add is not None:
            h = h + down_add.pop(0)
        for block in self.down_blocks:
            h, outputs = run_down_block(block, h, temb, context, down_add)
            skips += outputs

        if down_block_additional_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals, strict=True))
        if self.mid_block is not None:
            h = run_mid_block(self.mid_block, h, temb, context)
        if mid_block_add_sample is not None:
            h = h + mid_block_add_sample
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        h, _ = run_decoder(self.up_blocks, h, skips, temb, context, up_add)

        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        h = self.conv_out(h)
        return UNet2DConditionOutput(sample=h) if return_dict else (h,)

    def _embed_time(self, sample, timestep, timestep_cond, class_labels, encoder_hidden_states, added_cond_kwargs):
        """Time (+ class, + addition) embedding `temb` (N, time_embed_dim), as diffusers computes it."""
        temb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = self.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            temb = torch.cat([temb, class_emb], dim=-1) if self.config.class_embeddings_concat else temb + class_emb
        aug_emb = self.get_aug_embed(emb=temb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        if aug_emb is not None:
            temb = temb + aug_emb
        return self.time_embed_act(temb) if self.time_embed_act is not None else temb

    @staticmethod
    def _checked(samples, expected: int, where: str) -> list | None:
        """A fresh list of residuals to pop from, after checking there is one per layer."""
        if samples is None:
            return None
        if len(samples) != expected:
            raise ValueError(f"{where}_block_add_samples: expected {expected} tensors, got {len(samples)}")
        return list(samples)
