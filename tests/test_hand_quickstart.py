"""Synthetic hands in FreiHAND's layout (freihand.write_synthetic) and the hand quickstart end to
end (2 training steps: files written, table printed, an existing run refused)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import freihand as fr
import hand
import hand_quickstart


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return fr.write_synthetic(tmp_path_factory.mktemp("fh"), n_train=2, n_eval=1, seed=3)


def test_synthetic_layout_is_consistent(synth):
    ann = fr.load_annotations(synth, "training")
    assert ann["size"] == 2 and ann["verts"].shape == (2, 778, 3)
    hm = hand.HandModel()
    # keypoints are the 21-keypoint regressor applied to the written mesh (camera frame)
    kp = hm.keypoints(torch.tensor(ann["verts"]))
    np.testing.assert_allclose(kp.numpy(), ann["xyz"], atol=2e-6)
    # the written pose/shape reproduce the mesh up to the camera translation
    o = hm(torch.tensor(ann["betas"]), torch.tensor(ann["pose"]))
    d = ann["verts"] - o["vertices"].numpy()
    np.testing.assert_allclose(d, d[:, :1].repeat(778, 1), atol=2e-5)
    # the wrist projects inside the rendered hand (background is one flat colour)
    for i in range(2):
        img = np.asarray(Image.open(synth / "training" / "rgb" / f"{i:08d}.jpg"), np.float64)
        u, v = fr.project(ann["xyz"][i], ann["K"][i])[9].round().astype(int)   # middle MCP (palm)
        assert np.abs(img[v, u] - img[0, 0]).sum() > 30
    assert 0.4 < ann["xyz"][:, :, 2].mean() < 0.7


def test_hand_quickstart_end_to_end(synth, tmp_path, capsys):
    args = ["--data", str(synth), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2"]
    res = hand_quickstart.main(args)
    assert res["steps"] == 2 and np.isfinite(res["metrics"]["pa_mpjpe_mm"])
    # root-relative (wrist-centred GT), not camera coordinates (~0.5 m away): bounded by the hand's size
    m = res["metrics"]
    assert m["pa_mpjpe_mm"] <= m["mpjpe_mm"] < 250 and m["mpvpe_mm"] < 250
    xyz, verts = fr.read_pred_json(tmp_path / "run" / "pred.json", size=1)
    assert verts.shape == (1, 778, 3) and np.allclose(xyz[:, 0], 0)           # wrist-centred
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n_eval"] == 1
    assert "pa_mpvpe_mm" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        hand_quickstart.main(args)


def test_plausible_poses_bend_fingers_towards_the_palm():
    hm = hand.HandModel()
    flex, normal = fr.hand_pose_axes(hm)
    assert flex.shape == (15, 3) and torch.allclose(flex.norm(dim=1), torch.ones(15))
    assert torch.allclose(flex @ normal, torch.zeros(15), atol=1e-6)        # bending axes lie in the palm plane
    flat = hm(torch.zeros(1, 10), torch.zeros(1, 48))["joints"][0]
    pose = torch.zeros(1, 48)
    pose[0, 3:12] = (1.0 * flex[:3]).reshape(-1)                             # index chain, 1 rad per joint
    bent = hm(torch.zeros(1, 10), pose)["joints"][0]
    tip = hand.FREIHAND_JOINT_NAMES.index("Index_4")
    assert float((bent[tip] - flat[tip]) @ normal) > 0.02                    # towards the palm side
    assert float((bent[tip] - bent[0]).norm()) < float((flat[tip] - flat[0]).norm()) - 0.02
    others = [i for i, name in enumerate(hand.FREIHAND_JOINT_NAMES) if not name.startswith("Index")]
    torch.testing.assert_close(bent[others], flat[others])
    p1 = fr.sample_hand_poses(hm, 64, torch.Generator().manual_seed(0))
    p2 = fr.sample_hand_poses(hm, 64, torch.Generator().manual_seed(0))
    assert p1.shape == (64, 48) and torch.equal(p1, p2) and not p1[:, :3].any()
    tips = hm(torch.zeros(64, 10), p1)["joints"][:, [4, 8, 12, 16, 20]]     # fingertips
    assert float(((tips - flat[[4, 8, 12, 16, 20]]) @ normal).mean()) > 0.01
    with pytest.raises(ValueError, match="poses"):
        fr.write_synthetic("/nonexistent", 1, 1, poses="uniform")


def test_quickstart_records_its_synthetic_set_and_says_when_cut(tmp_path, capsys):
    d = tmp_path / "syn"
    base = ["--data", str(d), "--steps", "1", "--batch-size", "2", "--n-train", "2", "--n-eval", "1"]
    res = hand_quickstart.main(base + ["--out", str(tmp_path / "a")])
    assert res["steps"] == 1 and res["overrides"] == {"vertices_3d_loss_weight": 1000.0}
    assert json.loads((d / "synthetic.json").read_text())["n_train"] == 2
    assert (tmp_path / "a" / "model.pt").is_file()
    first = (d / "training_xyz.json").read_text()
    assert "rendering" in capsys.readouterr().out
    hand_quickstart.main(base + ["--out", str(tmp_path / "b"), "--set", "vertices_3d_loss_weight=100.0"])
    out = capsys.readouterr().out
    assert "rendering" not in out and "CUT SHORT" not in out                  # same settings: reused
    res = hand_quickstart.main(base + ["--out", str(tmp_path / "c"), "--seed", "1", "--max-minutes", "0"])
    out = capsys.readouterr().out
    assert "replacing a set made with other settings" in out and (d / "training_xyz.json").read_text() != first
    assert res["steps"] == 0 and "CUT SHORT" in out                           # the guard says so
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        hand_quickstart.main(base + ["--out", str(tmp_path / "d"), "--set", "vertices_3d_loss_weight=abc"])
