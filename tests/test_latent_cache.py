"""--latent_cache: the cached moments are the encoder's, a sample is the same clip with or without
the cache, latents drawn from the moments follow the encoder's distribution, a changed frame
re-encodes its video only, and a training run builds and uses the cache."""
import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from dataset.finetune_dataset import FinetuneDataset
from dataset.latent_cache import LatentCache, sample_latents
from diffueraser.trainer import encode_latents
from diffueraser.tiny import TINY_VAE
from tests.test_dataset import make_args
from tests.test_train_e2e import assets, flags  # noqa: F401 -- the tiny models and data of the end-to-end tests


def test_cached_moments_are_the_encoders_and_drawn_latents_follow_them(assets, tokenizer, tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    for tree in ("DAVIS", "YTVOS"):  # a copy: frames are changed below
        shutil.copytree(assets / tree, tmp_path / tree)
    args = make_args(davis_root=tmp_path / "DAVIS", ytvos_root=tmp_path / "YTVOS", nframes=4, resolution=32)
    plain, cached = FinetuneDataset(args, tokenizer), FinetuneDataset(args, tokenizer)
    cache = LatentCache(tmp_path / "cache", 32, vae).attach(cached.entries)
    assert cache.build(cached.entries, vae, show=False) == (4, [])  # 2 DAVIS (x10 entries) + 2 YouTube-VOS videos
    for index in (0, 3, 20, 21):  # the same seed: the same clip, frames, reversal and mask
        a, b = plain[index], cached[index]
        assert "pixel_values" not in b and b["latent_moments"].dtype == torch.float16
        assert torch.equal(a["conditioning_pixel_values"], b["conditioning_pixel_values"])
        dist = vae.encode(a["pixel_values"]).latent_dist
        expected = torch.cat([dist.mean, dist.std], dim=1)
        torch.testing.assert_close(b["latent_moments"].float(), expected, atol=2e-3, rtol=2e-3)  # fp16 storage

    # latents drawn from the moments: the encoder's mean and std (4,000 draws of each value)
    x, masked = plain[0]["pixel_values"][None], plain[0]["conditioning_pixel_values"][None]
    moments = cached[0]["latent_moments"][None]
    scale, f = vae.config.scaling_factor, moments.shape[1]
    draws = sample_latents(moments[0].repeat(4000, 1, 1, 1), scale, torch.float32).unflatten(0, (4000, f))
    dist = vae.encode(x[0]).latent_dist
    torch.testing.assert_close(draws.mean(0), dist.mean * scale, atol=0.08 * scale, rtol=0)
    torch.testing.assert_close(draws.std(0), dist.std * scale, atol=0.05 * scale, rtol=0.05)
    torch.manual_seed(1)
    clean, cond = encode_latents(vae, None, masked, moments=moments)  # the masked frames: still the encoder
    torch.manual_seed(1)
    assert torch.equal(cond, vae.encode(masked[0]).latent_dist.sample() * scale)
    assert clean.shape == cond.shape == draws.shape[1:]

    # a changed frame: its video is encoded again (new file), the others are read; an unreadable
    # frame: its video gets no file and is named, and the loader skips its clips
    with open(cached.entries[0].frames[1], "ab") as f:
        f.write(b"\0")
    with open(cached.entries[-1].frames[2], "r+b") as f:
        f.truncate(100)
    again = FinetuneDataset(args, tokenizer)
    LatentCache(tmp_path / "cache", 32, vae).attach(again.entries)
    assert again.entries[0].latents != cached.entries[0].latents
    assert LatentCache.missing(again.entries) == [again.entries[0], again.entries[-1]]
    count, unreadable = cache.build(again.entries, vae, show=False)
    assert count == 1 and len(unreadable) == 1 and again.entries[-1].name in unreadable[0]
    assert "truncated" in unreadable[0]
    assert "latent_moments" in again[len(again) - 1] and again.skipped_count == 1  # another video's clip
    # another VAE: another folder; the same one loaded from elsewhere: the same folder
    assert LatentCache(tmp_path / "cache", 32, AutoencoderKL(**TINY_VAE)).dir != cache.dir
    vae.save_pretrained(tmp_path / "vae")
    assert LatentCache(tmp_path / "cache", 32, AutoencoderKL.from_pretrained(tmp_path / "vae")).dir == cache.dir
    vae.encoder.to(memory_format=torch.channels_last)  # as a compiled run keeps it: the same VAE, the same folder
    assert LatentCache(tmp_path / "cache", 32, vae).dir == cache.dir

def test_compiled_encoder_builds_with_one_graph(assets, tmp_path, monkeypatch):
    """The scripts compile the VAE encoder for one shape: the build hands it whole batches, each video's
    last one padded, so it compiles once. Each file holds its video's frames' moments in order; an
    unreadable frame in a video's second batch leaves that video without a file and the next one whole.
    A long video's first batches wait in host memory (checked here by moving every batch after the first)."""
    import dataset.latent_cache as latent_cache
    from dataset.finetune_dataset import SIGNED_UNIT, lookup, read_square, reduction, to_planes
    from dataset.sources import scan_davis, scan_ytvos
    from PIL import Image

    monkeypatch.setattr(latent_cache, "BATCH", 5)  # 12-frame videos: batches of 5, 5 and 2 (+ 3 padding)
    monkeypatch.setattr(latent_cache, "ON_DEVICE", 1)  # as a long video: earlier batches move to host memory
    for tree in ("DAVIS", "YTVOS"):  # a copy: a frame is broken below
        shutil.copytree(assets / tree, tmp_path / tree)
    videos = scan_davis(tmp_path / "DAVIS", 4, repeat=1).videos + scan_ytvos(tmp_path / "YTVOS", 4).videos
    assert len(videos) > 2 and len(videos[0].frames) == 12
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()

    @torch.no_grad()
    def encoded(video):  # the eager encoder on the video's frames, read as the loader reads them
        with Image.open(video.frames[0]) as first:
            reduce = reduction(*first.size, 32)
        frames = np.empty((len(video.frames), 32, 32, 3), np.uint8)
        for i, path in enumerate(video.frames):
            read_square(path, 32, reduce, frames[i])
        dist = vae.encode(lookup(to_planes(frames), SIGNED_UNIT)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).numpy()

    expected = [encoded(v) for v in videos]
    graphs = []

    def backend(gm, example_inputs):  # counts the graphs dynamo hands over; runs them as they are
        graphs.append(gm)
        return gm.forward
    vae.encoder.compile(backend=backend, fullgraph=True, dynamic=False)
    with open(videos[0].frames[7], "r+b") as f:
        f.truncate(100)
    count, bad = LatentCache(tmp_path / "cache", 32, vae).attach(videos).build(videos, vae, show=False)
    assert len(graphs) == 1
    assert count == len(videos) - 1 and len(bad) == 1 and videos[0].name in bad[0]
    assert not os.path.exists(videos[0].latents)
    for video, want in zip(videos[1:], expected[1:]):
        got = np.load(video.latents)
        assert got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3, rtol=2e-3)


def test_training_run_builds_and_uses_the_cache(assets, tmp_path, monkeypatch):
    import train_DiffuEraser_stage1 as stage1
    from diffueraser import speed, trainer

    clocks = []  # and the stall watch: armed with --stall_dump_minutes while the run lasts, then stopped

    class Clock(speed.StepClock):
        def __init__(self, stall_s):
            super().__init__(stall_s)
            clocks.append(self)

        def stop(self):
            self.stopped = True
            super().stop()
    monkeypatch.setattr(speed, "StepClock", Clock)

    drawn = []  # every step's clean latents come from the loader's moments (a worker process reads them)
    monkeypatch.setattr(trainer, "sample_latents", lambda m, *a: drawn.append(m.shape) or sample_latents(m, *a))
    out, cache = tmp_path / "run", tmp_path / "cache"
    stage1.main([str(a) for a in flags(assets, out, 2, compile=0, dataloader_num_workers=1, latent_cache=cache,
                                       stall_dump_minutes=0.5)])
    assert drawn == [(2, 8, 8, 8)] * 2  # 2 steps of 2 frames
    assert len(clocks) == 1 and clocks[0].stall_s == 30 and clocks[0].stopped
    files = [f for _, _, fs in os.walk(cache) for f in fs]
    assert len(files) == 4 and all(f.endswith(".npy") for f in files)
    table = np.load(next(os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs))
    assert table.dtype == np.float16 and table.shape[1:] == (8, 8, 8)  # 64 px frames, 8 px latents
    weights = load_file(str(next((out / "unet_main").glob("*.safetensors"))))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_cache_falls_back_to_encoding_where_it_cannot_serve(assets, tokenizer, tmp_path, capsys, monkeypatch):
    """A run on video files goes without the cache and says why (LATENT_CACHE is on by default), a process that
    finds none of the main process's files (another node's disk) encodes as before, and a disk without room for
    the moments (plus 1 GB) leaves the cache off and says how much it needs."""
    import shutil
    from types import SimpleNamespace

    import dataset.latent_cache as latent_cache
    from diffueraser.data import use_latent_cache
    from tests.test_data_sources import write_csv, write_index_mp4

    vae = AutoencoderKL(**TINY_VAE).eval()
    cache = tmp_path / "cache"
    write_index_mp4(tmp_path / "a.mp4", 12)
    args = make_args(csv_file=write_csv(tmp_path / "m.csv", [("a.mp4", "x")]), resolution=16, latent_cache=cache)
    files = FinetuneDataset(args, tokenizer)
    main = dict(is_main_process=True, is_local_main_process=True, process_index=0, print=print,
                wait_for_everyone=lambda: None)
    use_latent_cache(args, SimpleNamespace(**main), files, vae)
    assert "latent cache off" in capsys.readouterr().out
    assert not cache.exists() and "pixel_values" in files[0]

    args = make_args(davis_root=assets / "DAVIS", resolution=32, latent_cache=cache, output_dir=str(tmp_path))
    other = FinetuneDataset(args, tokenizer)
    use_latent_cache(args, SimpleNamespace(**dict(main, is_main_process=False, process_index=1)), other, vae)
    assert "no cached moments" in capsys.readouterr().out
    assert all(v.latents is None for v in other.entries) and "pixel_values" in other[0]

    full = FinetuneDataset(args, tokenizer)
    frames = {f for v in full.entries for f in v.frames}  # DAVIS's videos are listed ten times: counted once
    need = len(frames) * 2 * 4 * 4 * 4 * 2  # 32 px: 4x4 latents, 4 + 4 channels, fp16
    assert latent_cache.LatentCache(cache, 32, vae).attach(full.entries).room(full.entries)[0] == need
    monkeypatch.setattr(latent_cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, need + 2**30 - 1))
    use_latent_cache(args, SimpleNamespace(**main), full, vae)
    assert "latent cache off: the clean frames' moments need" in capsys.readouterr().out
    assert not cache.exists() and all(v.latents is None for v in full.entries) and "pixel_values" in full[0]
    monkeypatch.setattr(latent_cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, need + 2**30))
    full = FinetuneDataset(args, tokenizer)
    use_latent_cache(args, SimpleNamespace(**main), full, vae)  # exactly enough: built
    assert "videos encoded" in capsys.readouterr().out and all(v.latents for v in full.entries)


LOADER_AFTER_BUILD = """
import sys, torch
from diffusers import AutoencoderKL
from dataset.latent_cache import LatentCache
from diffueraser.data import make_dataloader
from diffueraser.tiny import TINY_VAE, write_synthetic_davis
from tests.test_dataset import make_args
from diffueraser.tiny import tiny_tokenizer
root = sys.argv[1]
write_synthetic_davis(root + "/DAVIS", videos=("bear",), nframes=12, size=(480, 854))
args = make_args(davis_root=root + "/DAVIS", nframes=10, resolution=512, dataloader_num_workers=2, train_batch_size=1)
loader = make_dataloader(args, tiny_tokenizer(root + "/tok"))  # as the trainer: the loader, then the build
vae = AutoencoderKL(**TINY_VAE).eval()
LatentCache(root + "/cache", 512, vae).attach(loader.dataset.entries).build(loader.dataset.entries, vae, show=False)
batch = next(iter(loader))
print("batch", sorted(batch))
"""


def test_loader_workers_start_after_a_full_size_build(tmp_path):
    """The build resizes 480p frames with OpenCV, whose thread pool a forked worker inherits without
    its threads: the first full-size run with the cache hung in every worker until the loader's
    process stopped starting that pool."""
    import signal
    import subprocess
    import sys

    from tests.test_train_e2e import REPO

    proc = subprocess.Popen([sys.executable, "-c", LOADER_AFTER_BUILD, str(tmp_path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the loader's workers hung after the latent cache's build")
    assert proc.returncode == 0, out
    assert "batch ['conditioning_pixel_values', 'input_ids', 'latent_moments', 'masks']" in out
