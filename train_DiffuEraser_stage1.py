"""Stage 1: train the UNet and BrushNet (every parameter) on single frames of video clips.

    accelerate launch train_DiffuEraser_stage1.py --base_model_name_or_path ... --davis_root ...

See train.md for the full recipe.
"""
from diffueraser.stopping import StopRequest

if __name__ == "__main__":  # first: a stop during the imports below (seconds) ends the run
    StopRequest()

import os

from diffueraser.args import build_parser, check_args
from diffueraser.convert import load_unet2d
from diffueraser.trainer import Stage, train


def add_stage1_args(parser):
    parser.add_argument("--pretrained_stage1_path", type=str, default=None,
                        help="Start from a converted stage-1 folder (unet_main/ + brushnet/), or the released "
                             "DiffuEraser folder (its stage-2 unet_main/ gives the spatial layers).")
    parser.add_argument("--brushnet_model_name_or_path", type=str, default=None,
                        help="Start BrushNet from this folder (else it is built from the UNet).")
    return parser


def build_models(args):
    """UNet and BrushNet, both fully trainable."""
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel

    if args.pretrained_stage1_path:  # a converted stage-1 folder or the released DiffuEraser one
        unet = load_unet2d(os.path.join(args.pretrained_stage1_path, "unet_main"))
        brushnet = BrushNetModel.from_pretrained(os.path.join(args.pretrained_stage1_path, "brushnet"))
    else:
        unet = UNet2DConditionModel.from_pretrained(args.base_model_name_or_path, subfolder="unet",
                                                    revision=args.revision, variant=args.variant)
        if args.brushnet_model_name_or_path:
            brushnet = BrushNetModel.from_pretrained(args.brushnet_model_name_or_path)
        else:
            brushnet = BrushNetModel.from_unet(unet)
    return unet.requires_grad_(True), brushnet.requires_grad_(True)


def pipeline_cls():
    from diffueraser.pipeline_diffueraser_stage1 import DiffuEraserPipelineStage1
    return DiffuEraserPipelineStage1


def main(argv=None):
    parser = add_stage1_args(build_parser(__doc__.splitlines()[0], "finetune-stage1", nframes_default=10))
    args = check_args(parser.parse_args(argv))
    for flag in ("pretrained_stage1_path", "brushnet_model_name_or_path"):
        if getattr(args, flag) and not os.path.isdir(getattr(args, flag)):
            parser.error(f"--{flag}: {getattr(args, flag)} does not exist")
    return train(args, Stage("stage1", build_models, pipeline_cls()))


if __name__ == "__main__":
    main()
