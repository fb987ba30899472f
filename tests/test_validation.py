"""Validation: both samplers on tiny random models, clip loading, GIFs, tracker logging."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffueraser.validation import load_validation_clip, parse_path_list, run_validation, save_gif

R = 64  # the tiny UNet needs latents of at least 8x8 (three downsamples)
STEPS = 2


@pytest.fixture(scope="session")
def components(tmp_path_factory):
    """Tiny SD1.5-layout models plus a BrushNet made from the UNet, all float32 on CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffueraser.tiny import write_tiny_sd
    from libs.brushnet_CA import BrushNetModel
    from libs.unet_2d_condition import UNet2DConditionModel

    path = write_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    return dict(vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
                text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                unet=unet, brushnet=BrushNetModel.from_unet(unet),
                scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"))


@pytest.fixture(scope="session")
def stage1(components):
    from diffueraser.pipeline_diffueraser_stage1 import DiffuEraserPipelineStage1

    return DiffuEraserPipelineStage1(**components)


@pytest.fixture(scope="session")
def stage2(components, tmp_path_factory):
    from diffueraser.pipeline_diffueraser_stage2 import DiffuEraserPipelineStage2
    from diffueraser.tiny import write_tiny_motion_adapter
    from libs.unet_motion_model import MotionAdapter, UNetMotionModel

    adapter = MotionAdapter.from_pretrained(write_tiny_motion_adapter(str(tmp_path_factory.mktemp("adapter"))))
    return DiffuEraserPipelineStage2(**{**components, "unet": UNetMotionModel.from_unet2d(components["unet"], adapter)})


@pytest.fixture(scope="session")
def davis(tmp_path_factory):
    from diffueraser.tiny import write_synthetic_davis

    return write_synthetic_davis(str(tmp_path_factory.mktemp("davis")))


def clip(num_frames, seed=0):
    """Random uint8 frames (F, R, R, 3) and a square hole in the middle (hole = 0, kept = 1)."""
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, R, R, 3), dtype=np.uint8)
    masks = np.ones((num_frames, R, R), np.float32)
    masks[:, R // 4:3 * R // 4, R // 4:3 * R // 4] = 0
    return frames, masks


def sample(pipe, frames, masks, seed, **kwargs):
    return pipe(frames, masks, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_stage1_returns_uint8_frames_and_uses_unipc(stage1):
    from diffusers import UniPCMultistepScheduler

    frames, masks = clip(3)
    out = sample(stage1, frames, masks, seed=0)
    assert out.shape == (3, R, R, 3) and out.dtype == np.uint8
    assert isinstance(stage1.scheduler, UniPCMultistepScheduler)


def test_stage1_seed_decides_output_and_global_rng_untouched(stage1):
    frames, masks = clip(2)
    rng_state = torch.get_rng_state()
    a, b = sample(stage1, frames, masks, seed=1), sample(stage1, frames, masks, seed=1)
    assert torch.equal(rng_state, torch.get_rng_state())
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample(stage1, frames, masks, seed=2))


def test_stage1_guidance_scale_changes_output(stage1):
    frames, masks = clip(2)
    plain = sample(stage1, frames, masks, seed=0)
    guided = sample(stage1, frames, masks, seed=0, guidance_scale=5.0)
    assert guided.shape == plain.shape and not np.array_equal(plain, guided)


def test_stage1_rejects_size_not_multiple_of_8(stage1):
    frames, masks = clip(1)
    with pytest.raises(ValueError, match="multiple of 8"):
        sample(stage1, frames[:, :60], masks[:, :60], seed=0)


def test_stage2_motion_unet_returns_frames_and_is_seeded(stage2):
    frames, masks = clip(4)
    a, b = sample(stage2, frames, masks, seed=3), sample(stage2, frames, masks, seed=3)
    assert a.shape == (4, R, R, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample(stage2, frames, masks, seed=4))


def test_stage2_rejects_clip_longer_than_motion_max_seq_length(stage2):
    n = stage2.unet.config.motion_max_seq_length + 1
    with pytest.raises(ValueError, match="motion_max_seq_length"):
        stage2(np.zeros((n, 8, 8, 3), np.uint8), np.ones((n, 8, 8), np.float32))


def test_load_validation_clip_shapes_geometry_and_conventions(davis):
    frames, masks = load_validation_clip(f"{davis}/JPEGImages/480p/bear", f"{davis}/Annotations/480p/bear",
                                         num_frames=5, resolution=32, dilate=0)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    assert masks.shape == (5, 32, 32) and masks.dtype == np.float32
    assert set(np.unique(masks)) == {0.0, 1.0}
    # 64x96 -> 32x48, crop 8 columns each side; frame 0's hole rows 16:32, cols 24:48 at full size
    expected = np.ones((32, 32), np.float32)
    expected[8:16, 4:16] = 0
    assert np.array_equal(masks[0], expected)


def test_load_validation_clip_dilation_grows_hole(davis):
    dirs = f"{davis}/JPEGImages/480p/boat", f"{davis}/Annotations/480p/boat"
    _, plain = load_validation_clip(*dirs, num_frames=2, resolution=32, dilate=0)
    _, dilated = load_validation_clip(*dirs, num_frames=2, resolution=32, dilate=4)
    assert (dilated == 0).sum() > (plain == 0).sum()
    assert np.all(dilated[plain == 0] == 0)


def test_load_validation_clip_fewer_frames_and_single_mask(davis, tmp_path):
    _, masks = load_validation_clip(f"{davis}/JPEGImages/480p/bear", f"{davis}/Annotations/480p/bear/00003.png",
                                    num_frames=100, resolution=32)
    assert masks.shape == (12, 32, 32)  # all 12 frames, each with the one mask
    assert all(np.array_equal(m, masks[0]) for m in masks)
    palette = Image.fromarray(np.pad(np.full((8, 8), 2, np.uint8), 28), "P")  # DAVIS label 2
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    palette.save(tmp_path / "only.png")
    _, masks = load_validation_clip(f"{davis}/JPEGImages/480p/bear", str(tmp_path), num_frames=3, resolution=32)
    assert masks.shape == (3, 32, 32) and (masks == 0).any()


@pytest.mark.parametrize("which", ["image_dir", "mask_dir"])
def test_load_validation_clip_missing_path_names_it(davis, tmp_path, which):
    dirs = dict(image_dir=f"{davis}/JPEGImages/480p/bear", mask_dir=f"{davis}/Annotations/480p/bear")
    dirs[which] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_validation_clip(**dirs, num_frames=2, resolution=32)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_validation_clip(**{**dirs, which: str(tmp_path)}, num_frames=2, resolution=32)


class FakeTensorBoard:
    name = "tensorboard"

    def __init__(self):
        self.calls = []

    def log_images(self, values, step=None, **kwargs):  # accelerate's tracker API
        self.calls += [(tag, images.shape, step, kwargs) for tag, images in values.items()]


class BrokenTracker:
    name = "wandb"

    def log_images(self, values, step=None, **kwargs):
        raise RuntimeError("offline")


def test_run_validation_writes_gif_and_logs(stage1, tmp_path):
    frames, masks = clip(5)
    tensorboard = FakeTensorBoard()
    with pytest.warns(UserWarning, match="wandb"):  # wandb import or log fails: a warning, not an error
        results = run_validation(stage1, [dict(name="bear", frames=frames, masks=masks)], str(tmp_path), step=7,
                                 seed=0, trackers=[tensorboard, BrokenTracker()], num_inference_steps=STEPS)
    (name, gif_path, strips), = results
    assert name == "bear" and gif_path == str(tmp_path / "sample-7" / "bear.gif")
    assert strips.shape == (5, R, 3 * R, 3)
    with Image.open(gif_path) as gif:
        assert gif.n_frames == 5 and gif.size == (3 * R, R) and gif.info["loop"] == 0
    assert tensorboard.calls == [("validation/bear", (4, R, 3 * R, 3), 7, {"dataformats": "NHWC"})]
    assert np.all(strips[:, R // 2, R // 2] == 128)  # the hole is grey in the masked input
    assert np.array_equal(strips[:, :, 2 * R:], frames)  # ground truth on the right


def test_run_validation_rejects_bad_clips(stage1, tmp_path):
    with pytest.raises(ValueError, match="no validation clips"):
        run_validation(stage1, [], str(tmp_path), step=0, seed=0)
    with pytest.raises(KeyError, match="masks"):
        run_validation(stage1, [dict(name="x", frames=clip(1)[0])], str(tmp_path), step=0, seed=0)


def test_save_gif_frame_count_and_duration(tmp_path):
    rows = [np.full((8, 24, 3), 40 * i, np.uint8) for i in range(3)]
    path = save_gif(str(tmp_path / "a" / "b.gif"), rows)
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.info["duration"] == 100


@pytest.mark.parametrize("value, expected", [
    ("['a/bear', 'b/boat']", ["a/bear", "b/boat"]),
    ("data/DAVIS/JPEGImages/480p/bear", ["data/DAVIS/JPEGImages/480p/bear"]),
    (["x", "y"], ["x", "y"]),
    (("x",), ["x"]),
    ("", []),
])
def test_parse_path_list(value, expected):
    assert parse_path_list(value) == expected


@pytest.mark.parametrize("value", ["['a', 3]", "['a'", 5])
def test_parse_path_list_rejects(value):
    with pytest.raises((ValueError, TypeError)):
        parse_path_list(value)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GPU's memory"))])
def test_optimizer_state_waits_in_host_memory_and_comes_back(device):
    """Validation's retry parks Adam's moments: meanwhile their storage is empty (on a GPU: the
    allocated memory drops by their size), a storage shared between parameters' states moves once,
    and afterwards the same tensors hold the same values, so the next step is bit-exact with a twin's."""
    from diffueraser.validation import optimizer_state_in_host_memory

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 32, device=device)), torch.nn.Parameter(torch.randn(7, device=device))]
        opt = torch.optim.AdamW(params, lr=0.1, fused=device == "cuda")
        for step in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return params, opt
    (params, opt), (twin_params, twin) = make(), make()
    shared = torch.arange(256.0, device=device)  # as bitsandbytes' quantisation map: one tensor in every state
    for state in list(opt.state.values()) + list(twin.state.values()):
        state["qmap"] = shared
    fixed = torch.from_numpy(np.arange(3.0))  # a storage that cannot be resized: it stays where it is
    if device == "cpu":
        next(iter(opt.state.values()))["fixed"] = fixed
    tensors = [t for state in opt.state.values() for t in state.values() if t is not fixed]
    values = [t.clone() for t in tensors]
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    with optimizer_state_in_host_memory(opt, device_type=device) as moved:
        assert moved == 7  # 2 x (exp_avg, exp_avg_sq, step) + the shared map
        assert all(t.untyped_storage().nbytes() == 0 for t in tensors) and fixed.tolist() == [0.0, 1.0, 2.0]
        if device == "cuda":
            assert allocated - torch.cuda.memory_allocated() >= 2 * (64 * 32 + 7) * 4 + 256 * 4
    assert all(torch.equal(t, v) for t, v in zip(tensors, values))
    for group in (params, twin_params):
        for p in group:
            p.grad = torch.ones_like(p)
    opt.step(), twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    with optimizer_state_in_host_memory(None):  # no optimizer (a rank without validation): nothing to do
        pass


def test_optimizer_state_stays_where_moving_it_is_unsafe(monkeypatch):
    """Parking leaves alone a state storage that a parameter uses, and everything when host memory is short; a
    state that cannot come back (out of GPU memory twice) ends the run with a RuntimeError saying to resume, and
    one failure alone is retried after freeing cached memory."""
    from types import SimpleNamespace

    import diffueraser.validation as validation

    param = torch.nn.Parameter(torch.randn(8))
    opt = torch.optim.AdamW([param])
    param.grad = torch.randn(8)
    opt.step()
    opt.state[param]["alias"] = param.data  # shares the parameter's storage: must not be emptied
    with validation.optimizer_state_in_host_memory(opt, device_type="cpu") as moved:
        assert moved == 3 and param.untyped_storage().nbytes() == 8 * 4
    monkeypatch.setattr(validation.psutil, "virtual_memory", lambda: SimpleNamespace(available=2**30))
    with pytest.warns(UserWarning, match="host memory short"):
        with validation.optimizer_state_in_host_memory(opt, device_type="cpu") as moved:
            assert moved == 0
    monkeypatch.undo()

    moments = opt.state[param]["exp_avg"].clone()
    real, failures = validation._bytes_of, []

    def failing(times):
        def bytes_of(s):
            if s.nbytes() and len(failures) < times:  # the copy back, not the copy out
                failures.append(1)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")
            return real(s)
        return bytes_of
    with validation.optimizer_state_in_host_memory(opt, device_type="cpu"):
        monkeypatch.setattr(validation, "_bytes_of", failing(1))
    assert torch.equal(opt.state[param]["exp_avg"], moments) and len(failures) == 1
    failures.clear()
    monkeypatch.setattr(validation, "_bytes_of", real)
    with pytest.raises(RuntimeError, match="resume from its last checkpoint"):
        with validation.optimizer_state_in_host_memory(opt, device_type="cpu"):
            monkeypatch.setattr(validation, "_bytes_of", failing(2))
