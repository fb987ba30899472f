"""Convert a stage-1 accelerate checkpoint into `unet_main/` + `brushnet/` folders.

Edit the constants below and run `python save_checkpoint_stage1.py`, or pass flags.
"""
import os

from diffueraser.convert import (brushnet_config_for, converter_parser, convert, find_checkpoint, model_config_dir,
                                 require_stage)

INPUT_DIR = "finetune-stage1/latest"           # checkpoint-N, a run folder, or <run>/latest
OUTPUT_DIR = "converted_weights/diffuEraser-model-stage1"
BASE_MODEL = "weights/stable-diffusion-v1-5"    # only for checkpoints of the original scripts


def main(argv=None):
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel

    parser = converter_parser(__doc__.splitlines()[0], INPUT_DIR, OUTPUT_DIR)
    parser.add_argument("--base_model_name_or_path", default=BASE_MODEL,
                        help="SD1.5 folder, for model configs when the run folder has no model_config/.")
    args = parser.parse_args(argv)
    checkpoint = find_checkpoint(args.input_dir)
    require_stage(checkpoint, 1)
    unet_config = model_config_dir(checkpoint, "unet_main")
    brushnet_config = model_config_dir(checkpoint, "brushnet")
    if unet_config is None:  # a checkpoint of the original scripts: UNet from SD1.5, BrushNet from_unet
        unet_dir = os.path.join(args.base_model_name_or_path, "unet")
        if not os.path.isfile(os.path.join(unet_dir, "config.json")):
            raise SystemExit(f"--base_model_name_or_path: {unet_dir} has no config.json (needed: {checkpoint}'s "
                             "run folder has no model_config/)")
        unet_config = unet_dir
        brushnet_config = brushnet_config_for(UNet2DConditionModel.load_config(unet_dir))
    return convert(checkpoint, args.output_dir, UNet2DConditionModel, BrushNetModel, unet_config, brushnet_config,
                   force=args.force)


if __name__ == "__main__":
    main()
