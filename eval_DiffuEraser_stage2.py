"""Evaluate stage-2 weight sets (motion UNet + BrushNet) side by side on held-out videos.

    python eval_DiffuEraser_stage2.py --weights released=weights/diffuEraser \
        --weights mine=converted_weights/diffuEraser-model-stage2 \
        --base_model_name_or_path weights/stable-diffusion-v1-5 --vae_path weights/sd-vae-ft-mse \
        --davis_root data/DAVIS --i3d_weights weights/i3d_rgb_imagenet.pt --size 432x240

See train.md, "Evaluate".
"""
from diffueraser.evaluate import main

if __name__ == "__main__":
    main("stage2", nframes_default=22, description=__doc__.splitlines()[0])
