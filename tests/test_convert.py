"""Converters: the output replaced as a whole, checkpoints of the original scripts, motion-UNet configs."""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffueraser import convert as conv

REPO = Path(__file__).resolve().parents[1]


def one_line_exit(fn, *args):
    """Run fn(*args), expecting a one-line SystemExit message; return it."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value.code)
    assert message and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- replacing the output
def write_output(folder, tag, between=lambda: None):
    for name in conv.OUTPUT_MODELS:
        os.makedirs(os.path.join(folder, name))
        with open(os.path.join(folder, name, "weights"), "w") as f:
            f.write(tag)
        between()


def output_tag(path):
    """'old' or 'new' if `path` holds that output whole, None if there is none, else what it holds."""
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    tags = set()
    for name in names:
        with open(os.path.join(path, name, "weights")) as f:
            tags.add(f.read())
    return tags.pop() if len(tags) == 1 and names == sorted(conv.OUTPUT_MODELS) else (names, sorted(tags))


class Kill(BaseException):
    pass


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_force_replaces_the_output_whole_whatever_step_is_killed(tmp_path, monkeypatch, atomic_exchange):
    """Kill a --force conversion at each file operation (clean-up, writing, the swap): right after
    the kill the output is the old one or the new one, whole (where the filesystem cannot exchange
    two folders, the old one may wait whole beside it); the next run tidies up and converts."""
    out = str(tmp_path / "converted")
    staging, retired = conv.side_paths(out)
    real = {"rename": os.rename, "rmtree": conv.shutil.rmtree,
            "exchange": conv.exchange if atomic_exchange else (lambda a, b: False), "write": lambda: None}
    outcomes = []
    for k in range(1, 12):
        conv.shutil.rmtree(out, ignore_errors=True)
        write_output(out, "old")
        calls = []

        def op(name):
            def wrapped(*a, **kw):
                calls.append(name)
                if len(calls) == k:
                    raise Kill(name)
                return real[name](*a, **kw)
            return wrapped
        monkeypatch.setattr(os, "rename", op("rename"))
        monkeypatch.setattr(conv.shutil, "rmtree", op("rmtree"))
        monkeypatch.setattr(conv, "exchange", op("exchange"))
        try:
            conv.prepare_output(out, force=True)
            conv.replace_output(out, lambda folder: write_output(folder, "new", between=op("write")))
            killed = None
        except Kill as e:
            killed = str(e)
        monkeypatch.undo()
        now = output_tag(out)
        assert now in ("old", "new") or (not atomic_exchange and now is None and output_tag(retired) == "old"), \
            (k, calls, now)
        outcomes.append((killed, now))
        conv.prepare_output(out, force=True)  # the next run: one whole output, no leftovers
        assert output_tag(out) in ("old", "new") and not os.path.exists(staging) and not os.path.exists(retired)
        conv.replace_output(out, lambda folder: write_output(folder, "new"))
        assert output_tag(out) == "new" and os.listdir(tmp_path) == ["converted"]
        if killed is None:
            break
    assert outcomes[-1] == (None, "new")
    assert ("write", "old") in outcomes and ("rmtree", "new") in outcomes  # killed mid-write, and after the swap
    assert (("rename", None) in outcomes) != atomic_exchange                # between the fallback's two renames


def test_output_checks(tmp_path):
    out = tmp_path / "out"
    write_output(str(out), "old")
    (out / ".converting").mkdir()                        # an earlier version's staging folder, left by a kill
    assert "--force" in one_line_exit(conv.prepare_output, str(out), False)
    assert not (out / ".converting").exists()
    (out / "notes.txt").write_text("mine")
    message = one_line_exit(conv.prepare_output, str(out), True)
    assert str(out) in message and "notes.txt" in message       # never replaces a folder holding other things
    conv.prepare_output(str(tmp_path / "new"), False)


# ----------------------------------------------------------------------------- checkpoints of the original scripts
def original_checkpoint(run, unet, brushnet):
    """`prepare(unet_main, brushnet, optimizer)` + `save_state`, as the original scripts do (no model_config/)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    params = [p for m in (unet, brushnet) for p in m.parameters() if p.requires_grad]
    prepared = accelerator.prepare(unet, brushnet, torch.optim.AdamW(params, lr=1e-5))
    path = run / "checkpoint-1"
    accelerator.save_state(str(path))
    return path, prepared[0], prepared[1]


def assert_folder_equals(folder, model):
    saved = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    state = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


def test_original_stage1_checkpoint_converts_with_the_base_model(tmp_path):
    """No model_config/: the UNet config from --base_model_name_or_path, BrushNet's from from_unet of
    it (this failed on a meta-device UNet: 'Cannot copy out of meta tensor')."""
    import save_checkpoint_stage1
    from diffueraser.tiny import tiny_stage_models

    unet, brushnet = tiny_stage_models("stage1")
    unet.save_pretrained(str(tmp_path / "sd" / "unet"))
    path, unet, brushnet = original_checkpoint(tmp_path / "run", unet, brushnet)
    assert sorted(p.name for p in path.glob("model*.safetensors")) == ["model.safetensors", "model_1.safetensors"]
    out = tmp_path / "converted"
    save_checkpoint_stage1.main(["--input_dir", str(path), "--output_dir", str(out),
                                 "--base_model_name_or_path", str(tmp_path / "sd")])
    assert_folder_equals(out / "unet_main", unet)
    assert_folder_equals(out / "brushnet", brushnet)
    message = one_line_exit(save_checkpoint_stage1.main, ["--input_dir", str(path), "--output_dir", str(tmp_path / "x"),
                                                          "--base_model_name_or_path", str(tmp_path / "nothing")])
    assert "--base_model_name_or_path" in message and "model_config" in message


def test_original_stage2_checkpoint_converts_brushnet_from_model_1(tmp_path, capsys):
    """The original's stage-2 checkpoints hold the frozen BrushNet as model_1.safetensors: converted
    from there, with no stage-1 folder; ours hold none, and without a stage-1 folder the converter says so."""
    import save_checkpoint_stage2
    from diffueraser.tiny import tiny_stage_models

    unet, brushnet = tiny_stage_models("stage2")
    unet.save_config(str(tmp_path / "unet_config"))
    path, unet, brushnet = original_checkpoint(tmp_path / "run", unet, brushnet)
    out = tmp_path / "converted"
    save_checkpoint_stage2.main(["--input_dir", str(path), "--output_dir", str(out), "--unet_config",
                                 str(tmp_path / "unet_config"), "--pretrained_stage1", str(tmp_path / "none")])
    assert "model_1.safetensors (the original scripts' layout)" in capsys.readouterr().out
    assert_folder_equals(out / "unet_main", unet)
    assert_folder_equals(out / "brushnet", brushnet)
    os.remove(path / "model_1.safetensors")          # now laid out as this toolkit writes them
    message = one_line_exit(save_checkpoint_stage2.main, ["--input_dir", str(path), "--output_dir", str(tmp_path / "y"),
                                                          "--unet_config", str(tmp_path / "unet_config"),
                                                          "--pretrained_stage1", str(tmp_path / "none")])
    assert "no model_1.safetensors" in message and "--pretrained_stage1" in message and str(tmp_path / "none") in message
    message = one_line_exit(save_checkpoint_stage2.main, ["--input_dir", str(path), "--output_dir", str(tmp_path / "y")])
    assert "--unet_config" in message and "model_config" in message


# ----------------------------------------------------------------------------- motion-UNet configs
def test_load_unet2d_keeps_the_heads_of_a_project_saved_motion_unet(tmp_path):
    """Our stage-2 unet_main/ (diffusers 0.42) records its spatial heads only as num_attention_heads."""
    import json

    from diffueraser.tiny import tiny_stage_models

    unet, _ = tiny_stage_models("stage2")
    unet.save_pretrained(str(tmp_path / "unet_main"))
    config = json.loads((tmp_path / "unet_main" / "config.json").read_text())
    assert config.get("attention_head_dim") is None and config["num_attention_heads"] == 2
    unet2d = conv.load_unet2d(str(tmp_path / "unet_main"))
    assert unet2d.config.attention_head_dim == 2
    assert unet2d.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 2
    state = unet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in unet2d.state_dict().items())
