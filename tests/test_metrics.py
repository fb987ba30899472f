"""Evaluation metrics against ../shared/reference/metrics/ (ProPainter's evaluation, the one
published video-inpainting tables use), with the tolerances its README states."""
import json
import math

import numpy as np
import pytest
import torch

from diffueraser import metrics as M


@pytest.fixture(scope="module")
def ref(reference):
    return reference / "metrics"


@pytest.fixture(scope="module")
def psnr_ssim_cases(ref):
    return json.loads((ref / "psnr_ssim.json").read_text())["cases"]


@pytest.fixture(scope="module")
def frames(ref):
    return dict(np.load(ref / "psnr_ssim_frames.npz"))


@pytest.fixture(scope="module")
def manifest(ref):
    return json.loads((ref / "i3d_manifest.json").read_text())


@pytest.fixture(scope="module")
def i3d_ref(ref):
    return dict(np.load(ref / "i3d_features.npz"))


@pytest.fixture(scope="module")
def i3d():
    return M.fill_i3d_by_rule(M.InceptionI3d())


@pytest.fixture(scope="module")
def activations(i3d, i3d_ref):
    """Our (3, 1024) activations per mode ('eval', 'train') and side ('real', 'fake')."""
    return {(mode, side): np.stack([M.i3d_activations(i3d, i3d_ref[f"video_{side}_{i}"],
                                                      batch_stats=mode == "train") for i in range(3)])
            for mode in ("eval", "train") for side in ("real", "fake")}


def test_psnr_ssim_match_reference(psnr_ssim_cases, frames):
    for case in psnr_ssim_cases:
        gt, pred = frames[case["img1"]], frames[case["img2"]]
        want_psnr = float(case["calculate_psnr_float64_inputs"])  # the evaluation's float64 path
        got_psnr = M.psnr(gt, pred)
        if math.isinf(want_psnr):
            assert got_psnr == math.inf, case["case"]
        else:
            assert abs(got_psnr - want_psnr) <= 1e-4, case["case"]
        expected = case["calc_psnr_and_ssim"]
        if "raises" in expected:
            with pytest.raises(ValueError, match=f"{gt.shape[0]} x {gt.shape[1]}"):
                M.ssim(gt, pred)
        else:
            assert abs(M.ssim(gt, pred) - expected["ssim"]) <= 1e-6, case["case"]


def test_masked_psnr_and_ssim(frames):
    gt, pred = frames["A_240x432"], frames["A_240x432_hole_filled"]
    hole = frames["hole_mask_240x432"].astype(bool)
    mse = np.mean((gt.astype(np.float64) - pred) ** 2)  # all of it inside the hole
    assert M.masked_psnr(gt, pred, hole) == pytest.approx(20 * math.log10(255 / math.sqrt(mse / hole.mean())))
    assert M.masked_psnr(gt, pred, ~hole) == math.inf
    assert math.isnan(M.masked_psnr(gt, pred, np.zeros_like(hole)))
    everywhere = np.ones_like(hole)
    assert M.masked_ssim(gt, pred, everywhere) == pytest.approx(M.ssim(gt, pred), abs=1e-12)
    assert M.masked_ssim(gt, pred, hole) < M.ssim(gt, pred) < M.masked_ssim(gt, pred, ~hole) < 1
    border = np.zeros_like(hole)
    border[:32] = True  # no window of the whole-frame SSIM is centred there
    assert math.isnan(M.masked_ssim(gt, pred, border))
    with pytest.raises(ValueError, match="hole must be"):
        M.masked_psnr(gt, pred, hole[:10])


def test_i3d_state_dict_matches_manifest(i3d, manifest):
    state = i3d.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == \
        [(e["key"], e["shape"]) for e in manifest["state_dict"]]
    params = dict(i3d.named_parameters())
    assert [e["key"] for e in manifest["state_dict"] if e["kind"] == "parameter"] == list(params)
    assert sum(p.numel() for p in params.values()) == manifest["param_count"]
    bns = [m for m in i3d.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 57 and {(m.eps, m.momentum) for m in bns} == {(0.001, 0.01)}


def test_i3d_rule_fill_matches_manifest_checksums(i3d, manifest):
    state = i3d.state_dict()
    for entry in manifest["state_dict"]:
        tensor = state[entry["key"]]
        if "fill_sha256_float32_le" not in entry:  # num_batches_tracked: left at 0
            assert tensor.item() == 0, entry["key"]
            continue
        assert M.tensor_sha256(tensor) == entry["fill_sha256_float32_le"], entry["key"]
        assert tensor.double().sum().item() == pytest.approx(entry["fill_sum_float64"], rel=1e-12, abs=1e-12)
        assert tensor.flatten()[:4].tolist() == entry["fill_first4"], entry["key"]


def test_load_i3d_is_strict(i3d, tmp_path):
    path = tmp_path / "i3d.pt"
    state = {k: v for k, v in i3d.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)  # old checkpoints have no num_batches_tracked: still loads
    loaded = M.load_i3d(str(path))
    assert all(torch.equal(v, i3d.state_dict()[k]) for k, v in loaded.state_dict().items())
    broken = dict(state)
    del broken["Mixed_4d.b1b.bn.running_var"]
    torch.save(broken, path)
    with pytest.raises(SystemExit, match="missing Mixed_4d.b1b.bn.running_var"):
        M.load_i3d(str(path))
    broken = dict(state, **{"Conv3d_2b_1x1.conv3d.weight": torch.zeros(64, 64, 1, 1, 3)})
    torch.save(broken, path)
    with pytest.raises(SystemExit, match=r"Conv3d_2b_1x1.conv3d.weight"):
        M.load_i3d(str(path))
    with pytest.raises(SystemExit, match=r"nowhere.pt: I3D weights .* not found"):
        M.load_i3d(str(tmp_path / "nowhere.pt"))
    path.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="i3d.pt: not a readable state dict"):
        M.load_i3d(str(path))


def test_i3d_input_is_the_reference_tensor(i3d_ref):
    for side in ("real", "fake"):
        want = torch.from_numpy(i3d_ref[f"input_{side}_0"]).transpose(1, 2)  # (1, 3, T, H, W)
        assert torch.equal(M.frames_to_i3d_input(i3d_ref[f"video_{side}_0"]), want)
        as_float = i3d_ref[f"input_{side}_0"][0].transpose(0, 2, 3, 1)  # (T, H, W, 3) in [0, 1]
        assert torch.equal(M.frames_to_i3d_input(as_float), want)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        M.frames_to_i3d_input(i3d_ref["video_real_0"].astype(np.float32))


def test_i3d_activations_eval_mode(activations, i3d_ref):
    for side in ("real", "fake"):
        assert np.abs(activations["eval", side] - i3d_ref[f"act_eval_{side}"]).max() <= 1e-4


def test_i3d_activations_batch_statistics(activations, i3d_ref):
    for side in ("real", "fake"):
        diff = np.abs(activations["train", side] - i3d_ref[f"act_train_{side}"])
        assert diff.max() <= 2e-2 and diff.mean() <= 3e-4, side


def test_batch_stats_leave_the_model_unchanged(i3d, i3d_ref):
    before = {k: v.clone() for k, v in i3d.state_dict().items()}
    i3d.eval()
    acts = M.i3d_activations(i3d, i3d_ref["video_real_1"], batch_stats=True)
    assert acts.shape == (1024,) and acts.dtype == np.float32
    assert not i3d.training
    assert all(torch.equal(v, before[k]) for k, v in i3d.state_dict().items())
    again = M.i3d_activations(i3d, i3d_ref["video_real_1"], batch_stats=True)
    assert np.array_equal(acts, again)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_vfid_matches_reference(mode, activations, i3d_ref):
    want = float(i3d_ref[f"vfid_{mode}"])
    stored = M.vfid(i3d_ref[f"act_{mode}_real"], i3d_ref[f"act_{mode}_fake"])
    assert stored == pytest.approx(want, rel=1e-5)
    ours = M.vfid(activations[mode, "real"], activations[mode, "fake"])
    assert ours == pytest.approx(want, rel=3e-4)


def test_vfid_of_one_video_is_nan(i3d_ref):
    with pytest.warns(UserWarning, match="at least 2 videos"):
        assert math.isnan(M.vfid(i3d_ref["act_eval_real"][:1], i3d_ref["act_eval_fake"][:1]))


def test_lpips_from_local_alexnet_weights(tmp_path, frames):
    import torchvision

    assert M.lpips_available(None)[0] is False
    available, note = M.lpips_available(str(tmp_path / "alexnet.pth"))
    assert not available and "alexnet.pth not found" in note
    torch.manual_seed(0)
    backbone = torchvision.models.alexnet(weights=None)  # stands in for the ImageNet weights
    path = tmp_path / "alexnet.pth"
    features = {k: v for k, v in backbone.state_dict().items() if k.startswith("features.")}
    torch.save(features, path)  # the classifier's tensors are not needed (and ignored when there)
    assert M.lpips_available(str(path)) == (True, "")
    model = M.load_lpips(str(path))
    assert torch.equal(getattr(model.net.slice5, "10").weight, backbone.features[10].weight)
    gt = frames["S_72x104"]
    assert M.lpips_distance(model, gt, gt) == 0
    near = M.lpips_distance(model, gt, frames["S_72x104_avg_float32"])
    assert 0 < near < M.lpips_distance(model, gt, frames["S_72x104_noise_sigma10"])
    del features["features.3.weight"]
    torch.save(features, path)
    with pytest.raises(SystemExit, match="missing features.3.weight"):
        M.load_lpips(str(path))
