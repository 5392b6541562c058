"""Camera convention for non-square crops (CAMERA_CONVENTION.md, issue 17 point 1).

2D labels use one length L = min(H, W) for both axes, so one isotropic weak-perspective scale fits
them at every input size: the fitted camera leaves the same residual at 256x192 and 384x288 as at
224x224, and label joints projected back to pixels land on the body rendered with that camera.
"""
import numpy as np
import pytest
import torch

import data
import render
import tore

SIZES = [(224, 224), (256, 192), (384, 288)]
FOCAL = 5000.0  # long lens: the perspective render of a weak-perspective camera


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("camsynth")
    return data.generate_synthetic(out, 6, split="train", seed=11, size=96, batch_size=6, verbose=False)


def fit_weak_perspective(j3d, j2d):
    """Least-squares (s, tx, ty) with j2d = s * (j3d[:, :2] + t) over confident joints.
    j3d (24, 4), j2d (24, 3) -> cam (3,), RMS residual (normalised units)."""
    m = (j2d[:, 2] > 0) & (j3d[:, 3] > 0)
    X, x = j3d[m, :2], j2d[m, :2]
    n = len(X)
    # unknowns (s, a, b) with a = s tx, b = s ty: u = s X + a, v = s Y + b
    A = np.zeros((2 * n, 3))
    A[:n, 0], A[:n, 1] = X[:, 0], 1
    A[n:, 0], A[n:, 2] = X[:, 1], 1
    rhs = np.concatenate([x[:, 0], x[:, 1]])
    (s, a, b), *_ = np.linalg.lstsq(A, rhs, rcond=None)
    res = A @ np.array([s, a, b]) - rhs
    return np.array([s, a / s, b / s]), float(np.sqrt(np.mean(res ** 2)))


def _samples(npz, size):
    # The exact-box affine at every size (train mode, no augmentation): evaluation crops of square
    # inputs are the official integer box, whose truncation changes the scale by up to 1 px.
    ds = data.NpzDataset(npz, train=True, input_size=size, flip_prob=0.0, rot_factor=0.0, scale_factor=0.0,
                         noise_factor=0.0)
    return [ds[i] for i in range(len(ds))]


def test_normalise_pixels_round_trip_and_square_is_metro():
    rng = np.random.default_rng(0)
    px = rng.uniform(0, 224, (50, 2))
    old = np.stack([2 * px[:, 0] / 224 - 1, 2 * px[:, 1] / 224 - 1], 1)
    assert np.array_equal(data.normalise_pixels(px, (224, 224)), old)  # bit-identical at 224x224
    for H, W in SIZES:
        q = rng.uniform(0, 1, (50, 2)) * [W, H]
        np.testing.assert_allclose(data.pixels_from_normalised(data.normalise_pixels(q, (H, W)), (H, W)), q,
                                   atol=1e-9)
        L = min(H, W)
        corners = data.normalise_pixels([[0, 0], [W, H]], (H, W))
        np.testing.assert_allclose(corners, [[-W / L, -H / L], [W / L, H / L]])


def test_fitted_camera_residual_is_the_same_at_every_input_size(synth):
    res, scale = {}, {}
    for size in SIZES:
        fits = [fit_weak_perspective(s["joints3d"].double().numpy(), s["joints2d"].double().numpy())
                for s in _samples(synth, size)]
        res[size] = np.mean([r for _, r in fits])
        scale[size] = np.array([c[0] for c, _ in fits])
    for size in SIZES[1:]:
        assert res[size] == pytest.approx(res[(224, 224)], rel=1e-3), (size, res)
        np.testing.assert_allclose(scale[size], scale[(224, 224)], rtol=1e-3)  # s means the same
    # The per-axis normalisation (x / W, y / H) this replaces would fail this test.
    H, W = 256, 192
    old_res = []
    for s in _samples(synth, (H, W)):
        j2 = s["joints2d"].double().numpy().copy()
        px = data.pixels_from_normalised(j2[:, :2], (H, W))
        j2[:, 0], j2[:, 1] = 2 * px[:, 0] / W - 1, 2 * px[:, 1] / H - 1
        old_res.append(fit_weak_perspective(s["joints3d"].double().numpy(), j2)[1])
    assert np.mean(old_res) > 1.5 * res[(224, 224)]


def test_label_joints_land_on_the_body_rendered_with_the_fitted_camera(synth):
    from body import BodyModel
    body = BodyModel().eval()
    faces = body.faces.long()
    rates = {}
    for size in SIZES:
        H, W = size
        hits = total = 0
        for s in _samples(synth, size):
            cam, _ = fit_weak_perspective(s["joints3d"].double().numpy(), s["joints2d"].double().numpy())
            with torch.no_grad():
                v = body(s["betas"][None], s["pose"][None])["vertices"]               # (1, V, 3)
                pelvis = data.h36m_to_j24(body.h36m_joints(v).double().numpy())[0, 14, :3]
            v = v - torch.tensor(pelvis, dtype=v.dtype)                              # as joints3d
            t = render.weak_perspective_to_camera(torch.tensor(cam, dtype=torch.float32)[None], size, FOCAL)
            mask = render.render(v, faces, FOCAL, None, size, translation=t)["mask"][0].numpy()
            px = data.pixels_from_normalised(s["joints2d"][:, :2].double().numpy(), size)
            r = max(1, round(min(H, W) / 112))  # ~1% of the crop: joints near the surface
            for (x, y), c in zip(px, s["joints2d"][:, 2].tolist()):
                if c > 0 and 0 <= x < W and 0 <= y < H:
                    total += 1
                    i, j = int(y), int(x)
                    hits += bool(mask[max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1].any())
        assert total > 40, size
        rates[size] = hits / total
    assert all(rate > 0.9 for rate in rates.values()), rates


def test_tore_itp_grid_uses_the_crop_extent():
    # A point at pixel (x, y) of a 256x192 crop falls in cell (floor(y / 256 * h), floor(x / 192 * w)).
    H, W, h, w = 256, 192, 8, 6
    px = np.array([[10.0, 250.0], [100.0, 5.0], [191.0, 130.0]])
    uv = torch.tensor(data.normalise_pixels(px, (H, W)), dtype=torch.float32)[None]
    m = tore.itp_mask(uv, h, w, (H, W))[0].reshape(h, w)
    expect = torch.zeros(h, w)
    for x, y in px:
        expect[int(y / H * h), int(x / W * w)] = 1
    assert torch.equal(m, expect)
    sq = torch.rand(1, 30, 2) * 2 - 1  # square crop: identical to the official [-1, 1] map
    assert torch.equal(tore.itp_mask(sq, 7, 7, (224, 224)), tore.itp_mask(sq, 7, 7))
