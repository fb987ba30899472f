"""Cached VAE posteriors of the clean training frames (`--latent_cache DIR`).

A clean frame's square (centre crop, resize: no randomness) always encodes to the same Gaussian,
so its mean and standard deviation are computed once and kept on disk; a step then samples
`mean + std * noise` with fresh noise, the distribution a new encoding samples from, and only the
masked frames still go through the VAE encoder. One file per video folder,
`DIR/<resolution>px-vae<hash>/<hash>.npy`: float16 (frames, 8, R/8, R/8), the 4 mean channels
then the 4 std channels, memory-mapped by the loader. The folder's hash covers the VAE's config,
weights and dtype; a file's hash covers each frame's path, size and modification time, so a
changed frame, resolution or VAE gives a new file (old ones are never read again: delete freely).
Frame folders only (DAVIS, YouTube-VOS, --frames_root): video files are not cached.
"""
import hashlib
import itertools
import json
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

BATCH = 16  # frames per encoder call while building
ON_DEVICE = 64  # a video's encoded batches kept on the GPU before they move to host memory (one wait each)


def vae_hash(vae):
    """Hex digest of the VAE's config (its own keys: diffusers' `_...` entries hold paths and sets
    whose order changes between processes), weights and dtype."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        # flatten: the values in logical order whatever the memory format (a compiled run's encoder
        # is channels_last, where a 1x1 kernel counts as contiguous with a last stride above 1)
        h.update(tensor.detach().cpu().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def disk_of(path):
    """(bytes free, device number) of the disk that holds `path` or, not yet made, its nearest parent."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free, os.stat(existing).st_dev


def frames_hash(paths, resolution):
    """Hex digest of a frame folder's paths, sizes and modification times (and the resolution)."""
    h = hashlib.sha1(str(resolution).encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class LatentCache:
    """The cache folder of one VAE and resolution."""

    def __init__(self, root, resolution, vae):
        self.resolution = int(resolution)
        self.dir = os.path.join(root, f"{self.resolution}px-vae{vae_hash(vae)[:16]}")
        side = self.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        self.frame_bytes = 2 * vae.config.latent_channels * side * side * 2  # mean and std, float16

    def room(self, videos):
        """(bytes the missing videos' files need, bytes free on the cache's disk, that disk's device number)."""
        need = sum(len(v.frames) for v in self.missing(videos)) * self.frame_bytes
        return (need, *disk_of(self.dir))

    def attach(self, videos):
        """Set each video's `latents` (its file; the loader reads it); SystemExit naming a video
        that is a file rather than a frame folder."""
        for video in videos:
            if video.frames is None:
                raise SystemExit(f"--latent_cache covers frame folders only; {video.source} video {video.name} is "
                                 f"a file ({video.path}): extract its frames (--frames_root) or drop --latent_cache")
            if video.latents is None:
                video.latents = os.path.join(self.dir, frames_hash(video.frames, self.resolution) + ".npy")
        return self

    @staticmethod
    def missing(videos):
        return list({v.latents: v for v in videos if not os.path.exists(v.latents)}.values())

    @torch.no_grad()
    def build(self, videos, vae, show=True):
        """Encode the frames of every video whose file is missing; returns (videos encoded, videos
        with an unreadable frame: left without a file, so the loader skips their clips). Four threads
        read up to 4 batches ahead, across videos (a YouTube-VOS video is ~2 batches). A compiled
        encoder (the scripts' --compile) gets whole batches, the last of each video padded: one
        graph for every batch."""
        from dataset.finetune_dataset import READ_ERRORS, SIGNED_UNIT, lookup, read_square, reduction, to_planes
        from PIL import Image

        todo = self.missing(videos)
        os.makedirs(self.dir, exist_ok=True)
        r = self.resolution
        compiled = getattr(vae.encoder, "_compiled_call_impl", None) is not None
        bar = tqdm(total=sum(len(v.frames) for v in todo), desc="latent cache", unit="frame", disable=not show)

        def read(video, start):
            paths = video.frames[start:start + BATCH]
            with Image.open(video.frames[0]) as first:
                reduce = reduction(*first.size, r)  # as the loader reads them
            frames = np.zeros((BATCH if compiled else len(paths), r, r, 3), np.uint8)
            for i, path in enumerate(paths):
                read_square(path, r, reduce, frames[i])
            return lookup(to_planes(frames), SIGNED_UNIT)

        jobs = iter([(v, start) for v in todo for start in range(0, len(v.frames), BATCH)])
        encoded, bad, failed, parts = 0, [], set(), []
        with ThreadPoolExecutor(4) as pool:
            reads = deque((job, pool.submit(read, *job)) for job in itertools.islice(jobs, 4))
            while reads:
                (video, start), done = reads.popleft()
                job = next(jobs, None)
                if job is not None:
                    reads.append((job, pool.submit(read, *job)))
                if id(video) in failed:
                    continue
                try:
                    x = done.result()
                except READ_ERRORS as err:
                    bad.append(f"{video.source} video {video.name}: {err}")
                    failed.add(id(video))
                    parts = []
                    continue
                n = min(BATCH, len(video.frames) - start)
                dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
                parts.append(torch.cat([dist.mean[:n], dist.std[:n]], dim=1).to(torch.float16))
                if len(parts) > ON_DEVICE:  # a long video (--frames_root): its moments so far to host memory
                    parts = [torch.cat([t.cpu() for t in parts])]
                bar.update(n)
                if start + n == len(video.frames):  # its last batch: the file, renamed when whole (a kill leaves none)
                    partial = f"{video.latents}.{os.getpid()}.partial"
                    with open(partial, "wb") as f:
                        np.save(f, torch.cat([t.cpu() for t in parts]).numpy())
                    os.replace(partial, video.latents)
                    encoded, parts = encoded + 1, []
        bar.close()
        return encoded, bad


def read_moments(video, start, count, stride):
    """float16 (count, 8, R/8, R/8): the cached moments of frames start, start + stride, ... of a
    video (memory-mapped: only those frames are read)."""
    table = np.load(video.latents, mmap_mode="r")
    return torch.from_numpy(np.array(table[start:start + (count - 1) * stride + 1:stride]))  # a copy: writable


def sample_latents(moments, scaling_factor, dtype):
    """Latents drawn from cached moments (N, 8, h, w): (mean + std * noise) * scaling_factor, in `dtype`."""
    mean, std = moments.to(dtype).chunk(2, dim=1)
    return (mean + std * torch.randn_like(mean)) * scaling_factor
