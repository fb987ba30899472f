"""Random free-form video masks: one smooth blob per clip, still or drifting.

`create_random_shape_with_random_motion` has the original DiffuEraser signature and output (a
list of `video_length` PIL images, mode `L`, 255 = hole, 0 = kept) and its distribution
(checked against `shared/reference/mask_stats.json` in tests/test_masks.py), without
matplotlib and about 20x faster. `random_mask_frames` (a list of uint8 views, used by the
training dataset) and `random_shape_masks` (one (F, H, W) array) are the same generator
without PIL.

How the distribution is reproduced. The original draws the blob with matplotlib's defaults: a
640x480 canvas, one subplot covering [0.125, 0.9] x [0.11, 0.88] of it, both axis limits
1.1 x (min, max) of all control-point coordinates, an anti-aliased black fill with a 2 pt edge
stroke; it then resizes the canvas to the region box (bilinear), keeps the pixels that stayed
exactly black and crops to their extent. We place the Bezier outline at the same canvas
coordinates, widen it by the half stroke, keep the canvas pixels it covers completely (all four
corners inside), resize those with the same bilinear filter, keep what stayed fully set and
crop. Only the rasterisation details differ (an exact polygon test instead of Agg's coverage).
"""
import math
import random

import cv2
import numpy as np
from PIL import Image

CANVAS_W, CANVAS_H = 640, 480  # matplotlib's default figure: 6.4 x 4.8 in at 100 dpi
AXES_X = (0.125, 0.9)  # default subplot box, as fractions of the canvas (left, right)
AXES_Y = (0.11, 0.88)  # (bottom, top), measured upwards
LIMIT_PAD = 1.1  # axis limits are 1.1 x (min, max) of the control points
STROKE_HALF_WIDTH = 1.0 * 100 / 72  # PathPatch strokes its edge: 2 pt at 100 dpi, half outside
SAMPLES_PER_SEGMENT = 32
MAX_SPEED = 3.0
ACCELERATION = (3.0, 0.5)  # (speed, angle): Gaussian steps with sigma = half of these


class GlobalDraws:
    """Random draws from Python's `random` and `numpy.random` global generators, as the
    original does, so `random.seed` / `np.random.seed` control the masks the same way."""

    def randint(self, low, high):  # inclusive on both ends
        return random.randint(low, high)

    def coin(self):
        return random.uniform(0, 1)

    def unit(self, n):
        return np.random.random(n)

    def uniform(self, low, high):
        return float(np.random.uniform(low, high))

    def normal(self, sigma):
        return float(np.random.normal(0, sigma))


class GeneratorDraws:
    """The same draws from one `numpy.random.Generator` (per-sample seeding in the dataset)."""

    def __init__(self, rng):
        self.rng = rng

    def randint(self, low, high):
        return int(self.rng.integers(low, high + 1))

    def coin(self):
        return float(self.rng.random())

    def unit(self, n):
        return self.rng.random(n)

    def uniform(self, low, high):  # low > high allowed, as in numpy's legacy `uniform`
        return low + (high - low) * float(self.rng.random())

    def normal(self, sigma):
        return float(self.rng.normal(0, sigma))


def as_draws(rng):
    """None -> the global generators; a `numpy.random.Generator` or an int seed -> that stream."""
    if rng is None:
        return GlobalDraws()
    if isinstance(rng, (GlobalDraws, GeneratorDraws)):
        return rng
    if isinstance(rng, np.random.Generator):
        return GeneratorDraws(rng)
    return GeneratorDraws(np.random.default_rng(rng))


_T = np.linspace(0, 1, SAMPLES_PER_SEGMENT, endpoint=False)[:, None]
BEZIER_BASIS = np.concatenate([(1 - _T) ** 3, 3 * (1 - _T) ** 2 * _T, 3 * (1 - _T) * _T ** 2, _T ** 3], 1)


def bezier_outline(edge_num, ratio, draws):
    """Closed outline of `edge_num` cubic Bezier segments through 3*edge_num+1 control points
    on the unit circle (equal angles, first = last) with radii in [1-ratio, 1+ratio).

    Returns (outline (edge_num*SAMPLES_PER_SEGMENT, 2) in (x, y) data units, control points)."""
    n = 3 * edge_num + 1
    angles = np.linspace(0, 2 * np.pi, n)
    radii = 1 - ratio + 2 * ratio * draws.unit(n)
    ctrl = np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
    ctrl[-1] = ctrl[0]
    segments = np.lib.stride_tricks.sliding_window_view(ctrl, 4, axis=0)[::3]  # (edge_num, 2, 4)
    outline = np.einsum("sc,eic->esi", BEZIER_BASIS, segments).reshape(-1, 2)
    return outline, ctrl


def inside_corners(poly, x0, y0, width, height):
    """Even-odd inside test of a closed polygon at the integer points x0..x0+width-1,
    y0..y0+height-1 (canvas coordinates; pixel (r, c) spans [c, c+1] x [r, r+1]).

    Exact for the polygon and vectorised: the outline's crossings with each row, sorted, are
    the boundaries of alternating outside/inside runs, expanded with one `np.repeat`.
    Returns uint8 (height, width), 255 = inside."""
    a, b = poly, np.concatenate([poly[1:], poly[:1]])
    lo, hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    first = np.ceil(lo).astype(np.int64)  # rows y with lo <= y < hi cross the edge
    count = np.maximum(np.ceil(hi).astype(np.int64) - first, 0)
    edge = np.repeat(np.arange(len(a)), count)
    rows = first[edge] + (np.arange(len(edge)) - np.repeat(np.cumsum(count) - count, count))
    frac = (rows - a[edge, 1]) / (b[edge, 1] - a[edge, 1])
    xs = a[edge, 0] + frac * (b[edge, 0] - a[edge, 0])
    # a crossing at x flips every point of its row with column >= ceil(x); each row has an
    # even number of crossings, so runs alternate across the flattened (height, width+1) grid
    cols = np.clip(np.ceil(xs).astype(np.int64) - x0, 0, width)
    stops = np.sort((rows - y0) * (width + 1) + cols)
    runs = np.diff(stops, prepend=0, append=height * (width + 1))
    values = (np.arange(len(runs)) & 1).astype(np.uint8) * np.uint8(255)
    return np.repeat(values, runs).reshape(height, width + 1)[:, :width]


def offset_outline(poly, distance):
    """Move each vertex of a dense closed outline `distance` outwards along its normal: the
    filled shape plus a stroke of width 2*distance (exact wherever the curvature radius
    exceeds `distance`)."""
    nxt, prev = np.concatenate([poly[1:], poly[:1]]), np.concatenate([poly[-1:], poly[:-1]])
    tangent = nxt - prev
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], 1)
    normal /= np.maximum(np.hypot(normal[:, :1], normal[:, 1:]), 1e-12)
    signed_area = np.sum(poly[:, 0] * nxt[:, 1] - nxt[:, 0] * poly[:, 1])
    return poly + np.sign(signed_area) * distance * normal


def random_region(height, width, draws):
    """A random blob cropped to its extent, as the original draws it into a (height, width)
    box. Returns uint8 (h, w), 255 = hole."""
    edge_num = draws.randint(6, 8)
    ratio = draws.randint(6, 8) / 10
    outline, ctrl = bezier_outline(edge_num, ratio, draws)
    lo, hi = LIMIT_PAD * ctrl.min(), LIMIT_PAD * ctrl.max()
    scale = np.array([AXES_X[1] - AXES_X[0], -(AXES_Y[1] - AXES_Y[0])]) * (CANVAS_W, CANVAS_H) / (hi - lo)
    origin = np.array([AXES_X[0] * CANVAS_W, (1 - AXES_Y[0]) * CANVAS_H])  # canvas rows go down
    poly = offset_outline(origin + (outline - lo) * scale, STROKE_HALF_WIDTH)
    # canvas pixels covered completely (all four corners inside), with a zero margin
    c0, r0 = np.floor(poly.min(0)).astype(int) - 1
    c1, r1 = np.ceil(poly.max(0)).astype(int) + 2
    corners = inside_corners(poly, c0, r0, c1 - c0, r1 - r0)
    full = corners[:-1, :-1] & corners[1:, :-1] & corners[:-1, 1:] & corners[1:, 1:]
    # the canvas -> box bilinear resize, done on this window only: same scale, and the
    # sub-pixel phase it shifts is as random as the blob's place on the canvas
    fx, fy = width / CANVAS_W, height / CANVAS_H
    if round(full.shape[1] * fx) < 1 or round(full.shape[0] * fy) < 1:  # frames a few pixels small
        return np.full((1, 1), 255, np.uint8)
    box = cv2.resize(full, (0, 0), fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR)
    hole = (box == 255).view(np.uint8) * np.uint8(255)  # stayed fully set: 255, else 0
    x, y, w, h = cv2.boundingRect(hole)
    return hole[y:y + h, x:x + w]


def random_track(video_length, height, width, region_hw, draws):
    """Top-left (row, col) of the region in each frame, (video_length, 2) int64, and whether the
    clip is still. A moving region drifts with a randomly accelerating velocity, redrawn when it
    would leave the frame; its position is clipped so it always stays fully inside."""
    max_r, max_c = height - region_hw[0], width - region_hw[1]
    r, c = draws.randint(0, max_r), draws.randint(0, max_c)
    track = np.empty((video_length, 2), np.int64)
    track[:] = r, c
    if draws.coin() > 0.5:
        return track, True
    speed = draws.uniform(MAX_SPEED, 1.0)  # the original's uniform(3): low=3, high=1 -> (1, 3]
    angle = draws.uniform(0, 2 * np.pi)
    for i in range(1, video_length):
        r += int(speed * math.cos(angle))
        c += int(speed * math.sin(angle))
        speed += draws.normal(ACCELERATION[0] / 2)
        angle += draws.normal(ACCELERATION[1] / 2)
        if not (0 <= r <= max_r and 0 <= c <= max_c):
            speed = abs(draws.normal(MAX_SPEED / 2))
            angle = draws.uniform(0, 2 * np.pi)
        r, c = min(max(r, 0), max_r), min(max(c, 0), max_c)
        track[i] = r, c
    return track, False


def random_clip(video_length, height, width, draws):
    """One clip's random blob and motion: (region uint8 (h, w) with 255 = hole, track
    (video_length, 2) top-left positions, still flag), drawing in the original's order."""
    box_h = draws.randint(height // 3, height - 1)
    box_w = draws.randint(width // 3, width - 1)
    region = random_region(box_h, box_w, draws)
    track, still = random_track(video_length, height, width, region.shape, draws)
    return region, track, still


def place_region(region, track, height, width):
    """Paste `region` once into a zero canvas from which every frame is a window.

    Returns (canvas uint8, window offsets (video_length,) into canvas.ravel()). Frame i is
    `canvas[a:a+height, b:b+width]` with a, b = divmod(offset, canvas width): the region sits
    at track[i] in it. The canvas has one spare row so each window spans `height` full strides
    (what PIL's zero-copy `frombuffer` maps)."""
    (r_lo, c_lo), (r_hi, c_hi) = track.min(0), track.max(0)
    canvas = np.zeros((height + r_hi - r_lo + 1, width + c_hi - c_lo), np.uint8)
    h, w = region.shape
    canvas[r_hi:r_hi + h, c_hi:c_hi + w] = region
    offsets = (r_hi - track[:, 0]) * canvas.shape[1] + (c_hi - track[:, 1])
    return canvas, offsets


def random_mask_frames(video_length, imageHeight=240, imageWidth=432, rng=None):
    """The generator's masks as a list of `video_length` read-only uint8 (H, W) views, 255 = hole.

    No full-size copies: a still clip repeats one array, a moving clip's frames are windows of
    one padded canvas (see `place_region`). `rng`: None (global `random` / `numpy.random`, like
    the original), a `numpy.random.Generator`, or an int seed."""
    region, track, still = random_clip(video_length, imageHeight, imageWidth, as_draws(rng))
    canvas, offsets = place_region(region, track[:1] if still else track, imageHeight, imageWidth)
    canvas.flags.writeable = False
    cw = canvas.shape[1]
    frames = [canvas[o // cw:o // cw + imageHeight, o % cw:o % cw + imageWidth] for o in offsets]
    return frames * video_length if still else frames


def random_shape_masks(video_length, imageHeight=240, imageWidth=432, rng=None):
    """The generator's masks as one uint8 array (video_length, H, W), 255 = hole; a still clip is
    a read-only broadcast of one frame. `rng` as in `random_mask_frames`."""
    frames = random_mask_frames(video_length, imageHeight, imageWidth, rng)
    if all(f is frames[0] for f in frames):
        return np.broadcast_to(frames[0], (video_length, imageHeight, imageWidth))
    return np.stack(frames)


def create_random_shape_with_random_motion(video_length, imageHeight=240, imageWidth=432, rng=None):
    """`video_length` PIL images (mode L, 255 = hole, 0 = kept) of one random blob, still with
    probability 0.5 (then one image object repeated, as in the original) else moving.

    Same signature, output and distribution as the original; `rng` is an optional extra (see
    `random_mask_frames`). The images are read-only maps of one shared canvas (PIL copies on
    the first write), which is what makes a call cheap."""
    draws = as_draws(rng)
    region, track, still = random_clip(video_length, imageHeight, imageWidth, draws)
    canvas, offsets = place_region(region, track[:1] if still else track, imageHeight, imageWidth)
    buffer = memoryview(canvas.reshape(-1))
    images = [Image.frombuffer("L", (imageWidth, imageHeight), buffer[o:], "raw", "L", canvas.shape[1], 1)
              for o in offsets]
    return images * video_length if still else images
