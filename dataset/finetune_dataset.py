"""Video clips with random masks for finetuning DiffuEraser: DAVIS-2017 train, YouTube-VOS,
any folder of frame folders, and video files listed in CSVs with captions (the original's source),
mixed with a repeat per source (sources: dataset/sources.py, video decoding: dataset/video.py).

    python -m dataset.finetune_dataset --davis_root data/DAVIS --ytvos_root data/YouTubeVOS \
        --train_data_dir data/train --csv_file data/train/metadata.csv \
        --nframes 10 --resolution 512 --preview preview.gif

prints what the scan found and writes a few samples as an animated GIF (frame | mask | masked
frame per row), a look at the data before a long run.
"""
import argparse
import os
import shutil
import tempfile
import warnings

import cv2
import numpy as np
import torch
from PIL import Image

from dataset.latent_cache import read_moments
from dataset.sources import check_scans, describe_scan, scan_sources
from dataset.utils import GeneratorDraws, random_mask_frames
from dataset.video import DECODE_ERRORS, read_clip

CLIP_MAX_LENGTH = 77  # CLIP text encoder positions; used when the tokenizer does not say
MAX_RETRIES = 10  # unreadable clips in a row before __getitem__ gives up
MAX_WORKERS = 256  # slots of the shared skipped-clip counter (one per loader worker, 0 = main process)
# uint8 -> float32 tables: frames to [-1, 1] (exact at 0 and 255), kept masks (255) to 1
SIGNED_UNIT = (np.arange(256) / 127.5 - 1).astype(np.float32)
KEPT_UNIT = (np.arange(256) == 255).astype(np.float32)
REDUCED_READ = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}
# what a clip can throw when a file is corrupt, truncated, vanished or not an image
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, cv2.error) + DECODE_ERRORS


class DataScan:
    """The scan's verdict, known before any model loads: the sources, the dataset entries (each
    video listed `repeat` times) and the summary text. Raises FileNotFoundError / ValueError (one
    line naming the flag) when no source gives a clip of `args.nframes` frames."""

    def __init__(self, args):
        self.nframes = int(args.nframes)
        self.scans = scan_sources(args)
        self.summary = describe_scan(self.scans, self.nframes)
        print(self.summary)  # also when refused: it lists why each video was skipped
        check_scans(self.scans)
        self.entries = [video for scan in self.scans for video in scan.videos * scan.repeat]
        if not self.entries:
            raise ValueError(f"no usable videos with >= {self.nframes} frames")
        self.skipped_videos = sum(len(scan.skipped) for scan in self.scans)


def reduction(width, height, resolution):
    """Largest libjpeg DCT scale-down (1, 2, 4 or 8) that keeps the short side >= resolution."""
    return next(k for k in (8, 4, 2, 1) if min(width, height) // k >= resolution or k == 1)


def read_frame(path, reduce=1):
    """Decode an image file to uint8 BGR (h, w, 3), JPEGs at 1/`reduce` scale (decoded that
    small by libjpeg). Raises OSError for a file that is truncated or does not decode."""
    data = np.fromfile(path, np.uint8)
    if not data.size:
        raise OSError(f"{path}: empty file")  # cv2.imdecode raises cv2.error on an empty buffer
    if data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:].tobytes():
        raise OSError(f"{path}: truncated JPEG (no end-of-image marker)")  # libjpeg would pad it grey
    image = cv2.imdecode(data, REDUCED_READ[reduce] | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise OSError(f"{path}: not a decodable image")
    return image


def read_square(path, resolution, reduce, out):
    """Centre square of an image resized (bilinear) into `out`, uint8 (R, R, 3) BGR. The square
    is cut before the resize, so only it is resampled."""
    image = read_frame(path, reduce)
    h, w = image.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = image[y0:y0 + side, x0:x0 + side]
    if side == resolution:
        out[...] = square
    else:
        cv2.resize(square, (resolution, resolution), dst=out, interpolation=cv2.INTER_LINEAR)


def square_mask(hole, resolution):
    """Centre square of a source-size hole mask (255 = hole) resized with nearest neighbour:
    uint8 (R, R), 255 = kept, 0 = hole."""
    h, w = hole.shape
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    small = cv2.resize(hole[y0:y0 + side, x0:x0 + side], (resolution, resolution), interpolation=cv2.INTER_NEAREST)
    return cv2.bitwise_not(small)


def to_planes(frames):
    """uint8 BGR (F, R, R, 3) -> uint8 RGB planes (F, 3, R, R)."""
    f, r = frames.shape[:2]
    planes = np.empty((f, 3, r, r), np.uint8)
    for i in range(f):
        for c in range(3):
            cv2.extractChannel(frames[i], 2 - c, planes[i, c])
    return planes


def lookup(values, table):
    """Float32 tensor of table[values] (values uint8 (..., R)): one cv2 table lookup, much
    faster than float arithmetic over the clip."""
    out = np.empty(values.shape, np.float32)
    cv2.LUT(values.reshape(-1, values.shape[-1]), table, dst=out.reshape(-1, values.shape[-1]))
    return torch.from_numpy(out)


def tokenize(tokenizer, caption):
    """input_ids (L,) long, padded to the tokenizer's max length (77 for CLIP) and truncated."""
    max_length = tokenizer.model_max_length
    if not max_length or max_length > 100_000:  # a tokenizer folder without a config says "unbounded"
        max_length = CLIP_MAX_LENGTH
    return tokenizer(caption, max_length=max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids[0]


class FinetuneDataset(torch.utils.data.Dataset):
    """Clips of `nframes` frames with a fresh random mask each.

    Returns dict: `pixel_values` (F, 3, R, R) float32 in [-1, 1] (with `--latent_cache`, instead
    `latent_moments` (F, 8, R/8, R/8) float16: see dataset/latent_cache.py); `conditioning_pixel_values`
    (F, 3, R, R), the frames with the hole set to -1 (black); `masks` (F, 1, R, R) float32,
    hole = 0, kept = 1; `input_ids` (77,) long, the caption (the video's CSV caption, else
    `--caption`, "clean background"), empty with probability `proportion_empty_prompts`.

    Per sample: a random start, frames at the source's stride (frame folders: 1 unless
    `--*_stride`; video files: the original's max(fps // 15, 1)), a mask from
    `create_random_shape_with_random_motion`'s generator at the source resolution, short side
    resized to R and a centre square cut (frames bilinear, mask nearest), the clip reversed in
    time with probability 0.5.
    The masked frame is composed after the resize, in uint8, from the resized frame and the
    resized (nearest) mask: conditioning equals pixel_values exactly where kept and is -1
    exactly in the hole. Composing at source size and then resizing the masked frame
    (bilinear) would instead blend the hole's black into a rim of about one output pixel
    outside the mask, and cost a second resize per frame. The square is cut at source size
    before the resize (the same framing as resize-then-crop to within a pixel).

    Randomness: with `args.seed` a sample (clip, start, mask, reversal, caption, retries) is a
    pure function of (seed, epoch, index): the same whichever worker or process draws it, however
    often the loader was restarted, so a resumed run draws what the uninterrupted one did. Every
    draw comes from `generator(index)`, never from global state or per-process counters.
    `set_epoch` like a DistributedSampler's; it reaches persistent workers too. Without a seed
    it follows torch's seed (`torch.initial_seed()`,
    which DataLoader workers get per worker and per epoch), as the original's global RNGs do.

    An unreadable frame or video does not stop an epoch: the sample draws another clip (up to
    MAX_RETRIES), counts it in `skipped_count` (all loader workers together) and warns once per
    video (per process). `scan` is a DataScan made before (the trainer scans before loading
    models); without it the dataset scans.
    """

    def __init__(self, args, tokenizer, scan=None):
        self.nframes = int(args.nframes)
        self.resolution = int(args.resolution)
        self.proportion_empty_prompts = float(args.proportion_empty_prompts)
        self.seed = getattr(args, "seed", None)
        caption = getattr(args, "caption", None)
        self.caption = "clean background" if caption is None else caption
        scan = scan or DataScan(args)
        self.scans, self.entries, self.summary = scan.scans, scan.entries, scan.summary
        self.skipped_videos = scan.skipped_videos
        self.tokenizer = tokenizer
        self.token_cache = {}
        self.caption_ids = self.tokenize(self.caption)
        self.empty_ids = self.tokenize("")
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # shared with persistent workers
        self.skipped = torch.zeros(MAX_WORKERS, dtype=torch.int64).share_memory_()  # bad clips per worker
        self.warned_videos = set()
        self.process = None  # pid the per-process state below belongs to
        self.stream = None

    @property
    def skipped_count(self):
        """Clips replaced because a frame or video could not be read, in every loader worker
        since the dataset was made (the trainer logs it)."""
        return int(self.skipped.sum())

    @property
    def bad_clips(self):
        return self.skipped_count

    def __len__(self):
        return len(self.entries)

    def set_epoch(self, epoch):
        self.epoch.fill_(int(epoch))  # in place: workers started in an earlier epoch see it

    def tokenize(self, caption):
        """input_ids of a caption, cached (a CSV source has one caption per video)."""
        if caption not in self.token_cache:
            self.token_cache[caption] = tokenize(self.tokenizer, caption)
        return self.token_cache[caption]

    def generator(self, index):
        """The random stream for one sample (see the class docstring)."""
        if self.process != os.getpid():  # first call in this process (or a fresh worker)
            self.process = os.getpid()
            self.stream = np.random.default_rng(torch.initial_seed())
            if torch.utils.data.get_worker_info() is not None:
                cv2.setNumThreads(1)  # one worker = one core; parallelism comes from workers
        if self.seed is None:
            return self.stream
        return np.random.default_rng([int(self.seed), int(self.epoch), int(index)])

    def __getitem__(self, index):
        rng = self.generator(index)
        video = self.entries[index]
        for _ in range(MAX_RETRIES):
            try:
                return self.load_clip(video, rng)
            except READ_ERRORS as err:
                self.count_skipped()
                if (video.source, video.name) not in self.warned_videos:
                    self.warned_videos.add((video.source, video.name))
                    warnings.warn(f"{video.source} video {video.name}: unreadable clip ({err}); "
                                  "drawing another clip", RuntimeWarning, stacklevel=2)
                last = err
                video = self.another_video(video, rng)
        raise RuntimeError(f"{MAX_RETRIES} clips in a row could not be read; last error: {last}")

    def count_skipped(self):
        worker = torch.utils.data.get_worker_info()
        self.skipped[0 if worker is None else 1 + worker.id % (MAX_WORKERS - 1)] += 1

    def another_video(self, video, rng):
        """A random entry of a different video where one exists (the retry after a bad clip)."""
        for index in rng.integers(len(self.entries), size=16):
            if self.entries[index] is not video:
                return self.entries[index]
        return video

    def load_clip(self, video, rng):
        """One sample from `video` (see the class docstring); raises READ_ERRORS on bad files."""
        f, r = self.nframes, self.resolution
        length = video.info.frames if video.path else len(video.frames)
        start = video.stride * int(rng.integers(0, (length - 1) // video.stride - f + 2))
        reverse = rng.random() < 0.5
        empty_prompt = rng.random() < self.proportion_empty_prompts
        if video.path:
            width, height = video.info.width, video.info.height
        else:
            paths = video.frames[start:start + (f - 1) * video.stride + 1:video.stride]
            with Image.open(paths[0]) as first:
                width, height = first.size  # header only: the mask is drawn at source size
        holes = random_mask_frames(f, height, width, rng=GeneratorDraws(rng))
        frames = np.empty((f, r, r, 3), np.uint8)
        if video.path:
            read_clip(video.path, video.info, start, video.stride, frames)
        else:
            reduce = reduction(width, height, r)
            for i, path in enumerate(paths):
                read_square(path, r, reduce, frames[i])
        if reverse:
            frames, holes = frames[::-1], holes[::-1]
        kept = np.empty((f, 1, r, r), np.uint8)
        resized = {}  # a still clip repeats one hole array: resize it once
        for i, hole in enumerate(holes):
            if id(hole) not in resized:
                resized[id(hole)] = square_mask(hole, r)
            kept[i, 0] = resized[id(hole)]
        planes = to_planes(frames)  # (F, 3, R, R) RGB
        masked = np.bitwise_and(planes, kept)  # hole -> 0, i.e. -1 after the lookup
        caption = self.caption_ids if video.caption is None else self.tokenize(video.caption)
        sample = {
            "conditioning_pixel_values": lookup(masked, SIGNED_UNIT),
            "masks": lookup(kept, KEPT_UNIT),
            "input_ids": (self.empty_ids if empty_prompt else caption).clone(),
        }
        if video.latents is None:
            sample["pixel_values"] = lookup(planes, SIGNED_UNIT)
        else:  # --latent_cache: the clean frames' VAE moments instead of their pixels
            moments = read_moments(video, start, f, video.stride)
            sample["latent_moments"] = moments.flip(0) if reverse else moments
        return sample


def preview_strip(sample, tile):
    """One sample as a list of uint8 (tile, 3*tile, 3) images over time: frame | mask | masked
    (the hole shown white in the mask column)."""
    def to_uint8(x):  # (F, C, R, R) in [-1, 1] -> (F, R, R, C)
        return ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)

    frames = to_uint8(sample["pixel_values"])
    masked = to_uint8(sample["conditioning_pixel_values"])
    hole = ((1 - sample["masks"]).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8).repeat(3, axis=-1)
    rows = []
    for t in range(frames.shape[0]):
        row = np.concatenate([frames[t], hole[t], masked[t]], axis=1)
        rows.append(cv2.resize(row, (3 * tile, tile), interpolation=cv2.INTER_AREA))
    return rows


def write_preview(dataset, path, samples, tile, fps=5):
    """Write `samples` random samples as an animated GIF, one row per sample."""
    strips = [preview_strip(dataset[int(i)], tile)
              for i in np.random.default_rng(0).choice(len(dataset), size=samples, replace=samples > len(dataset))]
    images = [Image.fromarray(np.concatenate([s[t] for s in strips], axis=0)) for t in range(dataset.nframes)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def load_tokenizer(path, scratch):
    """A CLIP tokenizer folder, or (None) a tiny one written under `scratch`: the preview shows
    no captions."""
    if path:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(path)
    from diffueraser.tiny import tiny_tokenizer

    return tiny_tokenizer(os.path.join(scratch, "tokenizer"))


def parse_args(argv=None):
    """The training scripts' data flags (diffueraser/args.py) plus the preview's own."""
    from diffueraser.args import add_data_args, check_data_args

    parser = argparse.ArgumentParser(description="Scan the finetuning data and preview samples.")
    add_data_args(parser)
    parser.add_argument("--tokenizer", default=None,
                        help="CLIP tokenizer folder (e.g. SD1.5/tokenizer); default: a tiny local one.")
    parser.add_argument("--preview", default=None, help="Write samples as an animated GIF to this path.")
    parser.add_argument("--samples", type=int, default=4, help="Samples (rows) in the preview.")
    parser.add_argument("--tile", type=int, default=256, help="Preview tile size in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampled clips and masks.")
    args = parser.parse_args(argv)
    for flag in ("resolution", "samples", "tile"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: {getattr(args, flag)} must be >= 1")
    try:
        check_data_args(args)
    except SystemExit as err:
        parser.error(str(err))
    return args


def main(argv=None):
    args = parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="tiny_tokenizer_")
    try:
        dataset = FinetuneDataset(args, load_tokenizer(args.tokenizer, scratch))
        if args.preview:
            write_preview(dataset, args.preview, args.samples, args.tile)
            print(f"wrote {args.preview}: {args.samples} samples x {args.nframes} frames (frame | mask | masked)")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
