"""freihand.py: loaders on files written here in FreiHAND's layout, and the evaluation conventions
on hand-made cases whose numbers are worked out by hand (in the comments)."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import freihand as fr


def _write_set(root, split, n, n_images, seed=0):
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 21, 3)) * 0.03 + [0, 0, 0.5]
    xyz[:, 0] = [0.0224, 0.0, 0.5]                        # wrist: u = 500*0.0224/0.5 + 112 = 134.4
    K = np.tile([[500.0, 0, 112], [0, 500, 112], [0, 0, 1]], (n, 1, 1))
    (root / f"{split}_xyz.json").write_text(json.dumps(xyz.tolist()))
    (root / f"{split}_K.json").write_text(json.dumps(K.tolist()))
    (root / f"{split}_verts.json").write_text(json.dumps((rng.normal(size=(n, 778, 3)) * 0.03).tolist()))
    mano = [[list(np.arange(61) * 0.01 + i)] for i in range(n)]           # [[61 numbers]] per entry
    (root / f"{split}_mano.json").write_text(json.dumps(mano))
    (root / split / "rgb").mkdir(parents=True)
    for k in range(n_images):
        Image.new("RGB", (224, 224), (10 * k, 0, 0)).save(root / split / "rgb" / f"{k:08d}.jpg", quality=100)
    return xyz, K


def test_loaders_on_written_layout(tmp_path):
    xyz, K = _write_set(tmp_path, "training", 2, 8)
    _write_set(tmp_path, "evaluation", 1, 1, seed=1)
    ann = fr.load_annotations(tmp_path, "training")
    assert ann["size"] == 2 and ann["pose"].shape == (2, 48) and ann["betas"].shape == (2, 10)
    np.testing.assert_allclose(ann["pose"][1, :3], [1.0, 1.01, 1.02])
    np.testing.assert_allclose(ann["scale"], [0.6, 1.6])
    assert ann["verts"].shape == (2, 778, 3)
    assert fr.image_path(tmp_path, "training", 1, "hom", 2).name == "00000003.jpg"
    assert fr.image_path(tmp_path, "training", 1, "auto", 2).name == "00000007.jpg"
    ds = fr.FreiHANDDataset(tmp_path, "training", versions=("gs", "hom"))
    assert len(ds) == 4
    item = ds[3]                                          # sample 1, "hom" -> image 3 (red = 30)
    assert item["index"] == 1 and item["image"].shape == (3, 224, 224)
    red = item["image"][0].mean() * 0.229 + 0.485
    assert abs(float(red) - 30 / 255) < 0.02
    np.testing.assert_allclose(item["joints2d"][0].numpy(), [0.2, 0.0, 1.0], atol=1e-5)  # 2*134.4/224-1
    np.testing.assert_allclose(item["joints3d"][:, :3].numpy(), xyz[1], atol=1e-6)
    assert float(item["has_smpl"]) == 1.0 and item["vertices"].shape == (778, 3)
    ev = fr.FreiHANDDataset(tmp_path, "evaluation")
    assert len(ev) == 1 and ev[0]["joints3d"].shape == (21, 4)
    with pytest.raises(ValueError, match="only the 'gs'"):
        fr.image_path(tmp_path, "evaluation", 0, "hom", 1)


def test_loader_errors_name_file_and_index(tmp_path):
    _write_set(tmp_path, "training", 2, 2)
    bad = json.loads((tmp_path / "training_xyz.json").read_text())
    bad[1] = bad[1][:20]
    (tmp_path / "training_xyz.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"training_xyz\.json: entry 1 has shape \(20, 3\), expected \(21, 3\)"):
        fr.load_annotations(tmp_path, "training")
    (tmp_path / "b").mkdir()
    _write_set(tmp_path / "b", "training", 2, 0)
    K = json.loads((tmp_path / "b" / "training_K.json").read_text())
    (tmp_path / "b" / "training_K.json").write_text(json.dumps(K[:1]))
    with pytest.raises(ValueError, match=r"training_K\.json: 1 entries, expected 2"):
        fr.load_annotations(tmp_path / "b", "training")
    (tmp_path / "b" / "training_mano.json").write_text("[[1, 2")
    with pytest.raises(ValueError, match="training_K.json|training_mano.json"):
        fr.load_annotations(tmp_path / "b", "training")
    with pytest.raises(FileNotFoundError, match="evaluation_xyz.json"):
        fr.load_annotations(tmp_path / "b", "evaluation")
    (tmp_path / "c").mkdir()
    _write_set(tmp_path / "c", "training", 1, 0)
    with pytest.raises(FileNotFoundError, match="00000000.jpg"):
        fr.FreiHANDDataset(tmp_path / "c", "training")[0]


def test_align_matches_scipy_procrustes_and_allows_reflection():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(21, 3))
    c, s = np.cos(0.5), np.sin(0.5)
    Rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    pred = 1.7 * gt @ Rz.T + [0.1, -0.2, 0.3]
    np.testing.assert_allclose(fr.align_w_scale(gt, pred), gt, atol=1e-7)
    # FreiHAND's alignment is scipy's orthogonal_procrustes on normalised centred sets
    p2 = rng.normal(size=(21, 3))
    a, b = gt - gt.mean(0), p2 - p2.mean(0)
    s1, s2 = np.linalg.norm(a) + 1e-8, np.linalg.norm(b) + 1e-8
    R, sc = scipy.linalg.orthogonal_procrustes(a / s1, b / s2)
    np.testing.assert_allclose(fr.align_w_scale(gt, p2), (b / s2) @ R.T * sc * s1 + gt.mean(0), atol=1e-12)
    # a mirrored prediction aligns perfectly (no reflection fix in eval.py)
    np.testing.assert_allclose(fr.align_w_scale(gt, gt * [-1, 1, 1]), gt, atol=1e-7)


def test_metrics_hand_made_cases():
    # gt: 4 points at +-1 cm on x and y; pred keeps the x pair and puts the y pair at the centre.
    # Centred already; normalised gt rows have length 0.5, pred x rows 1/sqrt(2); a^T b has one
    # singular value 2 * 0.5 / sqrt(2) = 1/sqrt(2) -> aligned pred = pred (R = I, scale keeps it):
    # errors 0, 0, 10, 10 mm -> PA-MPJPE 5 mm. Shifting pred by (3, 4, 0) mm changes nothing aligned;
    # unaligned errors 5, 5, sqrt(3^2 + 6^2) = 6.7082, sqrt(3^2 + 14^2) = 14.3178 -> mean 7.7565 mm.
    gt = 0.01 * np.array([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]])
    pred = 0.01 * np.array([[1.0, 0, 0], [-1, 0, 0], [0, 0, 0], [0, 0, 0]]) + [0.003, 0.004, 0]
    m = fr.evaluate(gt[None], pred[None])
    assert abs(m["pa_mpjpe_mm"] - 5.0) < 1e-4
    assert abs(m["mpjpe_mm"] - (5 + 5 + 45 ** 0.5 + 205 ** 0.5) / 4) < 1e-9
    # F-score: 4 points on a line 1 cm apart, the last one lifted by 1 cm. Nearest distances:
    # pred -> gt 0, 0, 0, 10 mm; gt -> pred 0, 0, 0, 10 mm. F@5 = 0.75, F@15 = 1.
    line = 0.01 * np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]])
    lifted = line.copy()
    lifted[3, 1] = 0.01
    assert fr.fscore(line, lifted, 0.005)[0] == pytest.approx(0.75)
    assert fr.fscore(line, lifted, 0.015)[0] == pytest.approx(1.0)
    # strict <: with binary-exact spacing 1/128 m, a distance equal to the threshold is a miss
    assert fr.fscore(line * 0.78125, lifted * 0.78125, 1 / 128)[0] == pytest.approx(0.75)
    assert fr.fscore(line * 0.78125, lifted * 0.78125, 1 / 128 + 1e-9)[0] == pytest.approx(1.0)
    # one GT point, two predictions (one far): P = 1, R = 1/2 -> F = 2/3
    f, p, r = fr.fscore(np.zeros((1, 3)), np.array([[0.0, 0, 0], [1, 0, 0]]), 0.005)
    assert (p, r) == (1.0, 0.5) and f == pytest.approx(2 / 3)
    # AUC over 0..50 mm, 100 thresholds: errors 0 -> 1; 60 mm -> 0; exactly 25 mm -> the step
    # starts at threshold 50 (25.25 mm): (49 + 1/2) intervals of 50/99 mm over 50 mm = 0.5
    assert fr.pck_auc([0.0]) == 1.0 and fr.pck_auc([0.06]) == 0.0
    assert fr.pck_auc([0.025]) == pytest.approx(0.5)
    # meshes: similarity-transformed prediction -> PA-MPVPE 0, aligned F = 1
    rng = np.random.default_rng(1)
    gv = rng.normal(size=(2, 778, 3)) * 0.03
    m = fr.evaluate(gt[None].repeat(2, 0), gt[None].repeat(2, 0), gv, 0.8 * gv + 0.05)
    assert m["pa_mpvpe_mm"] < 1e-4 and m["f@5mm"] == 1.0 and m["f@15mm"] == 1.0
    assert m["f@5mm_unaligned"] < 0.5 and m["mpvpe_mm"] > 50
    with pytest.raises(ValueError, match="xyz"):
        fr.evaluate(gt[None], pred[None, :3])


def test_pred_json_round_trip(tmp_path):
    xyz, verts = np.random.rand(3, 21, 3), np.random.rand(3, 778, 3)
    p = fr.write_pred_json(tmp_path / "pred.json", xyz, verts)
    x2, v2 = fr.read_pred_json(p, size=3)
    np.testing.assert_allclose(x2, xyz)
    np.testing.assert_allclose(v2, verts)
    with pytest.raises(ValueError, match="expected 4"):
        fr.read_pred_json(p, size=4)
    (tmp_path / "bad.json").write_text(json.dumps([xyz.tolist()]))
    with pytest.raises(ValueError, match=r"\[xyz_list, verts_list\]"):
        fr.read_pred_json(tmp_path / "bad.json")
