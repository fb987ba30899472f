"""Clips from video files (mp4, mov, mkv, ...) with PyAV: probe once at scan time, then per
sample seek to the clip and decode only what it needs.

Why PyAV (measured with bench/data_bench.py on a 2-core CPU, one thread, 22 frames at 512 from
1080p30 H.264 at stride 2; numbers in bench/RESULTS.md): PyAV gives the decoded frame's YUV planes without
a copy, so the centre square is cut and resized in YUV and converted to RGB only at R x R; it can
skip frames nothing refers to before and inside the clip (`skip_frame`); and it reports the pixel
format, colour space and rotation. OpenCV's FFmpeg backend (`cv2.VideoCapture`, already a
dependency) decodes as fast but converts every retrieved frame to BGR at full size and can do none
of the rest: the same clips read 1.1-1.4x slower with it (3.7 vs 4.5 clips/s at 3 Mbit/s, 1.4 vs
2.0 at 13 Mbit/s). Either way H.264 decoding is most of the time (no reduced-size decode exists).
"""
import math
from dataclasses import dataclass

import av
import cv2
import numpy as np

# what decoding a damaged, truncated or vanished file can throw (av.FFmpegError is an OSError too)
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)
ORIGINAL_RATE = 15  # the original decodes at a stride of max(fps // 15, 1): ~15 frames per second
FAST_FORMATS = ("yuv420p", "yuvj420p")  # 8-bit 4:2:0: resized as planes; other formats via swscale
# YUV -> RGB, rows R, G, B: (Kr, Kb) of BT.601 and BT.709
MATRIX_COEFFICIENTS = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}
SPACES = {1: "bt709", 5: "bt601", 6: "bt601", 9: "bt2020", 10: "bt2020"}


class VideoError(OSError):
    """A video file that cannot be used; the message is the reason shown in the scan summary."""


@dataclass
class VideoInfo:
    """What the scan learnt from a file's header and first frame. `width`/`height` are the
    displayed size (after `rotation`, degrees counter-clockwise as FFmpeg reports it)."""
    frames: int
    fps: float
    width: int
    height: int
    rotation: int
    pix_fmt: str
    variable_rate: bool


def probe_video(path):
    """VideoInfo of a video file (its first video stream, first frame decoded); raises VideoError
    saying why it cannot be used (unreadable, no video stream, no frame)."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError("no video stream (audio only?)" if container.streams.audio else "no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1
            frame = next(container.decode(stream), None)
            if frame is None:
                raise VideoError("no decodable frame")
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if fps <= 0:
                raise VideoError("no frame rate in the header")
            frames = stream.frames
            if not frames and stream.duration:  # containers without a frame count (mkv, webm)
                frames = int(stream.duration * stream.time_base * fps)
            elif not frames and container.duration:  # only the container's duration, in microseconds
                frames = int(container.duration / 1e6 * fps)
            guessed = float(stream.guessed_rate or fps)
            rotation = int(round((frame.rotation or 0) / 90)) * 90 % 360
            width, height = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
            return VideoInfo(int(frames or 0), fps, width, height, rotation, frame.format.name,
                             abs(guessed - fps) > 0.01 * fps)
    except VideoError:
        raise
    except DECODE_ERRORS as err:
        # the reason without the path, so the summary groups files by it
        raise VideoError(f"unreadable ({getattr(err, 'strerror', None) or err})") from None


def original_stride(fps):
    """The original's frame stride: every max(fps // 15, 1)-th frame (30 fps -> 2, 25 -> 1)."""
    return max(int(fps // ORIGINAL_RATE), 1)


def clip_stride(frames, nframes, stride):
    """The stride actually used: `stride`, or (the original's fallback) frames // nframes when
    the video is too short for nframes frames at it. 0 when even that does not fit."""
    if frames >= (nframes - 1) * stride + 1:
        return stride
    return frames // nframes


def color_matrix(frame):
    """(3, 4) float32 matrix taking [Y, U, V, 1] (uint8 codes) to [B, G, R] for this frame's colour
    space and range; unspecified: BT.709 from 720 lines up, BT.601 below (what players assume)."""
    space = int(frame.colorspace)  # FFmpeg's AVColorSpace: 1 BT.709, 5/6 BT.601, 9/10 BT.2020, 2 unspecified
    name = SPACES.get(space, "bt709" if frame.height >= 720 else "bt601")
    kr, kb = MATRIX_COEFFICIENTS[name]
    kg = 1 - kr - kb
    full = int(frame.color_range) == 2 or frame.format.name == "yuvj420p"  # AVCOL_RANGE_JPEG
    ys, cs, y0 = (1.0, 1.0, 0.0) if full else (255 / 219, 255 / 224, 16.0)
    r = [ys, 0.0, 2 * (1 - kr) * cs]
    g = [ys, -2 * (1 - kb) * kb / kg * cs, -2 * (1 - kr) * kr / kg * cs]
    b = [ys, 2 * (1 - kb) * cs, 0.0]
    rows = np.array([b, g, r], np.float64)
    offset = -rows[:, 0] * y0 - (rows[:, 1] + rows[:, 2]) * 128.0
    return np.concatenate([rows, offset[:, None]], 1).astype(np.float32)


def resize_square(plane, out):
    """Resize a square uint8 plane into `out` as the JPEG path does: halve with a 2x2 mean while
    the result stays >= out's side (libjpeg's reduced decode), then bilinear."""
    side = out.shape[0]
    while plane.shape[0] >= 2 * side:
        plane = cv2.resize(plane, (plane.shape[1] // 2, plane.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if plane.shape[0] == side:
        out[...] = plane
    else:
        cv2.resize(plane, (side, side), dst=out, interpolation=cv2.INTER_LINEAR)


def plane_array(plane, width, height):
    """A frame plane as a uint8 (height, width) view (no copy)."""
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:height, :width]


def frame_square(frame, rotation, out):
    """The displayed centre square of a decoded frame resized into `out`, uint8 (R, R, 3) BGR.
    8-bit 4:2:0 frames are cut and resized per plane and converted at R x R; others (10-bit,
    4:2:2, odd sizes) go through swscale to BGR first."""
    w, h = frame.width, frame.height
    side = min(w, h)
    y0, x0 = (h - side) // 2 & ~1, (w - side) // 2 & ~1
    r = out.shape[0]
    if frame.format.name in FAST_FORMATS and w % 2 == 0 and h % 2 == 0 and side % 2 == 0:
        planes = np.empty((3, r, r), np.uint8)
        luma = plane_array(frame.planes[0], w, h)[y0:y0 + side, x0:x0 + side]
        resize_square(luma, planes[0])  # a strided view: cv2 takes row steps, no copy
        half = np.empty((r // 2 + r % 2,) * 2, np.uint8)  # chroma at half size, then up to R
        for c in (1, 2):
            chroma = plane_array(frame.planes[c], w // 2, h // 2)[y0 // 2:(y0 + side) // 2, x0 // 2:(x0 + side) // 2]
            resize_square(chroma, half)
            cv2.resize(half, (r, r), dst=planes[c], interpolation=cv2.INTER_LINEAR)
        yuv = cv2.merge(list(planes))
        square = cv2.transform(yuv, color_matrix(frame))
    else:
        bgr = frame.to_ndarray(format="bgr24")
        square = np.empty((r, r, 3), np.uint8)
        resize_square_bgr(bgr[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side], square)
    out[...] = np.rot90(square, rotation // 90) if rotation else square


def resize_square_bgr(square, out):
    """resize_square for a (S, S, 3) image."""
    side = out.shape[0]
    while square.shape[0] >= 2 * side:
        square = cv2.resize(square, (square.shape[1] // 2, square.shape[0] // 2), interpolation=cv2.INTER_AREA)
    cv2.resize(square, (side, side), dst=out, interpolation=cv2.INTER_LINEAR)


def read_clip(path, info, first, stride, out):
    """Decode frames first, first + stride, ... (len(out) of them) of a video into `out`, uint8
    (F, R, R, 3) BGR displayed centre squares.

    Seeks to the keyframe before `first` and decodes forward; frames before the clip that no other
    frame refers to are not decoded (`skip_frame`), nor (constant frame rate) those between the
    clip's frames. A frame's index is its timestamp times the average rate; with a variable rate
    a missing index takes the frame shown at that time (the last one before it). Raises
    VideoError when the file ends or breaks before the clip is complete."""
    count = len(out)
    wanted = [first + k * stride for k in range(count)]
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1  # one loader worker = one core
            codec = stream.codec_context
            tick = 1 / (info.fps * stream.time_base)  # timestamp units per frame
            origin = stream.start_time or 0
            container.seek(origin + int(math.floor(first * tick)), stream=stream, backward=True)
            done, shown = 0, None
            for packet in container.demux(stream):
                if packet.pts is not None:
                    index = round((packet.pts - origin) / tick)
                    needed = index >= first and (info.variable_rate or (index - first) % stride == 0)
                    codec.skip_frame = "DEFAULT" if needed else "NONREF"
                for frame in codec.decode(packet):
                    done, shown = take_frames(frame, round((frame.pts - origin) / tick), wanted, done, shown,
                                              info.rotation, out)
                if done == count:
                    return
            codec.skip_frame = "DEFAULT"
            for frame in codec.decode(None):  # the decoder's delayed frames at the end of the file
                done, shown = take_frames(frame, round((frame.pts - origin) / tick), wanted, done, shown,
                                          info.rotation, out)
    except DECODE_ERRORS as err:
        raise VideoError(f"{path}: {type(err).__name__}: {err}") from None
    if done < count:
        raise VideoError(f"{path}: ended after {done} of the clip's {count} frames (from frame {first})")


def take_frames(frame, index, wanted, done, shown, rotation, out):
    """Fill the clip's next slots from a decoded frame of timestamp index `index`; `shown` is the
    last frame before it. Returns the new (done, shown)."""
    while done < len(wanted) and index >= wanted[done]:
        source = frame if index == wanted[done] or shown is None else shown
        frame_square(source, rotation, out[done])
        done += 1
    return done, frame
