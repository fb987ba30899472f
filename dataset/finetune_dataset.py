"""Video clips with random masks for finetuning DiffuEraser (DAVIS-2017 train + YouTube-VOS).

    python -m dataset.finetune_dataset --davis_root data/DAVIS --ytvos_root data/YouTubeVOS \
        --nframes 10 --resolution 512 --preview preview.gif

prints what the scan found and writes a few samples as an animated GIF (frame | mask | masked
frame per row), a look at the data before a long run.
"""
import argparse
import os
import re
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image

from dataset.utils import GeneratorDraws, random_mask_frames

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CLIP_MAX_LENGTH = 77  # CLIP text encoder positions; used when the tokenizer does not say
MAX_RETRIES = 10  # unreadable clips in a row before __getitem__ gives up
# uint8 -> float32 tables: frames to [-1, 1] (exact at 0 and 255), kept masks (255) to 1
SIGNED_UNIT = (np.arange(256) / 127.5 - 1).astype(np.float32)
KEPT_UNIT = (np.arange(256) == 255).astype(np.float32)
REDUCED_READ = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}
# what a clip can throw when a file is corrupt, truncated, vanished or not an image
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class Video:
    source: str  # "DAVIS" or "YouTube-VOS"
    name: str
    frames: list  # sorted frame paths


@dataclass
class SourceScan:
    """What scanning one root found; `problem` says why it gives no videos."""
    source: str
    flag: str
    root: str
    used_root: str = None
    videos: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (video, reason)
    problem: str = None
    missing: bool = False


def natural_key(name):
    """Sort key that orders frame_2 before frame_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_frames(folder):
    """Image files (.jpg/.jpeg/.png, any case) of a folder, naturally sorted; others ignored."""
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def add_video(scan, name, folder, nframes):
    """Append `folder` as a video of `scan`, or record why it is skipped."""
    if not os.path.isdir(folder):
        scan.skipped.append((name, "no frame folder"))
        return
    frames = list_frames(folder)
    if not frames:
        scan.skipped.append((name, "no image files"))
    elif len(frames) < nframes:
        scan.skipped.append((f"{name} ({len(frames)})", "fewer frames than nframes"))
    else:
        scan.videos.append(Video(scan.source, name, frames))


def scan_davis(root, nframes):
    """DAVIS-2017: the videos named in ImageSets/2017/train.txt, frames in JPEGImages/480p/<name>/.
    Also finds a tree one `DAVIS/` level further down."""
    scan = SourceScan("DAVIS", "--davis_root", root)
    if not os.path.isdir(root):
        scan.problem, scan.missing = f"--davis_root: {root} does not exist", True
        return scan
    split = os.path.join("ImageSets", "2017", "train.txt")
    found = [r for r in (root, os.path.join(root, "DAVIS")) if os.path.isfile(os.path.join(r, split))]
    if not found:
        scan.problem = f"--davis_root: {root} has no {split} (nor DAVIS/{split})"
        return scan
    scan.used_root = found[0]
    with open(os.path.join(scan.used_root, split)) as f:
        names = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    for name in names:
        add_video(scan, name, os.path.join(scan.used_root, "JPEGImages", "480p", name), nframes)
    if not scan.videos:
        scan.problem = f"--davis_root: {root}: none of the {len(names)} videos in {split} is usable"
    return scan


def scan_ytvos(root, nframes):
    """YouTube-VOS: every folder JPEGImages/<video>/ (also under a `train/` level)."""
    scan = SourceScan("YouTube-VOS", "--ytvos_root", root)
    if not os.path.isdir(root):
        scan.problem, scan.missing = f"--ytvos_root: {root} does not exist", True
        return scan
    found = [r for r in (root, os.path.join(root, "train")) if os.path.isdir(os.path.join(r, "JPEGImages"))]
    if not found:
        scan.problem = f"--ytvos_root: {root} has no JPEGImages/ (nor train/JPEGImages/)"
        return scan
    scan.used_root = found[0]
    jpeg_dir = os.path.join(scan.used_root, "JPEGImages")
    names = sorted(n for n in os.listdir(jpeg_dir) if os.path.isdir(os.path.join(jpeg_dir, n)))
    for name in names:
        add_video(scan, name, os.path.join(jpeg_dir, name), nframes)
    if not scan.videos:
        scan.problem = f"--ytvos_root: {root}: none of its {len(names)} video folders is usable"
    return scan


def check_scans(scans):
    """Raise for a bad root unless another root has videos; then warn (once) and go on.
    A missing root is a FileNotFoundError, one without usable videos a ValueError."""
    if not scans:
        raise ValueError("no data: give --davis_root and/or --ytvos_root")
    for scan in scans:
        if scan.problem is None:
            continue
        if any(other.videos for other in scans):
            used = ", ".join(s.source for s in scans if s.videos)
            warnings.warn(f"{scan.problem}; using {used} only", RuntimeWarning, stacklevel=3)
        elif scan.missing:
            raise FileNotFoundError(scan.problem)
        else:
            raise ValueError(scan.problem)


def describe_scan(scans, nframes, davis_repeat):
    """The scan summary as text: per root the videos used, skipped (and why), entries."""
    lines = [f"FinetuneDataset scan (nframes={nframes}):"]
    total = 0
    for scan in scans:
        repeat = davis_repeat if scan.source == "DAVIS" else 1
        entries = len(scan.videos) * repeat
        total += entries
        where = scan.used_root or scan.root
        if scan.problem and not scan.videos:
            lines.append(f"  {scan.source:<12} {where}: not used ({scan.problem})")
            continue
        times = f" (x{repeat})" if repeat != 1 else ""
        lines.append(f"  {scan.source:<12} {where}: {len(scan.videos)} videos, "
                     f"{len(scan.skipped)} skipped -> {entries} entries{times}")
        reasons = {}
        for name, reason in scan.skipped:
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            examples = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            lines.append(f"    {len(names)} skipped, {reason}: {examples}")
    lines.append(f"  total: {total} entries")
    return "\n".join(lines)


def reduction(width, height, resolution):
    """Largest libjpeg DCT scale-down (1, 2, 4 or 8) that keeps the short side >= resolution."""
    return next(k for k in (8, 4, 2, 1) if min(width, height) // k >= resolution or k == 1)


def read_frame(path, reduce=1):
    """Decode an image file to uint8 BGR (h, w, 3), JPEGs at 1/`reduce` scale (decoded that
    small by libjpeg). Raises OSError for a file that is truncated or does not decode."""
    data = np.fromfile(path, np.uint8)
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
    """Clips of `nframes` consecutive frames with a fresh random mask each.

    Returns dict: `pixel_values` (F, 3, R, R) float32 in [-1, 1]; `conditioning_pixel_values`
    (F, 3, R, R), the frames with the hole set to -1 (black); `masks` (F, 1, R, R) float32,
    hole = 0, kept = 1; `input_ids` (77,) long, the caption ("clean background"), empty with
    probability `proportion_empty_prompts`.

    Per sample: a random start, a mask from `create_random_shape_with_random_motion`'s
    generator at the source resolution, short side resized to R and a centre square cut
    (frames bilinear, mask nearest), the clip reversed in time with probability 0.5.
    The masked frame is composed after the resize, in uint8, from the resized frame and the
    resized (nearest) mask: conditioning equals pixel_values exactly where kept and is -1
    exactly in the hole. Composing at source size and then resizing the masked frame
    (bilinear) would instead blend the hole's black into a rim of about one output pixel
    outside the mask, and cost a second resize per frame. The square is cut at source size
    before the resize (the same framing as resize-then-crop to within a pixel).

    Randomness: with `args.seed` a sample (clip, start, mask, reversal, caption, retries) is a
    pure function of (seed, epoch, index): the same whichever worker or process draws it, however
    often the loader was restarted, so a resumed run draws what the uninterrupted one did. Every
    draw comes from `generator(index)`. `set_epoch` like a DistributedSampler's; it reaches
    persistent workers too. Without a seed it follows torch's seed (`torch.initial_seed()`,
    which DataLoader workers get per worker and per epoch), as the original's global RNGs do.

    An unreadable frame does not stop an epoch: the sample draws another clip (up to
    MAX_RETRIES), counts it in `bad_clips` and warns once per video (per process).
    """

    def __init__(self, args, tokenizer):
        self.nframes = int(args.nframes)
        self.resolution = int(args.resolution)
        self.proportion_empty_prompts = float(args.proportion_empty_prompts)
        self.davis_repeat = int(getattr(args, "davis_repeat", 10))
        self.seed = getattr(args, "seed", None)
        caption = getattr(args, "caption", None)
        caption = "clean background" if caption is None else caption
        self.scans = []
        davis_root, ytvos_root = getattr(args, "davis_root", None), getattr(args, "ytvos_root", None)
        if davis_root:
            self.scans.append(scan_davis(str(davis_root), self.nframes))
        if ytvos_root:
            self.scans.append(scan_ytvos(str(ytvos_root), self.nframes))
        check_scans(self.scans)
        self.entries = []
        for scan in self.scans:
            self.entries += scan.videos * (self.davis_repeat if scan.source == "DAVIS" else 1)
        if not self.entries:
            raise ValueError(f"no usable videos with >= {self.nframes} frames (davis_repeat={self.davis_repeat})")
        self.summary = describe_scan(self.scans, self.nframes, self.davis_repeat)
        print(self.summary)
        self.caption_ids = tokenize(tokenizer, caption)
        self.empty_ids = tokenize(tokenizer, "")
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # shared with persistent workers
        self.bad_clips = 0
        self.warned_videos = set()
        self.process = None  # pid the per-process state below belongs to
        self.stream = None

    def __len__(self):
        return len(self.entries)

    def set_epoch(self, epoch):
        self.epoch.fill_(int(epoch))  # in place: workers started in an earlier epoch see it

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
                self.bad_clips += 1
                if (video.source, video.name) not in self.warned_videos:
                    self.warned_videos.add((video.source, video.name))
                    warnings.warn(f"{video.source} video {video.name}: unreadable clip ({err}); "
                                  "drawing another clip", RuntimeWarning, stacklevel=2)
                last = err
                video = self.another_video(video, rng)
        raise RuntimeError(f"{MAX_RETRIES} clips in a row could not be read; last error: {last}")

    def another_video(self, video, rng):
        """A random entry of a different video where one exists (the retry after a bad clip)."""
        for index in rng.integers(len(self.entries), size=16):
            if self.entries[index] is not video:
                return self.entries[index]
        return video

    def load_clip(self, video, rng):
        """One sample from `video` (see the class docstring); raises READ_ERRORS on bad files."""
        f, r = self.nframes, self.resolution
        start = int(rng.integers(0, len(video.frames) - f + 1))
        paths = video.frames[start:start + f]
        reverse = rng.random() < 0.5
        empty_prompt = rng.random() < self.proportion_empty_prompts
        with Image.open(paths[0]) as first:
            width, height = first.size  # header only: the mask is drawn at source size
        holes = random_mask_frames(f, height, width, rng=GeneratorDraws(rng))
        if reverse:
            paths, holes = paths[::-1], holes[::-1]
        reduce = reduction(width, height, r)
        frames = np.empty((f, r, r, 3), np.uint8)
        kept = np.empty((f, 1, r, r), np.uint8)
        resized = {}  # a still clip repeats one hole array: resize it once
        for i, (path, hole) in enumerate(zip(paths, holes)):
            read_square(path, r, reduce, frames[i])
            if id(hole) not in resized:
                resized[id(hole)] = square_mask(hole, r)
            kept[i, 0] = resized[id(hole)]
        planes = to_planes(frames)  # (F, 3, R, R) RGB
        masked = np.bitwise_and(planes, kept)  # hole -> 0, i.e. -1 after the lookup
        return {
            "pixel_values": lookup(planes, SIGNED_UNIT),
            "conditioning_pixel_values": lookup(masked, SIGNED_UNIT),
            "masks": lookup(kept, KEPT_UNIT),
            "input_ids": (self.empty_ids if empty_prompt else self.caption_ids).clone(),
        }


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


def load_tokenizer(path):
    """A CLIP tokenizer folder, or (None) a tiny local one: the preview shows no captions."""
    if path:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(path)
    import tempfile

    from diffueraser.tiny import tiny_tokenizer

    return tiny_tokenizer(tempfile.mkdtemp(prefix="tiny_tokenizer_"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Scan the finetuning data and preview samples.")
    parser.add_argument("--davis_root", default=None,
                        help="DAVIS-2017 root (ImageSets/2017/train.txt, JPEGImages/480p/).")
    parser.add_argument("--ytvos_root", default=None, help="YouTube-VOS root (JPEGImages/<video>/).")
    parser.add_argument("--nframes", type=int, default=10, help="Frames per clip.")
    parser.add_argument("--resolution", type=int, default=512, help="Square side of the samples.")
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.0, help="Probability of an empty caption.")
    parser.add_argument("--davis_repeat", type=int, default=10, help="How many times each DAVIS video is listed.")
    parser.add_argument("--tokenizer", default=None,
                        help="CLIP tokenizer folder (e.g. SD1.5/tokenizer); default: a tiny local one.")
    parser.add_argument("--preview", default=None, help="Write samples as an animated GIF to this path.")
    parser.add_argument("--samples", type=int, default=4, help="Samples (rows) in the preview.")
    parser.add_argument("--tile", type=int, default=256, help="Preview tile size in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampled clips and masks.")
    args = parser.parse_args(argv)
    if not args.davis_root and not args.ytvos_root:
        parser.error("give --davis_root and/or --ytvos_root")
    for flag in ("nframes", "resolution", "samples", "tile"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: {getattr(args, flag)} must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        dataset = FinetuneDataset(args, load_tokenizer(args.tokenizer))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    if args.preview:
        write_preview(dataset, args.preview, args.samples, args.tile)
        print(f"wrote {args.preview}: {args.samples} samples x {args.nframes} frames (frame | mask | masked)")


if __name__ == "__main__":
    main()
