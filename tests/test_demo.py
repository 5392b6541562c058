"""demo.py on real photos (issue 15 point 6, issue 19): EXIF orientation (also in the training
loader), 16-bit / alpha / greyscale images, output names that never collide, an unreadable image
skipped and reported with exit status 1, checked boxes, COCO and OpenPose person boxes, and the
mesh drawn back into the full image where it was drawn on the crop."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoints  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402
import render  # noqa: E402
import photo  # noqa: E402
from mesh import icosphere  # noqa: E402

ORIENTATION = 0x0112


def save_with_orientation(upright, path, orientation):
    """Store `upright` (PIL) as the camera would: pixels rotated, EXIF tag saying how to undo it."""
    stored = {6: upright.transpose(Image.Transpose.ROTATE_90),         # displayed = stored rotated 90 CW
              8: upright.transpose(Image.Transpose.ROTATE_270),
              3: upright.transpose(Image.Transpose.ROTATE_180)}[orientation]
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(path, exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((60, 40, 3), np.uint8)                                # portrait 40 wide, 60 high
    a[:20, :, 0] = 255                                                 # red top third
    for o in (3, 6, 8):
        p = tmp_path / f"o{o}.jpg"
        save_with_orientation(Image.fromarray(a), p, o)
        assert Image.open(p).size != (40, 60) or o == 3               # stored rotated
        img = np.asarray(photo.read_image(p))
        assert img.shape == (60, 40, 3)
        assert img[:15, :, 0].mean() > 200 and img[30:, :, 0].mean() < 40, o
        with Image.open(p) as raw:
            assert data.exif_upright(raw).size == (40, 60)
    plain = tmp_path / "plain.jpg"
    Image.fromarray(a).save(plain)
    with Image.open(plain) as raw:
        assert data.exif_upright(raw) is raw                           # no tag: the same lazy image


def test_training_loader_applies_exif_like_the_demo(tmp_path):
    data.generate_synthetic(tmp_path, 2, split="test", seed=1, size=64)
    ds = data.open_dataset(str(tmp_path / "test.npz"), train=False, input_size=(64, 64))
    before = ds[0]["img"].clone()
    name = str(np.load(tmp_path / "test.npz")["imgname"][0])
    path = tmp_path / name
    save_with_orientation(Image.open(path).convert("RGB"), path, 6)  # same picture, stored rotated + tag
    after = data.open_dataset(str(tmp_path / "test.npz"), train=False, input_size=(64, 64))[0]["img"]
    assert (after - before).abs().mean() < 0.1                         # JPEG re-encoding noise only
    assert (after - before.flip(-1).transpose(-1, -2)).abs().mean() > 0.3


def test_16bit_greyscale_alpha_and_palette_images(tmp_path):
    g16 = np.full((20, 30), 40000, np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = np.asarray(photo.read_image(tmp_path / "g16.png"))
    assert img.shape == (20, 30, 3) and abs(int(img[0, 0, 0]) - round(40000 / 257)) <= 1     # not white
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:5, :, 3] = 255                                               # top opaque, bottom transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = np.asarray(photo.read_image(tmp_path / "a.png"))
    assert (img[:5, :, 0] == 200).all() and (img[5:] == 0).all()
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "l.png")
    assert (np.asarray(photo.read_image(tmp_path / "l.png")) == 77).all()
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "p.png")
    assert photo.read_image(tmp_path / "p.png").mode == "RGB"


@pytest.mark.parametrize("entry, match", [
    ([], "non-empty"), ([10, 10, 5, 20], "inverted"), ([10, 10, 10, 20], "zero area"),
    ([1, 2, 3], "4 numbers"), ([[0, 0, 5, 5], [0, "x", 5, 5]], "box 1:.*non-number"),
    ([0, 0, float("nan"), 5], "non-finite")])
def test_bad_boxes_name_file_and_index(tmp_path, entry, match):
    p = tmp_path / "boxes.json"
    p.write_text(json.dumps({"a.jpg": entry}))
    with pytest.raises(ValueError, match=match) as e:
        photo.load_boxes(p)
    assert str(p) in str(e.value) and "a.jpg" in str(e.value)


def test_coco_and_openpose_boxes(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "dir/a.jpg"}],
            "annotations": [{"image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 60], "score": 0.9},
                            {"image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.1},
                            {"image_id": 7, "category_id": 2, "bbox": [0, 0, 5, 5]},
                            {"image_id": 7, "category_id": 1, "keypoints": [0, 0, 2, 10, 40, 2, 99, 99, 0]}]}
    p = tmp_path / "coco.json"
    p.write_text(json.dumps(coco))
    boxes = photo.load_coco(p, scale=1.0)
    assert boxes == {"a.jpg": [(25.0, 50.0, 60.0), (5.0, 20.0, 40.0)]}
    p.write_text(json.dumps([{"image_id": 3, "bbox": [0, 0, 4, 4]}]))
    with pytest.raises(ValueError, match="detection 0: image_id 3 names no file"):
        photo.load_coco(p)
    p.write_text(json.dumps([{"file_name": "b.png", "bbox": [0, 0, -4, 4]}]))
    with pytest.raises(ValueError, match="detection 0 .*inverted"):
        photo.load_coco(p)
    # OpenPose: SPIN's rule (confidence > 0.2, centre = mean, side = extent x rescale).
    op = tmp_path / "op"
    op.mkdir()
    kp = [10, 10, 0.9, 30, 50, 0.8, 500, 500, 0.1]
    (op / "a_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": kp},
                                                                {"pose_keypoints_2d": [1, 1, 0.1]}]}))
    files = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    assert photo.load_openpose(op, files, scale=1.2) == {"a.jpg": [(20.0, 30.0, 48.0)]}
    (op / "a_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": [1, 2]}]}))
    with pytest.raises(ValueError, match="person 0: keypoints"):
        photo.load_openpose(op, files)


def test_output_stems_never_collide():
    files = [Path(n) for n in ("a.jpg", "a.png", "a_jpg.png", "b.jpg", "c.JPG", "C.png")]
    stems = demo.output_stems(files, [1, 2, 1, 1, 1, 1])
    assert stems[0] == ["a_jpg"] and stems[1] == ["a_png_p0", "a_png_p1"] and stems[3] == ["b"]
    names = [s.casefold() + t for ss in stems for s in ss for t in (".obj", ".npz", "_overlay.png")]
    assert len(names) == len(set(names))


def test_full_image_camera_puts_the_mesh_where_the_crop_had_it():
    v, f = (torch.as_tensor(a) for a in icosphere(2))
    v = v.float() * 0.3
    image = Image.fromarray(np.zeros((300, 400, 3), np.uint8))        # non-square photo
    cx, cy, side = 250.0, 120.0, 150.0
    in_hw, focal = (64, 64), 300.0
    patch, info = photo.crop(image, cx, cy, side, in_hw)
    t = torch.tensor([0.05, -0.1, 2.0])
    crop_mask = render.render(v[None], f, focal, None, in_hw, translation=t[None])["mask"][0]
    fl, centre = demo.full_image_camera(info, in_hw, focal)
    full = render.render(v[None], f, fl, torch.tensor(centre, dtype=torch.float32)[None], (300, 400),
                         translation=t[None])["mask"][0]
    back = Image.fromarray(full.numpy().astype(np.uint8) * 255)
    back, _ = photo.crop(back.convert("RGB"), cx, cy, side, in_hw)    # the full render, cropped again
    back = np.asarray(back)[..., 0] > 127
    inter, union = (back & crop_mask.numpy()).sum(), (back | crop_mask.numpy()).sum()
    assert union > 100 and inter / union > 0.9


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_ckpt") / "fm.pt"
    torch.manual_seed(0)
    model, _ = checkpoints.build_model("fastmetro", "tiny", checkpoints.build_body())
    with torch.no_grad():                                              # a camera that puts the mesh in view
        model.cam_predictor.weight.zero_()
        model.cam_predictor.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    torch.save({"model": model.state_dict(), "config": {"model": "fastmetro", "preset": "tiny", "set": []}}, out)
    return out


def test_demo_folder_of_photos(ckpt, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(src / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (120, 80, 4), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 65535, (50, 70), dtype=np.uint16)).save(src / "g.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        demo.main(["--ckpt", str(ckpt), "--images", str(src), "--out", str(out), "--device", "cpu",
                   "--max-size", "100"])
    assert e.value.code == 1                                           # broken.jpg reported at the end
    for stem in ("a_jpg", "a_png", "g"):                               # the others were all written
        for suffix in (".obj", ".npz", "_overlay.png", "_full.png"):
            assert (out / f"{stem}{suffix}").stat().st_size > 0, stem + suffix
    assert Image.open(out / "a_jpg_full.png").size == (100, 56)       # 160x90 shown at --max-size 100
    assert Image.open(out / "a_png_full.png").size == (67, 100)
    assert np.load(out / "a_png.npz")["source_image"].item().endswith("a.png")
    # Boxes: one photo, two people -> two results and one full picture with both meshes.
    (tmp_path / "boxes.json").write_text(json.dumps({"a.jpg": [[10, 10, 60, 80], [90, 5, 150, 85]]}))
    n = demo.main(["--ckpt", str(ckpt), "--images", str(src / "a.jpg"), "--boxes", str(tmp_path / "boxes.json"),
                   "--out", str(tmp_path / "boxed"), "--device", "cpu"])
    assert n == 2
    full = np.asarray(Image.open(tmp_path / "boxed" / "a_full.png"))
    picture = np.asarray(photo.read_image(src / "a.jpg"))
    changed = (full != picture).any(-1)
    assert changed[:, :75].any() and changed[:, 85:].any()             # a mesh in each person's box


def test_npz_person_boxes_give_the_training_crop(tmp_path):
    """data.py boxes -> demo.py --boxes: the demo crops the square training crops (the
    quickstart's overlays are of the crops the model was trained on, not of the whole frame)."""
    data.generate_synthetic(tmp_path, 3, split="test", seed=1, size=96)
    npz = tmp_path / "test.npz"
    boxes_json = tmp_path / "boxes.json"
    data.main(["boxes", "--npz", str(npz), "--out", str(boxes_json)])
    boxes = photo.load_boxes(boxes_json)                               # enlarged by the default 1.2
    z = np.load(npz)
    names = [str(n) for n in z["imgname"]]
    assert sorted(boxes) == sorted(Path(n).name for n in names)
    for i, name in enumerate(names):
        (cx, cy, side), = boxes[Path(name).name]
        image = photo.read_image(tmp_path / name)
        patch, _ = photo.crop(image, cx, cy, side, (64, 64))
        A = data.crop_matrix(z["center"][i], z["scale"][i] * 200.0, 0.0, (64, 64))
        train_crop = data.warp_image(image, A, (64, 64)).astype(int)   # the un-augmented training crop
        assert np.abs(np.asarray(patch, dtype=int) - train_crop).max() <= 1
        off, _ = photo.crop(image, cx + side / 8, cy, side, (64, 64))
        assert np.abs(np.asarray(off, dtype=int) - train_crop).mean() > 5
    data.main(["boxes", "--npz", str(npz), "--out", str(boxes_json), "--limit", "2"])
    assert len(json.loads(boxes_json.read_text())) == 2
    with pytest.raises(ValueError, match="box_scale"):
        data.write_person_boxes(npz, boxes_json, box_scale=0)
