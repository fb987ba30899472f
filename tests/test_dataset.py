"""FinetuneDataset on synthetic DAVIS / YouTube-VOS trees: sample format and conventions, the
scan (oversampling, skips, bad roots), robustness to corrupt frames, randomness, the preview CLI."""
import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset.finetune_dataset as fd
from dataset.finetune_dataset import FinetuneDataset
from diffueraser.tiny import write_synthetic_davis, write_synthetic_ytvos

REPO = Path(__file__).resolve().parents[1]


def index_value(i):
    return 8 + 9 * i


def write_index_video(folder, n, height=12, width=20, ext=".png"):
    """n flat frames whose colour encodes the frame index: RGB (v, 255 - v, 100), v = 8 + 9 i."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        v = index_value(i)
        frame = np.empty((height, width, 3), np.uint8)
        frame[...] = (v, 255 - v, 100)
        Image.fromarray(frame).save(os.path.join(folder, f"{i:05d}{ext}"))


def davis_tree(root, videos, listed=(), nested=False, **kw):
    """DAVIS layout; `videos` name -> frame count; `listed` extra names in train.txt only."""
    base = os.path.join(root, "DAVIS") if nested else str(root)
    os.makedirs(os.path.join(base, "ImageSets", "2017"), exist_ok=True)
    with open(os.path.join(base, "ImageSets", "2017", "train.txt"), "w") as f:
        f.write("\n".join(list(videos) + list(listed)) + "\n")
    for name, n in videos.items():
        write_index_video(os.path.join(base, "JPEGImages", "480p", name), n, **kw)
    return str(root)


def ytvos_tree(root, videos, **kw):
    for name, n in videos.items():
        write_index_video(os.path.join(root, "JPEGImages", name), n, **kw)
    return str(root)


def make_args(**kw):
    args = dict(davis_root=None, ytvos_root=None, nframes=4, resolution=8, proportion_empty_prompts=0.0, seed=0)
    args.update(kw)
    return argparse.Namespace(**args)


def frame_indices(sample):
    """Frame index of each frame of a sample built from index videos (R channel)."""
    red = ((sample["pixel_values"][:, 0].mean(dim=(1, 2)) + 1) * 127.5).numpy()
    return np.round((red - 8) / 9).astype(int).tolist()


@pytest.fixture
def trees(tmp_path):
    davis = davis_tree(tmp_path / "davis", {"bear": 10, "boat": 7})
    ytvos = ytvos_tree(tmp_path / "ytvos", {"yt0": 9, "yt1": 6, "yt2": 5})
    return davis, ytvos


def test_sample_format(tmp_path, tokenizer):
    davis = write_synthetic_davis(str(tmp_path / "davis"), nframes=8, size=(64, 96))
    ytvos = write_synthetic_ytvos(str(tmp_path / "ytvos"), nframes=8, size=(64, 96))
    ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos, nframes=5, resolution=32), tokenizer)
    for index in (0, len(ds) - 1):
        s = ds[index]
        assert set(s) == {"pixel_values", "conditioning_pixel_values", "masks", "input_ids"}
        assert s["pixel_values"].shape == s["conditioning_pixel_values"].shape == (5, 3, 32, 32)
        assert s["masks"].shape == (5, 1, 32, 32)
        assert s["input_ids"].shape == (77,) and s["input_ids"].dtype == torch.long
        for key in ("pixel_values", "conditioning_pixel_values", "masks"):
            assert s[key].dtype == torch.float32 and s[key].is_contiguous()
        assert s["pixel_values"].min() >= -1 and s["pixel_values"].max() <= 1
        assert s["pixel_values"].std() > 0.1  # real image content, not a constant
        assert set(s["masks"].unique().tolist()) <= {0.0, 1.0}


def test_hole_convention(trees, tokenizer):
    """masks: hole = 0, kept = 1; the masked frame equals the frame where kept and is black
    (pixel 0 -> -1) in the hole."""
    davis, ytvos = trees
    ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos, resolution=24), tokenizer)
    holes = 0
    for i in range(12):
        s = ds[i]
        kept = s["masks"].bool().expand_as(s["pixel_values"])
        assert torch.equal(s["conditioning_pixel_values"][kept], s["pixel_values"][kept])
        assert (s["conditioning_pixel_values"][~kept] == -1).all()
        assert (s["pixel_values"][~kept] > -1).all()  # the frames themselves have no black pixel
        holes += int((~kept).sum())
        assert s["masks"].mean() > 0.5  # holes are ~8 % of a frame, well under half
    assert holes > 0


def test_consecutive_frames_rgb_and_reversal(trees, tokenizer):
    """Frames are consecutive (in order or reversed, p = 0.5), channels are RGB."""
    davis, ytvos = trees
    ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos, nframes=5), tokenizer)
    n, reversed_count = 200, 0
    for i in range(n):
        ds.set_epoch(i // len(ds))  # a sample is a function of (seed, epoch, index)
        s = ds[i % len(ds)]
        idx = frame_indices(s)
        step = idx[1] - idx[0]
        assert step in (1, -1) and np.diff(idx).tolist() == [step] * 4, idx
        reversed_count += step == -1
        v = np.array([index_value(k) for k in idx])
        rgb = ((s["pixel_values"].mean(dim=(2, 3)) + 1) * 127.5).numpy()
        np.testing.assert_allclose(rgb, np.stack([v, 255 - v, np.full(5, 100)], 1), atol=0.51)
    # binomial(200, 0.5): 4 standard errors = 0.14
    assert abs(reversed_count / n - 0.5) < 4 * np.sqrt(0.25 / n)


def test_start_covers_every_offset(tmp_path, tokenizer):
    ytvos = ytvos_tree(tmp_path / "y", {"v": 7})
    ds = FinetuneDataset(make_args(ytvos_root=ytvos, nframes=4), tokenizer)
    starts = set()
    for epoch in range(60):  # a sample is a function of (seed, epoch, index)
        ds.set_epoch(epoch)
        starts.add(min(frame_indices(ds[0])))
    assert starts == {0, 1, 2, 3}


def test_short_side_resize_and_centre_crop(tmp_path, tokenizer):
    """A 20x40 frame whose red channel is 6 x column: the centre 20x20 square (columns 10-29)
    resized to 10x10 keeps its left/right values, the sides are cut."""
    folder = tmp_path / "y" / "JPEGImages" / "v"
    folder.mkdir(parents=True)
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[..., 0] = (np.arange(40) * 6)[None, :]
    for i in range(4):
        Image.fromarray(frame).save(folder / f"{i}.png")
    ds = FinetuneDataset(make_args(ytvos_root=str(tmp_path / "y"), resolution=10), tokenizer)
    red = (ds[0]["pixel_values"][0, 0, 0].numpy() + 1) * 127.5
    assert abs(red[0] - 6 * 10.5) < 4 and abs(red[-1] - 6 * 28.5) < 4
    assert np.all(np.diff(red) > 0)


def test_mask_is_drawn_at_source_size(trees, tokenizer, monkeypatch):
    calls = []
    original = fd.random_mask_frames

    def spy(length, height, width, rng=None):
        calls.append((length, height, width))
        return original(length, height, width, rng=rng)

    monkeypatch.setattr(fd, "random_mask_frames", spy)
    davis, _ = trees
    ds = FinetuneDataset(make_args(davis_root=davis, nframes=3, resolution=6), tokenizer)
    ds[0]
    assert calls == [(3, 12, 20)]


def test_davis_is_oversampled(trees, tokenizer):
    davis, ytvos = trees
    ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos), tokenizer)
    sources = [e.source for e in ds.entries]
    assert len(ds) == 2 * 10 + 3 and sources.count("DAVIS") == 20
    assert {e.name for e in ds.entries if e.source == "DAVIS"} == {"bear", "boat"}
    ds3 = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos, davis_repeat=3), tokenizer)
    assert len(ds3) == 2 * 3 + 3
    assert "x10" in ds.summary and "20 entries" in ds.summary and "total: 23 entries" in ds.summary


def test_scan_skips_and_summary(tmp_path, tokenizer, capsys):
    davis = davis_tree(tmp_path / "davis", {"bear": 8, "short": 3}, listed=["gone"])
    ytvos = ytvos_tree(tmp_path / "ytvos", {"yt0": 6, "tiny": 2})
    os.makedirs(tmp_path / "ytvos" / "JPEGImages" / "empty")
    notes = tmp_path / "ytvos" / "JPEGImages" / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a frame")
    (tmp_path / "ytvos" / "JPEGImages" / "yt0" / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "ytvos" / "JPEGImages" / "yt0" / "extra.JPG").write_bytes(
        (tmp_path / "ytvos" / "JPEGImages" / "yt0" / "00000.png").read_bytes())  # upper case counts
    (tmp_path / "ytvos" / "JPEGImages" / "list.txt").write_text("stray file")
    ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos, nframes=4), tokenizer)
    assert [(e.source, e.name) for e in ds.entries] == [("DAVIS", "bear")] * 10 + [("YouTube-VOS", "yt0")]
    yt0 = ds.entries[-1]
    assert [os.path.basename(p) for p in yt0.frames][-1] == "extra.JPG" and len(yt0.frames) == 7
    summary = ds.summary
    assert summary in capsys.readouterr().out
    for text in ("1 skipped, fewer frames than nframes: short (3)", "1 skipped, no frame folder: gone",
                 "1 skipped, fewer frames than nframes: tiny (2)", "2 skipped, no image files: empty, notes",
                 "1 videos, 2 skipped", "1 videos, 3 skipped", "nframes=4"):
        assert text in summary, text


def test_missing_root_is_an_error_naming_it(tmp_path, tokenizer):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="--davis_root: .*nowhere"):
        FinetuneDataset(make_args(davis_root=missing), tokenizer)
    with pytest.raises(FileNotFoundError, match="--ytvos_root: .*nowhere"):
        FinetuneDataset(make_args(ytvos_root=missing, davis_root=""), tokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"--davis_root: {empty} has no ImageSets/2017/train.txt"):
        FinetuneDataset(make_args(davis_root=str(empty)), tokenizer)
    with pytest.raises(ValueError, match=f"--ytvos_root: {empty} has no JPEGImages"):
        FinetuneDataset(make_args(ytvos_root=str(empty)), tokenizer)
    with pytest.raises(ValueError, match="give --davis_root, --ytvos_root, --frames_root and/or --csv_file"):
        FinetuneDataset(make_args(), tokenizer)


def test_root_without_usable_videos_is_an_error(tmp_path, tokenizer):
    ytvos = ytvos_tree(tmp_path / "y", {"a": 2, "b": 3})
    with pytest.raises(ValueError, match=f"--ytvos_root: {ytvos}: none of its 2 video folders"):
        FinetuneDataset(make_args(ytvos_root=ytvos), tokenizer)


def test_bad_root_warns_when_the_other_works(trees, tmp_path, tokenizer):
    davis, ytvos = trees
    missing = str(tmp_path / "nowhere")
    with pytest.warns(RuntimeWarning, match=f"--davis_root: {missing} does not exist; using YouTube-VOS only"):
        ds = FinetuneDataset(make_args(davis_root=missing, ytvos_root=ytvos), tokenizer)
    assert len(ds) == 3 and "not used" in ds.summary
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.warns(RuntimeWarning, match=f"--ytvos_root: {empty} has no JPEGImages"):
        ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=str(empty)), tokenizer)
    assert len(ds) == 20
    ds[0]


def test_either_root_alone(trees, tokenizer):
    davis, ytvos = trees
    assert len(FinetuneDataset(make_args(davis_root=davis, ytvos_root=""), tokenizer)) == 20
    assert len(FinetuneDataset(make_args(davis_root=None, ytvos_root=ytvos), tokenizer)) == 3


def test_nested_davis_level_is_found(tmp_path, tokenizer):
    root = davis_tree(tmp_path / "download", {"bear": 6}, nested=True)
    ds = FinetuneDataset(make_args(davis_root=root), tokenizer)
    assert len(ds) == 10
    assert os.path.join(root, "DAVIS") in ds.summary
    assert frame_indices(ds[0])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_frame_draws_another_clip(tmp_path, tokenizer, damage):
    """A clip with an unreadable frame is replaced by another clip: counted, warned once per video."""
    root = tmp_path / "y"
    ytvos_tree(root, {"good": 6})
    bad = root / "JPEGImages" / "bad"
    bad.mkdir()
    for i in range(4):  # exactly nframes: every clip of it contains the broken frame
        Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(bad / f"{i}.jpg", quality=90)
    data = (bad / "2.jpg").read_bytes()
    (bad / "2.jpg").write_bytes(b"not a jpeg" * 20 if damage == "garbage" else data[:len(data) // 2])
    ds = FinetuneDataset(make_args(ytvos_root=str(root)), tokenizer)
    bad_index = [e.name for e in ds.entries].index("bad")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            s = ds[bad_index]
            idx = frame_indices(s)  # a clip of "good" (index colours), not of "bad" (flat 90)
            assert abs(idx[1] - idx[0]) == 1
    assert ds.bad_clips == 3
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "bad" in messages[0] and "2.jpg" in messages[0]


def test_retries_are_bounded(tmp_path, tokenizer):
    folder = tmp_path / "y" / "JPEGImages" / "bad"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"broken")
    ds = FinetuneDataset(make_args(ytvos_root=str(tmp_path / "y")), tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="10 clips in a row could not be read"):
            ds[0]
    assert ds.bad_clips == fd.MAX_RETRIES


def test_fixed_seed_is_deterministic(trees, tokenizer):
    davis, ytvos = trees

    def samples(seed, epoch=0):
        ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos, seed=seed), tokenizer)
        ds.set_epoch(epoch)
        return [ds[i] for i in (0, 5, 21, 0)]

    def same(a, b):
        return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)

    a, b = samples(123), samples(123)
    assert same(a, b)
    assert not same(a, samples(124))
    assert not same(a, samples(123, epoch=1))
    # a second visit of an index in the same epoch draws the same sample (a resumed run repeats it)
    assert all(torch.equal(a[0][k], a[3][k]) for k in a[0])


def test_unseeded_follows_torch_seed(trees, tokenizer):
    davis, ytvos = trees

    def masks():
        ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos, seed=None), tokenizer)
        return torch.stack([ds[i]["masks"] for i in range(6)])

    torch.manual_seed(5)
    a = masks()
    torch.manual_seed(5)
    assert torch.equal(a, masks())
    torch.manual_seed(6)
    assert not torch.equal(a, masks())


@pytest.mark.parametrize("proportion", [0.0, 0.3, 1.0])
def test_empty_prompt_probability(trees, tokenizer, proportion):
    davis, ytvos = trees
    ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos, nframes=2, resolution=4,
                                   proportion_empty_prompts=proportion), tokenizer)
    caption = tokenizer("clean background", max_length=77, padding="max_length", return_tensors="pt").input_ids[0]
    empty = tokenizer("", max_length=77, padding="max_length", return_tensors="pt").input_ids[0]
    n, empties = 300, 0
    for i in range(n):
        ds.set_epoch(i // len(ds))
        ids = ds[i % len(ds)]["input_ids"]
        assert torch.equal(ids, empty) or torch.equal(ids, caption)
        empties += torch.equal(ids, empty)
    # binomial(300, p): 4 standard errors, at most 0.106
    assert abs(empties / n - proportion) <= 4 * np.sqrt(proportion * (1 - proportion) / n)


def test_caption_is_configurable(trees, tokenizer):
    davis, _ = trees
    ds = FinetuneDataset(make_args(davis_root=davis, caption="a video of the bear"), tokenizer)
    expected = tokenizer("a video of the bear", max_length=77, padding="max_length", return_tensors="pt").input_ids[0]
    assert torch.equal(ds[0]["input_ids"], expected)


def test_dataloader_workers(trees, tokenizer):
    davis, ytvos = trees
    ds = FinetuneDataset(make_args(davis_root=davis, ytvos_root=ytvos, nframes=3, resolution=8, seed=1), tokenizer)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = [b for _, b in zip(range(2), loader)]
    assert batches[0]["pixel_values"].shape == (2, 3, 3, 8, 8)
    assert batches[0]["input_ids"].shape == (2, 77)
    # the two workers draw different masks for their (different) clips
    assert not torch.equal(batches[0]["masks"], batches[1]["masks"])
    # what a worker draws is what the main process draws: samples do not depend on who loads them,
    # and an epoch set after the (persistent) workers started reaches them
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        in_workers = [b for _, b in zip(range(2), loader)]
        here = [torch.utils.data.default_collate([ds[i], ds[i + 1]]) for i in (0, 2)]
        assert all(torch.equal(w[k], h[k]) for w, h in zip(in_workers, here) for k in h)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dataset.finetune_dataset", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_preview_cli_writes_a_gif(trees, tmp_path):
    davis, ytvos = trees
    out = tmp_path / "preview.gif"
    result = run_cli("--davis_root", davis, "--ytvos_root", ytvos, "--nframes", "4", "--resolution", "16",
                     "--preview", str(out), "--samples", "2", "--tile", "16")
    assert result.returncode == 0, result.stderr
    assert "FinetuneDataset scan (nframes=4)" in result.stdout and "total: 23 entries" in result.stdout
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (3 * 16, 2 * 16)
        gif.seek(1)
        assert len(np.unique(np.asarray(gif.convert("RGB")).reshape(-1, 3), axis=0)) > 2


def test_preview_cli_names_a_bad_root(tmp_path):
    result = run_cli("--davis_root", str(tmp_path / "nowhere"), "--preview", str(tmp_path / "p.gif"))
    assert result.returncode != 0
    assert f"--davis_root: {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert not (tmp_path / "p.gif").exists()
