"""Evaluation metrics: PSNR and SSIM per frame (whole frame and inside the hole), I3D activations
and VFID per test set, in the conventions of the standard video-inpainting evaluation
(ProPainter's, the one published tables use; facts in ../shared/reference/README.md, "metrics/").

Frames are (H, W, 3) RGB arrays, uint8 or float in [0, 255]; holes are (H, W) bool, True = hole.
"""
import hashlib
import math
import os
import warnings
from contextlib import contextmanager

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter
from torch import nn

SSIM_WIN = 65  # uniform window of the standard evaluation (not the Gaussian 11 x 11 of the SSIM paper)
SSIM_K1, SSIM_K2, DATA_RANGE = 0.01, 0.03, 255.0


def _as_float64(gt, pred):
    gt, pred = np.asarray(gt, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if gt.shape != pred.shape or gt.ndim != 3 or gt.shape[2] != 3:
        raise ValueError(f"frames must both be (H, W, 3); got {gt.shape} and {pred.shape}")
    return gt, pred


def _psnr_from_mse(mse):
    return math.inf if mse == 0 else 20 * math.log10(DATA_RANGE / math.sqrt(mse))


def psnr(gt, pred):
    """PSNR in dB of two (H, W, 3) frames: one MSE over all H*W*3 values (RGB, no Y channel, no
    crop), computed in float64 (uint8 inputs never wrap); inf for identical frames."""
    gt, pred = _as_float64(gt, pred)
    return _psnr_from_mse(float(np.mean((gt - pred) ** 2)))


def _check_hole(hole, shape):
    hole = np.asarray(hole, dtype=bool)
    if hole.shape != shape[:2]:
        raise ValueError(f"hole must be (H, W) = {shape[:2]}; got {hole.shape}")
    return hole


def masked_psnr(gt, pred, hole):
    """PSNR in dB over the hole only: the MSE is taken over the 3 values of every hole pixel
    (hole (H, W) bool, True = hole). inf when the hole is reproduced exactly, nan for an empty hole."""
    gt, pred = _as_float64(gt, pred)
    hole = _check_hole(hole, gt.shape)
    if not hole.any():
        return math.nan
    return _psnr_from_mse(float(np.mean((gt[hole] - pred[hole]) ** 2)))


def _ssim_map_channel(x, y):
    """SSIM map of one channel (float64 (H, W)) at the window centres whose 65 x 65 window lies
    inside the frame: (H - 64, W - 64)."""
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    n = SSIM_WIN * SSIM_WIN
    r = SSIM_WIN // 2
    inner = (slice(r, x.shape[0] - r), slice(r, x.shape[1] - r))

    def box_mean(a):  # the border mode is irrelevant: only windows fully inside are kept
        return uniform_filter(a, size=SSIM_WIN)[inner]

    ux, uy = box_mean(x), box_mean(y)
    sample = n / (n - 1)  # sample (not population) covariances, as the standard evaluation uses
    vx = sample * (box_mean(x * x) - ux * ux)
    vy = sample * (box_mean(y * y) - uy * uy)
    vxy = sample * (box_mean(x * y) - ux * uy)
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim_map(gt, pred):
    """Mean over the RGB channels of the per-channel SSIM map (uniform 65 x 65 window, K1 0.01,
    K2 0.03, data range 255, sample covariances), float64 (H - 64, W - 64): entry (i, j) belongs to
    the pixel (i + 32, j + 32), the centre of a window lying inside the frame."""
    gt, pred = _as_float64(gt, pred)
    if min(gt.shape[:2]) < SSIM_WIN:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WIN} x {SSIM_WIN} pixels; got "
                         f"{gt.shape[0]} x {gt.shape[1]}")
    return np.mean([_ssim_map_channel(gt[..., c], pred[..., c]) for c in range(3)], axis=0)


def ssim(gt, pred):
    """SSIM of two (H, W, 3) frames as the standard evaluation computes it: per RGB channel the
    mean of the SSIM map over the positions whose window lies inside the frame (a 32-pixel border
    is dropped), then the plain mean of the 3 channels. ValueError for frames under 65 px."""
    return float(ssim_map(gt, pred).mean())


def masked_ssim(gt, pred, hole):
    """SSIM inside the hole: the channel-averaged SSIM map (see `ssim_map`) averaged over the hole
    pixels that are window centres of the whole-frame SSIM, i.e. at least 32 px from every border
    (each such value still looks at the 65 x 65 neighbourhood, hole edge included). nan when no
    hole pixel lies there."""
    return hole_mean(ssim_map(gt, pred), _check_hole(hole, np.shape(gt)))


def hole_mean(values, hole):
    """Mean of an `ssim_map` over the hole pixels it covers (see `masked_ssim`); nan if none."""
    r, hole = SSIM_WIN // 2, np.asarray(hole, dtype=bool)
    inside = hole[r:hole.shape[0] - r, r:hole.shape[1] - r]
    return float(values[inside].mean()) if inside.any() else math.nan


# ---------------------------------------------------------------------------------------------
# I3D (Inception-v1 inflated to 3D), the layout of i3d_rgb_imagenet.pt. Only the features up to
# Mixed_5c are used by VFID; the 400-way `logits` layer exists so that the checkpoint loads strictly.

BN_EPS, BN_MOMENTUM = 0.001, 0.01

# Inception modules: name -> (in_channels, out_channels of b0, b1a, b1b, b2a, b2b, b3b)
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
# Endpoints in forward order: ("conv", in, out, kernel, stride), ("pool", kernel, stride), ("mixed",)
ENDPOINTS = [
    ("Conv3d_1a_7x7", ("conv", 3, 64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", ("pool", (1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", ("conv", 64, 64, (1, 1, 1), (1, 1, 1))),
    ("Conv3d_2c_3x3", ("conv", 64, 192, (3, 3, 3), (1, 1, 1))),
    ("MaxPool3d_3a_3x3", ("pool", (1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", ("mixed",)),
    ("Mixed_3c", ("mixed",)),
    ("MaxPool3d_4a_3x3", ("pool", (3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", ("mixed",)),
    ("Mixed_4c", ("mixed",)),
    ("Mixed_4d", ("mixed",)),
    ("Mixed_4e", ("mixed",)),
    ("Mixed_4f", ("mixed",)),
    ("MaxPool3d_5a_2x2", ("pool", (2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", ("mixed",)),
    ("Mixed_5c", ("mixed",)),
]


def same_pad(x, kernel, stride):
    """Zero-pad (B, C, T, H, W) so that a padding-0 conv/pool gives ceil(size / stride) outputs,
    as TensorFlow's "SAME": per dim pad = max(k - st, 0) if s % st == 0 else max(k - s % st, 0),
    the smaller half in front (a 7-kernel on an even size pads 2 front, 3 back)."""
    pads = []
    for s, k, st in zip(x.shape[2:], kernel, stride):
        pad = max(k - st, 0) if s % st == 0 else max(k - s % st, 0)
        pads.append((pad // 2, pad - pad // 2))
    (tf, tb), (hf, hb), (wf, wb) = pads
    return F.pad(x, (wf, wb, hf, hb, tf, tb))


class SamePool3d(nn.Module):
    """Max pooling after zero "same" padding (zeros are harmless: every pooled input is >= 0)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        return F.max_pool3d(same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Unit3D(nn.Module):
    """"Same"-padded Conv3d -> BatchNorm3d (eps 0.001, momentum 0.01) -> ReLU; the logits layer
    is a biased conv alone (norm=False)."""

    def __init__(self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1), norm=True):
        super().__init__()
        self.kernel, self.stride, self.norm = kernel, stride, norm
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x):
        x = self.conv3d(same_pad(x, self.kernel, self.stride))
        return F.relu(self.bn(x)) if self.norm else x


class Mixed(nn.Module):
    """Inception module: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1, concatenated
    on channels."""

    def __init__(self, in_channels, widths):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = widths
        self.b0 = Unit3D(in_channels, c0)
        self.b1a = Unit3D(in_channels, c1a)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, c2a)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3))
        self.b3a = SamePool3d((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3b)

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """I3D with the state-dict layout of i3d_rgb_imagenet.pt (344 keys, `logits.*` first).
    forward((B, 3, T, H, W) float) -> the Mixed_5c feature map (B, 1024, ~T/8, ~H/32, ~W/32).
    The 400-way `logits` conv is kept only so that the checkpoint loads strictly; VFID never uses it."""

    def __init__(self):
        super().__init__()
        self.logits = Unit3D(1024, 400, norm=False)  # registered first: the checkpoint's key order
        for name, spec in ENDPOINTS:
            if spec[0] == "conv":
                layer = Unit3D(*spec[1:])
            elif spec[0] == "pool":
                layer = SamePool3d(*spec[1:])
            else:
                layer = Mixed(*MIXED[name])
            self.add_module(name, layer)

    def forward(self, x):
        for name, _ in ENDPOINTS:
            x = getattr(self, name)(x)
        return x


def _check_state_dict(path, state, expected, what):
    """SystemExit (one line) naming the first missing, unexpected or misshapen key of `state`
    against the `expected` state dict. BatchNorm's num_batches_tracked may be absent (old
    checkpoints lack it; torch's loader fills it with 0)."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        k = (missing or unexpected or wrong)[0]
        why = ("missing" if missing else "unexpected" if unexpected
               else f"shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}:")
        raise SystemExit(f"{path}: not {what}: {why} {k} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} misshapen)")


def _load_state_dict_file(path, what):
    """The tensors of a torch.save'd state dict (no code is unpickled); SystemExit naming the path."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: {what} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file or a pickled model: one line, not a traceback
        raise SystemExit(f"{path}: not a readable state dict ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_i3d(path, device="cpu"):
    """InceptionI3d with the state dict at `path` (i3d_rgb_imagenet.pt) loaded strictly: a missing,
    unexpected or misshapen tensor is an error naming the key (SystemExit, one line)."""
    state = _load_state_dict_file(path, "I3D weights (i3d_rgb_imagenet.pt, needed for VFID)")
    model = InceptionI3d()
    _check_state_dict(path, state, model.state_dict(), "an I3D state dict")
    model.load_state_dict(state, strict=True)
    return model.to(device)


FILL_ALPHA, FILL_BETA = 0.6180339887498949, 0.4142135623730951


def rule_values(key, k, shape):
    """The reference's deterministic fill for one tensor (float64 numpy, `shape`): key at position k
    of sorted(state_dict), element n: u = frac(n * ALPHA + k * BETA), s = 2u - 1, scaled by key."""
    n = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.float64)
    t = n * FILL_ALPHA + k * FILL_BETA
    u = t - np.floor(t)
    s = 2 * u - 1
    if key.endswith("conv3d.weight"):
        values = s * math.sqrt(12 / (n.size / shape[0]))  # uniform with variance 1 / fan_in
    elif key.endswith("bn.weight"):
        values = 1 + 0.25 * s
    elif key.endswith("bn.running_var"):
        values = 1 + 0.25 * u
    elif key.endswith(("conv3d.bias", "bn.bias", "bn.running_mean")):
        values = 0.1 * s
    else:
        raise KeyError(f"{key}: no fill rule")
    return values.reshape(shape)


@torch.no_grad()
def fill_i3d_by_rule(model):
    """Fill every parameter and float buffer of `model` with the reference's deterministic rule
    (num_batches_tracked stays as it is); returns the model. Lets the I3D be checked without the
    real weights."""
    state = model.state_dict()
    for k, key in enumerate(sorted(state)):
        tensor = state[key]
        if key.endswith("num_batches_tracked"):
            continue
        values = rule_values(key, k, tuple(tensor.shape)).astype(np.float32)  # one rounding at the end
        tensor.copy_(torch.from_numpy(values))
    return model


def tensor_sha256(tensor):
    """sha256 of a tensor's little-endian float32 bytes in C order (the manifest's fill checksum)."""
    return hashlib.sha256(tensor.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes()).hexdigest()


def frames_to_i3d_input(frames):
    """(T, H, W, 3) uint8 (or float in [0, 1]) -> (1, 3, T, H, W) float32 in [0, 1]: uint8 / 255 in
    float32, no mean/std normalisation, no resize (as the reference evaluation feeds I3D)."""
    x = torch.as_tensor(np.asarray(frames))
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3); got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif not x.is_floating_point():
        raise ValueError(f"frames must be uint8 or float in [0, 1]; got {x.dtype}")
    elif x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"float frames must be in [0, 1]; got values in [{x.min():.3g}, {x.max():.3g}]")
    else:
        x = x.float()
    return x.permute(3, 0, 1, 2).unsqueeze(0)


@contextmanager
def _norm_mode(model, batch_stats):
    """Run BatchNorm on each input's own statistics (train mode, batch_stats=True) or on the stored
    running statistics (eval mode); afterwards the running statistics and the train/eval flag are
    as before (train mode would otherwise update them)."""
    was_training = model.training
    saved = {k: v.clone() for k, v in model.named_buffers()} if batch_stats else {}
    model.train(batch_stats)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in saved:
                    v.copy_(saved[k])
        model.train(was_training)


@torch.no_grad()
def i3d_activations(model, frames, batch_stats=True):
    """One (1024,) float32 vector for a video: (T, H, W, 3) frames (uint8, or float in [0, 1]) through
    I3D up to Mixed_5c in one pass, averaged over W, then H, then T.

    batch_stats=True normalises with the clip's own BatchNorm statistics, as the reference
    evaluation does (it never calls .eval()) and as published VFIDs were computed; the model's
    running statistics are left unchanged. It needs more than 8 frames or a side above 32 px.
    batch_stats=False uses the stored running statistics (eval mode).
    On CUDA, TF32 convolutions (torch.backends.cudnn.allow_tf32) move the values slightly."""
    x = frames_to_i3d_input(frames).to(next(model.parameters()).device)
    with _norm_mode(model, batch_stats):
        h = model(x)  # (1, 1024, T', H', W')
    return h.mean(4).mean(3).mean(2)[0].float().cpu().numpy()


def vfid(real_acts, fake_acts):
    """Fréchet distance between the Gaussians fitted to two sets of per-video I3D vectors (N, 1024)
    (pairing is not used), as the reference computes it: |mu1 - mu2|^2 + tr S1 + tr S2
    - 2 tr sqrtm(S1 S2), with S the sample covariance, sqrtm retried with 1e-6 I added to both when
    not finite, and its real part taken. With N < 1025 videos S is singular (scipy's singular-matrix
    warning is expected and silenced). Fewer than 2 videos: nan with a warning (no covariance)."""
    real, fake = np.asarray(real_acts), np.asarray(fake_acts)
    if real.ndim != 2 or real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"activations must be (N, D) with the same D; got {real.shape} and {fake.shape}")
    if min(len(real), len(fake)) < 2:
        warnings.warn(f"VFID needs at least 2 videos per set; got {len(real)} and {len(fake)}: nan")
        return math.nan
    mu1, mu2 = real.mean(axis=0), fake.mean(axis=0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"VFID: sqrtm has imaginary diagonal parts up to "
                             f"{np.abs(np.diagonal(covmean).imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------
# LPIPS (AlexNet, v0.1) through the `lpips` package, which ships its small linear layers. Its
# AlexNet backbone would be downloaded by torchvision, so it is built untrained here and the
# user's local copy of torchvision's ImageNet AlexNet (alexnet-owt-7be5be79.pth) is loaded into it.

LPIPS_WEIGHTS_NOTE = "torchvision's ImageNet AlexNet state dict (alexnet-owt-7be5be79.pth)"


def lpips_available(path):
    """(True, "") when LPIPS can be computed offline with the AlexNet weights at `path`, else
    (False, a one-line note saying why, for the evaluation's output)."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False, "LPIPS skipped: the lpips package is not installed (pip install lpips)"
    if not path:
        return False, f"LPIPS skipped: no --lpips_weights given ({LPIPS_WEIGHTS_NOTE})"
    if not os.path.isfile(path):
        return False, f"LPIPS skipped: {path} not found ({LPIPS_WEIGHTS_NOTE})"
    return True, ""


def load_lpips(path, device="cpu"):
    """The LPIPS (AlexNet, v0.1) model with its backbone loaded strictly from the `features.*`
    tensors at `path` (the classifier's are ignored), in eval mode; nothing is downloaded. Errors
    (SystemExit, one line) name the path or the key."""
    import lpips

    state = _load_state_dict_file(path, f"LPIPS backbone weights ({LPIPS_WEIGHTS_NOTE})")
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    # lpips splits alexnet.features into 5 slices whose children keep their index there
    layers = {index: layer for part in model.net.children() for index, layer in part.named_children()}
    expected = {f"features.{i}.{k}": v for i, layer in layers.items() for k, v in layer.state_dict().items()}
    _check_state_dict(path, {k: v for k, v in state.items() if k.startswith("features.")}, expected,
                      "an AlexNet state dict")
    for index, layer in layers.items():
        layer.load_state_dict({k: state[f"features.{index}.{k}"] for k in layer.state_dict()})
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def lpips_distance(model, gt, pred):
    """LPIPS between two (H, W, 3) frames in [0, 255] (uint8 or float), scaled to [-1, 1] as LPIPS
    expects; lower is closer, 0 for identical frames."""
    gt, pred = _as_float64(gt, pred)
    device = next(model.parameters()).device

    def to_tensor(a):  # (H, W, 3) [0, 255] -> (1, 3, H, W) [-1, 1]
        return torch.from_numpy(a / 127.5 - 1).float().permute(2, 0, 1).unsqueeze(0).to(device)

    return float(model(to_tensor(gt), to_tensor(pred)).item())
