"""Random free-form video masks: one smooth blob per clip, still or drifting.

`create_random_shape_with_random_motion` has the original DiffuEraser signature and output (a
list of `video_length` PIL images, mode `L`, 255 = hole, 0 = kept) and the same distribution
(checked against `shared/reference/mask_stats.json` in tests/test_masks.py), without matplotlib.
`random_shape_masks` is the same generator returning one uint8 array (F, H, W), which the
training dataset uses to skip the PIL round trip.

How the distribution is reproduced. The original draws the blob with matplotlib's defaults: a
640x480 canvas, one subplot covering [0.125, 0.9] x [0.11, 0.88] of it, both axis limits set to
1.1 x (min, max) of all control-point coordinates, an anti-aliased black fill; it then resizes
the canvas to the region box (bilinear), keeps the pixels that stayed exactly black and crops
to their extent. We place the Bezier outline at the same canvas coordinates, keep the canvas
pixels the outline covers completely (all four corners inside), resize that with the same
bilinear filter, keep what stayed fully set and crop. Only this exact rasterisation detail
differs; it moves the hole area by well under 1 %.
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

    def uniform(self, low, high):
        return float(self.rng.uniform(low, high))

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


def bezier_outline(edge_num, ratio, draws):
    """Closed outline of `edge_num` cubic Bezier segments through 3*edge_num+1 control points
    on the unit circle (equal angles, first = last) with radii in [1-ratio, 1+ratio).

    Returns (outline (N, 2) float64 in (x, y) data units, control points (3*edge_num+1, 2))."""
    n = 3 * edge_num + 1
    angles = np.linspace(0, 2 * np.pi, n)
    radii = 1 - ratio + 2 * ratio * draws.unit(n)
    ctrl = np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
    ctrl[-1] = ctrl[0]
    t = np.linspace(0, 1, SAMPLES_PER_SEGMENT, endpoint=False)[:, None]
    basis = np.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], 1)  # (S, 4)
    segments = np.stack([ctrl[3 * k:3 * k + 4] for k in range(edge_num)])  # (edge_num, 4, 2)
    outline = np.einsum("sc,eci->esi", basis, segments).reshape(-1, 2)
    return outline, ctrl


def inside_corners(poly, x0, y0, width, height):
    """Even-odd inside test of a closed polygon at the integer points x0..x0+width-1,
    y0..y0+height-1 (canvas coordinates; pixel (r, c) spans [c, c+1] x [r, r+1]).

    Scanline crossings plus a running sum: exact for the polygon, vectorised. Returns bool
    (height, width)."""
    a, b = poly, np.roll(poly, -1, axis=0)
    lo, hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    first = np.ceil(lo).astype(np.int64)  # rows with lo <= y < hi cross the edge
    last = np.ceil(hi).astype(np.int64) - 1
    count = np.maximum(last - first + 1, 0)
    edge = np.repeat(np.arange(len(a)), count)
    rows = first[edge] + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    ta = (rows - a[edge, 1]) / (b[edge, 1] - a[edge, 1])
    xs = a[edge, 0] + ta * (b[edge, 0] - a[edge, 0])
    # a crossing at x toggles every point with integer column >= ceil(x)
    cols = np.clip(np.ceil(xs).astype(np.int64) - x0, 0, width)
    toggles = np.zeros((height, width + 1), np.int32)
    np.add.at(toggles, (rows - y0, cols), 1)
    return (np.cumsum(toggles[:, :width], axis=1) & 1).astype(bool)


def offset_outline(poly, distance):
    """Move each vertex of a dense closed outline `distance` outwards along its normal: the
    filled shape plus a stroke of width 2*distance (exact wherever the curvature radius
    exceeds `distance`)."""
    if distance == 0:
        return poly
    tangent = np.roll(poly, -1, axis=0) - np.roll(poly, 1, axis=0)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], 1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    x, y = poly[:, 0], poly[:, 1]
    signed_area = 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
    return poly + np.sign(signed_area) * distance * normal


def random_region(height, width, draws):
    """A random blob cropped to its extent, as the original draws it into a (height, width)
    box. Returns uint8 (h, w), 255 = hole."""
    edge_num = draws.randint(6, 8)
    ratio = draws.randint(6, 8) / 10
    outline, ctrl = bezier_outline(edge_num, ratio, draws)
    lo, hi = LIMIT_PAD * ctrl.min(), LIMIT_PAD * ctrl.max()
    ax_w = (AXES_X[1] - AXES_X[0]) * CANVAS_W
    ax_h = (AXES_Y[1] - AXES_Y[0]) * CANVAS_H
    px = AXES_X[0] * CANVAS_W + (outline[:, 0] - lo) / (hi - lo) * ax_w
    py = CANVAS_H - (AXES_Y[0] * CANVAS_H + (outline[:, 1] - lo) / (hi - lo) * ax_h)  # rows go down
    poly = offset_outline(np.stack([px, py], 1), STROKE_HALF_WIDTH)
    # canvas pixels covered completely: all four corners inside the outline
    c0, r0 = np.floor(poly.min(0)).astype(int)
    c1, r1 = np.ceil(poly.max(0)).astype(int)
    corners = inside_corners(poly, c0, r0, c1 - c0 + 1, r1 - r0 + 1)
    full = corners[:-1, :-1] & corners[1:, :-1] & corners[:-1, 1:] & corners[1:, 1:]
    canvas = np.zeros((CANVAS_H, CANVAS_W), np.uint8)
    canvas[r0:r1, c0:c1] = full * np.uint8(255)
    box = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)
    hole = np.where(box == 255, np.uint8(255), np.uint8(0))
    x, y, w, h = cv2.boundingRect(hole)
    return hole[y:y + h, x:x + w]


def random_track(video_length, height, width, region_hw, draws):
    """Top-left (row, col) of the region in each frame: (video_length, 2) int, or None for a
    still clip. Moving clips drift with a randomly accelerating velocity, redrawn when the
    region would leave the frame; the region is clipped to stay fully inside."""
    max_r, max_c = height - region_hw[0], width - region_hw[1]
    r, c = draws.randint(0, max_r), draws.randint(0, max_c)
    if draws.coin() > 0.5:
        return r, c, None
    speed = draws.uniform(MAX_SPEED, 1.0)  # the original's uniform(3): low=3, high=1 -> (1, 3]
    angle = draws.uniform(0, 2 * np.pi)
    track = np.empty((video_length, 2), np.int64)
    track[0] = r, c
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
    return r, c, track


def random_shape_masks(video_length, imageHeight=240, imageWidth=432, rng=None):
    """Masks of one random blob, still or moving: uint8 (video_length, H, W), 255 = hole.

    A still clip is returned as a read-only broadcast view of one frame (no copy); moving
    clips are a fresh array. `rng`: None (global `random` / `numpy.random`, like the
    original), a `numpy.random.Generator`, or an int seed."""
    draws = as_draws(rng)
    box_h = draws.randint(imageHeight // 3, imageHeight - 1)
    box_w = draws.randint(imageWidth // 3, imageWidth - 1)
    region = random_region(box_h, box_w, draws)
    h, w = region.shape
    r, c, track = random_track(video_length, imageHeight, imageWidth, (h, w), draws)
    if track is None:
        frame = np.zeros((imageHeight, imageWidth), np.uint8)
        frame[r:r + h, c:c + w] = region
        return np.broadcast_to(frame, (video_length, imageHeight, imageWidth))
    masks = np.zeros((video_length, imageHeight, imageWidth), np.uint8)
    for frame, (r, c) in zip(masks, track):
        frame[r:r + h, c:c + w] = region
    return masks


def create_random_shape_with_random_motion(video_length, imageHeight=240, imageWidth=432, rng=None):
    """`video_length` PIL images (mode L, 255 = hole, 0 = kept) of one random blob, still with
    probability 0.5 (then the same image object repeated, as in the original) else moving.

    Same signature and output as the original; `rng` is an optional extra (see
    `random_shape_masks`)."""
    masks = random_shape_masks(video_length, imageHeight, imageWidth, rng)
    if masks.strides[0] == 0:
        return [Image.fromarray(np.ascontiguousarray(masks[0]))] * video_length
    return [Image.fromarray(m) for m in masks]
