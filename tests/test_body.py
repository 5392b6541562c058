"""Tests for body.py: toy body, restricted SMPL unpickler, BodyModel, rotations, cameras."""
import importlib.util
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import body

PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]


@pytest.fixture(scope="module")
def toy():
    return body.build_toy_body()


@pytest.fixture(scope="module")
def bm():
    return body.BodyModel()


def _random_pose(B, scale=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, 24, 3, generator=g)


def _small_smpl(V=60, F=50, nj=24, seed=0):
    """A small, valid SMPL-format dict (random geometry) for loader tests."""
    rng = np.random.RandomState(seed)
    jr = rng.rand(nj, V)
    w = rng.rand(V, nj)
    kt = np.stack([np.array(PARENTS[:nj] if nj == 24 else [-1] + list(range(nj - 1))),
                   np.arange(nj)]).astype(np.int64)
    kt[0, 0] = 4294967295
    return {"v_template": rng.randn(V, 3), "shapedirs": 0.01 * rng.randn(V, 3, 10),
            "posedirs": np.zeros((V, 3, 9 * (nj - 1))),
            "J_regressor": sp.csc_matrix(jr / jr.sum(1, keepdims=True)),
            "weights": w / w.sum(1, keepdims=True), "kintree_table": kt,
            "f": rng.randint(0, V, (F, 3)).astype(np.uint32), "bs_style": "lbs"}


# ---------------------------------------------------------------------------------------------
# Toy body
# ---------------------------------------------------------------------------------------------
def test_toy_counts_and_format(toy):
    s = toy["smpl"]
    V = s["v_template"].shape[0]
    assert V == 6890 and s["f"].shape == (13720, 3)
    assert s["shapedirs"].shape == (V, 3, 10) and s["posedirs"].shape == (V, 3, 207)
    assert s["J_regressor"].shape == (24, V) and s["weights"].shape == (V, 24)
    assert s["kintree_table"].shape == (2, 24) and s["f"].dtype == np.uint32
    assert np.all(s["posedirs"] == 0)
    body.validate_smpl_arrays(s, "toy")
    # every part closed (each edge in exactly two faces) and oriented outwards (positive volume)
    v, f, part = s["v_template"], s["f"].astype(np.int64), toy["part"]
    for i, name in enumerate(body.TOY_PART_NAMES):
        fp = f[part[f[:, 0]] == i]
        assert np.all(part[fp] == i), name
        e = np.sort(np.concatenate([fp[:, [0, 1]], fp[:, [1, 2]], fp[:, [2, 0]]]), axis=1)
        _, counts = np.unique(e, axis=0, return_counts=True)
        assert np.all(counts == 2), name
        a, b, c = v[fp[:, 0]], v[fp[:, 1]], v[fp[:, 2]]
        assert np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6 > 1e-4, name
    # plausible adult: ~1.6-1.85 m tall, facing +z (nose and toes in front), left at +x
    height = v[:, 1].max() - v[:, 1].min()
    assert 1.6 < height < 1.85
    assert v[toy["vertex_ids"]["nose"], 2] > 0.08 and v[toy["vertex_ids"]["LBigToe"], 2] > 0.1
    assert toy["joints"][1, 0] > 0 and toy["joints"][16, 0] > 0  # left hip / shoulder at +x


def test_toy_deterministic_cached_atomic(tmp_path, monkeypatch):
    p1 = body.toy_body_path(tmp_path / "a")
    monkeypatch.setenv("HMR_CACHE", str(tmp_path / "b"))
    p2 = body.toy_body_path()
    assert p2.parent == tmp_path / "b" and p1.read_bytes() == p2.read_bytes()
    mtime = p2.stat().st_mtime_ns
    assert body.toy_body_path() == p2 and p2.stat().st_mtime_ns == mtime  # cached, not rewritten
    assert body.h36m_sidecar(p2).is_file()
    assert not [x for x in (tmp_path / "b").iterdir() if x.suffix == ".tmp"]
    assert p2.name.startswith("SMPL_")  # smplx.create infers the model type from the prefix
    body.build_toy_body.cache_clear()   # regenerate from scratch: identical arrays
    again = body.build_toy_body()["smpl"]
    old = body.load_smpl_pickle(p1)
    for k in ("v_template", "shapedirs", "weights", "f"):
        np.testing.assert_array_equal(again[k], old[k])


def test_regressors_reproduce_skeleton(toy):
    s = toy["smpl"]
    v = s["v_template"]
    J = s["J_regressor"] @ v
    np.testing.assert_allclose(J, toy["joints"], atol=1e-9)
    np.testing.assert_allclose(J, s["J"], atol=1e-9)
    np.testing.assert_allclose(toy["h36m_regressor"] @ v, toy["h36m_joints"], atol=1e-9)
    for R in (s["J_regressor"].toarray(), toy["h36m_regressor"]):
        assert np.all(R >= 0)
        np.testing.assert_allclose(R.sum(1), 1.0, atol=1e-12)
    # the skeleton is SMPL's tree: each bone has a sensible length, children below/out of parents
    bones = np.linalg.norm(J[1:] - J[PARENTS[1:]], axis=1)
    assert np.all(bones > 0.02) and np.all(bones < 0.5)
    H = toy["h36m_joints"]
    assert H[10, 1] > H[9, 1] > H[8, 1] > H[7, 1] > H[0, 1] > H[2, 1] > H[3, 1]  # head ... ankle


def test_skinning_weights(toy):
    W = toy["smpl"]["weights"]
    assert np.all(W >= 0)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)
    # smooth: the weights are blended near joints (not one-hot everywhere)
    assert ((W > 0.05) & (W < 0.95)).any(1).mean() > 0.1
    # the upper arm follows the shoulder joint mid-bone; the forearm follows the elbow
    v = toy["smpl"]["v_template"]
    mid_upper = np.argmin(np.linalg.norm(v - (toy["joints"][16] + toy["joints"][18]) / 2
                                         - (0, 0.05, 0), axis=1))
    assert W[mid_upper].argmax() == 16


def test_shape_directions_visible_and_symmetric(toy):
    s = toy["smpl"]
    v, S, sym = s["v_template"], s["shapedirs"], s["vert_sym_idxs"]
    np.testing.assert_allclose(v[sym] * (-1, 1, 1), v, atol=1e-9)
    height = lambda x: x[:, 1].max() - x[:, 1].min()
    for k in range(10):
        d = S[:, :, k]
        assert np.abs(d).max() > 0.01, k                      # > 1 cm for beta = 1
        np.testing.assert_allclose(d[sym] * (-1, 1, 1), d, atol=1e-9)  # mirror symmetric
    assert height(v + S[:, :, 0]) - height(v) > 0.04          # beta0: taller
    torso = toy["part"] == 0
    girth = lambda x: np.linalg.norm(x[torso][:, [0, 2]], axis=1).mean()
    assert girth(v + S[:, :, 1]) - girth(v) > 0.005           # beta1: wider torso
    assert height(v + S[:, :, 2]) - height(v) > 0.02          # beta2: longer legs
    Dn = S.reshape(-1, 10) / np.linalg.norm(S.reshape(-1, 10), axis=0)
    off = np.abs(Dn.T @ Dn - np.eye(10))
    assert off.max() < 0.95                                    # 10 distinct directions


# ---------------------------------------------------------------------------------------------
# BodyModel
# ---------------------------------------------------------------------------------------------
def test_zero_pose_gives_template(bm, toy):
    out = bm(torch.zeros(2, 10), torch.zeros(2, 72))
    assert out["vertices"].shape == (2, 6890, 3) and out["joints"].shape == (2, 24, 3)
    v0 = torch.as_tensor(toy["smpl"]["v_template"], dtype=torch.float32)
    torch.testing.assert_close(out["vertices"][0], v0, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["joints"][1], torch.as_tensor(toy["joints"]).float(),
                               atol=1e-5, rtol=0)
    assert bm.is_toy and bm.num_vertices == 6890
    assert bm.faces.dtype == torch.long and bm.faces.shape == (13720, 3)
    assert bm.parents.tolist() == PARENTS and bm.lbs_weights.shape == (6890, 24)
    assert bm.J_regressor.shape == (24, 6890) and bm.J_regressor_h36m.shape == (17, 6890)
    h = bm.h36m_joints(out["vertices"])
    torch.testing.assert_close(h[0], torch.as_tensor(toy["h36m_joints"]).float(), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(bm.lsp_joints(out["vertices"]), h[:, body.H36M_TO_LSP])


def test_pose_formats_batching_and_gradients(bm):
    B = 3
    pose = _random_pose(B)
    betas = torch.randn(B, 10, generator=torch.Generator().manual_seed(1))
    a = bm(betas, pose.reshape(B, 72))
    b = bm(betas, pose)
    c = bm(betas, body.axis_angle_to_matrix(pose))
    for k in ("vertices", "joints"):
        torch.testing.assert_close(a[k], b[k])
        torch.testing.assert_close(a[k], c[k], atol=1e-5, rtol=0)
    single = bm(betas[1:2], pose[1:2])
    torch.testing.assert_close(single["vertices"][0], a["vertices"][1], atol=1e-6, rtol=0)
    # joints follow the kinematic tree: bone lengths are preserved by posing (zero betas)
    z = bm(torch.zeros(B, 10), pose)["joints"]
    r = bm(torch.zeros(1, 10), torch.zeros(1, 72))["joints"]
    bl = lambda j: (j[:, 1:] - j[:, PARENTS[1:]]).norm(dim=-1)
    torch.testing.assert_close(bl(z), bl(r).expand(B, -1), atol=1e-5, rtol=0)
    # gradients reach betas and pose
    betas = betas.clone().requires_grad_(True)
    pose = pose.clone().requires_grad_(True)
    out = bm(betas, pose)
    (out["vertices"].square().sum() + out["joints"].sum()).backward()
    assert betas.grad.abs().sum() > 0 and pose.grad.abs().sum() > 0
    assert torch.isfinite(pose.grad).all()
    with pytest.raises(ValueError, match="pose must be"):
        bm(torch.zeros(1, 10), torch.zeros(1, 69))
    with pytest.raises(ValueError, match="betas must be"):
        bm(torch.zeros(1, 7), torch.zeros(1, 72))


def test_smplx_loads_toy_file_and_matches(bm):
    import smplx
    from smplx.utils import Struct
    arrays = body.load_smpl_pickle(bm.model_path)      # smplx never unpickles: pass the arrays
    ref = smplx.SMPL(model_path=str(bm.model_path), data_struct=Struct(**{
        k: (v.toarray() if hasattr(v, "toarray") else np.asarray(v)) for k, v in arrays.items()
        if k in body.SMPL_KEYS}))
    pose = _random_pose(2, seed=3)
    betas = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    o = ref(betas=betas, global_orient=pose[:, 0], body_pose=pose[:, 1:].reshape(2, 69))
    mine = bm(betas, pose)
    torch.testing.assert_close(o.vertices, mine["vertices"], atol=1e-5, rtol=0)
    torch.testing.assert_close(o.joints[:, :24], mine["joints"], atol=1e-5, rtol=0)


def test_topology(bm):
    pytest.importorskip("mesh")
    import mesh
    topo = bm.topology()
    assert bm.topology() is topo  # cached on the instance
    V = topo["num_vertices"]
    assert V[0] == 6890 and len(V) == 3 and V[0] > V[1] > V[2]
    for l in range(3):
        assert topo["faces"][l].dtype == torch.long and topo["template"][l].shape == (V[l], 3)
        assert topo["skin_weights"][l].shape == (V[l], 24)
        assert topo["joint_regressor"][l].shape == (14, V[l])
    for l in range(2):
        torch.testing.assert_close(topo["skin_weights"][l + 1],
                                   topo["skin_weights"][l][topo["down_index"][l]])
    # joint_regressor[l+1] = joint_regressor[l] @ U_l: same joints from an upsampled coarse mesh
    x2 = torch.randn(1, V[2], 3, generator=torch.Generator().manual_seed(0))
    x1 = mesh.upsample(x2, topo["up_index"][1], topo["up_weight"][1])
    x0 = mesh.upsample(x1, topo["up_index"][0], topo["up_weight"][0])
    j0 = topo["joint_regressor"][0] @ x0[0]
    torch.testing.assert_close(topo["joint_regressor"][1] @ x1[0], j0, atol=1e-5, rtol=0)
    torch.testing.assert_close(topo["joint_regressor"][2] @ x2[0], j0, atol=1e-5, rtol=0)
    torch.testing.assert_close(topo["h36m_regressor"][body.H36M_TO_LSP],
                               topo["joint_regressor"][0])
    assert topo["joint_to_smpl"].tolist() == body.LSP_TO_SMPL
    assert topo["parents"].tolist() == PARENTS
    with pytest.raises(ValueError, match="joint_set"):
        bm.topology("coco")


def test_gender_directory_lookup(tmp_path, bm):
    (tmp_path / "SMPL_MALE.pkl").write_bytes(bm.model_path.read_bytes())
    assert body.find_smpl_file(tmp_path, "male") == tmp_path / "SMPL_MALE.pkl"
    with pytest.raises(FileNotFoundError, match="SMPL_FEMALE.pkl"):
        body.find_smpl_file(tmp_path, "female")
    m = body.BodyModel(tmp_path, gender="male")
    assert m.num_vertices == 6890 and not m.is_toy
    with pytest.raises(FileNotFoundError, match="J_regressor_h36m_correct.npy"):
        m.h36m_joints(torch.zeros(1, 6890, 3))
    np.save(tmp_path / "J_regressor_h36m_correct.npy", np.zeros((17, 5)))
    with pytest.raises(ValueError, match=r"J_regressor_h36m_correct.npy.*expected \(17, 6890\)"):
        body.BodyModel(tmp_path, gender="male")


# ---------------------------------------------------------------------------------------------
# Restricted unpickler
# ---------------------------------------------------------------------------------------------
def _install_fake_chumpy():
    pkg, mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x)

        def __getstate__(self):  # chumpy keeps the array under 'x' plus bookkeeping
            return {"x": self.x, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {}}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    mod.Ch, pkg.ch = Ch, mod
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, mod
    return Ch


@pytest.mark.parametrize("protocol", [0, 2])
def test_chumpy_pickle_loads_without_chumpy(tmp_path, protocol):
    assert importlib.util.find_spec("chumpy") is None, "chumpy must not be installed"
    data = _small_smpl()
    Ch = _install_fake_chumpy()
    try:
        obj = dict(data, shapedirs=Ch(data["shapedirs"]), v_template=Ch(data["v_template"]),
                   J=Ch(np.zeros((24, 3))))
        path = tmp_path / "basicModel_neutral_lbs_10_207_0_v1.0.0.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    assert b"chumpy" in path.read_bytes()       # a plain unpickler would need chumpy (not run here)
    out = body.load_smpl_pickle(path)
    assert "chumpy" not in sys.modules
    for k in ("v_template", "shapedirs", "posedirs", "weights", "f"):
        assert isinstance(out[k], np.ndarray)
        np.testing.assert_array_equal(out[k], data[k])
    assert sp.issparse(out["J_regressor"])
    np.testing.assert_allclose(out["J_regressor"].toarray(), data["J_regressor"].toarray())
    # and the whole body model builds from it (V != 6890, so no smplx default vertex ids)
    m = body.BodyModel(path)
    o = m(torch.zeros(2, 10), _random_pose(2))
    assert o["vertices"].shape == (2, 60, 3) and o["joints"].shape == (2, 24, 3)


def test_cleaned_pickle_loads(tmp_path):
    data = _small_smpl()
    path = tmp_path / "clean.pkl"
    path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    out = body.load_smpl_pickle(path)
    np.testing.assert_array_equal(out["v_template"], data["v_template"])
    assert out["bs_style"] == "lbs"


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("kind", ["system", "eval", "nested"])
def test_malicious_pickle_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "system":
        payload, refused = _Evil(os.system, f"touch {marker}"), "system"
    elif kind == "eval":
        payload, refused = _Evil(eval, f"open({str(marker)!r}, 'w')"), "eval"
    else:  # hidden inside an otherwise valid model, behind a numpy array
        payload, refused = [np.zeros(3), _Evil(exec, f"open({str(marker)!r}, 'w')")], "exec"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(dict(_small_smpl(), v_template=payload), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=refused) as e:
        body.load_smpl_pickle(path)
    assert str(path) in str(e.value) and "refusing" in str(e.value)
    assert not marker.exists()


def test_bad_inputs_name_file_and_expectation(tmp_path):
    missing = tmp_path / "nope.pkl"
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        body.load_smpl_pickle(missing)
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        body.BodyModel(missing)
    # MANO-like: 16 joints
    mano = _small_smpl(nj=16)
    p = tmp_path / "MANO_RIGHT.pkl"
    p.write_bytes(pickle.dumps(mano, protocol=2))
    with pytest.raises(ValueError, match=r"MANO_RIGHT.pkl.*kintree_table.*\(2, 24\).*MANO"):
        body.load_smpl_pickle(p)
    # a dict of something else
    p = tmp_path / "other.pkl"
    p.write_bytes(pickle.dumps({"weights": np.zeros(3)}, protocol=2))
    with pytest.raises(ValueError, match=r"other.pkl.*missing key.*v_template"):
        body.load_smpl_pickle(p)
    # not a dict / not a pickle
    p.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="other.pkl.*expected a pickled dict"):
        body.load_smpl_pickle(p)
    p.write_bytes(b"this is not a pickle")
    with pytest.raises((ValueError, pickle.UnpicklingError), match="other.pkl"):
        body.load_smpl_pickle(p)
    # wrong shapes
    for key, bad, want in [("posedirs", np.zeros((60, 3, 10)), r"\(60, 3, 207\)"),
                           ("weights", np.zeros((60, 23)), r"\(60, 24\)"),
                           ("J_regressor", np.zeros((24, 59)), r"\(24, 60\)"),
                           ("v_template", np.zeros((60, 2)), r"\(V, 3\)")]:
        p = tmp_path / f"bad_{key}.pkl"
        p.write_bytes(pickle.dumps(dict(_small_smpl(), **{key: bad}), protocol=2))
        with pytest.raises(ValueError, match=rf"bad_{key}.pkl.*'{key}'.*{want}"):
            body.load_smpl_pickle(p)
    # too few shape components for num_betas
    p = tmp_path / "few_betas.pkl"
    p.write_bytes(pickle.dumps(dict(_small_smpl(), shapedirs=np.zeros((60, 3, 4))), protocol=2))
    with pytest.raises(ValueError, match="few_betas.pkl.*4 shape components"):
        body.BodyModel(p)


# ---------------------------------------------------------------------------------------------
# Rotations and cameras
# ---------------------------------------------------------------------------------------------
def _axes(n, seed=0):
    a = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a / a.norm(dim=-1, keepdim=True)


def _is_rotation(R, atol=1e-6):
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=atol, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype),
                               atol=atol, rtol=0)


def test_axis_angle_matrix_round_trip():
    from smplx.lbs import batch_rodrigues
    n = 200
    angles = torch.cat([torch.linspace(0.0, math.pi - 1e-3, n - 8, dtype=torch.float64),
                        torch.tensor([1e-12, 1e-8, 1e-5, 1e-3], dtype=torch.float64),
                        torch.tensor([math.pi - 1e-4, math.pi - 1e-6, math.pi - 1e-8, math.pi],
                                     dtype=torch.float64)])
    aa = _axes(n) * angles[:, None]
    R = body.axis_angle_to_matrix(aa)
    _is_rotation(R, 1e-12)
    torch.testing.assert_close(R, batch_rodrigues(aa), atol=1e-7, rtol=0)  # same convention
    back = body.matrix_to_axis_angle(R)
    torch.testing.assert_close(body.axis_angle_to_matrix(back), R, atol=1e-9, rtol=0)
    ok = angles < math.pi - 1e-3  # below pi the axis-angle itself is unique
    torch.testing.assert_close(back[ok], aa[ok], atol=1e-9, rtol=0)
    # near pi: same rotation, angle ~ pi, axis up to sign
    near = ~ok
    assert torch.allclose(back[near].norm(dim=-1), angles[near], atol=1e-6)
    # batched shapes and float32
    R32 = body.axis_angle_to_matrix(aa.float().reshape(4, 50, 3))
    assert R32.shape == (4, 50, 3, 3)
    back32 = body.matrix_to_axis_angle(R32).reshape(-1, 3).double()
    torch.testing.assert_close(back32[ok], aa[ok], atol=1e-4, rtol=0)


def test_rotation_gradients():
    for scale in (1e-9, 1e-3, 1.0, 3.0):
        aa = (_axes(4, seed=1) * scale).requires_grad_(True)
        assert torch.autograd.gradcheck(body.axis_angle_to_matrix, (aa,))
    aa = (_axes(4, seed=2) * 1.3)
    R = body.axis_angle_to_matrix(aa).requires_grad_(True)
    assert torch.autograd.gradcheck(body.matrix_to_axis_angle, (R,))


@pytest.mark.parametrize("layout", ["hmr2", "spin"])
def test_rot6d(layout):
    x = torch.randn(100, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    R = body.rot6d_to_matrix(x, layout)
    _is_rotation(R, 1e-12)
    torch.testing.assert_close(body.rot6d_to_matrix(body.matrix_to_rot6d(R, layout), layout), R)
    # the first 6D vector gives the first column's direction
    a1 = x[:, :3] if layout == "hmr2" else x[:, 0::2]
    torch.testing.assert_close(R[:, :, 0], a1 / a1.norm(dim=-1, keepdim=True))
    Rt = body.axis_angle_to_matrix(_axes(10) * 2.0)
    torch.testing.assert_close(body.rot6d_to_matrix(body.matrix_to_rot6d(Rt, layout), layout), Rt)
    assert body.rot6d_to_matrix(x.reshape(10, 10, 6), layout).shape == (10, 10, 3, 3)


def test_cameras():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2, 5, 3, generator=g)
    cam = torch.tensor([[0.9, 0.1, -0.2], [1.2, -0.05, 0.3]])
    wp = body.weak_perspective_project(pts, cam)
    torch.testing.assert_close(wp, cam[:, None, :1] * (pts[..., :2] + cam[:, None, 1:]))
    # a weak-perspective camera equals the perspective camera from weak_perspective_to_translation
    # for points at depth 0 (the pelvis plane), in pixels of a crop of side 224
    f, crop = 5000.0, 224
    flat = pts.clone()
    flat[..., 2] = 0
    t = body.weak_perspective_to_translation(cam, f, crop)
    pix = body.perspective_project(flat, t, f, torch.full((2, 2), crop / 2))
    torch.testing.assert_close(pix, (body.weak_perspective_project(flat, cam) + 1) * crop / 2,
                               atol=1e-3, rtol=0)
    # per-sample and per-axis focal lengths
    pix2 = body.perspective_project(flat, t, torch.tensor([[f, f], [f, f]]),
                                    torch.full((2, 2), crop / 2))
    torch.testing.assert_close(pix, pix2)


def test_constants():
    assert len(body.SMPL_JOINT_NAMES) == 24 and len(body.H36M_JOINT_NAMES) == 17
    assert [body.H36M_JOINT_NAMES[i] for i in body.H36M_TO_LSP] == [
        n.replace("Neck", "Thorax") if n == "Neck" else n for n in body.LSP_JOINT_NAMES]
    assert len(body.LSP_TO_SMPL) == 14 and len(body.J24_TO_LSP) == 14
