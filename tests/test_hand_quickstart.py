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
    xyz, verts = fr.read_pred_json(tmp_path / "run" / "pred.json", size=1)
    assert verts.shape == (1, 778, 3) and np.allclose(xyz[:, 0], 0)           # wrist-centred
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n_eval"] == 1
    assert "pa_mpvpe_mm" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        hand_quickstart.main(args)
