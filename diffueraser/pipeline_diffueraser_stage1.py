"""Stage-1 sampler: a 2D SD1.5 UNet guided by the BrushNet branch, one clip of frames at a time.

Used by validation during training and by the demo. Conventions are the training ones:
masks are hole = 0, kept = 1; BrushNet's condition is cat([masked_latents, latent_mask]), where
masked_latents = vae.encode(frame * kept) * scaling_factor with the frame in [0, 1] before the
[-1, 1] normalisation (so the hole is black, -1, exactly as the training data makes it) and
latent_mask is the mask resized to latent size (nearest).
"""
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UniPCMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor


class DiffuEraserPipelineStage1(DiffusionPipeline):
    """Video inpainting with UNet + BrushNet and a UniPC sampler.

    Pass unwrapped models (not DDP/accelerate wrappers). Each model may have its own dtype (frozen
    ones in the mixed-precision dtype, trained ones in float32); inputs are cast per model and the
    latents stay float32 for the scheduler.
    """

    model_cpu_offload_seq = "text_encoder->brushnet->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, brushnet, scheduler):
        super().__init__()
        if not isinstance(scheduler, UniPCMultistepScheduler):
            scheduler = UniPCMultistepScheduler.from_config(scheduler.config)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              brushnet=brushnet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def encode_prompt(self, prompt, num_frames):
        """Text embedding of `prompt` repeated per frame: (num_frames, 77, D) in the UNet's dtype."""
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder(ids.to(self.device))[0]  # (1, 77, D)
        return embeds.to(self.unet.dtype).repeat(num_frames, 1, 1)

    def prepare_condition(self, frames, masks, decode_chunk_size):
        """BrushNet condition (F, 5, H/8, W/8) from uint8 frames (F, H, W, 3) and masks (F, H, W).

        Masks: float in [0, 1] or uint8 0/1 or 0/255, hole = 0; binarised at 0.5.
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or masks.shape != frames.shape[:3]:
            raise ValueError(f"frames must be (F, H, W, 3) and masks (F, H, W); got {frames.shape} and {masks.shape}")
        height, width = frames.shape[1:3]
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"frame size {height}x{width} must be a multiple of {self.vae_scale_factor}")
        kept = torch.from_numpy(np.asarray(masks, dtype=np.float32))
        kept = (kept / (255.0 if kept.max() > 1 else 1.0) > 0.5).float()[:, None].to(self.device)  # (F, 1, H, W)
        pixels = torch.from_numpy(frames.astype(np.float32) / 255.0).permute(0, 3, 1, 2).to(self.device)
        # As in training: the hole is black (0 in [0, 1]) before the [-1, 1] normalisation.
        latents = self.encode_pixels((pixels * kept) * 2 - 1, decode_chunk_size)  # (F, 4, H/8, W/8)
        latent_mask = F.interpolate(kept, size=latents.shape[-2:]).to(latents.dtype)
        return torch.cat([latents, latent_mask], dim=1)

    def encode_pixels(self, pixels, decode_chunk_size):
        """Scaled VAE latents (F, 4, H/8, W/8) of pixels (F, 3, H, W) in [-1, 1], a chunk of frames at a time.

        The posterior mean: deterministic, leaves every RNG alone (SD's VAE posterior std is tiny).
        """
        pixels = pixels.to(self.device, self.vae.dtype)
        latents = torch.cat([self.vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(decode_chunk_size)])
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents, decode_chunk_size):
        """uint8 frames (F, H, W, 3) from latents (F, 4, H/8, W/8), decoded a chunk of frames at a time."""
        latents = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        images = torch.cat([self.vae.decode(chunk).sample for chunk in latents.split(decode_chunk_size)])
        images = self.image_processor.postprocess(images.float(), output_type="np")  # (F, H, W, 3) in [0, 1]
        return (images * 255).round().astype(np.uint8)

    def predict_noise(self, latents, t, encoder_hidden_states, condition, conditioning_scale, num_frames):
        """One UNet + BrushNet evaluation on (N, 4, h, w) latents at timestep t; returns (N, 4, h, w)."""
        timestep = t.expand(latents.shape[0])  # (N,)
        brush = self.brushnet(latents.to(self.brushnet.dtype), timestep,
                              encoder_hidden_states=encoder_hidden_states.to(self.brushnet.dtype),
                              brushnet_cond=condition.to(self.brushnet.dtype),
                              conditioning_scale=conditioning_scale, return_dict=True)
        dtype = self.unet.dtype
        return self.unet(latents.to(dtype), timestep, encoder_hidden_states.to(dtype),
                         down_block_add_samples=[r.to(dtype) for r in brush.down_block_res_samples],
                         mid_block_add_sample=brush.mid_block_res_sample.to(dtype),
                         up_block_add_samples=[r.to(dtype) for r in brush.up_block_res_samples],
                         num_frames=num_frames, return_dict=False)[0].float()

    @torch.no_grad()  # not inference_mode: models that keep training must not cache inference tensors
    def __call__(self, frames, masks, prompt="clean background", num_inference_steps=20, guidance_scale=0.0,
                 conditioning_scale=1.0, generator=None, decode_chunk_size=8, init_latents=None, start_step=0):
        """Inpaint one clip; returns uint8 (F, H, W, 3).

        frames: uint8 (F, H, W, 3), H and W multiples of 8. masks: (F, H, W), hole = 0, kept = 1.
        guidance_scale > 1 adds classifier-free guidance against the empty prompt (two passes' worth
        of batch). generator: a torch.Generator for the initial noise (the global RNG is not used).
        init_latents: clean latents (F, 4, H/8, W/8) of a prior (e.g. `encode_pixels` of ProPainter's
        frames), noised to the schedule's timestep number `start_step` and denoised from there over the
        remaining num_inference_steps - start_step steps (img2img); None starts from pure noise.
        """
        frames, masks = np.asarray(frames), np.asarray(masks)
        num_frames = frames.shape[0]
        condition = self.prepare_condition(frames, masks, decode_chunk_size)
        embeds = self.encode_prompt(prompt, num_frames)
        do_cfg = guidance_scale > 1.0
        if do_cfg:  # batch = [uncond frames, cond frames]; the motion UNet sees two clips of F frames
            embeds = torch.cat([self.encode_prompt("", num_frames), embeds])
            condition = torch.cat([condition, condition])

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        shape = (num_frames, 4) + tuple(condition.shape[-2:])
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        if init_latents is None:
            latents = latents * self.scheduler.init_noise_sigma  # (F, 4, H/8, W/8)
        else:
            if not 0 <= start_step < len(timesteps):
                raise ValueError(f"start_step {start_step} is outside the {len(timesteps)}-step schedule")
            timesteps = timesteps[start_step:]
            self.scheduler.set_begin_index(start_step)
            latents = self.scheduler.add_noise(init_latents.to(latents), latents, timesteps[:1])
        for t in self.progress_bar(timesteps):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise = self.predict_noise(model_input, t, embeds, condition, conditioning_scale, num_frames)
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
        return self.decode_latents(latents, decode_chunk_size)
