"""Evaluation and inference on tiny random models: tables, determinism, masks, windows, run_diffueraser."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from diffueraser.inference import composite, window_starts, window_weights

REPO = Path(__file__).resolve().parents[1]
SIZE = 72  # the smallest frames with an SSIM (65 px window) the tiny UNet takes


@pytest.fixture(scope="session")
def eval_assets(tmp_path_factory, reference):
    """Tiny SD folder, two stage-1 weight sets, a released-like folder (motion UNet), a synthetic DAVIS,
    and rule-filled I3D weights (no download)."""
    from diffueraser.metrics import InceptionI3d, fill_i3d_by_rule
    from diffueraser.tiny import TINY_UNET, write_synthetic_davis, write_tiny_sd
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel

    root = tmp_path_factory.mktemp("eval")
    sd = write_tiny_sd(str(root / "sd"))
    for name, seed in (("w1", 0), ("w2", 5)):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        unet.save_pretrained(str(root / name / "unet_main"))
        BrushNetModel.from_unet(unet).save_pretrained(str(root / name / "brushnet"))
    shutil.copytree(reference / "tiny_stage2" / "unet_main", root / "released" / "unet_main")
    shutil.copytree(reference / "tiny_stage1" / "brushnet", root / "released" / "brushnet")
    write_synthetic_davis(str(root / "DAVIS"), videos=("bear", "boat"), nframes=7, size=(80, 112))
    torch.save(fill_i3d_by_rule(InceptionI3d()).state_dict(), root / "i3d.pt")
    import torchvision

    torch.manual_seed(0)  # a random AlexNet stands in for the ImageNet one LPIPS uses
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), root / "alexnet.pth")
    return dict(root=root, sd=sd, davis=root / "DAVIS", i3d=root / "i3d.pt", alexnet=root / "alexnet.pth")


def eval_argv(assets, out, *extra, weights=("a=w1", "b=w2")):
    argv = ["--base_model_name_or_path", assets["sd"], "--davis_root", assets["davis"], "--split", "train",
            "--resolution", str(SIZE), "--nframes", "4", "--steps", "2", "--output_dir", out]
    for spec in weights:
        name, folder = spec.split("=")
        argv += ["--weights", f"{name}={assets['root'] / folder}"]
    return [str(a) for a in argv + list(extra)]


def scores(results, drop=("seconds",)):
    """Everything but timings (per video and weight set, and the means) as JSON text: nan equals nan.
    drop: keys left out, at both levels."""
    def keep(d):
        return {k: keep(v) if isinstance(v, dict) else v for k, v in d.items() if k not in drop}
    return json.dumps(keep({"means": results["means"], "videos": results["videos"]}), sort_keys=True)


@pytest.fixture(scope="session")
def two_runs(eval_assets, tmp_path_factory):
    """The stage-1 script run as users run it, writing its masks, then again reading them back: the
    same command twice (a run in this process would differ by rounding: conftest sets one torch thread)."""
    out = tmp_path_factory.mktemp("eval_runs")
    masks = out / "masks"
    metrics = ["--i3d_weights", eval_assets["i3d"], "--lpips_weights", eval_assets["alexnet"]]
    runs = {}
    for name, extra in (("first", ["--write_masks", masks]), ("again", ["--masks", masks])):
        proc = subprocess.run([sys.executable, "eval_DiffuEraser_stage1.py",
                               *eval_argv(eval_assets, out / name, *extra, *metrics)], cwd=REPO, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads((out / name / "results.json").read_text())
        runs.setdefault("proc", proc)
    return dict(out=out, masks=masks, read_back=runs["again"], **runs)


def test_two_weight_sets_one_table_same_numbers_twice(two_runs):
    first, out = two_runs["first"], two_runs["out"] / "first"
    assert set(first["means"]) == {"a", "b"}
    assert set(first["videos"]) == {"bear", "boat"}
    for row in first["videos"].values():
        assert {"a", "b"} <= set(row) and row["frames"] == 7
    for m in first["means"].values():
        assert all(np.isfinite(m[k]) for k in ("psnr", "ssim", "psnr_hole", "lpips", "vfid"))
        assert 0 < m["ssim"] <= 1 and m["psnr"] > m["psnr_hole"]  # the kept part is the clean frame
    assert first["means"]["a"] != first["means"]["b"]  # different weights, different numbers
    assert scores(two_runs["again"]) == scores(first)  # deterministic (the second run read the masks back)
    md = (out / "results.md").read_text()
    assert "| **mean** | **a** |" in md and "| **mean** | **b** |" in md and "batch" in md.lower()
    stdout = two_runs["proc"].stdout
    assert "clips/s" in stdout and "s per video" in stdout and "| **mean** | **b** |" in stdout
    with Image_open(out / "means.png") as im:
        assert im.size[0] > 0
    with Image_open(out / "gifs" / "bear.gif") as im:  # masked input | a | b | ground truth
        assert im.size == (4 * SIZE, SIZE) and im.n_frames == 7


def Image_open(path):
    from PIL import Image

    return Image.open(path)


def test_masks_written_and_read_back_give_the_same_numbers(two_runs):
    pngs = sorted((two_runs["masks"] / "bear").glob("*.png"))
    assert len(pngs) == 7
    with Image_open(pngs[0]) as im:
        values = set(np.unique(np.asarray(im)))
    assert values == {0, 255}  # white = hole
    assert "read from" in two_runs["read_back"]["settings"]["masks"]


def test_released_folder_and_checkpoint_load(eval_assets, tmp_path):
    """A released folder (motion UNet) gives stage 1 its spatial layers and stage 2 its motion UNet; a
    training checkpoint loads the same tensors as the folder it was made of; stage 2 refuses a 2D UNet."""
    from safetensors.torch import save_file

    from diffueraser.inference import load_weights

    root = eval_assets["root"]
    unet2d, _ = load_weights(str(root / "released"), "stage1")
    motion, _ = load_weights(str(root / "released"), "stage2")
    assert type(unet2d).__name__ == "UNet2DConditionModel" and type(motion).__name__ == "UNetMotionModel"
    with pytest.raises(SystemExit, match="2D UNet"):
        load_weights(str(root / "w1"), "stage2")
    unet, brushnet = load_weights(str(root / "w1"), "stage1")
    run = tmp_path / "run"
    for name, model in (("unet_main", unet), ("brushnet", brushnet)):
        (run / "model_config" / name).mkdir(parents=True)
        shutil.copy(root / "w1" / name / "config.json", run / "model_config" / name / "config.json")
    (run / "checkpoint-3").mkdir()
    save_file(unet.state_dict(), str(run / "checkpoint-3" / "model.safetensors"))
    save_file(brushnet.state_dict(), str(run / "checkpoint-3" / "model_1.safetensors"))
    u2, b2 = load_weights(str(run / "latest"), "stage1")
    for a, b in ((unet, u2), (brushnet, b2)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(SystemExit, match="stage-1 checkpoint"):
        load_weights(str(run), "stage2")


def test_stage2_evaluation_of_a_released_folder(eval_assets, tmp_path):
    from diffueraser.evaluate import main

    results = main("stage2", 22, eval_argv(eval_assets, tmp_path, "--max_videos", "1", "--max_frames", "5",
                                           weights=("released=released",)))
    assert list(results["videos"]) == ["bear"] and results["videos"]["bear"]["frames"] == 5
    assert np.isfinite(results["means"]["released"]["psnr_hole"])
    assert any("VFID skipped" in n for n in results["notes"])


def test_annotations_give_pictures_and_no_scores(eval_assets, tmp_path):
    from diffueraser.evaluate import main

    results = main("stage1", 10, eval_argv(eval_assets, tmp_path, "--annotations", "--max_videos", "1",
                                           "--max_frames", "3", weights=("a=w1",)))
    assert results["means"] == {} and "annotations" in results["settings"]["masks"]
    assert (tmp_path / "gifs" / "bear.gif").is_file() and not (tmp_path / "means.png").exists()
    assert "no scores" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit, match="--masks: no such file or folder: .*bear"):  # one line, naming the flag
        main("stage1", 10, eval_argv(eval_assets, tmp_path, "--masks", tmp_path, "--max_videos", "1",
                                     weights=("a=w1",)))


@pytest.mark.parametrize("flags, size", [([], (512, 512)), (["--size", "432x240"], (240, 432)),
                                         (["--native"], (80, 112))])
def test_evaluation_sizes(eval_assets, flags, size):
    import argparse

    from diffueraser.evaluate import add_eval_args, check_eval_args, load_frames

    parser = add_eval_args(argparse.ArgumentParser(), 10)
    args = check_eval_args(parser, parser.parse_args(
        ["--weights", f"a={eval_assets['root'] / 'w1'}", "--base_model_name_or_path", "sd",
         "--videos", str(eval_assets["davis"] / "JPEGImages" / "480p"), "--max_frames", "2", *flags]))
    frames, _ = load_frames(str(eval_assets["davis"] / "JPEGImages" / "480p" / "bear"), args)
    assert frames.shape == (2, *size, 3)


def test_windows_cover_and_blend_linearly():
    starts = window_starts(60, 10, 4)
    assert starts[0] == 0 and starts[-1] == 50 and all(b - a <= 6 for a, b in zip(starts, starts[1:]))
    total = np.zeros(60)
    for s, w in zip(starts, window_weights(starts, 10)):
        total[s:s + 10] += w
    assert np.allclose(total, 1)
    w = window_weights([0, 6], 10)  # 4 shared frames: weights 4/5 .. 1/5 against 1/5 .. 4/5
    assert np.allclose(w[0][6:], [0.8, 0.6, 0.4, 0.2]) and np.allclose(w[1][:4], [0.2, 0.4, 0.6, 0.8])
    assert window_starts(7, 10, 4) == [0]


def test_composite_keeps_the_frame_outside_and_the_result_inside():
    original = np.full((1, 40, 40, 3), 10, np.uint8)
    result = np.full((1, 40, 40, 3), 200, np.uint8)
    hole = np.zeros((1, 40, 40), bool)
    hole[:, 15:25, 15:25] = True
    out = composite(original, result, hole, blur=7)
    assert (out[hole] == 200).all()                       # nothing of the original leaks into the hole
    assert (out[:, :8] == 10).all()                       # far from the hole: the original frame
    assert 10 < out[0, 14, 20, 0] < 200                   # the soft edge lies outside the hole


def test_pipeline_starts_from_a_prior(eval_assets):
    """init_latents + start_step: a start at the last of 10 steps returns nearly the prior (measured: mean
    distance 0.22x that of a start from noise)."""
    from diffueraser.inference import build_pipeline, load_base_models, load_weights
    from diffueraser.learning_check import identity_vae

    _, text_encoder, tokenizer, scheduler = load_base_models(eval_assets["sd"])
    base = (identity_vae(), text_encoder, tokenizer, scheduler)  # a VAE that keeps what it encodes
    pipe = build_pipeline("stage1", *load_weights(str(eval_assets["root"] / "w1"), "stage1"), base,
                          torch.device("cpu"), torch.float32)
    from diffueraser.tiny import _video_frames

    frames = _video_frames(np.random.default_rng(0), 2, 64, 64)
    kept = np.ones((2, 64, 64), np.float32)
    kept[:, 16:48, 16:48] = 0
    prior = pipe.encode_pixels(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1, 8)
    target = pipe.decode_latents(prior, 8).astype(float)
    run = dict(num_inference_steps=10, generator=None)
    late = pipe(frames, kept, init_latents=prior, start_step=9, **run).astype(float)
    noise = pipe(frames, kept, **run).astype(float)
    assert np.abs(late - target).mean() < 0.3 * np.abs(noise - target).mean()
    with pytest.raises(ValueError, match="start_step"):
        pipe(frames, kept, init_latents=prior, start_step=10, **run)


# ----------------------------------------------------------------------------- run_diffueraser.py
@pytest.fixture(scope="session")
def user_video(tmp_path_factory):
    """A 60-frame 96x64 mp4, a one-PNG mask (white = hole), and mismatched masks."""
    from diffueraser.tiny import _video_frames

    root = tmp_path_factory.mktemp("video")
    frames = _video_frames(np.random.default_rng(0), 60, 64, 96)
    writer = cv2.VideoWriter(str(root / "in.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 24, (96, 64))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    mask = np.zeros((64, 96), np.uint8)
    mask[20:40, 30:60] = 255
    cv2.imwrite(str(root / "mask.png"), mask)
    cv2.imwrite(str(root / "mask_small.png"), mask[:32])
    (root / "masks59").mkdir()
    for i in range(59):
        cv2.imwrite(str(root / "masks59" / f"{i:05d}.png"), mask)
    return root


def run_argv(assets, video, *extra, weights="w1"):
    return [str(a) for a in ["--video", video / "in.mp4", "--weights", assets["root"] / weights,
                             "--base_model_name_or_path", assets["sd"], "--steps", "2", *extra]]


def read_mp4(path):
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = cap.read()
        if not ok:
            return np.stack(frames)
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


def test_run_diffueraser_writes_every_frame_at_the_input_size(eval_assets, user_video, tmp_path):
    proc = subprocess.run([sys.executable, "run_diffueraser.py",
                           *run_argv(eval_assets, user_video, "--mask", user_video / "mask.png", "--nframes", "10",
                                     "--output", tmp_path / "out.mp4", "--save_frames", tmp_path / "frames",
                                     weights="released")],  # the motion UNet: stage-2 sampling
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage2" in proc.stderr and "10 windows" in proc.stdout  # 60 frames, windows of 10 sharing 4
    out = read_mp4(tmp_path / "out.mp4")
    assert out.shape == (60, 64, 96, 3)
    saved = np.stack([cv2.imread(str(p))[..., ::-1] for p in sorted((tmp_path / "frames").glob("*.png"))])
    assert saved.shape == (60, 64, 96, 3)
    original = read_mp4(user_video / "in.mp4")
    assert np.array_equal(saved[:, :, :12], original[:, :, :12])  # far from the mask: untouched
    assert not np.array_equal(saved[:, 25:35, 40:50], original[:, 25:35, 40:50])


def test_run_diffueraser_refuses_mismatched_masks(eval_assets, user_video, tmp_path):
    import run_diffueraser

    proc = subprocess.run([sys.executable, "run_diffueraser.py",
                           *run_argv(eval_assets, user_video, "--mask", user_video / "mask_small.png",
                                     "--output", tmp_path / "x.mp4")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"--mask: {user_video / 'mask_small.png'} is 96x32, --video is 96x64"
    with pytest.raises(SystemExit, match="has 59 frames, --video has 60"):
        run_diffueraser.main(run_argv(eval_assets, user_video, "--mask", user_video / "masks59"))
    with pytest.raises(SystemExit, match="--prior: .* has 59 frames of 96x64, --video 60 of 96x64"):
        run_diffueraser.main(run_argv(eval_assets, user_video, "--mask", user_video / "mask.png", "--prior",
                                      user_video / "masks59"))
    assert not (tmp_path / "x.mp4").exists()


def test_run_diffueraser_with_a_prior(eval_assets, user_video, tmp_path):
    """Each window starts from the prior (here the input itself) noised to the last of 2 steps."""
    import run_diffueraser

    out = run_diffueraser.main(run_argv(eval_assets, user_video, "--mask", user_video / "mask.png", "--nframes", "30",
                                        "--prior", user_video / "in.mp4", "--prior_steps", "1",
                                        "--output", tmp_path / "prior.mp4"))
    assert out.shape == (60, 64, 96, 3) and read_mp4(tmp_path / "prior.mp4").shape == (60, 64, 96, 3)
