"""The video + CSV source, --frames_root, sources mixed, and bad input: small H.264 mp4s written
here (PyAV's bundled libx264), checked against the decoded video; tiny stage-1 runs from them."""
import os
import subprocess
import sys
import warnings

import av
import cv2
import numpy as np
import pytest
import torch

from dataset.finetune_dataset import FinetuneDataset, tokenize
from tests.test_dataset import davis_tree, frame_indices, index_value, make_args, write_index_video, ytvos_tree
from tests.test_train_e2e import REPO, assets, flags, run  # noqa: F401  (assets is a session fixture)


def write_index_mp4(path, n, fps=30, width=64, height=48, rotation=0, pix_fmt="yuv420p", gop=6, options=None):
    """An H.264 mp4 of n flat frames coloured by index, RGB (v, 255 - v, 100), v = 8 + 9 i (as
    tests/test_dataset.py's frame videos), a white bar on its top rows; B-frames, a keyframe
    every `gop` frames."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"g": str(gop), "preset": "veryfast", "crf": "10"}
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(n):
            v = index_value(i)
            frame = np.empty((height, width, 3), np.uint8)
            frame[...] = (v, 255 - v, 100)
            frame[:height // 6] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_audio_only(path):
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for _ in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_csv(path, rows, header=("video_path", "caption")):
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(header) + "\n")
        f.writelines(f"{video},{caption}\n" for video, caption in rows)
    return str(path)


def index_rows(sample):
    """Frame index of each frame from the centre of the square (away from the white bar), R channel."""
    r = sample["pixel_values"].shape[-1]
    centre = sample["pixel_values"][:, 0, r // 3:2 * r // 3, r // 3:2 * r // 3]
    red = ((centre.mean(dim=(1, 2)) + 1) * 127.5).numpy()
    return np.round((red - 8) / 9).astype(int).tolist()


@pytest.fixture
def videos(tmp_path):
    """data/: a 30 fps and a 25 fps video, a CSV of both with captions."""
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    write_index_mp4(data / "clips" / "a30.mp4", 20, fps=30)
    write_index_mp4(data / "clips" / "b25.mp4", 12, fps=25)
    csv = write_csv(data / "meta.csv", [("clips/a30.mp4", "a red car"), ("clips/b25.mp4", "a quiet street")])
    return data, csv


def video_args(data, csv, **kw):
    return make_args(train_data_dir=str(data), csv_file=csv, resolution=16, **kw)


def test_clips_follow_the_original_stride_and_caption(videos, tokenizer):
    """30 fps -> every 2nd frame, 25 fps -> every frame, from a grid starting at frame 0; the
    row's caption; both time directions; frames equal to the decoded video's."""
    data, csv = videos
    ds = FinetuneDataset(video_args(data, csv), tokenizer)
    assert [(v.name, v.stride) for v in ds.entries] == [("clips/a30.mp4", 2), ("clips/b25.mp4", 1)]
    captions = {"clips/a30.mp4": "a red car", "clips/b25.mp4": "a quiet street"}
    starts, directions = set(), set()
    for i in range(40):
        ds.set_epoch(i // 2)  # a sample is a function of (seed, epoch, index)
        s = ds[i % 2]
        video = ds.entries[i % 2]
        idx = index_rows(s)
        step = idx[1] - idx[0]
        assert abs(step) == video.stride and np.diff(idx).tolist() == [step] * 3, (video.name, idx)
        first = min(idx)
        assert first % video.stride == 0 and max(idx) < video.info.frames
        starts.add((video.name, first))
        directions.add(step > 0)
        assert torch.equal(s["input_ids"], tokenize(tokenizer, captions[video.name]))
    assert directions == {True, False} and len(starts) > 4
    # pixels against the video decoded independently (OpenCV), frame by frame
    ds.set_epoch(0)
    s = ds[0]
    idx = index_rows(s)
    capture = cv2.VideoCapture(str(data / "clips" / "a30.mp4"))
    decoded = [capture.read()[1] for _ in range(20)]
    for t, k in enumerate(idx):
        expected = cv2.resize(decoded[k][:, 8:56], (16, 16), interpolation=cv2.INTER_AREA)[..., ::-1]
        got = ((s["pixel_values"][t].permute(1, 2, 0).numpy() + 1) * 127.5)
        assert np.abs(got - expected).mean() < 3, (t, k)


def test_stride_flag_and_short_video_fallback(tmp_path, tokenizer):
    """--video_stride overrides the rule; a video too short for the stride falls back to
    frames // nframes (the original's rule)."""
    write_index_mp4(tmp_path / "long.mp4", 20, fps=30)
    write_index_mp4(tmp_path / "short.mp4", 6, fps=30)  # stride 2 needs 7 frames for 4
    csv = write_csv(tmp_path / "m.csv", [("long.mp4", "x"), ("short.mp4", "y")])
    ds = FinetuneDataset(make_args(csv_file=csv, resolution=16, video_stride=3), tokenizer)
    assert [v.stride for v in ds.entries] == [3, 1]
    assert abs(np.diff(index_rows(ds[0]))).tolist() == [3, 3, 3]
    assert abs(np.diff(index_rows(ds[1]))).tolist() == [1, 1, 1]


def test_rotated_video_is_upright(tmp_path, tokenizer):
    """A phone video's rotation metadata is applied: the sample equals OpenCV's auto-rotated
    decode (the white bar is on the side the viewer sees it)."""
    path = write_index_mp4(tmp_path / "rot.mp4", 8, width=64, height=48, rotation=90)
    csv = write_csv(tmp_path / "m.csv", [("rot.mp4", "x")])
    ds = FinetuneDataset(make_args(csv_file=csv, resolution=16, video_stride=1), tokenizer)
    video = ds.entries[0]
    assert (video.info.width, video.info.height, video.info.rotation) == (48, 64, 90)
    assert "rotated 90" in ds.summary
    s = ds[0]
    idx = index_rows(s)
    capture = cv2.VideoCapture(path)  # auto-rotates by default
    frame = [capture.read()[1] for _ in range(idx[0] + 1)][-1]
    assert frame.shape[:2] == (64, 48)
    expected = cv2.resize(frame[8:56], (16, 16), interpolation=cv2.INTER_AREA)[..., ::-1]
    got = (s["pixel_values"][0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(got - expected).mean() < 4
    bar = (got.mean(axis=2) > 240)  # the bar: a column band (it was the top rows before rotating)
    assert bar[:, :2].all() or bar[:, -2:].all()


def test_bad_videos_are_skipped_with_reasons(tmp_path, tokenizer):
    """Missing, corrupt, truncated, audio-only and too-short files are skipped with their reason
    in the summary; 10-bit and odd-sized videos are used (converted by swscale)."""
    write_index_mp4(tmp_path / "good.mp4", 10)
    write_index_mp4(tmp_path / "short.mp4", 3)
    write_index_mp4(tmp_path / "deep.mp4", 8, pix_fmt="yuv420p10le")
    write_index_mp4(tmp_path / "odd.mp4", 8, width=33, height=25, pix_fmt="yuv444p")
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(3000))
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[:len(data) // 2])
    write_audio_only(tmp_path / "audio.mp4")
    names = ["good", "missing", "corrupt", "truncated", "audio", "short", "deep", "odd"]
    csv = write_csv(tmp_path / "m.csv", [(f"{n}.mp4", n) for n in names])
    ds = FinetuneDataset(make_args(csv_file=csv, resolution=16, video_stride=1), tokenizer)
    assert sorted(v.name for v in ds.entries) == ["deep.mp4", "good.mp4", "odd.mp4"]
    assert ds.skipped_videos == 5
    summary = ds.summary
    for expected in ("1 skipped, missing file: missing.mp4",
                     "2 skipped, unreadable (Invalid data found when processing input): corrupt.mp4, truncated.mp4",
                     "no video stream (audio only?): audio.mp4", "fewer frames than nframes: short.mp4 (3)",
                     "yuv420p10le 64x48: converted by swscale", "yuv444p 33x25: converted"):
        assert expected in summary, summary
    for index in range(len(ds)):  # every used video gives a clip of index frames
        idx = index_rows(ds[index])
        assert abs(idx[1] - idx[0]) == 1


def test_variable_frame_rate_picks_frames_by_time(tmp_path, tokenizer):
    """Frames 33 ms apart with every third gap 100 ms: detected, noted, and a clip's frames are
    those shown at start + k / (average rate) (a frame repeats where the gap is long)."""
    from fractions import Fraction

    from dataset.video import probe_video, read_clip

    path = str(tmp_path / "vfr.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        ms = 0
        for i in range(24):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), index_value(i), np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            ms += 33 if i % 3 else 100
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = probe_video(path)
    assert info.variable_rate and 17 < info.fps < 19 and info.frames == 24
    out = np.empty((4, 16, 16, 3), np.uint8)
    read_clip(path, info, 3, 1, out)
    shown = np.round((out[:, 8, 8].mean(axis=1) - 8) / 9).astype(int).tolist()
    index = [round(ms_of(i) * info.fps / 1000) for i in range(24)]  # timestamp in frames of the average rate
    expected = []
    for k in range(3, 7):  # the frame at index k, else the one shown then (the last before)
        i = min(i for i in range(24) if index[i] >= k)
        expected.append(i if index[i] == k else i - 1)
    assert len(set(expected)) < 4  # the long gaps repeat a frame
    assert shown == expected, (shown, expected)
    csv = write_csv(tmp_path / "m.csv", [("vfr.mp4", "x")])
    ds = FinetuneDataset(make_args(csv_file=csv, resolution=16), tokenizer)
    assert "variable frame rate: frames picked by time" in ds.summary
    assert len(index_rows(ds[0])) == 4


def ms_of(i):
    """The timestamp (ms) of frame i of the variable-rate test video."""
    return sum(33 if k % 3 else 100 for k in range(i))


def test_csv_without_the_column(tmp_path, tokenizer):
    write_index_mp4(tmp_path / "a.mp4", 8)
    csv = write_csv(tmp_path / "m.csv", [("a.mp4", "x")], header=("file", "caption"))
    with pytest.raises(ValueError, match=f"--video_column: {csv} has no column 'video_path' .columns: file, caption."):
        FinetuneDataset(make_args(csv_file=csv), tokenizer)
    ytvos = ytvos_tree(tmp_path / "y", {"v": 6})
    with pytest.warns(RuntimeWarning, match="--video_column"):
        ds = FinetuneDataset(make_args(csv_file=csv, ytvos_root=ytvos), tokenizer)
    assert [v.name for v in ds.entries] == ["v"]


def test_a_video_that_breaks_mid_file_draws_another_clip(tmp_path, tokenizer):
    """A file damaged after the scan (its frames cut off) costs a clip, counted, not the epoch."""
    write_index_mp4(tmp_path / "a.mp4", 12)
    write_index_mp4(tmp_path / "b.mp4", 12)
    csv = write_csv(tmp_path / "m.csv", [("a.mp4", "x"), ("b.mp4", "y")])
    ds = FinetuneDataset(make_args(csv_file=csv, resolution=16, video_stride=1), tokenizer)
    (tmp_path / "a.mp4").write_bytes(b"gone")
    with pytest.warns(RuntimeWarning, match="a.mp4: unreadable clip"):
        s = ds[0]
    assert len(index_rows(s)) == 4 and ds.skipped_count == 1


def test_frames_root_and_mixed_repeats(tmp_path, tokenizer, videos):
    """--frames_root takes every image folder at any depth; each source's repeat, and its share
    of the samples in the summary."""
    root = tmp_path / "frames"
    write_index_video(root / "cat" / "clip1", 6)
    write_index_video(root / "clip2", 5)
    (root / "notes").mkdir()
    data, csv = videos
    davis = davis_tree(tmp_path / "davis", {"bear": 6})
    ds = FinetuneDataset(make_args(frames_root=str(root), frames_repeat=3, train_data_dir=str(data), csv_file=csv,
                                   video_repeat=2, davis_root=davis, davis_repeat=1, resolution=16), tokenizer)
    names = [(v.source, v.name) for v in ds.entries]
    assert names.count(("frames", os.path.join("cat", "clip1"))) == 3 and names.count(("frames", "clip2")) == 3
    assert names.count(("videos", "clips/a30.mp4")) == 2 and len(names) == 1 + 6 + 4
    assert "frames" in ds.summary and "6 entries (x3), 55% of samples" in ds.summary
    assert "4 entries (x2), 36% of samples" in ds.summary
    assert set(s for s, _ in names) == {"DAVIS", "frames", "videos"}
    for i in range(len(ds)):
        assert len(index_rows(ds[i])) == 4


def test_frame_stride_flag(tmp_path, tokenizer):
    ytvos = ytvos_tree(tmp_path / "y", {"v": 9, "short": 6})
    ds = FinetuneDataset(make_args(ytvos_root=ytvos, ytvos_stride=2), tokenizer)
    assert [v.name for v in ds.entries] == ["v"] and "fewer frames than nframes at the stride" in ds.summary
    for _ in range(5):
        assert abs(np.diff(frame_indices(ds[0]))).tolist() == [2, 2, 2]


def test_zero_byte_frame_bom_and_file_root(tmp_path, tokenizer):
    """Issue 15: a zero-byte frame cuts its video there (no cv2 error); train.txt with a UTF-8 BOM
    keeps its first video; a root that is a file says so."""
    davis = davis_tree(tmp_path / "d", {"bear": 8, "boat": 6})
    split = tmp_path / "d" / "ImageSets" / "2017" / "train.txt"
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes())
    frames = sorted((tmp_path / "d" / "JPEGImages" / "480p" / "bear").iterdir())
    frames[5].write_bytes(b"")
    ds = FinetuneDataset(make_args(davis_root=davis), tokenizer)
    assert sorted(v.name for v in ds.entries) == ["bear"] * 10 + ["boat"] * 10
    assert "zero-byte frame 00005.png: cut there" in ds.summary
    bear = [i for i, v in enumerate(ds.entries) if v.name == "bear"]
    assert len(ds.entries[bear[0]].frames) == 5
    for i in bear:
        assert max(frame_indices(ds[i])) < 5
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match=f"--ytvos_root: {afile} is a file, not a folder"):
        FinetuneDataset(make_args(ytvos_root=str(afile)), tokenizer)


def test_skipped_count_totals_the_workers(tmp_path, tokenizer):
    """Clips replaced in loader workers are counted where the trainer reads them."""
    root = tmp_path / "y"
    ytvos_tree(root, {"good": 6})
    for i in range(4):
        (root / "JPEGImages" / "bad").mkdir(exist_ok=True)
        (root / "JPEGImages" / "bad" / f"{i}.png").write_bytes(b"broken")
    ds = FinetuneDataset(make_args(ytvos_root=str(root)), tokenizer)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in loader:
            pass
    assert ds.skipped_count >= 1  # entry "bad" failed at least once, in a worker


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dataset.finetune_dataset", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


def test_preview_of_videos_leaves_no_temp_folder(videos, tmp_path):
    data, csv = videos
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "p.gif"
    result = cli("--train_data_dir", data, "--csv_file", csv, "--nframes", 4, "--resolution", 16,
                 "--preview", out, "--samples", 2, "--tile", 16, env=dict(os.environ, TMPDIR=str(scratch)))
    assert result.returncode == 0, result.stderr
    assert "videos" in result.stdout and out.is_file()
    assert not list(scratch.iterdir())


def e2e_flags(assets, out, steps, **extra):  # noqa: F811
    """flags() of tests/test_train_e2e.py without its DAVIS / YouTube-VOS roots unless given."""
    args = flags(assets, out, steps, **extra)
    for flag in ("--davis_root", "--ytvos_root"):
        if flag[2:] not in extra:
            i = args.index(flag)
            del args[i:i + 2]
    return args


def write_cut_mp4(path):
    """An mp4 whose header and first frame are whole and the rest is cut off (an interrupted
    copy): the scan accepts it, every clip of it fails."""
    write_index_mp4(path, 20, options={"movflags": "faststart"})
    with av.open(str(path)) as container:
        second = sorted(p.pos for p in container.demux(video=0) if p.size)[1]
    with open(path, "r+b") as f:
        f.truncate(second)


def test_train_from_videos_alone_and_mixed(assets, videos, tmp_path):  # noqa: F811
    """Tiny stage 1, 2 steps from the CSV videos alone (one of them cut short: its clips are
    replaced, counted and logged to the tracker), then mixed with a frame tree."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, csv = videos
    write_cut_mp4(data / "clips" / "cut.mp4")
    with open(csv, "a") as f:
        f.write("clips/cut.mp4,cut\n" * 2)  # 2 of 4 entries: one of the first 2 samples is one of them
    alone = run("train_DiffuEraser_stage1.py", e2e_flags(assets, tmp_path / "alone", 2, train_data_dir=data,
                                                           csv_file=csv, nframes=4, report_to="tensorboard"))
    assert "videos" in alone.stdout and (tmp_path / "alone" / "checkpoint-2").is_dir()
    assert "clips could not be read and were replaced" in alone.stdout
    events = EventAccumulator(str(next((tmp_path / "alone" / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert events.Scalars("skipped_clips")[-1].value >= 1
    mixed = run("train_DiffuEraser_stage1.py", e2e_flags(assets, tmp_path / "mixed", 2, train_data_dir=data,
                                                           csv_file=csv, frames_root=assets / "YTVOS",
                                                           nframes=4, video_repeat=3))
    assert "frames" in mixed.stdout and (tmp_path / "mixed" / "checkpoint-2").is_dir()


def test_training_refuses_unusable_data_before_loading_models(assets, videos, tmp_path):  # noqa: F811
    data, csv = videos
    proc = run("train_DiffuEraser_stage1.py", e2e_flags(assets, tmp_path / "o", 1, train_data_dir=data,
                                                          csv_file=csv, nframes=40), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"--csv_file: {csv}: none of its 2 videos is usable"
    assert "fewer frames than nframes: clips/a30.mp4 (20)" in proc.stdout
    assert not (tmp_path / "o" / "run_info.json").exists()  # written once the models are built


def test_data_flags_are_checked_in_one_line(tmp_path):
    from diffueraser.args import build_parser, check_data_args

    afile = tmp_path / "f.txt"
    afile.write_text("x")
    parse = build_parser("t", "out", 10).parse_args
    base = ["--base_model_name_or_path", "sd"]
    cases = [([], "give at least one data source"),
             (["--frames_root", str(afile)], f"--frames_root: {afile} is a file, not a folder"),
             (["--csv_file", "m.csv", "--video_stride", "-1"], "--video_stride: -1 must be 0"),
             (["--csv_file", "m.csv", "--video_repeat", "0"], "--video_repeat: 0 must be at least 1"),
             (["--train_data_dir", str(tmp_path)], f"--train_data_dir: {tmp_path} needs --csv_file"),
             (["--csv_file", "m.csv", "--max_train_samples", "0"], "--max_train_samples: 0 must be at least 1")]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=message):
            check_data_args(parse(base + flags))
    args = parse(base + ["--csv_file", "m.csv"])
    check_data_args(args)
    assert (args.video_column, args.caption_column, args.video_stride) == ("video_path", "caption", 0)
