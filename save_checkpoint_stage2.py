"""Convert a stage-2 accelerate checkpoint into `unet_main/` (motion UNet) + `brushnet/` folders.

Edit the constants below and run `python save_checkpoint_stage2.py`, or pass flags. Stage 2 does
not train BrushNet, so it is copied from the stage-1 folder the run started from.
"""
import os

from diffueraser.convert import converter_parser, convert, find_checkpoint, model_config_dir, run_info

INPUT_DIR = "finetune-stage2/latest"            # checkpoint-N, a run folder, or <run>/latest
OUTPUT_DIR = "converted_weights/diffuEraser-model-stage2"
PRETRAINED_STAGE1 = "converted_weights/diffuEraser-model-stage1"  # BrushNet source if the run does not say


def main(argv=None):
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_motion_model import UNetMotionModel

    parser = converter_parser(__doc__.splitlines()[0], INPUT_DIR, OUTPUT_DIR)
    parser.add_argument("--pretrained_stage1", default=None,
                        help=f"Stage-1 folder whose brushnet/ is copied (default: the run's, else {PRETRAINED_STAGE1}).")
    parser.add_argument("--unet_config", default=None,
                        help="Folder with the motion UNet's config.json, when the run folder has no model_config/.")
    args = parser.parse_args(argv)
    checkpoint = find_checkpoint(args.input_dir)
    stage1 = args.pretrained_stage1 or run_info(checkpoint).get("pretrained_stage1") or PRETRAINED_STAGE1
    unet_config = model_config_dir(checkpoint, "unet_main") or args.unet_config
    if unet_config is None:
        parser.error(f"{checkpoint}: its run folder has no model_config/; pass --unet_config")
    brushnet_config = model_config_dir(checkpoint, "brushnet") or os.path.join(stage1, "brushnet")
    fallback = os.path.join(stage1, "brushnet")
    return convert(checkpoint, args.output_dir, UNetMotionModel, BrushNetModel, unet_config, brushnet_config,
                   brushnet_fallback=fallback if os.path.isdir(fallback) else None, force=args.force)


if __name__ == "__main__":
    main()
