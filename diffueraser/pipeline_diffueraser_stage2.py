"""Stage-2 sampler: the stage-1 sampler with the motion UNet (UNet + AnimateDiff motion modules).

Numerically nothing differs: the stage-1 sampler already passes num_frames = F with the whole clip
as one batch, which the 2D UNet ignores and the motion UNet uses to mix across frames. What this
class adds is the motion modules' limit on clip length.
"""
from .pipeline_diffueraser_stage1 import DiffuEraserPipelineStage1


class DiffuEraserPipelineStage2(DiffuEraserPipelineStage1):
    """Video inpainting with the motion UNet + BrushNet; all F frames are denoised together."""

    def __call__(self, frames, masks, *args, **kwargs):
        """As DiffuEraserPipelineStage1.__call__; F must fit the motion modules' positional embedding."""
        max_frames = self.unet.config.motion_max_seq_length
        if len(frames) > max_frames:
            raise ValueError(f"{len(frames)} frames exceed the motion modules' motion_max_seq_length={max_frames}")
        return super().__call__(frames, masks, *args, **kwargs)
