"""Stage 2: train only the motion modules of the stage-1 UNet turned into a motion UNet.

    accelerate launch train_DiffuEraser_stage2.py --pretrained_stage1 ... --motion_adapter_path ...

BrushNet and every spatial UNet layer stay frozen. See train.md for the full recipe.
"""
from diffueraser.stopping import StopRequest

if __name__ == "__main__":  # first: a stop during the imports below (seconds) ends the run
    StopRequest()

import os

from diffueraser.args import build_parser, check_args
from diffueraser.convert import load_unet2d
from diffueraser.trainer import Stage, train


def add_stage2_args(parser):
    parser.add_argument("--pretrained_stage1", type=str, required=True,
                        help="Converted stage-1 folder (unet_main/ + brushnet/), or the released DiffuEraser folder.")
    parser.add_argument("--motion_adapter_path", type=str, required=True,
                        help="AnimateDiff motion adapter folder (animatediff-motion-adapter-v1-5-2), or a released "
                             "DiffuEraser stage-2 unet_main/ to start from its trained motion modules.")
    return parser


def load_motion_adapter(path):
    """A MotionAdapter from an adapter folder, or from the motion modules of a saved UNetMotionModel
    (a released DiffuEraser stage-2 `unet_main/`), read without building the whole motion UNet."""
    import glob
    import json

    from safetensors.torch import load_file

    from libs.unet_motion_model import MotionAdapter

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("_class_name") == "MotionAdapter":
        return MotionAdapter.from_pretrained(path)
    if config.get("_class_name") != "UNetMotionModel":
        raise SystemExit(f"--motion_adapter_path: {path} holds a {config.get('_class_name')}, "
                         "not a MotionAdapter or UNetMotionModel")
    adapter = MotionAdapter(
        block_out_channels=config["block_out_channels"], motion_layers_per_block=config["layers_per_block"],
        motion_num_attention_heads=config["motion_num_attention_heads"],
        motion_norm_num_groups=config.get("motion_norm_num_groups", config["norm_num_groups"]),
        motion_max_seq_length=config["motion_max_seq_length"], use_motion_mid_block=config["use_motion_mid_block"])
    state = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state.update({k: v for k, v in load_file(file).items() if ".motion_modules." in k})
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"--motion_adapter_path: {path} does not match a motion adapter: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return adapter


def build_models(args):
    """Motion UNet with only its motion modules trainable; BrushNet frozen."""
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_motion_model import UNetMotionModel

    unet2d = load_unet2d(os.path.join(args.pretrained_stage1, "unet_main"))
    unet = UNetMotionModel.from_unet2d(unet2d, load_motion_adapter(args.motion_adapter_path))
    unet.freeze_unet2d_params()
    brushnet = BrushNetModel.from_pretrained(os.path.join(args.pretrained_stage1, "brushnet"))
    return unet, brushnet.requires_grad_(False)


def pipeline_cls():
    from diffueraser.pipeline_diffueraser_stage2 import DiffuEraserPipelineStage2
    return DiffuEraserPipelineStage2


def main(argv=None):
    parser = add_stage2_args(build_parser(__doc__.splitlines()[0], "finetune-stage2", nframes_default=22))
    args = check_args(parser.parse_args(argv))
    for sub in ("unet_main", "brushnet"):
        if not os.path.isfile(os.path.join(args.pretrained_stage1, sub, "config.json")):
            parser.error(f"--pretrained_stage1: {args.pretrained_stage1} has no {sub}/config.json")
    if not os.path.isfile(os.path.join(args.motion_adapter_path, "config.json")):
        parser.error(f"--motion_adapter_path: {args.motion_adapter_path} has no config.json")
    return train(args, Stage("stage2", build_models, pipeline_cls(),
                             frozen_sources=lambda a: {"brushnet": os.path.join(a.pretrained_stage1, "brushnet")}))


if __name__ == "__main__":
    main()
