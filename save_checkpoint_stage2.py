"""Convert a stage-2 accelerate checkpoint into `unet_main/` (motion UNet) + `brushnet/` folders.

Edit the constants below and run `python save_checkpoint_stage2.py`, or pass flags. Stage 2 does
not train BrushNet, so our checkpoints do not hold it: it is copied from the stage-1 folder the run
started from. Checkpoints of the original scripts hold it as `model_1.safetensors`; it is
converted from there.
"""
import os

from diffueraser.checkpoints import MODEL_FILES
from diffueraser.convert import (brushnet_config_for, converter_parser, convert, find_checkpoint, model_config_dir,
                                 require_stage, run_info)

INPUT_DIR = "finetune-stage2/latest"            # checkpoint-N, a run folder, or <run>/latest
OUTPUT_DIR = "converted_weights/diffuEraser-model-stage2"
PRETRAINED_STAGE1 = "converted_weights/diffuEraser-model-stage1"  # BrushNet source if the run does not say


def brushnet_source(checkpoint, stage1, unet_config):
    """(BrushNet config, folder to copy brushnet/ from or None) for a stage-2 checkpoint, in either
    layout: the original scripts' (BrushNet in model_1.safetensors) or ours (no BrushNet)."""
    from libs.unet_motion_model import UNetMotionModel

    folder = os.path.join(stage1, "brushnet")
    has_folder = os.path.isfile(os.path.join(folder, "config.json"))
    if os.path.isfile(os.path.join(checkpoint, MODEL_FILES[1])):
        print(f"{checkpoint}: BrushNet is in {MODEL_FILES[1]} (the original scripts' layout); brushnet/ is "
              "converted from it")
        config = model_config_dir(checkpoint, "brushnet") or (folder if has_folder else None)
        return config or brushnet_config_for(dict(UNetMotionModel.load_config(unet_config))), None
    if not has_folder:
        raise SystemExit(f"{checkpoint}: no {MODEL_FILES[1]}: this toolkit's stage-2 checkpoints hold only the motion "
                         f"UNet (BrushNet is frozen and copied from the stage-1 folder), and {stage1} has no "
                         "brushnet/; pass --pretrained_stage1 <the converted stage-1 folder the run started from>")
    return model_config_dir(checkpoint, "brushnet") or folder, folder


def main(argv=None):
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_motion_model import UNetMotionModel

    parser = converter_parser(__doc__.splitlines()[0], INPUT_DIR, OUTPUT_DIR)
    parser.add_argument("--pretrained_stage1", default=None,
                        help=f"Stage-1 folder whose brushnet/ is copied (default: the run's, else {PRETRAINED_STAGE1}).")
    parser.add_argument("--unet_config", default=None,
                        help="Folder with the motion UNet's config.json, when the run folder has no model_config/ "
                             "(a checkpoint of the original scripts): e.g. a converted or released stage-2 unet_main/.")
    args = parser.parse_args(argv)
    checkpoint = find_checkpoint(args.input_dir)
    require_stage(checkpoint, 2)
    stage1 = args.pretrained_stage1 or run_info(checkpoint).get("pretrained_stage1") or PRETRAINED_STAGE1
    unet_config = model_config_dir(checkpoint, "unet_main") or args.unet_config
    if unet_config is None or not os.path.isfile(os.path.join(unet_config, "config.json")):
        raise SystemExit(f"--unet_config: {unet_config}: no config.json, and {checkpoint}'s run folder has no "
                         "model_config/ (a checkpoint of the original scripts): pass a folder with the motion UNet's "
                         "config.json")
    brushnet_config, copy_from = brushnet_source(checkpoint, stage1, unet_config)
    return convert(checkpoint, args.output_dir, UNetMotionModel, BrushNetModel, unet_config, brushnet_config,
                   brushnet_fallback=copy_from, force=args.force)


if __name__ == "__main__":
    main()
