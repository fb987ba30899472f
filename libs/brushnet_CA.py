"""BrushNet with cross-attention: a full UNet-shaped branch whose per-layer features, through
zero-initialised 1x1 convs, are added to the main UNet (see `libs.unet_2d_condition`).

Built from diffusers' block factories; state-dict keys are those of released brushnet checkpoints:
`conv_in_condition`, `time_embedding`, `down_blocks`, `mid_block`, `up_blocks` (as in the UNet) and the
zero convs `brushnet_down_blocks.N`, `brushnet_mid_block`, `brushnet_up_blocks.N`.
"""
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_mid_block, get_up_block
from diffusers.utils import BaseOutput

from libs.unet_2d_condition import (
    StrictLoadingMixin, UNet2DConditionModel, run_decoder, run_down_block, run_mid_block,
)


@dataclass
class BrushNetOutput(BaseOutput):
    """Residuals for the main UNet, each shaped like the hidden state it is added to.

    down_block_res_samples: after conv_in, each down resnet/attention pair and downsampler (12 for SD).
    mid_block_res_sample: after the mid block. up_block_res_samples: after each up resnet/attention
    pair and upsampler (15 for SD).

    The fields default to None so that the output can be rebuilt from a dict, as accelerate does
    when it casts a prepared model's outputs to float32 under mixed precision.
    """

    down_block_res_samples: tuple[torch.Tensor, ...] = None
    mid_block_res_sample: torch.Tensor = None
    up_block_res_samples: tuple[torch.Tensor, ...] = None


def zero_conv(channels: int) -> nn.Conv2d:
    """1x1 conv initialised to zero, so a fresh branch leaves the main UNet unchanged."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def per_block(value, n: int) -> list:
    """A per-block list from a scalar or a sequence."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class BrushNetModel(StrictLoadingMixin, ModelMixin, AttentionMixin, ConfigMixin):
    """BrushNet branch: input cat(noisy latents, brushnet_cond) -> per-layer residuals for the UNet.

    `brushnet_cond` is (N, conditioning_channels, H, W): masked-image latents (4) and the latent
    mask (1). Only the SD1.5 family is built: class/addition embeddings and encoder_hid_proj are
    accepted as config keys (released config.json files carry them) but must be null.
    `conditioning_embedding_out_channels` is kept for config compatibility and unused.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
        ),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int, ...] = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        unsupported = dict(encoder_hid_dim_type=encoder_hid_dim_type, class_embed_type=class_embed_type,
                           addition_embed_type=addition_embed_type, num_class_embeds=num_class_embeds)
        for key, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"BrushNetModel: {key}={value!r} is not supported (SD1.5 family only)")
        if brushnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"brushnet_conditioning_channel_order: {brushnet_conditioning_channel_order!r}")

        n = len(down_block_types)
        # diffusers' naming quirk: for SD checkpoints `attention_head_dim` is the number of heads
        heads = per_block(num_attention_heads or attention_head_dim, n)
        head_dims = per_block(attention_head_dim, n)
        cross_dims = per_block(cross_attention_dim, n)
        layers = per_block(layers_per_block, n)
        tf_layers = per_block(transformer_layers_per_block, n)
        only_cross = per_block(only_cross_attention, n)
        temb_dim = block_out_channels[0] * 4
        common = dict(temb_channels=temb_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                      use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                      resnet_time_scale_shift=resnet_time_scale_shift)

        self.conv_in_condition = nn.Conv2d(in_channels + conditioning_channels, block_out_channels[0], 3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], temb_dim, act_fn=act_fn)

        self.down_blocks = nn.ModuleList()
        self.brushnet_down_blocks = nn.ModuleList([zero_conv(block_out_channels[0])])
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            is_final = i == n - 1
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers[i], transformer_layers_per_block=tf_layers[i], in_channels=in_ch,
                out_channels=out_ch, add_downsample=not is_final, cross_attention_dim=cross_dims[i],
                num_attention_heads=heads[i], attention_head_dim=head_dims[i] or out_ch,
                downsample_padding=downsample_padding, only_cross_attention=only_cross[i], **common))
            self.brushnet_down_blocks.extend(zero_conv(out_ch) for _ in range(layers[i] + (not is_final)))

        self.mid_block = get_mid_block(
            mid_block_type, in_channels=block_out_channels[-1], output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=tf_layers[-1], num_attention_heads=heads[-1],
            cross_attention_dim=cross_dims[-1], attention_head_dim=head_dims[-1], **common)
        self.brushnet_mid_block = zero_conv(block_out_channels[-1])

        self.up_blocks = nn.ModuleList()
        self.brushnet_up_blocks = nn.ModuleList()
        rev_ch, rev_layers, rev_tf_layers, rev_cross_dims, rev_heads, rev_only_cross = (
            v[::-1] for v in (list(block_out_channels), layers, tf_layers, cross_dims, heads, only_cross))
        out_ch = rev_ch[0]
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch, in_ch = out_ch, rev_ch[i], rev_ch[min(i + 1, n - 1)]
            is_final = i == n - 1
            self.up_blocks.append(get_up_block(
                block_type, num_layers=rev_layers[i] + 1, transformer_layers_per_block=rev_tf_layers[i],
                in_channels=in_ch, out_channels=out_ch, prev_output_channel=prev_ch, add_upsample=not is_final,
                resolution_idx=i, cross_attention_dim=rev_cross_dims[i], num_attention_heads=rev_heads[i],
                attention_head_dim=head_dims[i] or out_ch, only_cross_attention=rev_only_cross[i], **common))
            self.brushnet_up_blocks.extend(zero_conv(out_ch) for _ in range(rev_layers[i] + 1 + (not is_final)))

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 5,
    ) -> "BrushNetModel":
        """A BrushNet shaped like `unet`; with `load_weights_from_unet`, its blocks start as copies.

        conv_in_condition (C0, 4 + 5, 3, 3) gets the UNet's conv_in weights for the noisy latents
        (channels 0-3) *and again* for the masked-image latents (4-7), zero for the mask (8), and
        conv_in's bias. Zero convs stay zero.
        """
        c = unet.config
        brushnet = cls(
            in_channels=c.in_channels, conditioning_channels=conditioning_channels,
            flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift, down_block_types=c.down_block_types,
            mid_block_type=c.mid_block_type, up_block_types=c.up_block_types,
            only_cross_attention=c.only_cross_attention, block_out_channels=c.block_out_channels,
            layers_per_block=c.layers_per_block, downsample_padding=c.downsample_padding,
            mid_block_scale_factor=c.mid_block_scale_factor, act_fn=c.act_fn, norm_num_groups=c.norm_num_groups,
            norm_eps=c.norm_eps, cross_attention_dim=c.cross_attention_dim,
            transformer_layers_per_block=c.transformer_layers_per_block, encoder_hid_dim=c.encoder_hid_dim,
            encoder_hid_dim_type=c.encoder_hid_dim_type, attention_head_dim=c.attention_head_dim,
            num_attention_heads=c.num_attention_heads, use_linear_projection=c.use_linear_projection,
            class_embed_type=c.class_embed_type, addition_embed_type=c.addition_embed_type,
            addition_time_embed_dim=c.addition_time_embed_dim, num_class_embeds=c.num_class_embeds,
            upcast_attention=c.upcast_attention, resnet_time_scale_shift=c.resnet_time_scale_shift,
            projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim,
            brushnet_conditioning_channel_order=brushnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            global_pool_conditions=False, addition_embed_type_num_heads=c.addition_embed_type_num_heads,
        )
        if load_weights_from_unet:
            weight = unet.conv_in.weight  # (C0, 4, 3, 3)
            with torch.no_grad():
                brushnet.conv_in_condition.weight.zero_()
                brushnet.conv_in_condition.weight[:, :weight.shape[1]].copy_(weight)
                brushnet.conv_in_condition.weight[:, weight.shape[1]:2 * weight.shape[1]].copy_(weight)
                brushnet.conv_in_condition.bias.copy_(unet.conv_in.bias)
            for name in ("time_embedding", "down_blocks", "mid_block", "up_blocks"):
                getattr(brushnet, name).load_state_dict(getattr(unet, name).state_dict())
        return brushnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        brushnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> BrushNetOutput | tuple:
        """Residuals for the main UNet.

        sample: noisy latents (N, in_channels, H, W); timestep: scalar or (N,); encoder_hidden_states:
        (N, L, cross_attention_dim); brushnet_cond: (N, conditioning_channels, H, W).
        Residuals are multiplied by `conditioning_scale`; with `guess_mode`, by
        `conditioning_scale * logspace(-1, 0)` over down, mid and up residuals in order.
        `class_labels` and `added_cond_kwargs` are accepted for API parity; SD1.5 has no use for them.
        """
        if class_labels is not None:
            raise ValueError("class_labels: this BrushNet has no class embedding")
        if attention_mask is not None:  # 1 = keep, 0 = discard -> additive bias with a query axis
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if self.config.brushnet_conditioning_channel_order == "bgr":
            brushnet_cond = torch.flip(brushnet_cond, dims=[1])

        timesteps = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        t_emb = self.time_proj(timesteps.reshape(-1).expand(sample.shape[0])).to(dtype=sample.dtype)
        temb = self.time_embedding(t_emb, timestep_cond)  # (N, 4 * C0)
        context = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                       cross_attention_kwargs=cross_attention_kwargs, encoder_attention_mask=None)

        h = self.conv_in_condition(torch.cat([sample, brushnet_cond], dim=1))  # (N, C0, H, W)
        skips = (h,)
        for block in self.down_blocks:
            h, outputs = run_down_block(block, h, temb, context)
            skips += outputs
        h = run_mid_block(self.mid_block, h, temb, context)
        mid = self.brushnet_mid_block(h)
        _, up_features = run_decoder(self.up_blocks, h, skips, temb, context)

        down = [conv(s) for conv, s in zip(self.brushnet_down_blocks, skips, strict=True)]
        up = [conv(s) for conv, s in zip(self.brushnet_up_blocks, up_features, strict=True)]
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1 + len(up), device=sample.device) * conditioning_scale
            down = [r * s for r, s in zip(down, scales[:len(down)])]
            mid = mid * scales[len(down)]
            up = [r * s for r, s in zip(up, scales[len(down) + 1:])]
        else:
            down = [r * conditioning_scale for r in down]
            mid = mid * conditioning_scale
            up = [r * conditioning_scale for r in up]
        if self.config.global_pool_conditions:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
            up = [r.mean(dim=(2, 3), keepdim=True) for r in up]

        if not return_dict:
            return tuple(down), mid, tuple(up)
        return BrushNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid,
                              up_block_res_samples=tuple(up))
