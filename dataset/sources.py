"""The training data's sources: what each root or CSV holds, found once at start (the scan).

DAVIS-2017 and YouTube-VOS frame trees, any folder of frame folders (`--frames_root`), and video
files listed in CSVs with captions (the original's `--train_data_dir --csv_file`). Each source
gives `Video`s; a video that cannot be used is skipped with its reason, a source without any
usable video is a `problem` (an error when no other source has videos).
"""
import ast
import csv
import os
import re
import warnings
from dataclasses import dataclass, field

from dataset.video import VideoError, clip_stride, original_stride, probe_video

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class Video:
    source: str  # "DAVIS", "YouTube-VOS", "frames" or "videos"
    name: str
    frames: list = None  # sorted frame paths (frame sources)
    stride: int = 1  # frames between two clip frames
    path: str = None  # the video file (video source)
    info: object = None  # its dataset.video.VideoInfo
    caption: str = None  # None: the run's --caption
    latents: str = None  # its --latent_cache file (dataset/latent_cache.py)


@dataclass
class SourceScan:
    """What scanning one source found; `problem` says why it gives no videos."""
    source: str
    flag: str
    root: str
    repeat: int = 1
    used_root: str = None
    videos: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (video, reason)
    notes: list = field(default_factory=list)  # (video, remark) for videos used
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


def add_frame_video(scan, name, folder, nframes, stride=1):
    """Append `folder` as a video of `scan`, or record why it is skipped. Zero-byte files are not
    frames (an interrupted copy); a video with one is cut at it."""
    if not os.path.isdir(folder):
        scan.skipped.append((name, "no frame folder"))
        return
    frames = list_frames(folder)
    empty = next((i for i, f in enumerate(frames) if os.path.getsize(f) == 0), None)
    if empty is not None:
        scan.notes.append((name, f"zero-byte frame {os.path.basename(frames[empty])}: cut there"))
        frames = frames[:empty]
    need = (nframes - 1) * stride + 1
    if not frames:
        scan.skipped.append((name, "no image files"))
    elif len(frames) < need:
        scan.skipped.append((f"{name} ({len(frames)})", f"fewer frames than nframes{' at the stride' * (stride > 1)}"))
    else:
        scan.videos.append(Video(scan.source, name, frames, stride))


def check_root(scan, kind="folder"):
    """Set scan.problem when the root is missing or not a folder; True if it is usable."""
    if not os.path.exists(scan.root):
        scan.problem, scan.missing = f"{scan.flag}: {scan.root} does not exist", True
    elif not os.path.isdir(scan.root):
        scan.problem = f"{scan.flag}: {scan.root} is a file, not a {kind}"
    return scan.problem is None


def scan_davis(root, nframes, repeat=10, stride=1):
    """DAVIS-2017: the videos named in ImageSets/2017/train.txt, frames in JPEGImages/480p/<name>/.
    Also finds a tree one `DAVIS/` level further down."""
    scan = SourceScan("DAVIS", "--davis_root", root, repeat)
    if not check_root(scan):
        return scan
    split = os.path.join("ImageSets", "2017", "train.txt")
    found = [r for r in (root, os.path.join(root, "DAVIS")) if os.path.isfile(os.path.join(r, split))]
    if not found:
        scan.problem = f"--davis_root: {root} has no {split} (nor DAVIS/{split})"
        return scan
    scan.used_root = found[0]
    with open(os.path.join(scan.used_root, split), encoding="utf-8-sig") as f:  # a BOM is not part of a name
        names = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    for name in names:
        add_frame_video(scan, name, os.path.join(scan.used_root, "JPEGImages", "480p", name), nframes, stride)
    if not scan.videos:
        scan.problem = f"--davis_root: {root}: none of the {len(names)} videos in {split} is usable"
    return scan


def scan_ytvos(root, nframes, repeat=1, stride=1):
    """YouTube-VOS: every folder JPEGImages/<video>/ (also under a `train/` level)."""
    scan = SourceScan("YouTube-VOS", "--ytvos_root", root, repeat)
    if not check_root(scan):
        return scan
    found = [r for r in (root, os.path.join(root, "train")) if os.path.isdir(os.path.join(r, "JPEGImages"))]
    if not found:
        scan.problem = f"--ytvos_root: {root} has no JPEGImages/ (nor train/JPEGImages/)"
        return scan
    scan.used_root = found[0]
    jpeg_dir = os.path.join(scan.used_root, "JPEGImages")
    names = sorted(n for n in os.listdir(jpeg_dir) if os.path.isdir(os.path.join(jpeg_dir, n)))
    for name in names:
        add_frame_video(scan, name, os.path.join(jpeg_dir, name), nframes, stride)
    if not scan.videos:
        scan.problem = f"--ytvos_root: {root}: none of its {len(names)} video folders is usable"
    return scan


def scan_frames_root(root, nframes, repeat=1, stride=1):
    """Any tree of frame folders: every folder (at any depth) holding image files is a video,
    named by its path under the root."""
    scan = SourceScan("frames", "--frames_root", root, repeat)
    if not check_root(scan):
        return scan
    folders = []
    for folder, dirs, files in os.walk(root):
        dirs.sort(key=natural_key)
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            folders.append(folder)
    for folder in folders:
        add_frame_video(scan, os.path.relpath(folder, root), folder, nframes, stride)
    if not scan.videos:
        scan.problem = (f"--frames_root: {root}: none of its {len(folders)} frame folders is usable" if folders
                        else f"--frames_root: {root} has no folder with image files")
    return scan


def parse_csv_files(value):
    """--csv_file as the original takes it, a Python-list string "['a.csv', 'b.csv']", or one path."""
    value = str(value).strip()
    if value.startswith("["):
        try:
            files = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--csv_file: {value} is not a list of paths") from None
        return [str(f) for f in files]
    return [value]


def read_csv_rows(scan, csv_path, video_column, caption_column):
    """The rows of one CSV as (video, caption) pairs, or [] with scan.problem naming the flaw."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for flag, column in (("--video_column", video_column), ("--caption_column", caption_column)):
                if column not in columns:
                    scan.problem = f"{flag}: {csv_path} has no column {column!r} (columns: {', '.join(columns)})"
                    return []
            return [(row[video_column], row[caption_column]) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        scan.problem = f"--csv_file: {csv_path}: {err}"
        return []


def scan_csv_videos(data_dir, csv_file, nframes, video_column="video_path", caption_column="caption",
                    max_samples=None, repeat=1, stride=0):
    """The original's source: video files listed in CSVs (paths relative to `data_dir`, captions
    per row). Every file is probed (header + first frame); `stride` 0 is the original's rule
    max(fps // 15, 1), with its fallback for short videos (frames // nframes)."""
    scan = SourceScan("videos", "--csv_file", str(csv_file), repeat)
    if data_dir and not os.path.isdir(data_dir):
        scan.flag, scan.root = "--train_data_dir", data_dir
        check_root(scan)
        if not scan.problem:
            scan.problem = f"--train_data_dir: {data_dir} is not a folder"
        return scan
    rows = []
    for path in parse_csv_files(csv_file):
        if not os.path.isfile(path) and data_dir and os.path.isfile(os.path.join(data_dir, path)):
            path = os.path.join(data_dir, path)
        if not os.path.isfile(path):
            scan.problem = f"--csv_file: {path} {'is not a file' if os.path.exists(path) else 'does not exist'}"
            scan.missing = not os.path.exists(path)
            continue
        base = data_dir or os.path.dirname(path)
        rows += [(base, video, caption) for video, caption in read_csv_rows(scan, path, video_column, caption_column)]
    if max_samples is not None:
        rows = rows[:max_samples]
    scan.used_root = data_dir
    for base, video, caption in rows:
        add_video_file(scan, base, video, caption, nframes, stride)
    if not scan.videos and not scan.problem:
        scan.problem = f"--csv_file: {csv_file}: none of its {len(rows)} videos is usable"
    return scan


def add_video_file(scan, base, name, caption, nframes, stride):
    """Probe one listed file (`name` as the CSV gives it, relative to `base`): a Video of `scan`,
    or the reason it is skipped."""
    path = os.path.join(base, name)
    if not os.path.isfile(path):
        scan.skipped.append((name, "missing file"))
        return
    try:
        info = probe_video(path)
    except VideoError as err:
        scan.skipped.append((name, str(err)))
        return
    step = clip_stride(info.frames, nframes, stride or original_stride(info.fps))
    if info.frames < nframes or step == 0:
        scan.skipped.append((f"{name} ({info.frames})", "fewer frames than nframes"))
        return
    scan.videos.append(Video(scan.source, name, stride=step, path=path, info=info, caption=caption))
    slow = info.pix_fmt not in ("yuv420p", "yuvj420p") or info.width % 2 or info.height % 2
    remarks = [f"rotated {info.rotation}" if info.rotation else "",
               "variable frame rate: frames picked by time" if info.variable_rate else "",
               f"{info.pix_fmt} {info.width}x{info.height}: converted by swscale (slower)" if slow else ""]
    if any(remarks):
        scan.notes.append((name, ", ".join(r for r in remarks if r)))


def scan_sources(args):
    """Scan every source the flags name (missing flags default as the training scripts do)."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    nframes = int(args.nframes)
    scans = []
    if get("davis_root"):
        scans.append(scan_davis(str(args.davis_root), nframes, int(get("davis_repeat", 10)),
                                int(get("davis_stride", 1))))
    if get("ytvos_root"):
        scans.append(scan_ytvos(str(args.ytvos_root), nframes, int(get("ytvos_repeat", 1)),
                                int(get("ytvos_stride", 1))))
    if get("frames_root"):
        scans.append(scan_frames_root(str(args.frames_root), nframes, int(get("frames_repeat", 1)),
                                      int(get("frames_stride", 1))))
    if get("csv_file"):
        scans.append(scan_csv_videos(get("train_data_dir"), args.csv_file, nframes, get("video_column", "video_path"),
                                     get("caption_column", "caption"), get("max_train_samples"),
                                     int(get("video_repeat", 1)), int(get("video_stride", 0))))
    return scans


def check_scans(scans):
    """Raise for a bad source unless another source has videos; then warn (once) and go on.
    A missing root is a FileNotFoundError, one without usable videos a ValueError."""
    if not scans:
        raise ValueError("no data: give --davis_root, --ytvos_root, --frames_root and/or --csv_file")
    for scan in scans:
        if scan.problem is None:
            continue
        if scan.videos:  # e.g. one of several CSVs lacks the column: the others are used
            warnings.warn(f"{scan.problem}; using the {len(scan.videos)} videos found", RuntimeWarning, stacklevel=3)
        elif any(other.videos for other in scans):
            used = ", ".join(s.source for s in scans if s.videos)
            warnings.warn(f"{scan.problem}; using {used} only", RuntimeWarning, stacklevel=3)
        elif scan.missing:
            raise FileNotFoundError(scan.problem)
        else:
            raise ValueError(scan.problem)


def group_examples(pairs):
    """{reason: "a, b, c, ..."} of (name, reason) pairs, five names at most."""
    grouped = {}
    for name, reason in pairs:
        grouped.setdefault(reason, []).append(name)
    return {reason: (len(names), ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""))
            for reason, names in grouped.items()}


def describe_scan(scans, nframes):
    """The scan summary as text: per source the videos used, skipped (and why), entries and
    their share of the samples."""
    lines = [f"FinetuneDataset scan (nframes={nframes}):"]
    total = sum(len(s.videos) * s.repeat for s in scans)
    for scan in scans:
        entries = len(scan.videos) * scan.repeat
        where = scan.used_root or scan.root
        times = f" (x{scan.repeat})" if scan.repeat != 1 else ""
        if scan.problem and not scan.videos:
            lines.append(f"  {scan.source:<12} {where}: not used ({scan.problem})")
        else:
            lines.append(f"  {scan.source:<12} {where}: {len(scan.videos)} videos, {len(scan.skipped)} skipped -> "
                         f"{entries} entries{times}, {100 * entries / max(total, 1):.0f}% of samples")
        if scan.problem and scan.videos:
            lines.append(f"    partly unusable: {scan.problem}")
        for reason, (count, examples) in group_examples(scan.skipped).items():
            lines.append(f"    {count} skipped, {reason}: {examples}")
        for remark, (count, examples) in group_examples(scan.notes).items():
            lines.append(f"    {count} used, {remark}: {examples}")
    lines.append(f"  total: {total} entries, {sum(len(s.skipped) for s in scans)} videos skipped")
    return "\n".join(lines)
