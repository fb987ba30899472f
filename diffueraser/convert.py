"""Turn an accelerate checkpoint into ready-to-use `unet_main/` + `brushnet/` folders.

Both converters share this. Model configs come from the run folder (`model_config/`, written by
the training core), or, for checkpoints of the original DiffuEraser scripts, from the model paths
given on the command line. Loading is strict: every tensor of the checkpoint must land in the
model and every model tensor must come from somewhere.
"""
import argparse
import json
import os
import shutil

import torch

from diffueraser.checkpoints import MODEL_FILES, load_checkpoint_models, resolve_checkpoint


def find_checkpoint(input_dir):
    """A checkpoint folder, a run folder (its latest checkpoint) or `<run>/latest`."""
    run, leaf = os.path.split(os.path.normpath(input_dir))
    try:
        path = resolve_checkpoint("latest", run) if leaf == "latest" else resolve_checkpoint(input_dir, ".")
    except FileNotFoundError as e:
        raise SystemExit(f"--input_dir: {e}") from None
    if path is None:
        raise SystemExit(f"--input_dir: {input_dir}: no complete checkpoint-<step> folder found")
    return path


def load_strict(model, state, what):
    """Copy `state` into `model`; any missing, unexpected or misshapen key is an error naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        raise SystemExit(f"{what}: checkpoint does not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, misshapen {misshapen[:8]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def build_from_config(cls, config):
    """Model of `cls` from a config dict or a folder's config.json, weights on the meta device."""
    if isinstance(config, str):
        config = cls.load_config(config)
    with torch.device("meta"):
        return cls.from_config(config)


def convert(checkpoint, output_dir, unet_cls, brushnet_cls, unet_config, brushnet_config, brushnet_fallback=None,
            force=False):
    """Write `output_dir/unet_main` and `output_dir/brushnet` from an accelerate checkpoint."""
    targets = [os.path.join(output_dir, n) for n in ("unet_main", "brushnet")]
    if any(os.path.exists(t) for t in targets) and not force:
        raise SystemExit(f"--output_dir: {output_dir} already holds unet_main/ or brushnet/ (use --force)")
    states = load_checkpoint_models(checkpoint)
    unet = load_strict(build_from_config(unet_cls, unet_config), states[0], f"{checkpoint}/{MODEL_FILES[0]}")
    if len(states) > 1:
        brushnet = load_strict(build_from_config(brushnet_cls, brushnet_config), states[1],
                               f"{checkpoint}/{MODEL_FILES[1]}")
    elif brushnet_fallback:  # stage 2 trains no BrushNet: it is the stage-1 one, unchanged
        brushnet = None
    else:
        raise SystemExit(f"{checkpoint}: no {MODEL_FILES[1]} and no BrushNet folder to take it from")
    staging = os.path.join(output_dir, ".converting")  # written in full first, then moved in place
    shutil.rmtree(staging, ignore_errors=True)
    unet.save_pretrained(os.path.join(staging, "unet_main"))
    if brushnet is not None:
        brushnet.save_pretrained(os.path.join(staging, "brushnet"))
    else:
        shutil.copytree(brushnet_fallback, os.path.join(staging, "brushnet"))
    for target in targets:
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, os.path.basename(target)), target)
    os.rmdir(staging)
    print(f"{checkpoint} -> {targets[0]}, {targets[1]}")
    return targets


def run_info(checkpoint):
    path = os.path.join(os.path.dirname(os.path.normpath(checkpoint)), "run_info.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def converter_parser(description, input_dir, output_dir):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input_dir", default=input_dir,
                        help="checkpoint-N folder, a run folder (its latest checkpoint) or <run>/latest.")
    parser.add_argument("--output_dir", default=output_dir, help="Where unet_main/ and brushnet/ are written.")
    parser.add_argument("--force", action="store_true", help="Overwrite an existing output.")
    return parser


def model_config_dir(checkpoint, name):
    """`<run>/model_config/<name>` if the training core wrote it, else None."""
    path = os.path.join(os.path.dirname(os.path.normpath(checkpoint)), "model_config", name)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def load_unet2d(folder):
    """The 2D UNet of a `unet_main/` folder: a UNet2DConditionModel as saved, or the spatial layers
    of a UNetMotionModel (a released DiffuEraser `unet_main/`), without its motion modules."""
    import glob

    from safetensors.torch import load_file

    from libs.unet_2d_condition import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(folder))
    if config.get("_class_name") != "UNetMotionModel":
        return UNet2DConditionModel.from_pretrained(folder)
    for key in ("down_block_types", "up_block_types"):
        config[key] = [t.replace("Motion", "2D") for t in config[key]]
    # keys only the motion UNet has (its spatial heads are attention_head_dim, as in SD1.5)
    config = {k: v for k, v in config.items() if not k.startswith(("motion_", "use_motion", "_")) and k not in (
        "num_attention_heads", "conditioning_channels", "conditioning_embedding_out_channels")}
    unet = UNet2DConditionModel.from_config(config)
    state = {}
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        state.update({k: v for k, v in load_file(file).items() if ".motion_modules." not in k})
    return load_strict(unet, state, folder)
