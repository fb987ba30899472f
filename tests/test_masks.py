"""create_random_shape_with_random_motion: output format and distribution versus the original's
measured statistics (shared/reference/mask_stats.json, 1000 clips per size).

Tolerances. Each statistic is compared at the original's sizes (the statistics are fractions
of the frame, so a smaller frame would change them) from N clips of ours. Its standard error
is estimated by a clip-level bootstrap of our sample (B resamples; clips, not frames, are the
independent units: frames and steps within a clip are correlated), the reference's error from
that scaled to its 1000 clips, and the test allows Z = 4 combined standard errors: with 44
statistics a correct generator fails one about once in 400 seeds (Bonferroni), while a wrong
distribution (no acceleration, a smaller box, other blob radii, another still probability)
lies many errors away; test_tolerances_are_tight_enough_to_fail checks that margin. Finer
details, e.g. whether velocity is redrawn at the frame border, are below this resolution. The
seeds are fixed, so the run is reproducible.
"""
import json
import random

import numpy as np
import pytest
from PIL import Image

from dataset.utils import create_random_shape_with_random_motion, random_mask_frames, random_shape_masks

Z = 4.0
BOOTSTRAP = 300
CLIPS = {(480, 854): 800, (720, 1280): 500}  # a few seconds each at the real sizes


def clip_record(images, height, width):
    """Per-clip measurements from the PIL images of one call. The hole moves rigidly (its area
    and box size are checked constant), so the centroid step equals the box's step."""
    still = all(im is images[0] for im in images)
    boxes = [im.getbbox() for im in (images[:1] if still else images)]
    areas = {im.histogram()[255] for im in (images[:1] if still else images)}
    left, top, right, bottom = boxes[0]
    area = areas.pop() if len(areas) == 1 else np.nan
    corners = np.array([box[:2] for box in boxes] if not still else [box[:2] for box in boxes] * len(images), float)
    steps = np.sqrt((np.diff(corners, axis=0) ** 2).sum(1))
    rigid = not areas and len({(b[2] - b[0], b[3] - b[1]) for b in boxes}) == 1
    return dict(area=area / (height * width), bbox_h=(bottom - top) / height, bbox_w=(right - left) / width,
                fill=area / ((right - left) * (bottom - top)), still=still, steps=steps, rigid=rigid)


@pytest.fixture(scope="module", params=[0, 1], ids=["480x854x10", "720x1280x22"])
def measured(request, reference):
    """(reference entry, clip records as arrays) for one of the reference sizes."""
    ref = json.loads((reference / "mask_stats.json").read_text())["sizes"][request.param]
    (height, width), length = ref["image_hw"], ref["video_length"]
    random.seed(1000 + request.param)
    np.random.seed(1000 + request.param)
    records = [clip_record(create_random_shape_with_random_motion(length, height, width), height, width)
               for _ in range(CLIPS[(height, width)])]
    arrays = {key: np.array([r[key] for r in records]) for key in records[0]}
    return ref, arrays


def statistics(clips, idx):
    """Name -> value over the clips `idx`, named as in mask_stats.json (`key.field`)."""
    out = {}
    for key, ref_key in [("area", "hole_area_fraction_per_clip"), ("bbox_h", "bbox_height_fraction"),
                         ("bbox_w", "bbox_width_fraction"), ("fill", "fill_ratio_area_over_bbox")]:
        values = clips[key][idx]
        out[f"{ref_key}.mean"] = values.mean()
        for q in (5, 25, 50, 75, 95) if key == "area" else (5, 50, 95):
            out[f"{ref_key}.p{q}"] = np.percentile(values, q)
    steps = clips["steps"][idx][~clips["still"][idx]]  # (moving clips, F-1)
    out["centroid_step_displacement_px.mean"] = steps.mean()
    out["centroid_step_displacement_px.p95"] = np.percentile(steps, 95)
    out["zero_displacement_step_fraction"] = (steps == 0).mean()
    out["mean_displacement_by_step_index.last"] = steps[:, -1].mean()
    return out


def reference_value(ref, name):
    key, _, field = name.partition(".")
    if field == "last":
        return ref[key][-1]
    return ref[key][field] if field else ref[key]


@pytest.fixture(scope="module")
def compared(measured):
    """name -> (ours, original, tolerance): Z combined bootstrap standard errors."""
    ref, clips = measured
    n = len(clips["area"])
    ours = statistics(clips, np.arange(n))
    rng = np.random.default_rng(0)
    boot = [statistics(clips, rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]
    out = {}
    for name, value in ours.items():
        se_ours = np.std([b[name] for b in boot])
        se_ref = se_ours * np.sqrt(n / ref["clips"])  # same spread, the reference's 1000 clips
        out[name] = (value, reference_value(ref, name), Z * np.hypot(se_ours, se_ref))
    return out


def test_statistics_match_the_original(compared):
    failures = [f"{name}: ours {value:.4f}, original {expected:.4f}, tolerance {tol:.4f}"
                for name, (value, expected, tol) in compared.items() if abs(value - expected) > tol]
    assert not failures, "\n".join(failures)


def test_tolerances_are_tight_enough_to_fail(compared):
    """The tolerances reject plainly wrong generators: a blob 20 % smaller in area, a much
    fuller shape (fill ratio 0.75, an ellipse's is 0.785), motion without acceleration (mean
    step about 1.6 px)."""
    _, area_ref, area_tol = compared["hole_area_fraction_per_clip.mean"]
    assert area_tol < 0.2 * area_ref
    _, fill_ref, fill_tol = compared["fill_ratio_area_over_bbox.mean"]
    assert fill_tol < 0.75 - fill_ref
    _, step_ref, step_tol = compared["centroid_step_displacement_px.mean"]
    assert step_tol < step_ref - 1.6


def test_every_clip_keeps_its_area_and_stays_inside(measured):
    _, clips = measured
    assert clips["rigid"].all()


def test_still_fraction(reference):
    """Still with probability 0.5. The coin does not depend on the frame size, so it is counted
    over many cheap calls: 3000 clips give a tolerance of 0.073 (Z binomial errors of ours and
    the original's 1000), which rejects 0.4 or 0.6."""
    ref = json.loads((reference / "mask_stats.json").read_text())["sizes"][0]
    (height, width), length = ref["image_hw"], ref["video_length"]
    random.seed(2000)
    np.random.seed(2000)
    n = 3000
    still = np.mean([f[0] is f[1] for f in (random_mask_frames(length, height, width) for _ in range(n))])
    tol = Z * np.sqrt(0.25 / n + 0.25 / ref["clips"])
    assert tol < 0.1
    assert abs(still - ref["stationary_branch_fraction"]) < tol


@pytest.mark.parametrize("length,height,width", [(10, 480, 854), (22, 720, 1280), (5, 240, 432)])
def test_output_format(length, height, width):
    random.seed(3)
    np.random.seed(3)
    kinds = set()
    for _ in range(12):
        images = create_random_shape_with_random_motion(length, height, width)
        assert isinstance(images, list) and len(images) == length
        for im in images:
            assert isinstance(im, Image.Image) and im.mode == "L" and im.size == (width, height)
        values = {v for im in images for v, count in enumerate(im.histogram()) if count}
        assert values == {0, 255}
        still = all(im is images[0] for im in images)
        kinds.add(still)
        if not still:  # a moving clip: distinct image objects that move
            assert len({id(im) for im in images}) == length
    assert kinds == {True, False}


def test_default_size_and_writable_copies():
    images = create_random_shape_with_random_motion(3)
    assert images[0].size == (432, 240)
    im = images[0].copy()
    im.putpixel((0, 0), 255)  # the returned images are read-only maps; copies are ordinary images
    assert im.getpixel((0, 0)) == 255


def test_global_seeding_reproduces_like_the_original():
    def run():
        random.seed(7)
        np.random.seed(7)
        return [np.stack([np.asarray(im) for im in create_random_shape_with_random_motion(6, 120, 200)])
                for _ in range(4)]

    a, b = run(), run()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(a[0], x) for x in a[1:])


def test_rng_argument_and_array_path_agree():
    a = random_shape_masks(8, 100, 180, rng=np.random.default_rng(5))
    images = create_random_shape_with_random_motion(8, 100, 180, rng=np.random.default_rng(5))
    b = np.stack([np.asarray(im) for im in images])
    c = random_shape_masks(8, 100, 180, rng=np.random.default_rng(6))
    assert a.shape == (8, 100, 180) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
