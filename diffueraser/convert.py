"""Turn an accelerate checkpoint into ready-to-use `unet_main/` + `brushnet/` folders.

Both converters share this. Model configs come from the run folder (`model_config/`, written by
the training core), or, for checkpoints of the original DiffuEraser scripts, from the model paths
given on the command line. Loading is strict: every tensor of the checkpoint must land in the
model and every model tensor must come from somewhere. The output folder is replaced as a whole
(see replace_output), so a kill never leaves half of an old and half of a new output.
"""
import argparse
import ctypes
import errno
import json
import os
import shutil
import sys

import torch

from diffueraser.checkpoints import MODEL_FILES, _fsync_tree, load_checkpoint_models, resolve_checkpoint, unreadable

OUTPUT_MODELS = ("unet_main", "brushnet")


def find_checkpoint(input_dir):
    """A checkpoint folder, a run folder (its latest checkpoint) or `<run>/latest`."""
    run, leaf = os.path.split(os.path.normpath(input_dir))
    try:
        path = resolve_checkpoint("latest", run) if leaf == "latest" else resolve_checkpoint(input_dir, ".")
    except (FileNotFoundError, ValueError) as e:
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


def checkpoint_stage(checkpoint):
    """1 or 2, from the tensor names of the checkpoint's UNet (read without loading it): only a
    stage-2 motion UNet has motion modules. None when there is no model.safetensors (DeepSpeed)."""
    from safetensors import safe_open

    file = os.path.join(checkpoint, MODEL_FILES[0])
    if not os.path.isfile(file):
        return None
    try:
        with safe_open(file, "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors' own error type
        raise SystemExit(unreadable(file, e)) from None
    return 2 if any(".motion_modules." in k for k in keys) else 1


def require_stage(checkpoint, stage):
    """Stop, naming the right converter, when `checkpoint` is of the other stage."""
    found = checkpoint_stage(checkpoint)
    if found is not None and found != stage:
        why = "its UNet has motion modules" if found == 2 else "its UNet has no motion modules"
        raise SystemExit(f"--input_dir: {checkpoint} is a stage-{found} checkpoint ({why}): convert it with "
                         f"save_checkpoint_stage{found}.py")


def convert(checkpoint, output_dir, unet_cls, brushnet_cls, unet_config, brushnet_config, brushnet_fallback=None,
            force=False):
    """Write `output_dir/unet_main` and `output_dir/brushnet` from an accelerate checkpoint; BrushNet
    from its `model_1.safetensors`, else copied from the folder `brushnet_fallback`."""
    output_dir = os.path.abspath(output_dir)
    prepare_output(output_dir, force)
    try:
        states = load_checkpoint_models(checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    unet = load_strict(build_from_config(unet_cls, unet_config), states[0], f"{checkpoint}/{MODEL_FILES[0]}")
    if len(states) > 1:
        brushnet = load_strict(build_from_config(brushnet_cls, brushnet_config), states[1],
                               f"{checkpoint}/{MODEL_FILES[1]}")
    elif brushnet_fallback:  # stage 2 trains no BrushNet: it is the stage-1 one, unchanged
        brushnet = None
    else:
        raise SystemExit(f"{checkpoint}: no {MODEL_FILES[1]} and no BrushNet folder to take it from")

    def write(folder):
        unet.save_pretrained(os.path.join(folder, "unet_main"))
        if brushnet is not None:
            brushnet.save_pretrained(os.path.join(folder, "brushnet"))
        else:
            shutil.copytree(brushnet_fallback, os.path.join(folder, "brushnet"))
    replace_output(output_dir, write)
    targets = [os.path.join(output_dir, n) for n in OUTPUT_MODELS]
    print(f"{checkpoint} -> {targets[0]}, {targets[1]}")
    return targets


# ----------------------------------------------------------------------------- replacing the output
def side_paths(output_dir):
    """(staging, retired): siblings of `output_dir` where the new output is written, and where the
    old one waits when the filesystem cannot swap two folders in one step."""
    parent, name = os.path.split(os.path.abspath(output_dir))
    return os.path.join(parent, f".{name}.converting"), os.path.join(parent, f".{name}.replaced")


def recover_output(output_dir):
    """Finish what a killed conversion left: an old output set aside is put back (or removed when
    the new one is in place), a half-written staging folder is removed."""
    staging, retired = side_paths(output_dir)
    if os.path.isdir(retired):
        if os.path.exists(output_dir):
            shutil.rmtree(retired)
        else:  # killed between the two renames of replace_output's fallback: the old output goes back
            os.rename(retired, output_dir)
            print(f"{output_dir}: restored the previous output a killed conversion had set aside")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(os.path.join(output_dir, ".converting"), ignore_errors=True)  # earlier versions staged here


def prepare_output(output_dir, force):
    """Clean up after a killed conversion, then check `output_dir` may be replaced as a whole."""
    recover_output(output_dir)
    if not os.path.exists(output_dir):
        return
    if not os.path.isdir(output_dir):
        raise SystemExit(f"--output_dir: {output_dir} is a file")
    entries = sorted(os.listdir(output_dir))
    others = [e for e in entries if e not in OUTPUT_MODELS]
    if others:
        raise SystemExit(f"--output_dir: {output_dir} holds more than unet_main/ and brushnet/ "
                         f"({', '.join(others[:5])}); the whole folder is replaced: give a new or empty folder")
    if entries and not force:
        raise SystemExit(f"--output_dir: {output_dir} already holds unet_main/ or brushnet/ (use --force)")


def replace_output(output_dir, write):
    """`write(folder)` the new output into a staging folder beside `output_dir`, flush it, then put
    it in place of `output_dir` in one step: a kill at any moment leaves the old output or the new
    one whole. (Where the filesystem cannot exchange two folders atomically, two renames; a kill
    between them leaves the old output whole beside it, and the next run puts it back.)"""
    staging, retired = side_paths(output_dir)
    os.makedirs(os.path.dirname(staging), exist_ok=True)
    write(staging)
    _fsync_tree(staging)
    if not os.path.exists(output_dir):
        os.rename(staging, output_dir)
    elif exchange(staging, output_dir):  # staging now holds the old output
        shutil.rmtree(staging)
    else:
        os.rename(output_dir, retired)
        os.rename(staging, output_dir)
        shutil.rmtree(retired)


def exchange(a, b):
    """Swap two folders atomically (Linux renameat2 with RENAME_EXCHANGE); False where the system or
    the filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


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


def unet2d_config(config):
    """The UNet2DConditionModel config of a saved UNetMotionModel config: 2D block types, no motion
    keys. A motion UNet counts its spatial heads in `num_attention_heads`; the 2D UNet takes that
    count as `attention_head_dim` (SD naming). Configs saved by diffusers 0.29.2 hold both keys, equal;
    ours (diffusers 0.42) only `num_attention_heads`."""
    config = dict(config)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim")
    for key in ("down_block_types", "up_block_types"):
        config[key] = [t.replace("Motion", "2D") for t in config[key]]
    config = {k: v for k, v in config.items() if not k.startswith(("motion_", "use_motion", "_")) and k not in (
        "num_attention_heads", "conditioning_channels", "conditioning_embedding_out_channels")}
    if heads is not None:
        config["attention_head_dim"] = heads
    return config


def brushnet_config_for(unet_config):
    """The config `BrushNetModel.from_unet` gives for a UNet config (2D or motion), built on the meta
    device without weights: what the original scripts' BrushNet was made from."""
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel

    if unet_config.get("_class_name") == "UNetMotionModel":
        unet_config = unet2d_config(unet_config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        return dict(BrushNetModel.from_unet(unet, load_weights_from_unet=False).config)


def load_unet2d(folder):
    """The 2D UNet of a `unet_main/` folder: a UNet2DConditionModel as saved, or the spatial layers
    of a UNetMotionModel (a released DiffuEraser `unet_main/` or a stage-2 one of ours), without
    its motion modules."""
    import glob

    from safetensors.torch import load_file

    from libs.unet_2d_condition import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(folder))
    if config.get("_class_name") != "UNetMotionModel":
        return UNet2DConditionModel.from_pretrained(folder)
    unet = UNet2DConditionModel.from_config(unet2d_config(config))
    state = {}
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        state.update({k: v for k, v in load_file(file).items() if ".motion_modules." not in k})
    return load_strict(unet, state, folder)
