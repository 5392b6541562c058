"""Reproducing the papers' numbers from released checkpoints (issue 14): official-layout state
dicts through evaluate.py / demo.py / train.py --weights, the preset-fit message, mesh hierarchy
identity and the missing-hierarchy error, the fastmetro / spin protocols on hand-made joints, H36M
regressor ordering and content checks, the official integer-box crop, short label TSVs, multi-line
yaml lists, the 1723-level normal-loss faces, TORE's float64 ITP weight, float32 losses."""
import io
import json
import math
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from PIL import Image

import body
import checkpoints
import data
import fastmetro
import metrics
import tore

SIZE = 64
RESNET_SEQ = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


@pytest.fixture(scope="module")
def toy():
    return checkpoints.build_body()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_off")
    data.generate_synthetic(out, 4, split="test", seed=1, size=SIZE, batch_size=4, verbose=False)
    return out


def official_layout(model, prefix="module."):
    """A model's state dict as the official code saves it: ResNet backbone as nn.Sequential
    indices (backbone.0/1/4..7), a DDP "module." prefix, no project config."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            head, rest = k[len("backbone."):].split(".", 1)
            k = f"backbone.{RESNET_SEQ.get(head, head)}.{rest}"
        out[prefix + k] = v.clone()
    return out


@pytest.fixture(scope="module")
def released(toy, tmp_path_factory):
    """Tiny FastMETRO and TORE with random weights, saved in the official layout (bare and wrapped)."""
    d = tmp_path_factory.mktemp("released")
    files = {}
    for name, wrap in (("fastmetro", False), ("tore", True)):
        torch.manual_seed(7)
        model, _ = checkpoints.build_model(name, "tiny", toy)
        sd = official_layout(model)
        assert not any(k.startswith("backbone.conv1") for k in sd if k.startswith("module."))
        f = d / f"{name}_state_dict.bin"
        torch.save({"model": sd} if wrap else sd, f)
        files[name] = (f, model.state_dict())
    return files


# ----------------------------------------------------------------------------- --weights
@pytest.mark.parametrize("name", ["fastmetro", "tore"])
def test_weights_through_evaluate_cli_equal_in_code_loading(name, released, synth, toy, tmp_path):
    import evaluate
    f, original = released[name]
    out = tmp_path / "res.json"
    res = evaluate.main(["--model", name, "--preset", "tiny", "--weights", str(f), "--data",
                         str(synth / "test.npz"), "--device", "cpu", "--workers", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    # In code: build the preset, load the original (project-layout) weights, evaluate.
    model, _ = checkpoints.build_model(name, "tiny", toy)
    model.load_state_dict(original)
    loader = evaluate.make_eval_loader(str(synth / "test.npz"), None, model.cfg.input_size, 32, 0)
    ref = metrics.evaluate(model, loader, toy, "cpu")
    for k in ("mpjpe", "pa_mpjpe", "mpve"):
        assert math.isclose(saved["model"][k], ref["model"][k], rel_tol=1e-9), k
        assert saved["model"][k] == res["model"][k] and saved["model"][k] > 0
    assert saved["protocol"] == "fastmetro"
    assert saved["source"]["source"] == "official" and saved["source"]["file"] == str(f)
    assert saved["mesh_hierarchy"]["source"] == "decimated" and len(saved["mesh_hierarchy"]["sha256"]) == 64
    assert saved["h36m_regressor"]["sha256"] == checkpoints.sha256_file(toy.h36m_regressor_path)
    assert saved["h36m_regressor"]["ordering"] == "metro"


def test_weights_through_demo_cli_equal_project_checkpoint(released, synth, toy, tmp_path):
    import demo
    f, original = released["fastmetro"]
    ck = tmp_path / "project.pt"
    _, ident = checkpoints.load_hierarchy(toy)
    torch.save({"model": original, "config": {"model": "fastmetro", "preset": "tiny", "set": [],
                                              "mesh_hierarchy_identity": ident}}, ck)
    common = ["--images", str(synth / "images" / "test"), "--limit", "1", "--device", "cpu"]
    assert demo.main(["--model", "fastmetro", "--preset", "tiny", "--weights", str(f),
                      "--out", str(tmp_path / "a"), *common]) == 1
    assert demo.main(["--ckpt", str(ck), "--out", str(tmp_path / "b"), *common]) == 1
    (a,), (b,) = sorted((tmp_path / "a").glob("*.npz")), sorted((tmp_path / "b").glob("*.npz"))
    va, vb = np.load(a)["vertices"], np.load(b)["vertices"]
    assert va.shape == (6890, 3) and np.array_equal(va, vb)


def test_wrong_preset_names_keys_and_the_preset_that_fits(released):
    f, _ = released["fastmetro"]
    with pytest.raises(ValueError) as e:
        checkpoints.load_for_inference("cpu", weights=f, model="tore", preset="tiny")
    msg = str(e.value)
    assert str(f) in msg and "--model tore --preset tiny" in msg
    assert "missing keys" in msg and "token_selector_fc.weight" in msg
    assert "unexpected keys" in msg and "coarse2intermediate_upsample.weight" in msg
    assert "The file fits: --model fastmetro --preset tiny" in msg


def test_project_checkpoint_is_not_taken_for_weights_and_vice_versa(released, tmp_path):
    f, _ = released["fastmetro"]
    with pytest.raises(ValueError, match="not a checkpoint written by train.py.*--weights"):
        checkpoints.load_model_from_checkpoint(f, "cpu")
    with pytest.raises(ValueError, match="--weights needs --model and --preset"):
        checkpoints.load_for_inference("cpu", weights=f)


def test_train_initialises_from_weights(released, synth, tmp_path):
    import train
    f, original = released["tore"]
    args = train.parse_args(["--model", "tore", "--preset", "tiny", "--weights", str(f), "--train",
                             str(synth / "test.npz"), "--out", str(tmp_path), "--steps", "1", "--lr", "0",
                             "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu"])
    train.train(args)
    ck = train.load_checkpoint(tmp_path / "last.pt")
    params = dict(checkpoints.build_model("tore", "tiny", checkpoints.build_body())[0].named_parameters())
    for k in params:                          # lr 0: the parameters are the released ones
        assert torch.equal(ck["model"][k], original[k]), k
    assert ck["config"]["mesh_hierarchy_identity"]["source"] == "decimated"


# ----------------------------------------------------------------------------- hierarchy
def write_graphcmr(path, h, template_faces):
    """A GraphCMR-layout mesh_downsampling.npz (U, D, F object arrays) of a MeshHierarchy."""
    U = np.empty(len(h.up_index), dtype=object)
    D = np.empty(len(h.down_index), dtype=object)
    F = np.empty(len(h.faces), dtype=object)
    for l in range(len(h.up_index)):
        U[l] = sp.csc_matrix(h.U(l))
        D[l] = sp.csc_matrix(h.D(l))
    for l in range(len(h.faces)):
        F[l] = (template_faces if l == 0 else h.faces[l]).astype(np.uint32)
    np.savez(path, U=U, D=D, F=F)


def test_mesh_hierarchy_file_identity_round_trip(toy, tmp_path):
    h, decimated = checkpoints.load_hierarchy(toy)
    f = tmp_path / "mesh_downsampling.npz"
    write_graphcmr(f, h, toy.faces.numpy())
    _, ident = checkpoints.load_hierarchy(toy, f)
    assert ident["source"] == "graphcmr" and ident["file"] == str(f)
    assert ident["sha256"] == decimated["sha256"]          # same arrays -> same identity
    # A hierarchy with other upsampling weights is another identity, and a checkpoint refuses it.
    h.up_weight[0] = h.up_weight[0][:, [1, 0, 2]]
    h.up_index[0] = h.up_index[0][:, [1, 0, 2]]
    other = tmp_path / "other.npz"
    h.up_index[1] = np.roll(h.up_index[1], 1, axis=0)
    write_graphcmr(other, h, toy.faces.numpy())
    _, ident2 = checkpoints.load_hierarchy(toy, other)
    assert ident2["sha256"] != decimated["sha256"]
    with pytest.raises(ValueError, match="trained on the decimated mesh hierarchy.*--mesh-hierarchy"):
        checkpoints.check_hierarchy_identity(decimated, ident2, "run/last.pt")


def test_official_weights_with_real_smpl_need_the_hierarchy_file(released, tmp_path):
    # A body that is not the toy (by name) and has 6890 vertices is treated as the real SMPL.
    src = body.toy_body_path()
    dst = tmp_path / "SMPL_NEUTRAL.pkl"
    shutil.copy(src, dst)
    shutil.copy(body.h36m_sidecar(src), tmp_path / body.H36M_REGRESSOR_NAME)
    f, _ = released["fastmetro"]
    with pytest.raises(ValueError, match=r"GraphCMR.*--mesh-hierarchy mesh_downsampling\.npz.*FastMETRO"):
        checkpoints.load_for_inference("cpu", weights=f, model="fastmetro", preset="tiny", body=str(dst))


# ----------------------------------------------------------------------------- protocols
class _FakeBody:
    """17 'vertices' = the 17 H36M joints (identity regressor); GT meshes from a table."""

    def __init__(self, gt_vertices):
        self.J_regressor_h36m = torch.eye(17, dtype=torch.float64)
        self.gt = gt_vertices

    def __call__(self, betas, pose):
        return {"vertices": self.gt[pose[:, 0].long()]}


def _batch(j24, has_3d, index):
    n = len(index)
    return {"img": torch.zeros(n, 3, 4, 4), "pose": torch.tensor(index, dtype=torch.float64)[:, None].repeat(1, 72),
            "betas": torch.zeros(n, 10), "has_smpl": torch.ones(n), "has_3d": torch.tensor(has_3d, dtype=torch.float64),
            "joints3d": j24, "gender": torch.zeros(n, dtype=torch.long)}


def _hand_made():
    """One sample. GT: LSP joints, pelvis (J24 14) 5 cm above the hip midpoint. Prediction: the same
    body shape, 2 m away, its regressed pelvis (H36M 0) ON the hip midpoint, one wrist 3 cm off."""
    rng = np.random.default_rng(0)
    lsp = rng.normal(0, 0.3, (14, 3))
    lsp[2], lsp[3] = [-0.1, 0.0, 0.0], [0.1, 0.0, 0.0]           # hips; midpoint at the origin
    j24 = np.zeros((1, 24, 4))
    j24[0, metrics.J24_TO_LSP, :3] = lsp
    j24[0, :, 3] = 1.0
    j24[0, 14, :3] = [0.0, 0.05, 0.0]                           # GT pelvis != hip midpoint
    j24[0, 14, 3] = 1.0
    pred = np.zeros((17, 3))
    pred[metrics.H36M_TO_LSP] = lsp
    pred[metrics.H36M_TO_LSP[6]] += [0.03, 0.0, 0.0]            # R_Wrist 3 cm off
    pred[0] = [0.0, 0.0, 0.0]                                   # predicted pelvis = hip midpoint
    pred += [0.0, 0.0, 2.0]
    gt_mesh = np.zeros((17, 3))
    gt_mesh[metrics.H36M_TO_LSP] = lsp
    gt_mesh[0] = j24[0, 14, :3]
    return lsp, torch.tensor(j24), torch.tensor(pred)[None], torch.tensor(gt_mesh)[None]


def _umeyama(a, b):
    """Independent similarity Procrustes (numpy): a onto b, rows = points."""
    ma, mb = a.mean(0), b.mean(0)
    A, B = a - ma, b - mb
    U, S, Vt = np.linalg.svd(B.T @ A)
    D = np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / (A ** 2).sum()
    return s * A @ R.T + mb


def test_protocols_on_hand_made_joints():
    lsp, j24, pred, gt_mesh = _hand_made()
    fake = _FakeBody(gt_mesh)

    class Model(torch.nn.Module):
        def forward(self, img):
            return {"vertices": pred.expand(img.shape[0], -1, -1)}

    res = {p: metrics.evaluate(Model(), [_batch(j24, [1.0], [0])], fake, "cpu", p)["model"] for p in metrics.PROTOCOLS}
    # fastmetro: both sides hip-centred -> only the wrist error remains: 30 mm / 14 joints.
    assert math.isclose(res["fastmetro"]["mpjpe"], 30.0 / 14, rel_tol=1e-9)
    # spin: prediction centred on its pelvis (= hip midpoint), GT on its pelvis 5 cm above the
    # hip midpoint: every joint is 5 cm off (the wrist by |(0.03, 0.05, 0)|).
    expect_spin = (13 * 50.0 + 1000 * math.hypot(0.03, 0.05)) / 14
    assert math.isclose(res["spin"]["mpjpe"], expect_spin, rel_tol=1e-9)
    # PA-MPJPE is translation invariant: equal in both protocols, and to an independent Umeyama.
    p = pred[0].numpy()[metrics.H36M_TO_LSP]
    expect_pa = 1000 * np.linalg.norm(_umeyama(p, lsp) - lsp, axis=1).mean()
    for r in res.values():
        assert math.isclose(r["pa_mpjpe"], expect_pa, rel_tol=1e-6)
    # MPVE: both meshes centred on their regressed pelvis (vertex 0 here).
    pv, gv = pred[0].numpy() - pred[0, 0].numpy(), gt_mesh[0].numpy() - gt_mesh[0, 0].numpy()
    assert math.isclose(res["fastmetro"]["mpve"], 1000 * np.linalg.norm(pv - gv, axis=1).mean(), rel_tol=1e-9)


def test_protocol_without_3d_labels_uses_the_gt_mesh_and_default_is_fastmetro():
    import evaluate
    import train
    lsp, j24, pred, gt_mesh = _hand_made()

    class Model(torch.nn.Module):
        def forward(self, img):
            return {"vertices": pred.expand(img.shape[0], -1, -1)}

    r = metrics.evaluate(Model(), [_batch(j24 * 0, [0.0], [0])], _FakeBody(gt_mesh), "cpu", "spin")["model"]
    # GT joints from the GT mesh centred on its pelvis (5 cm above the hips): as with the labels.
    assert r["gt_joints_from_mesh"] == 1 and r["num_samples"] == 1
    assert math.isclose(r["mpjpe"], (13 * 50.0 + 1000 * math.hypot(0.03, 0.05)) / 14, rel_tol=1e-9)
    assert metrics.DEFAULT_PROTOCOL == "fastmetro"
    assert train.parse_args(["--model", "tore", "--train", "x.npz"]).protocol == "fastmetro"
    import inspect
    assert "DEFAULT_PROTOCOL" in inspect.getsource(evaluate.main)
    with pytest.raises(ValueError, match="unknown evaluation protocol 'metro'"):
        metrics.protocol_centre("metro", torch.zeros(1, 14, 3), torch.zeros(1, 3))


# ----------------------------------------------------------------------------- regressor checks
def _regressor_copy(tmp_path, toy, rows=None, edit=None):
    reg = np.load(toy.h36m_regressor_path)
    if rows is not None:
        reg = reg[rows]
    if edit is not None:
        edit(reg)
    f = tmp_path / "J_regressor_h36m.npy"
    np.save(f, reg)
    return f, np.load(toy.h36m_regressor_path)


def test_swapped_regressor_is_detected_and_reordered(toy, tmp_path):
    swap = [0, 4, 5, 6, 1, 2, 3] + list(range(7, 17))
    f, original = _regressor_copy(tmp_path, toy, swap)
    bm = body.BodyModel(h36m_regressor_path=f)
    assert bm.h36m_regressor_ordering == "spin"
    assert np.array_equal(bm.J_regressor_h36m.numpy(), original.astype(np.float32))
    assert body.BodyModel(h36m_regressor_path=toy.h36m_regressor_path).h36m_regressor_ordering == "metro"
    # A file fitting neither ordering (a leg row swapped with an arm row) is refused.
    f, _ = _regressor_copy(tmp_path, toy, [0, 11, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 12, 13, 14, 15, 16])
    with pytest.raises(ValueError, match=r"J_regressor_h36m\.npy: cannot tell.*metro: .*spin: "):
        body.BodyModel(h36m_regressor_path=f)


@pytest.mark.parametrize("bad, match", [(0.0, r"rows \[5\] are all zero \(joints \['L_Knee'\]\)"),
                                        (float("nan"), r"rows \[5\] contain NaN or inf")])
def test_zero_or_nan_regressor_row_is_refused(toy, tmp_path, bad, match):
    def edit(reg):
        reg[5] = 0.0
        reg[5, 100] = bad if bad != 0.0 else 0.0

    f, _ = _regressor_copy(tmp_path, toy, edit=edit)
    with pytest.raises(ValueError, match=match):
        body.load_h36m_regressor(f, 6890)


# ----------------------------------------------------------------------------- crops and files
def _textured_jpeg(path, W=1000, H=750):
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([127 + 120 * np.sin(xx / 3.1 + yy / 7.3), 127 + 120 * np.cos(xx / 5.2 - yy / 2.7),
                    rng.uniform(0, 255, (H, W))], -1)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=92)


def _reference_crop(img, center, scale, res):
    """The official crop written from its description: box corners = int(center -+ 100 * scale)
    (numpy truncation), zero padding, then a bilinear resize at pixel centres with the border
    pixel repeated (cv2 INTER_LINEAR), as interpolation matrices (float64)."""
    x0, y0 = (int(c - 100.0 * scale) for c in center)
    x1, y1 = (int(c + 100.0 * scale) for c in center)
    H0, W0, _ = img.shape
    box = np.zeros((y1 - y0, x1 - x0, 3))
    for y in range(max(0, y0), min(H0, y1)):
        xs, xe = max(0, x0), min(W0, x1)
        box[y - y0, xs - x0:xe - x0] = img[y, xs:xe]

    def interp(n_in):
        M = np.zeros((res, n_in))
        for u in range(res):
            s = (u + 0.5) * n_in / res - 0.5
            i = math.floor(s)
            a = s - i
            M[u, min(max(i, 0), n_in - 1)] += 1 - a
            M[u, min(max(i + 1, 0), n_in - 1)] += a
        return M

    My, Mx = interp(box.shape[0]), interp(box.shape[1])
    rows = np.tensordot(My, box, axes=(1, 0))                     # (res, bw, 3)
    return np.einsum("vx,uxc->uvc", Mx, rows)


def test_evaluation_crop_matches_the_official_integer_box_crop(tmp_path):
    _textured_jpeg(tmp_path / "a.jpg")
    boxes = [((500.3, 375.7), 1.0), ((120.2, 80.9), 1.3), ((900.6, 700.4), 2.1), ((500.0, 375.0), 0.553),
             ((400.5, 300.2), 3.7)]                             # inside, across corners, larger than the image
    n = len(boxes)
    np.savez(tmp_path / "c.npz", imgname=np.array(["a.jpg"] * n), center=np.array([b[0] for b in boxes]),
             scale=np.array([b[1] for b in boxes]))
    ds = data.NpzDataset(tmp_path / "c.npz", train=False, input_size=(224, 224))
    full = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")).astype(np.float64)
    mean, std = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
    for i, (c, s) in enumerate(boxes):
        got = (ds[i]["img"].numpy().transpose(1, 2, 0) * std + mean) * 255
        ref = _reference_crop(full, c, s, 224)
        assert np.abs(got - ref).max() <= 1.0, (c, s, np.abs(got - ref).max())
        assert np.abs(got - ref).mean() < 0.05


def test_short_label_tsv_with_linelist_loads(tmp_path):
    from test_data import _dots_dataset
    yaml = data.write_metro_tsv(_dots_dataset(tmp_path), tmp_path / "tsv", "d")
    full = data.TsvDataset(yaml)
    label = tmp_path / "tsv" / "d.label.tsv"
    rows = label.read_text().splitlines()[:2]                  # only rows 0 and 1 are labelled
    data.write_tsv([r.split("\t") for r in rows], label)
    (tmp_path / "tsv" / "d.linelist.tsv").write_text("0\n1\n")
    short = data.TsvDataset(yaml)
    assert len(short) == 2
    for i in range(2):
        assert torch.equal(short[i]["img"], full[i]["img"])
        assert torch.equal(short[i]["joints3d"], full[i]["joints3d"])
    (tmp_path / "tsv" / "d.linelist.tsv").write_text("0\n3\n")
    with pytest.raises(data.DataError, match=r"linelist.*selects row 3 .*label TSV .*has 2 rows"):
        data.TsvDataset(yaml)
    (tmp_path / "tsv" / "d.yaml").write_text("img: d.img.tsv\nlabel: d.label.tsv\n")
    with pytest.raises(data.DataError, match="without a linelist every image row needs a label row"):
        data.TsvDataset(yaml)


def test_multi_line_yaml_flow_list():
    text = ("composite: true\nimg: [a.img.tsv,\n      b.img.tsv,   # second\n      c.img.tsv]\n"
            "label: [x.tsv, y.tsv]\nhw:\n  - h.tsv\n")
    cfg = data.parse_yaml(text)
    assert cfg == {"composite": True, "img": ["a.img.tsv", "b.img.tsv", "c.img.tsv"],
                   "label": ["x.tsv", "y.tsv"], "hw": ["h.tsv"]}
    with pytest.raises(ValueError, match="never closed"):
        data.parse_yaml("img: [a,\n b\n")


# ----------------------------------------------------------------------------- loss fidelity
def test_normal_loss_faces_are_every_triangle_of_the_edge_graph():
    # A tetrahedron without its bottom face: 3 faces, but its edge graph has 4 triangles.
    faces = torch.tensor([[0, 1, 3], [1, 2, 3], [2, 0, 3]])
    tri = fastmetro.edge_graph_triangles(faces, 4)
    assert sorted(map(tuple, tri.tolist())) == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    # A closed octahedron: exactly its 8 faces.
    oct_faces = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    assert sorted(map(tuple, fastmetro.edge_graph_triangles(oct_faces, 6).tolist())) == \
        sorted(tuple(sorted(f)) for f in oct_faces.tolist())


def test_normal_loss_uses_edge_graph_triangles(icosphere_topology):
    topo = icosphere_topology
    model = fastmetro.FastMETRO(fastmetro.PRESETS["tiny"], checkpoints._NoParamBackbone(8), topo)
    expect = fastmetro.edge_graph_triangles(topo["faces"][1], topo["num_vertices"][1])
    assert torch.equal(model.normal_faces_1, expect)


def test_tore_itp_weight_is_float64():
    for epoch in (0.0, 2.9, 3.7, 10.25, 59.9):
        assert tore.itp_loss_weight(epoch) == 1e-3 * (1 / (1 + np.exp(-(np.float64(epoch) - 3))))


def test_losses_run_in_float32_outside_autocast_and_batch_is_printed(synth, tmp_path, monkeypatch, capsys):
    import train
    seen = []
    real = fastmetro.FastMETRO.loss

    def spy(self, out, targets):
        seen.append((torch.is_autocast_enabled("cpu"), {k: v.dtype for k, v in out.items()}))
        return real(self, out, targets)

    monkeypatch.setattr(fastmetro.FastMETRO, "loss", spy)
    args = train.parse_args(["--model", "fastmetro", "--preset", "tiny", "--train", str(synth / "test.npz"),
                             "--out", str(tmp_path), "--steps", "1", "--batch-size", "2", "--workers", "0",
                             "--no-progress", "--device", "cpu", "--amp", "bf16"])
    train.train(args)
    autocast_on, dtypes = seen[0]
    assert not autocast_on and set(dtypes.values()) == {torch.float32}
    text = capsys.readouterr().out
    assert "batch: 2 per GPU x world size 1 x accum 1 = global batch 2" in text and "lr 0.0001" in text
    assert fastmetro.TRAIN_DEFAULTS["batch_per_gpu"] == 16 == tore.TRAIN_DEFAULTS["batch_per_gpu"]


def test_two_nodes_one_process_each_on_localhost(synth, tmp_path):
    """Multi-node torchrun as far as one machine allows: 2 "nodes" x 1 process, c10d rendezvous,
    gloo. Both agents rendezvous at one endpoint, train 2 steps, and the replicas stay identical."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test2n",
           str(root / "train.py"), "--model", "fastmetro", "--preset", "tiny", "--train", str(synth / "test.npz"),
           "--out", str(tmp_path), "--steps", "2", "--batch-size", "1", "--workers", "0", "--device", "cpu",
           "--no-progress", "--log-every", "1"]
    nodes = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = []
    for p in nodes:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in nodes:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-3000:] for o in outs)
    rep = json.loads((tmp_path / "replicas.json").read_text())
    assert rep["world_size"] == 2 and rep["max_param_spread"] == 0.0
    assert any("world size 2" in o and "global batch 2" in o for o in outs)


def test_scripts_import_no_other_script():
    """train.py, evaluate.py and demo.py share model loading through checkpoints.py and the
    metrics through metrics.py: no script imports another (the train <-> evaluate cycle is gone)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    scripts = {"train", "evaluate", "demo"}
    for name in scripts:
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & (scripts - {name}), (name, imported & scripts)
        assert "checkpoints" in imported, name


def test_resume_refuses_another_mesh_hierarchy(synth, toy, tmp_path):
    import train
    h, _ = checkpoints.load_hierarchy(toy)
    h.up_index[1] = np.roll(h.up_index[1], 1, axis=0)              # another hierarchy, same sizes
    other = tmp_path / "other_mesh_downsampling.npz"
    write_graphcmr(other, h, toy.faces.numpy())
    common = ["--model", "fastmetro", "--preset", "tiny", "--train", str(synth / "test.npz"), "--out",
              str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--workers", "0", "--no-progress",
              "--device", "cpu"]
    train.train(train.parse_args(common + ["--stop-at-step", "1", "--ckpt-every", "1"]))
    with pytest.raises(ValueError, match="trained on the decimated mesh hierarchy"):
        train.train(train.parse_args(common + ["--resume", "--mesh-hierarchy", str(other)]))


def test_tore_nsr_layer_hint_and_set_override(toy, tmp_path):
    model, _ = checkpoints.build_model("tore", "tiny", toy, overrides={"nsr_enc_layers": 2})
    f = tmp_path / "tore_nsr2.bin"
    torch.save(official_layout(model, prefix=""), f)
    with pytest.raises(ValueError, match=r"NSR encoder \(transformer_3.encoder\) has 2 layer\(s\): add "
                                         r"--set nsr_enc_layers=2"):
        checkpoints.load_for_inference("cpu", weights=f, model="tore", preset="tiny")
    loaded, _, _ = checkpoints.load_for_inference("cpu", weights=f, model="tore", preset="tiny",
                                                  overrides={"nsr_enc_layers": 2})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="applies to --weights only"):
        checkpoints.load_for_inference("cpu", ckpt=f, overrides={"nsr_enc_layers": 2})
