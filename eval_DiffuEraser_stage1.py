"""Evaluate stage-1 weight sets (2D UNet + BrushNet) side by side on held-out videos.

    python eval_DiffuEraser_stage1.py --weights released=weights/diffuEraser \
        --weights mine=converted_weights/diffuEraser-model-stage1 \
        --base_model_name_or_path weights/stable-diffusion-v1-5 --davis_root data/DAVIS

A released folder's motion UNet gives its spatial layers. See train.md, "Evaluate".
"""
from diffueraser.evaluate import main

if __name__ == "__main__":
    main("stage1", nframes_default=10, description=__doc__.splitlines()[0])
