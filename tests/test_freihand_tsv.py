"""freihand.MetroFreiHANDTsv: METRO's FreiHAND TSV layout (yaml naming img / label / hw TSVs; one
label row = key \\t JSON list whose first element holds center, scale, 2d_joints (21, 3) pixels,
3d_joints (21, 4) wrist-centred, pose (48), betas (10) and the has_* flags, as
metro/tools/tsv_demo_freihand.py writes it), on files written here, and its errors."""
import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import freihand as fr
import hand


@pytest.fixture(scope="module")
def hm():
    return hand.HandModel()


@pytest.fixture(scope="module")
def synth(tmp_path_factory, hm):
    root = tmp_path_factory.mktemp("fh")
    fr.write_synthetic(root, 3, 1, seed=3)
    return root, fr.load_annotations(root, "training")


def _labels(ann, i):
    """tsv_demo_freihand.py's training label: centre (112, 112), scale 0.9, 2D keypoints in image
    pixels with conf 1, 3D keypoints wrist-centred with conf 1, MANO pose / betas, has_* = 1."""
    uv = fr.project(ann["xyz"][i], ann["K"][i])
    rel = ann["xyz"][i] - ann["xyz"][i][:1]
    return {"center": [112, 112], "scale": 0.9,
            "2d_joints": np.concatenate([uv, np.ones((21, 1))], 1).tolist(), "has_2d_joints": 1,
            "3d_joints": np.concatenate([rel, np.ones((21, 1))], 1).tolist(), "has_3d_joints": 1,
            "pose": ann["pose"][i].tolist(), "betas": ann["betas"][i].tolist(), "has_smpl": 1}


def _write_tsv(out, root, labels, name="train"):
    """img / label / hw TSVs (+ .lineidx), linelist and the yaml index, METRO's layout."""
    rows_img, rows_label, rows_hw = [], [], []
    for i, lab in enumerate(labels):
        key = f"{i:08d}.jpg"
        rows_img.append([key, base64.b64encode((root / "training" / "rgb" / key).read_bytes()).decode()])
        rows_label.append([key, json.dumps([lab])])
        rows_hw.append([key, json.dumps([{"height": 224, "width": 224}])])
    out.mkdir(parents=True, exist_ok=True)
    data.write_tsv(rows_img, out / f"{name}.img.tsv")
    data.write_tsv(rows_label, out / f"{name}.label.tsv")
    data.write_tsv(rows_hw, out / f"{name}.hw.tsv")
    data.write_tsv([[i] for i in range(len(labels))], out / f"{name}.linelist.tsv")
    y = out / f"{name}.yaml"
    y.write_text(f"img: {name}.img.tsv\nlabel: {name}.label.tsv\nhw: {name}.hw.tsv\nlinelist: {name}.linelist.tsv\n")
    return y


def test_reads_metro_layout_and_builds_meshes_as_metro_training(tmp_path, synth, hm):
    root, ann = synth
    y = _write_tsv(tmp_path / "tsv", root, [_labels(ann, i) for i in range(3)])
    ds = fr.MetroFreiHANDTsv(y, hand_model=hm)
    assert len(ds) == 3
    it = ds[1]
    assert it["image"].shape == (3, 224, 224) and it["imgname"] == "00000001.jpg"
    # the mesh comes from MANO(pose, betas), wrist-centred: the written camera-frame mesh, wrist-centred
    wrist = ann["xyz"][1][0]
    np.testing.assert_allclose(it["vertices"].numpy(), ann["verts"][1] - wrist, atol=2e-5)
    np.testing.assert_allclose(it["joints3d"][:, :3].numpy(), ann["xyz"][1] - wrist, atol=2e-5)
    assert float(it["has_smpl"]) == 1 and float(it["has_3d"]) == 1
    # crop box = 180 px around (112, 112) -> 224 px: normalised u = (x - 112) / 90
    uv = fr.project(ann["xyz"][1], ann["K"][1])
    np.testing.assert_allclose(it["joints2d"][:, :2].numpy(), (uv - 112) / 90, atol=1e-5)
    # the image is that crop of the JPEG (centre pixel of the crop = centre pixel of the image)
    with Image.open(root / "training" / "rgb" / "00000001.jpg") as im:
        full = np.asarray(im.convert("RGB"), np.float32) / 255
    centre = it["image"][:, 111:113, 111:113].mean((1, 2)).numpy() * np.array(data.IMAGENET_STD) + data.IMAGENET_MEAN
    np.testing.assert_allclose(centre, full[111:113, 111:113].mean((0, 1)), atol=0.03)
    # it trains like the FreiHAND-json dataset: same keys, shapes and dtypes the hand models use
    ref = fr.FreiHANDDataset(root, "training")[1]
    for k in ("image", "joints3d", "joints2d", "vertices", "has_smpl", "has_3d", "pose", "betas"):
        assert it[k].shape == ref[k].shape and it[k].dtype == ref[k].dtype, k


def test_without_hand_model_and_with_rotation(tmp_path, synth, hm):
    root, ann = synth
    y = _write_tsv(tmp_path / "tsv", root, [_labels(ann, i) for i in range(3)])
    it = fr.MetroFreiHANDTsv(y)[2]                       # no MANO: label keypoints, no mesh
    assert float(it["has_smpl"]) == 0 and not it["vertices"].any()
    np.testing.assert_allclose(it["joints3d"][:, :3].numpy(), ann["xyz"][2] - ann["xyz"][2][0], atol=2e-6)
    # in-plane rotation: the mesh from the rotated global orientation and the rotated label
    # keypoints agree (METRO's rot_aa / j3d_processing pair), and the 2D keypoints turn with the image
    with_mano, without = fr.MetroFreiHANDTsv(y, hand_model=hm, train=True), fr.MetroFreiHANDTsv(y, train=True)
    rec, img = with_mano._record(2), with_mano._image(2)
    a = with_mano.process(img, rec, 2, rot=40.0)
    b = without.process(img, rec, 2, rot=40.0)
    np.testing.assert_allclose(a["joints3d"].numpy(), b["joints3d"].numpy(), atol=3e-5)
    r0 = without.process(img, rec, 2, rot=0.0)["joints2d"][:, :2].numpy()
    r40 = b["joints2d"][:, :2].numpy()
    ang = np.degrees(np.arctan2(r40[:, 1], r40[:, 0]) - np.arctan2(r0[:, 1], r0[:, 0]))
    far = np.linalg.norm(r0, axis=1) > 0.2
    np.testing.assert_allclose(((ang[far] + 180) % 360) - 180, -40.0, atol=0.5)
    with pytest.raises(ValueError, match="flip"):
        fr.MetroFreiHANDTsv(y, flip_prob=0.5)


def test_evaluation_rows_with_dummy_mano_have_no_mesh(tmp_path, synth, hm):
    root, ann = synth
    lab = dict(_labels(ann, 0), pose=[1.0] * 48, betas=[1.0] * 10, has_2d_joints=0, has_3d_joints=0,
               **{"2d_joints": np.zeros((21, 3)).tolist(), "3d_joints": np.zeros((21, 4)).tolist()})
    it = fr.MetroFreiHANDTsv(_write_tsv(tmp_path / "tsv", root, [lab], "test"), hand_model=hm)[0]
    assert float(it["has_smpl"]) == 0 and float(it["has_3d"]) == 0 and not it["joints2d"].any()


@pytest.mark.parametrize("change, match", [
    (lambda lab: lab.pop("betas"), r"train\.label\.tsv: index 1, key 'betas': missing key in label"),
    (lambda lab: lab.update({"2d_joints": np.zeros((24, 3)).tolist()}),
     r"train\.label\.tsv: index 1, key '2d_joints': expected shape \(21, 3\), got \(24, 3\)"),
    (lambda lab: lab.update(pose=[0.0] * 72), r"index 1, key 'pose': expected shape \(48,\), got \(72,\)"),
    (lambda lab: lab.update({"3d_joints": (np.array(lab["3d_joints"]) * [1000, 1000, 1000, 1]).tolist()}),
     r"index 1, key '3d_joints': wrist-relative keypoints up to 1\d\d: .*millimetres"),
    (lambda lab: lab.update(center=[float("nan"), 1.0]), r"index 1, key 'center': contains NaN"),
])
def test_bad_labels_name_file_row_and_key(tmp_path, synth, change, match):
    root, ann = synth
    labels = [_labels(ann, i) for i in range(2)]
    change(labels[1])
    ds = fr.MetroFreiHANDTsv(_write_tsv(tmp_path / "tsv", root, labels))
    ds[0]                                               # the good row loads
    with pytest.raises(data.DataError, match=match):
        ds[1]


def test_bad_index_and_image_errors(tmp_path, synth):
    root, ann = synth
    y = _write_tsv(tmp_path / "tsv", root, [_labels(ann, 0)])
    y.write_text("label: train.label.tsv\n")
    with pytest.raises(data.DataError, match=r"train\.yaml: index -, key 'img': missing key in the yaml index"):
        fr.MetroFreiHANDTsv(y)
    y = _write_tsv(tmp_path / "tsv2", root, [_labels(ann, 0)])
    data.write_tsv([["00000000.jpg", base64.b64encode(b"not a jpeg").decode()]], tmp_path / "tsv2" / "train.img.tsv")
    with pytest.raises(data.DataError, match=r"train\.img\.tsv: index 0, key 'img': cannot decode"):
        fr.MetroFreiHANDTsv(y)[0]
    data.write_tsv([["00000000.jpg", "{not json"]], tmp_path / "tsv2" / "train.label.tsv")
    with pytest.raises(data.DataError, match=r"train\.label\.tsv: index 0, key 'label': cannot parse JSON"):
        fr.MetroFreiHANDTsv(y)[0]
