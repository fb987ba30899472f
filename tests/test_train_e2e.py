"""End to end on tiny random models and a synthetic dataset: the real entry scripts in subprocesses."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from diffueraser.checkpoints import find_latest_checkpoint, list_checkpoints
from diffueraser.tiny import write_synthetic_davis, write_synthetic_ytvos, write_tiny_motion_adapter, write_tiny_sd

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    write_tiny_sd(str(root / "sd"))
    write_tiny_motion_adapter(str(root / "adapter"))
    write_synthetic_davis(str(root / "DAVIS"))
    write_synthetic_ytvos(str(root / "YTVOS"))
    return root


def flags(assets, out, steps, nframes=2, **extra):
    davis = assets / "DAVIS"
    args = {"base_model_name_or_path": assets / "sd", "davis_root": davis, "ytvos_root": assets / "YTVOS",
            "output_dir": out, "resolution": 64, "nframes": nframes, "max_train_steps": steps,
            "checkpointing_steps": 2, "learning_rate": 1e-4, "lr_warmup_steps": 0, "seed": 0, "report_to": "none",
            "validation_steps": 1000, "validation_inference_steps": 1}
    args.update(extra)
    out = []
    for k, v in args.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


def run(script, args, check=True, **kw):
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True, **kw)
    if check and proc.returncode:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def stage1_run(assets, tmp_path_factory):
    """A stage-1 run killed by SIGTERM after its first checkpoint, then resumed to the end."""
    out = tmp_path_factory.mktemp("stage1")
    cmd = [sys.executable, "train_DiffuEraser_stage1.py",
           *flags(assets, out, 8, checkpointing_steps=2, resume_from_checkpoint="latest")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list_checkpoints(str(out)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    first_log = proc.communicate(timeout=300)[0]
    first = list_checkpoints(str(out))
    (out / "checkpoint-1000.partial").mkdir()          # a save cut short: never "latest"
    (out / "checkpoint-999").mkdir()                   # a folder without model files: never "latest"
    resumed = run("train_DiffuEraser_stage1.py", cmd[2:])
    return dict(out=out, first_code=proc.returncode, first_log=first_log, first=first,
                resumed_log=resumed.stdout + resumed.stderr)


def test_sigterm_saves_and_resume_finishes(stage1_run):
    out = stage1_run["out"]
    assert stage1_run["first_code"] == 0, stage1_run["first_log"][-3000:]
    stopped_at = stage1_run["first"][-1][0]
    assert 2 <= stopped_at < 8, stage1_run["first_log"][-3000:]
    assert "resuming from" in stage1_run["resumed_log"] and f"checkpoint-{stopped_at}" in stage1_run["resumed_log"]
    assert list_checkpoints(str(out))[-1][0] == 8
    assert find_latest_checkpoint(str(out)).endswith("checkpoint-8")
    for name in ("unet_main", "brushnet"):
        assert (out / name / "config.json").is_file()
        assert (out / name / "diffusion_pytorch_model.safetensors").is_file()


def test_speed_defaults(stage1_run):
    """compile follows the device (off on CPU, on with CUDA unless DeepSpeed); the cuDNN switch reaches torch as a bool
    (an int raised on every GPU run; the runs here now set it on CPU too, so they would fail)."""
    from diffueraser.args import build_parser

    info = json.loads((stage1_run["out"] / "run_info.json").read_text())
    assert info["compile"] is False and info["cudnn_benchmark"] == 1
    from accelerate.utils import DistributedType

    from diffueraser.speed import resolve_compile

    def acc(device, kind=DistributedType.NO):
        return SimpleNamespace(device=torch.device(device), distributed_type=kind)
    assert resolve_compile(None, acc("cuda")) is True
    assert resolve_compile(None, acc("cuda", DistributedType.MULTI_GPU)) is True
    assert resolve_compile(None, acc("cuda", DistributedType.DEEPSPEED)) is False
    assert resolve_compile(None, acc("cpu")) is False
    assert resolve_compile(1, acc("cpu")) is True and resolve_compile(0, acc("cuda")) is False
    parse = build_parser("t", "out", 10).parse_args
    base = ["--base_model_name_or_path", "sd"]
    assert parse(base).compile is None
    assert parse(base + ["--compile"]).compile == 1
    assert parse(base + ["--compile", "0"]).compile == 0
    assert parse(base).channels_last == 0 and parse(base + ["--channels_last"]).channels_last == 1
    assert parse(base + ["--channels_last", "1", "--channels_last", "0"]).channels_last == 0  # the script's, then yours


def test_converter_stage1(stage1_run, tmp_path):
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel

    out = stage1_run["out"]
    dest = tmp_path / "converted"
    run("save_checkpoint_stage1.py", ["--input_dir", out / "latest", "--output_dir", dest])
    ckpt = out / "checkpoint-8"
    for name, file, cls in (("unet_main", "model.safetensors", UNet2DConditionModel),
                            ("brushnet", "model_1.safetensors", BrushNetModel)):
        saved = load_file(str(dest / name / "diffusion_pytorch_model.safetensors"))
        expected = load_file(str(ckpt / file))
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[k], expected[k]) for k in saved)
        final = load_file(str(out / name / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(saved[k], final[k]) for k in saved)  # final folders = last checkpoint
        cls.from_pretrained(str(dest / name))
    sample = torch.randn(2, 4, 8, 8)
    t, text = torch.tensor([10, 10]), torch.randn(2, 77, 20)
    with torch.no_grad():  # the converted UNet computes what the run's final UNet computes
        a = UNet2DConditionModel.from_pretrained(str(dest / "unet_main"))(sample, t, text).sample
        b = UNet2DConditionModel.from_pretrained(str(out / "unet_main"))(sample, t, text).sample
    assert torch.equal(a, b)
    again = run("save_checkpoint_stage1.py", ["--input_dir", out, "--output_dir", dest], check=False)
    assert again.returncode != 0 and "--force" in again.stderr
    run("save_checkpoint_stage1.py", ["--input_dir", out, "--output_dir", dest, "--force"])


def test_converter_rejects_foreign_tensor(stage1_run, tmp_path):
    import shutil

    from safetensors.torch import save_file

    ckpt = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(stage1_run["out"] / "checkpoint-8", ckpt)
    shutil.copytree(stage1_run["out"] / "model_config", tmp_path / "run" / "model_config")
    state = load_file(str(ckpt / "model.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(ckpt / "model.safetensors"))
    proc = run("save_checkpoint_stage1.py", ["--input_dir", ckpt, "--output_dir", tmp_path / "x"], check=False)
    assert proc.returncode != 0 and "extra.weight" in proc.stderr


@pytest.fixture(scope="session")
def stage2_run(assets, stage1_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    davis = assets / "DAVIS"
    run("train_DiffuEraser_stage2.py", [
        *flags(assets, out, 2, nframes=4, validation_steps=2,
               validation_image=str([str(davis / "JPEGImages/480p/bear"), "/no/such/clip"]),
               validation_mask=str([str(davis / "Annotations/480p/bear"), "/no/such/mask"])),
        "--pretrained_stage1", stage1_run["out"], "--motion_adapter_path", assets / "adapter"])
    return out


def test_stage2_resume_checks_the_frozen_brushnet(assets, stage1_run, stage2_run, tmp_path):
    """Checkpoints record the BrushNet folder's fingerprint; resuming against changed weights stops
    with a message, resuming against the same ones goes on."""
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "run"
    shutil.copytree(stage2_run, out)
    marker = json.loads((out / "checkpoint-2" / "checkpoint_complete.json").read_text())
    assert marker["step"] == 2 and marker["frozen_sources"]["brushnet"]["files"]
    changed = tmp_path / "stage1-reconverted"
    for name in ("unet_main", "brushnet"):
        shutil.copytree(stage1_run["out"] / name, changed / name)
    weights = changed / "brushnet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    first = sorted(state)[0]
    state[first] = state[first] + 1
    save_file(state, str(weights), metadata={"format": "pt"})

    def resume_with(stage1):
        return run("train_DiffuEraser_stage2.py", [
            *flags(assets, out, 3, nframes=4, resume_from_checkpoint="latest"),
            "--pretrained_stage1", stage1, "--motion_adapter_path", assets / "adapter"], check=False)
    proc = resume_with(changed)
    assert proc.returncode != 0 and "now holds different weights" in proc.stderr, proc.stderr[-2000:]
    assert str(changed / "brushnet") in proc.stderr
    proc = resume_with(stage1_run["out"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout + proc.stderr and (out / "checkpoint-3").is_dir()


def assert_same_weights(run_a, run_b, step):
    from diffueraser.checkpoints import load_checkpoint_models

    a, b = (load_checkpoint_models(str(out / f"checkpoint-{step}")) for out in (run_a, run_b))
    assert [s.keys() for s in a] == [s.keys() for s in b]
    differ = [k for sa, sb in zip(a, b) for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{len(differ)} tensors differ at step {step}, e.g. {differ[0]}"


@pytest.mark.parametrize("stage, workers, stops, older", [
    ("stage1", 2, (2, 6), None),     # stopped mid-epoch (2), resumed across the epoch boundary (4)
    ("stage2", 0, (3, 6), 4),        # stopped mid-epoch (3); then again from the older checkpoint-4 (a boundary)
])
def test_resumed_run_is_bitwise_the_uninterrupted_one(assets, stage1_run, tmp_path, stage, workers, stops, older):
    """A run stopped at checkpoints and resumed (`latest`, or an older checkpoint's path) ends with the
    weights of the run that was never stopped, bit for bit: the data order and every sample's draws are
    functions of (seed, epoch, index), the step's noise comes from the checkpointed RNG, and starting
    the loader again (workers included) draws nothing from it. 4 clips: an epoch is 4 steps."""
    script = f"train_DiffuEraser_{stage}.py"
    extra = dict(davis_repeat=1, dataloader_num_workers=workers)
    if stage == "stage2":
        extra.update(nframes=4, pretrained_stage1=stage1_run["out"], motion_adapter_path=assets / "adapter")
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    run(script, flags(assets, whole, stops[-1], **extra))
    for stop in stops:
        run(script, flags(assets, pieces, stop, resume_from_checkpoint="latest", **extra))
    assert_same_weights(whole, pieces, stops[-1])
    if older:
        run(script, flags(assets, pieces, stops[-1], resume_from_checkpoint=pieces / f"checkpoint-{older}", **extra))
        assert (pieces / f"checkpoint-{stops[-1]}.abandoned-at-{older}").is_dir()
        assert_same_weights(whole, pieces, stops[-1])


def test_run_resumed_after_sigterm_is_bitwise_the_uninterrupted_one(assets, stage1_run, tmp_path):
    """stage1_run was stopped by SIGTERM at whichever step it had reached (22 clips: mid-epoch), then resumed."""
    run("train_DiffuEraser_stage1.py", flags(assets, tmp_path, 8))
    assert_same_weights(stage1_run["out"], tmp_path, 8)


def test_stage2_trains_motion_modules_only(stage1_run, stage2_run):
    stage1, out = stage1_run["out"], stage2_run
    before = load_file(str(stage1 / "unet_main" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "unet_main" / "diffusion_pytorch_model.safetensors"))
    motion = [k for k in after if ".motion_modules." in k]
    spatial = [k for k in after if ".motion_modules." not in k]
    assert sorted(spatial) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in spatial)
    assert motion
    b_before = load_file(str(stage1 / "brushnet" / "diffusion_pytorch_model.safetensors"))
    b_after = load_file(str(out / "brushnet" / "diffusion_pytorch_model.safetensors"))
    assert b_before.keys() == b_after.keys() and all(torch.equal(b_before[k], b_after[k]) for k in b_before)


def test_stage2_motion_modules_changed(assets, stage2_run):
    initial = load_file(str(assets / "adapter" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(stage2_run / "motion_modules" / "diffusion_pytorch_model.safetensors"))
    assert initial.keys() == trained.keys()
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(changed) > len(initial) // 2


def test_validation_gif_and_bad_clip(stage2_run):
    from PIL import Image

    gifs = sorted((stage2_run / "logs" / "samples").glob("sample-*/*.gif"))
    assert {g.parent.name for g in gifs} == {"sample-0", "sample-2"}   # first step and every validation_steps
    assert {g.stem for g in gifs} == {"bear"}                           # the bad clip was skipped, not fatal
    with Image.open(gifs[0]) as im:
        assert im.n_frames == 4 and im.size == (3 * 64, 64)


def test_converter_stage2(stage1_run, stage2_run, tmp_path):
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_motion_model import UNetMotionModel

    dest = tmp_path / "converted2"
    run("save_checkpoint_stage2.py", ["--input_dir", stage2_run, "--output_dir", dest])
    unet = UNetMotionModel.from_pretrained(str(dest / "unet_main"))
    BrushNetModel.from_pretrained(str(dest / "brushnet"))
    saved = load_file(str(dest / "unet_main" / "diffusion_pytorch_model.safetensors"))
    ckpt = load_file(str(stage2_run / "checkpoint-2" / "model.safetensors"))
    assert saved.keys() == ckpt.keys() and all(torch.equal(saved[k], ckpt[k]) for k in saved)
    assert sum(p.numel() for p in unet.parameters()) > 0


def test_converters_refuse_partial_truncated_and_other_stage_checkpoints(stage1_run, stage2_run, tmp_path):
    """Each gets one line naming the path (and, for the other stage, the converter to use); nothing is written."""
    import shutil

    import save_checkpoint_stage1
    import save_checkpoint_stage2

    def refusal(main, input_dir):
        with pytest.raises(SystemExit) as e:
            main(["--input_dir", str(input_dir), "--output_dir", str(tmp_path / "converted")])
        assert not (tmp_path / "converted").exists()
        message = str(e.value.code)
        assert "\n" not in message
        return message
    run = tmp_path / "run"
    shutil.copytree(stage1_run["out"] / "model_config", run / "model_config")
    partial = shutil.copytree(stage1_run["out"] / "checkpoint-8", run / "checkpoint-9.partial")  # complete-looking
    assert "checkpoint-9.partial is a checkpoint save that never finished" in refusal(save_checkpoint_stage1.main,
                                                                                     partial)
    truncated = shutil.copytree(stage1_run["out"] / "checkpoint-8", run / "checkpoint-8") / "model_1.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    message = refusal(save_checkpoint_stage1.main, run / "checkpoint-8")
    assert message.startswith(f"{truncated}: not a readable safetensors file"), message
    message = refusal(save_checkpoint_stage1.main, stage2_run)
    assert "is a stage-2 checkpoint" in message and "save_checkpoint_stage2.py" in message
    message = refusal(save_checkpoint_stage2.main, stage1_run["out"])
    assert "is a stage-1 checkpoint" in message and "save_checkpoint_stage1.py" in message


@pytest.mark.parametrize("extra", [
    {"train_batch_size": 2, "gradient_accumulation_steps": 2, "mixed_precision": "no"},
    {"mixed_precision": "bf16", "gradient_checkpointing": True, "channels_last": 1, "report_to": "tensorboard"},
])
def test_batch_accumulation_and_precision(assets, tmp_path, extra):
    clip = assets / "DAVIS" / "JPEGImages" / "480p" / "bear"
    proc = run("train_DiffuEraser_stage1.py", flags(assets, tmp_path, 2, **extra, validation_steps=5,
                                                    validation_image=clip,
                                                    validation_mask=str(clip).replace("JPEGImages", "Annotations")))
    assert list_checkpoints(str(tmp_path))[-1][0] == 2
    # validation at the start and at the end (2 is no multiple of 5), also under mixed precision, where
    # accelerate rebuilds the models' outputs in fp32 (every bf16/fp16 stage-1 validation once failed so)
    assert "failed" not in proc.stderr, proc.stderr[-3000:]
    for step in (0, 2):
        assert (tmp_path / "logs" / "samples" / f"sample-{step}" / "bear.gif").is_file(), proc.stderr[-3000:]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert all(info[k] == v for k, v in extra.items()), proc.stdout
    if extra.get("report_to") == "tensorboard":  # what a user looks at when a run goes wrong, one value per step
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
        per_step = ("loss", "lr", "grad_norm", "steps_per_s", "data_wait_s", "skipped_updates", "skipped_clips")
        for tag in per_step:
            assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
        assert "loss_scale" not in events.Tags()["scalars"]  # bf16 has no loss scaler
        assert all(e.value > 0 for tag in ("grad_norm", "steps_per_s") for e in events.Scalars(tag))
        assert all(e.value == 0 for tag in ("skipped_updates", "skipped_clips") for e in events.Scalars(tag))
        assert all(e.value >= 0 for e in events.Scalars("data_wait_s"))
        assert [e.step for e in events.Images("validation/bear")] == [0, 2]  # through the tracker's log_images


def test_bad_paths_are_named(assets, tmp_path):
    proc = run("train_DiffuEraser_stage1.py", flags(assets, tmp_path, 1, davis_root="/no/davis"), check=False)
    assert proc.returncode != 0 and "--davis_root: /no/davis" in proc.stderr
    proc = run("train_DiffuEraser_stage2.py", [*flags(assets, tmp_path, 1), "--pretrained_stage1", tmp_path,
                                               "--motion_adapter_path", assets / "adapter"], check=False)
    assert proc.returncode != 0 and "--pretrained_stage1" in proc.stderr


@pytest.mark.parametrize("script", ["finetune_stage1.sh", "finetune_stage2.sh"])
def test_shell_scripts_name_missing_paths(script, tmp_path):
    env = {**os.environ, "WEIGHTS": str(tmp_path / "no-weights"), "OUTPUT_DIR": str(tmp_path / "out")}
    proc = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert f"missing: {tmp_path / 'no-weights'}/stable-diffusion-v1-5" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("script,config", [("finetune_stage1.sh", "configs/accelerate_multigpu.yaml"),
                                           ("finetune_stage2.sh", "configs/deepspeed_zero2.yaml")])
def test_shell_scripts_pass_config_and_gpu_count_to_the_launcher(script, config, tmp_path):
    """NUM_PROCESSES=N and ACCELERATE_CONFIG (train.md, "Several GPUs") reach `accelerate launch`."""
    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\n')
    fake.chmod(0o755)
    for folder in ("sd", "vae", "adapter", "stage1"):
        (tmp_path / folder).mkdir()
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "BASE_MODEL": str(tmp_path / "sd"),
           "VAE": str(tmp_path / "vae"), "MOTION_ADAPTER": str(tmp_path / "adapter"), "STAGE1": str(tmp_path / "stage1"),
           "DAVIS": "", "YTBV": "", "OUTPUT_DIR": str(tmp_path / "out"), "ACCELERATE_CONFIG": config, "NUM_PROCESSES": "3"}
    proc = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    launched = (tmp_path / "args").read_text()
    assert launched.startswith(f"launch --config_file {config} --num_processes 3 ")
    assert " --latent_cache latent_cache " in launched  # on by default, one folder for both stages
    proc = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, env=dict(env, LATENT_CACHE=""))
    assert proc.returncode == 0 and "--latent_cache" not in (tmp_path / "args").read_text()  # LATENT_CACHE= : off


STALLED = """
import time
from diffueraser.speed import StepClock

def waiting_for_a_batch():
    time.sleep(3)

clock = StepClock(1.5)
for _ in range(30):  # every call re-arms the watch: steps 0.05 s apart are no stall
    time.sleep(0.05)
    clock.restart()
waiting_for_a_batch()  # the dump, 1.5 s into it
clock.restart()
clock.stop()
time.sleep(2)  # stopped after a re-arm: no second dump
"""


def test_a_stalled_run_writes_its_stacks_once():
    proc = subprocess.run([sys.executable, "-c", STALLED], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.count("Timeout (0:00:01.500000)!") == 1, proc.stderr
    assert "waiting_for_a_batch" in proc.stderr  # the dump came from the stall, not from the steady steps


def test_stage1_starts_from_a_converted_folder(assets, stage1_run, tmp_path):
    src = stage1_run["out"]
    run("train_DiffuEraser_stage1.py", [*flags(assets, tmp_path, 1, learning_rate=0, adam_weight_decay=0),
                                        "--pretrained_stage1_path", src])
    for name in ("unet_main", "brushnet"):  # lr 0: the weights it ends with are the ones it loaded
        a = load_file(str(src / name / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / name / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_motion_modules_from_a_released_stage2_unet(reference):
    from train_DiffuEraser_stage2 import load_motion_adapter

    adapter = load_motion_adapter(str(reference / "tiny_stage2" / "unet_main"))
    unet = load_file(str(reference / "tiny_stage2" / "unet_main" / "diffusion_pytorch_model.safetensors"))
    state = adapter.state_dict()
    assert state.keys() == {k for k in unet if ".motion_modules." in k}
    assert all(torch.equal(state[k], unet[k]) for k in state)
    with pytest.raises(SystemExit, match="BrushNetModel"):
        load_motion_adapter(str(reference / "tiny_stage1" / "brushnet"))


def test_stage1_unet_from_a_released_stage2_unet(reference):
    """--pretrained_stage1(_path) may name the released DiffuEraser folder, whose unet_main/ is a motion UNet."""
    from diffueraser.convert import load_unet2d

    unet = load_unet2d(str(reference / "tiny_stage2" / "unet_main"))   # built from tiny_stage1's UNet
    expected = load_file(str(reference / "tiny_stage1" / "unet_main" / "diffusion_pytorch_model.safetensors"))
    state = unet.state_dict()
    assert type(unet).__name__ == "UNet2DConditionModel" and state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def start_stage1_script(assets, out, cwd):
    """finetune_stage1.sh on the tiny assets, training "forever", in its own session; returns (process, log)."""
    env = {**os.environ, "BASE_MODEL": str(assets / "sd"), "VAE": str(assets / "sd"), "DAVIS": str(assets / "DAVIS"),
           "YTBV": str(assets / "YTVOS"), "OUTPUT_DIR": str(out)}
    extra = ["--mixed_precision", "no", "--resolution", "64", "--nframes", "2", "--dataloader_num_workers", "0",
             "--max_train_steps", "100000", "--validation_steps", "100000", "--validation_inference_steps", "1",
             "--report_to", "none"]
    proc = subprocess.Popen(["bash", str(REPO / "finetune_stage1.sh"), *extra], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, out / "train_stage1.log"


def wait_for_log(proc, log, text):
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and text not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["kill_script", "ctrl_c"])
def test_shell_script_stop_saves_and_exits(assets, tmp_path, how):
    """`kill <finetune_stage1.sh>` (SIGTERM to the script) or Ctrl-C (SIGINT to the terminal's process
    group): the trainer saves a checkpoint, the log has it all, exit 0. The launcher must not see the
    signal: accelerate launch >= 1.16 kills its child 5 s after its own SIGTERM (exit 143)."""
    out = tmp_path / "out"
    proc, log = start_stage1_script(assets, out, tmp_path)
    wait_for_log(proc, log, "steps/epoch")
    time.sleep(3)  # a few training steps
    if how == "kill_script":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped at step" in text and "resume with --resume_from_checkpoint latest" in text
    assert list_checkpoints(str(out)), text[-2000:]


@pytest.mark.parametrize("moment", ["1 s after the start", "at the data scan"])
def test_shell_script_stop_during_startup_ends_it(assets, tmp_path, moment):
    """`kill <finetune_stage1.sh>` before training started: the run ends at once, status 0, no checkpoint.
    1 s in, the launcher is starting (no trainer yet: its session is ended); at the data scan the trainer
    is loading, with SIGINT/SIGTERM inherited ignored (run_logged.sh, `&`), which it must undo first thing."""
    out = tmp_path / "out"
    proc, log = start_stage1_script(assets, out, tmp_path)
    try:
        if moment == "1 s after the start":
            time.sleep(1)
        else:
            wait_for_log(proc, log, "FinetuneDataset scan")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:  # a failed test must not leave a trainer running (the launcher has a session of its own)
        from bench.gpu_e2e import kill_tree

        kill_tree(proc)
    text = log.read_text()
    assert "stopped at step" not in text and not list_checkpoints(str(out)), text[-2000:]
    if moment == "at the data scan":
        assert "signal SIGTERM before training started: stopped, no checkpoint written" in text, text[-2000:]
