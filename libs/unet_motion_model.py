"""DiffuEraser's motion UNet: diffusers' UNetMotionModel plus per-layer BrushNet residuals.

The spatial layers are SD1.5's, the motion modules AnimateDiff's. BrushNet residuals come in
three lists (SD layout: 12 down, 1 mid, 15 up) and are added after every layer, always before
that layer's motion module:

- down: after `conv_in` (into the down blocks, not into the conv_in skip connection), after
        every resnet/attention pair, after every downsampler;
- mid:  inside the mid block, after its resnet (see `_forward_mid_block`);
- up:   after every resnet/attention pair, after every upsampler.

Videos are flattened to frames: `sample` is (B*F, C, h, w), frames of one clip adjacent.
Parameter names are those of diffusers' UNetMotionModel, which equal the released stage-2
checkpoints (saved by diffusers 0.29.2) at SD1.5 size, so no key bridging is needed.
"""
import functools

import torch
from diffusers import MotionAdapter as _DiffusersMotionAdapter
from diffusers import UNetMotionModel as _DiffusersUNetMotionModel
from diffusers.models.unets.unet_motion_model import UNetMotionOutput

from libs.unet_2d_condition import StrictLoadingMixin

__all__ = ["MotionAdapter", "UNetMotionModel"]

# The released checkpoints were trained with diffusers 0.29.2, whose up blocks without
# attention built their motion modules with GroupNorm's default of 32 groups.
RELEASED_UP_BLOCK_MOTION_GROUPS = 32


class MotionAdapter(StrictLoadingMixin, _DiffusersMotionAdapter):
    """diffusers' MotionAdapter (same config and state-dict keys) whose `from_pretrained` is strict:
    diffusers would initialise a missing tensor randomly and only warn."""


class UNetMotionModel(StrictLoadingMixin, _DiffusersUNetMotionModel):
    """diffusers' UNetMotionModel whose forward takes BrushNet residuals and flattened frames.

    Loading is strict (StrictLoadingMixin); from_unet2d, freeze_unet2d_params and
    save_motion_modules are diffusers' own.
    """

    @functools.wraps(_DiffusersUNetMotionModel.__init__)  # keeps diffusers' signature visible
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self.mid_block, "motion_modules"):
            raise ValueError("use_motion_mid_block=False is not supported: DiffuEraser's mid block has motion modules")
        for block in self.up_blocks:
            if not hasattr(block, "attentions"):
                for motion in block.motion_modules:
                    motion.norm.num_groups = RELEASED_UP_BLOCK_MOTION_GROUPS

    def residual_counts(self):
        """Numbers of (down, mid, up) BrushNet residuals this layout takes: (12, 1, 15) for SD1.5."""
        down = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in self.down_blocks)
        up = sum(len(b.resnets) + (b.upsamplers is not None) for b in self.up_blocks)
        return down, 1, up

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        down_block_add_samples=None,
        mid_block_add_sample=None,
        up_block_add_samples=None,
        *,
        num_frames,
        cross_attention_kwargs=None,
        return_dict=True,
    ):
        """Predict noise for B clips of F frames.

        Args:
            sample: (B*F, C_in, h, w) noisy latents, the F frames of each clip adjacent.
            timestep: a number, (B,) one per clip, or (B*F,) one per frame.
            encoder_hidden_states: (B, L, D) per clip (repeated over frames) or (B*F, L, D).
            down_block_add_samples: BrushNet down residuals, each (B*F, c, h_i, w_i), or None.
            mid_block_add_sample: BrushNet mid residual (B*F, c, h_mid, w_mid), or None.
            up_block_add_samples: BrushNet up residuals, each (B*F, c, h_i, w_i), or None.
            num_frames: F.
        Returns:
            UNetMotionOutput (or a 1-tuple) with sample (B*F, C_out, h, w).
        """
        if sample.shape[0] % num_frames:
            raise ValueError(f"sample batch {sample.shape[0]} is not a multiple of num_frames={num_frames}")
        batch = sample.shape[0] // num_frames
        temb = self._time_embedding(timestep, batch, num_frames, sample)  # (B*F, 4*c0)
        if encoder_hidden_states.shape[0] not in (batch, batch * num_frames):
            raise ValueError(f"encoder_hidden_states batch {encoder_hidden_states.shape[0]}: expected B={batch} "
                             f"or B*F={batch * num_frames}")
        if encoder_hidden_states.shape[0] != batch * num_frames:
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
        down_adds, up_adds = self._residual_lists(down_block_add_samples, up_block_add_samples)
        kw = dict(temb=temb, context=encoder_hidden_states, num_frames=num_frames,
                  attn_kwargs=cross_attention_kwargs)

        h = self.conv_in(sample)
        skips = [h]  # as in the released model, the conv_in skip does not carry BrushNet residual 0
        if down_adds:
            h = h + down_adds.pop(0)
        for block in self.down_blocks:
            h = self._forward_down_block(block, h, down_adds, skips, **kw)

        h = self._forward_mid_block(self.mid_block, h, mid_block_add_sample, **kw)

        # Sizes that do not halve evenly need the skip's size passed to the upsamplers.
        uneven = any(s % 2**self.num_upsamplers for s in sample.shape[-2:])
        for block in self.up_blocks:
            h = self._forward_up_block(block, h, up_adds, skips, uneven, **kw)

        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        h = self.conv_out(h)
        return UNetMotionOutput(sample=h) if return_dict else (h,)

    def _time_embedding(self, timestep, batch, num_frames, sample):
        """(B*F, 4*c0) time embedding from a scalar, (B,) or (B*F,) timestep."""
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if t.numel() not in (1, batch, batch * num_frames):
            raise ValueError(f"timestep has {t.numel()} entries; expected 1, B={batch} or B*F={batch * num_frames}")
        per_frame = t.numel() == batch * num_frames
        t = t if per_frame else t.expand(batch)
        emb = self.time_embedding(self.time_proj(t).to(dtype=self.dtype))
        return emb if per_frame else emb.repeat_interleave(num_frames, dim=0)

    def _residual_lists(self, down, up):
        """Copies (consumed by popping) of the down and up residual lists, checked against this layout."""
        n_down, _, n_up = self.residual_counts()
        for name, adds, n in (("down_block_add_samples", down, n_down), ("up_block_add_samples", up, n_up)):
            if adds is not None and len(adds) != n:
                raise ValueError(f"{name}: got {len(adds)} tensors, this UNet takes {n}")
        return (list(down) if down is not None else None), (list(up) if up is not None else None)

    @staticmethod
    def _run(block, module, *args):
        """module(*args), through the block's gradient-checkpointing switch (resnets, motion modules)."""
        if torch.is_grad_enabled() and block.gradient_checkpointing:
            return block._gradient_checkpointing_func(module, *args)
        return module(*args)

    def _forward_layer(self, block, i, h, residuals, temb, context, num_frames, attn_kwargs):
        """Layer i of a block: resnet, attention (if any), BrushNet residual, motion module."""
        h = self._run(block, block.resnets[i], h, temb)
        if hasattr(block, "attentions"):  # Transformer2DModel checkpoints its own layers
            h = block.attentions[i](h, encoder_hidden_states=context, cross_attention_kwargs=attn_kwargs,
                                    return_dict=False)[0]
        if residuals:
            h = h + residuals.pop(0)
        # AnimateDiffTransformer3D(hidden_states, encoder_hidden_states, timestep, class_labels, num_frames)
        return self._run(block, block.motion_modules[i], h, None, None, None, num_frames)

    def _forward_down_block(self, block, h, residuals, skips, **kw):
        """Run one down block; appends its skip connections to `skips`. Returns (B*F, c, h', w')."""
        for i in range(len(block.resnets)):
            h = self._forward_layer(block, i, h, residuals, **kw)
            skips.append(h)
        for downsampler in block.downsamplers or []:
            h = downsampler(h)
            if residuals:
                h = h + residuals.pop(0)
            skips.append(h)
        return h

    def _forward_mid_block(self, block, h, residual, temb, context, num_frames, attn_kwargs):
        """Run the mid block. Returns (B*F, c, h_mid, w_mid).

        Follows the released checkpoints (diffusers 0.29.2-era DiffuEraser), not current diffusers:
        each layer is attention, resnet, BrushNet residual, motion module, then the same resnet again.
        """
        h = self._run(block, block.resnets[0], h, temb)
        for attn, resnet, motion in zip(block.attentions, block.resnets[1:], block.motion_modules):
            h = attn(h, encoder_hidden_states=context, cross_attention_kwargs=attn_kwargs, return_dict=False)[0]
            h = self._run(block, resnet, h, temb)
            if residual is not None:
                h = h + residual
            h = self._run(block, motion, h, None, None, None, num_frames)
            h = self._run(block, resnet, h, temb)
        return h

    def _forward_up_block(self, block, h, residuals, skips, uneven, **kw):
        """Run one up block, consuming its skip connections from `skips`. Returns (B*F, c, h', w')."""
        for i in range(len(block.resnets)):
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._forward_layer(block, i, h, residuals, **kw)
        for upsampler in block.upsamplers or []:
            h = upsampler(h, skips[-1].shape[2:] if uneven else None)
            if residuals:
                h = h + residuals.pop(0)
        return h
