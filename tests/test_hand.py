"""hand.py: the toy hand in MANO's format, MANO loading (chumpy-free, validated, body/hand
refusals), HandModel keypoints, and the 778 -> 195 hierarchy (decimated or GraphCMR layout)."""
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import body
import hand
import mesh


@pytest.fixture(scope="module")
def toy():
    return hand.build_toy_hand()


@pytest.fixture(scope="module")
def hm():
    return hand.HandModel()


def test_toy_hand_counts_and_format(toy):
    m = toy["mano"]
    hand.validate_mano_arrays(m)
    assert m["v_template"].shape == (778, 3) and m["f"].shape == (1532, 3)
    assert m["shapedirs"].shape == (778, 3, 10) and m["posedirs"].shape == (778, 3, 135)
    assert m["J_regressor"].shape == (16, 778) and m["weights"].shape == (778, 16)
    assert list(m["kintree_table"][0, 1:]) == hand.MANO_PARENTS[1:]
    assert m["hands_components"].shape == (45, 45) and m["hands_mean"].shape == (45,)
    # every face is used, each of the 6 parts is closed with outward winding (positive volume)
    assert len(np.unique(m["f"])) == 778
    v, f = m["v_template"], m["f"].astype(np.int64)
    vol = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
    assert 1.5e-4 < vol < 8e-4, vol                      # 150-800 ml: a hand, with overlapping parts
    ext = v.max(0) - v.min(0)
    assert 0.15 < ext[0] < 0.25 and 0.02 < ext[1] < 0.06 and 0.08 < ext[2] < 0.16, ext


def test_toy_hand_regressor_weights_tips(toy):
    m = toy["mano"]
    R = m["J_regressor"].toarray()
    np.testing.assert_allclose(R @ m["v_template"], toy["joints"], atol=1e-12)
    np.testing.assert_allclose(R.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(m["weights"].sum(1), 1.0, atol=1e-12)
    assert (m["weights"] >= 0).all()
    v = m["v_template"]
    # tip vertices: each is the finger's farthest point from its MCP joint (the capsule's end pole)
    J = toy["joints"]
    for tip, mcp, part in zip(hand.MANO_TIP_VERTEX_IDS, (13, 1, 4, 10, 7),
                              ("thumb", "index", "middle", "ring", "pinky")):
        mask = toy["part"] == toy["part_names"].index(part)
        assert mask[tip]
        d = np.linalg.norm(v - J[mcp], axis=1)
        assert int(np.argmax(np.where(mask, d, -1))) == tip
    # middle finger is longest: its tip is the vertex with the largest x
    assert int(np.argmax(v[:, 0])) == hand.MANO_TIP_VERTEX_IDS[2]
    # shape directions move the mesh by a few millimetres per unit
    sd = np.linalg.norm(m["shapedirs"], axis=1).max(0)
    assert (sd > 1e-3).all() and (sd < 0.03).all(), sd


def test_toy_hand_cached_and_rebuilt(tmp_path):
    p = hand.toy_hand_path(tmp_path)
    a = p.read_bytes()
    assert hand.toy_hand_path(tmp_path) == p and p.read_bytes() == a
    p.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding"):
        hand.toy_hand_path(tmp_path)
    assert p.read_bytes() == a                           # deterministic


def _install_fake_chumpy():
    pkg, mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x)

        def __getstate__(self):
            return {"x": self.x, "_dirty_vars": set()}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    mod.Ch, pkg.ch = Ch, mod
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, mod
    return Ch


def test_mano_chumpy_round_trip_and_refusals(tmp_path, toy):
    m = toy["mano"]
    Ch = _install_fake_chumpy()
    try:  # official MANO_RIGHT.pkl: shapedirs, v_template, J chumpy; J_regressor scipy.sparse
        obj = dict(m, shapedirs=Ch(m["shapedirs"]), v_template=Ch(m["v_template"]), J=Ch(m["J"]))
        path = tmp_path / "MANO_RIGHT.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=2))
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    assert b"chumpy" in path.read_bytes()
    out = hand.load_mano_pickle(path)
    for k in ("v_template", "shapedirs", "posedirs", "weights", "f", "hands_components", "hands_mean"):
        np.testing.assert_array_equal(np.asarray(out[k]), m[k])
    assert sp.issparse(out["J_regressor"])
    hm = hand.HandModel(path)
    o = hm(torch.zeros(1, 10), torch.zeros(1, 48))
    np.testing.assert_allclose(o["vertices"][0].double().numpy(), m["v_template"], atol=1e-6)
    # a hand where a body is expected, a body where a hand is expected
    with pytest.raises(ValueError, match="MANO"):
        body.load_smpl_pickle(path)
    with pytest.raises(ValueError, match="SMPL body model"):
        hand.load_mano_pickle(body.toy_body_path())
    # missing MANO key / wrong shape name the file and the key
    bad = dict(m)
    del bad["hands_components"]
    p2 = tmp_path / "no_components.pkl"
    p2.write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"no_components\.pkl.*hands_components"):
        hand.load_mano_pickle(p2)
    bad = dict(m, posedirs=np.zeros((778, 3, 207)))
    p3 = tmp_path / "bad_posedirs.pkl"
    p3.write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"bad_posedirs\.pkl.*'posedirs'.*\(778, 3, 135\)"):
        hand.load_mano_pickle(p3)
    with pytest.raises(FileNotFoundError, match="MANO"):
        hand.load_mano_pickle(tmp_path / "absent.pkl")


class _Evil:
    def __reduce__(self):
        import os
        return (os.getcwd, ())


def test_malicious_mano_refused(tmp_path, toy):
    p = tmp_path / "MANO_RIGHT.pkl"
    p.write_bytes(pickle.dumps(dict(toy["mano"], evil=_Evil()), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        hand.load_mano_pickle(p)


def test_hand_model_keypoints_pose_shape(hm, toy):
    o = hm(torch.zeros(2, 10), torch.zeros(2, 16, 3))
    v, j = o["vertices"][0].double(), o["joints"][0].double()
    J = torch.as_tensor(toy["joints"])
    # keypoints: MANO joints in FreiHAND order, tips = the tip vertices
    np.testing.assert_allclose(j[[0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19]].numpy(),
                               J[[0, 13, 14, 15, 1, 2, 3, 4, 5, 6, 10, 11, 12, 7, 8, 9]].numpy(), atol=1e-6)
    np.testing.assert_allclose(j[[4, 8, 12, 16, 20]].numpy(), v[hand.MANO_TIP_VERTEX_IDS].numpy(), atol=1e-7)
    np.testing.assert_allclose(o["mano_joints"][0].double().numpy(), J.numpy(), atol=1e-6)
    # global rotation by 90 deg about y rotates everything about the wrist (origin)
    pose = torch.zeros(1, 48)
    pose[0, 1] = np.pi / 2
    r = hm(torch.zeros(1, 10), pose)
    Ry = torch.tensor([[0., 0, 1], [0, 1, 0], [-1, 0, 0]])
    torch.testing.assert_close(r["vertices"][0], o["vertices"][0] @ Ry.T, atol=1e-5, rtol=0)
    # bending index1 moves the index finger tip but not the thumb tip
    pose = torch.zeros(1, 48)
    pose[0, 3 + 2] = 1.0                                   # joint 1 (index1), z axis
    b = hm(torch.zeros(1, 10), pose)["joints"][0]
    assert (b[8] - o["joints"][0, 8]).norm() > 0.02
    assert (b[4] - o["joints"][0, 4]).norm() < 1e-6
    s = hm(torch.ones(1, 10), torch.zeros(1, 48))["vertices"][0]
    assert (s - o["vertices"][0]).norm(dim=-1).max() > 0.005
    with pytest.raises(ValueError, match="pose"):
        hm(torch.zeros(1, 10), torch.zeros(1, 72))
    with pytest.raises(ValueError, match="betas"):
        hm(torch.zeros(1, 5), torch.zeros(1, 48))


def test_hand_topology_decimated_and_graphcmr(hm, tmp_path):
    topo = hm.topology()
    assert topo["num_vertices"] == [778, 195]
    assert topo["joint_regressor"][0].shape == (21, 778) and topo["joint_regressor"][1].shape == (21, 195)
    v = hm.v_template.float()
    up = mesh.upsample(v[topo["down_index"][0]][None], topo["up_index"][0], topo["up_weight"][0])[0]
    assert (up - v).norm(dim=-1).mean() < 0.01            # coarse mesh still describes the hand
    # GraphCMR-style mano_downsampling.npz (U, D, F) from the same hierarchy loads identically
    h = mesh.get_hierarchy(hm.model_path, v.double().numpy(), hm.faces.numpy(), factors=(4,))
    obj = lambda items: np.array(items + [None], dtype=object)[:-1]
    p = tmp_path / "mano_downsampling.npz"
    np.savez(p, U=obj([sp.csc_matrix(h.U(0))]), D=obj([sp.csc_matrix(h.D(0))]),
             F=obj([f.astype(np.uint32) for f in h.faces]))
    g = hand.HandModel(hm.model_path).topology(graphcmr_path=p)
    assert g["num_vertices"] == [778, 195]
    assert torch.equal(g["down_index"][0], topo["down_index"][0])
    x = torch.randn(2, 195, 3)                             # same U (slot order may differ)
    torch.testing.assert_close(mesh.upsample(x, g["up_index"][0], g["up_weight"][0]),
                               mesh.upsample(x, topo["up_index"][0], topo["up_weight"][0]))
    torch.testing.assert_close(g["joint_regressor"][1], topo["joint_regressor"][1])
