"""Reading real photos and person boxes, for demo.py and visualize.py (no paper: tooling).

What this file implements
- `read_image(path)`: any photo -> upright 8-bit RGB: EXIF orientation applied (data.exif_upright,
  the convention the training loaders follow: see data.py's header), 16/32-bit integer greyscale
  scaled from PNG's 0..65535 range (not clipped to white), float greyscale from 0..1, alpha
  composited over black (the padding colour of the crops), palette / greyscale / CMYK converted.
- `crop` (square box -> model input, non-square inputs keep the box's shorter side, as
  data.crop_matrix), `to_tensor` (ImageNet normalisation), `square_box`.
- Person boxes, checked when loaded (`check_box`: empty, not 4 finite numbers, inverted, zero
  area -> ValueError naming the file and index): `load_boxes` ({"image.jpg": [x1, y1, x2, y2] or
  a list}), `load_coco` (COCO annotation file or a list of detections; "bbox" [x, y, w, h] or
  "keypoints"), `load_openpose` (OpenPose JSON; SPIN's demo rule: keypoints with confidence > 0.2,
  centre = their mean, side = their largest extent x rescale 1.2). Each returns
  {file name: [(centre x, centre y, side), ...]}.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
OPENPOSE_THRESHOLD = 0.2                      # SPIN demo's detection_thresh
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


def to_rgb(img):
    """Any PIL image -> 8-bit RGB: 16/32-bit integer greyscale scaled from 0..65535 (PNG's 16-bit
    range), float greyscale from 0..1, alpha composited over black, everything else converted."""
    mode = img.mode
    if mode.startswith("I"):                                          # I;16, I;16B, I (16-bit PNG)
        a = np.asarray(img, dtype=np.float64) / 257.0                 # 65535 -> 255
        return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64) * 255.0
        return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def read_image(path):
    """Image file -> upright (EXIF applied) 8-bit RGB PIL image; raises what PIL raises."""
    with Image.open(path) as img:
        img = data.exif_upright(img)
        img.load()
        return to_rgb(img)


def square_box(box, scale=1.0):
    """[x1, y1, x2, y2] -> (centre x, centre y, side) of the enclosing square, enlarged by scale."""
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * scale


def crop(image, cx, cy, side, out_hw):
    """Crop the square (cx, cy, side) of a PIL image (zero padding outside), resize to out_hw (H, W).

    Non-square model inputs (H != W) take a box of the same aspect ratio whose SHORTER side is
    `side`, as data.crop_matrix does in training (the box side maps to min(H, W) pixels).
    Returns the crop and (x0, y0, source pixels per crop pixel).
    """
    h, w = out_hw
    box_w, box_h = side * w / min(h, w), side * h / min(h, w)
    x0, y0 = cx - box_w / 2, cy - box_h / 2
    patch = image.transform((w, h), Image.AFFINE, (box_w / w, 0, x0, 0, box_h / h, y0),
                            resample=Image.BILINEAR)
    return patch, (x0, y0, box_w / w)


def to_tensor(patch):
    x = torch.from_numpy(np.asarray(patch, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H,W,3)->(3,H,W)
    return (x - MEAN) / STD


def check_box(box, where):
    """A box [x1, y1, x2, y2] -> 4 floats, or ValueError naming `where`."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"{where}: expected a box [x1, y1, x2, y2] (4 numbers), got {box!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: box {box!r} holds a non-number") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"{where}: box {box!r} holds a non-finite number")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{where}: box {box!r} is inverted (need x1 <= x2 and y1 <= y2)")
    if x2 == x1 or y2 == y1:
        raise ValueError(f"{where}: box {box!r} has zero area")
    return x1, y1, x2, y2


def keypoint_crop(points, where, threshold, scale):
    """(K, 3) keypoints (x, y, confidence) -> (cx, cy, side) as SPIN's bbox_from_openpose, or None
    when fewer than 2 keypoints pass the threshold or they have no extent."""
    try:
        kp = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: keypoints must be a flat list of (x, y, confidence) triples") from None
    if not np.isfinite(kp).all():
        raise ValueError(f"{where}: keypoints hold a non-finite number")
    valid = kp[kp[:, 2] > threshold, :2]
    if len(valid) < 2:
        return None
    side = float((valid.max(0) - valid.min(0)).max()) * scale
    if side <= 0:
        return None
    cx, cy = valid.mean(0)
    return float(cx), float(cy), side


def _read_json(path, flag):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag} {path}: could not read JSON: {e}") from e


def load_boxes(path, scale=1.2):
    """--boxes JSON -> {file name: [(cx, cy, side), ...]}."""
    boxes = _read_json(path, "--boxes")
    if not isinstance(boxes, dict):
        raise ValueError(f"--boxes {path}: expected {{\"image.jpg\": [x1, y1, x2, y2], ...}}, got a "
                         f"{type(boxes).__name__}")
    out = {}
    for name, entry in boxes.items():
        where = f"--boxes {path}: {name!r}"
        if not isinstance(entry, (list, tuple)) or len(entry) == 0:
            raise ValueError(f"{where}: expected [x1, y1, x2, y2] or a non-empty list of them, got {entry!r}")
        entries = entry if isinstance(entry[0], (list, tuple)) else [entry]
        out.setdefault(Path(name).name, []).extend(
            square_box(check_box(b, f"{where} box {k}"), scale) for k, b in enumerate(entries))
    return out


def load_coco(path, scale=1.2, min_score=0.5):
    """COCO-style detections / keypoints JSON -> {file name: [(cx, cy, side), ...]} (see header)."""
    obj = _read_json(path, "--coco")
    if isinstance(obj, dict) and "annotations" in obj:
        names = {}
        for k, im in enumerate(obj.get("images", [])):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise ValueError(f"--coco {path}: images[{k}] must have 'id' and 'file_name'")
            names[im["id"]] = im["file_name"]
        dets = obj["annotations"]
    elif isinstance(obj, list):
        names, dets = None, obj
    else:
        raise ValueError(f"--coco {path}: expected a COCO file with 'images' and 'annotations' or a list "
                         "of detections")
    out = {}
    for i, d in enumerate(dets):
        where = f"--coco {path}: detection {i}"
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        if d.get("category_id", 1) != 1 or d.get("iscrowd", 0) or float(d.get("score", 1.0)) < min_score:
            continue
        if names is not None:
            if d.get("image_id") not in names:
                raise ValueError(f"{where}: image_id {d.get('image_id')!r} is not in 'images'")
            name = names[d["image_id"]]
        elif "file_name" in d or isinstance(d.get("image_id"), str):
            name = d.get("file_name", d.get("image_id"))
        else:
            raise ValueError(f"{where}: image_id {d.get('image_id')!r} names no file: give a COCO file "
                             "with an 'images' list (id -> file_name) or detections with 'file_name'")
        if "bbox" in d:
            b = d["bbox"]
            if not isinstance(b, (list, tuple)) or len(b) != 4:
                raise ValueError(f"{where}: bbox must be [x, y, w, h], got {b!r}")
            try:
                box = [float(b[0]), float(b[1]), float(b[0]) + float(b[2]), float(b[1]) + float(b[3])]
            except (TypeError, ValueError):
                raise ValueError(f"{where}: bbox {b!r} holds a non-number") from None
            entry = square_box(check_box(box, f"{where} (bbox [x, y, w, h] = {b!r})"), scale)
        elif "keypoints" in d:
            entry = keypoint_crop(d["keypoints"], f"{where} keypoints", 0.0, scale)
            if entry is None:
                print(f"skip {where}: fewer than 2 labelled keypoints")
                continue
        else:
            raise ValueError(f"{where}: has neither 'bbox' nor 'keypoints'")
        out.setdefault(Path(str(name)).name, []).append(entry)
    return out


def load_openpose(path, files, scale=1.2):
    """--openpose DIR (<stem>_keypoints.json per image) or FILE (one image) -> {file name: [...]}."""
    path = Path(path)
    if path.is_file():
        if len(files) != 1:
            raise ValueError(f"--openpose {path} is one file but --images gave {len(files)} images; "
                             "give a folder of <image stem>_keypoints.json files")
        sources = {files[0].name: path}
    elif path.is_dir():
        sources = {f.name: path / f"{f.stem}_keypoints.json" for f in files}
        sources = {k: v for k, v in sources.items() if v.is_file()}
    else:
        raise FileNotFoundError(f"--openpose {path}: no such file or folder")
    out = {}
    for name, src in sources.items():
        obj = _read_json(src, "--openpose")
        people = obj.get("people") if isinstance(obj, dict) else None
        if not isinstance(people, list):
            raise ValueError(f"--openpose {src}: expected {{\"people\": [...]}}")
        for k, person in enumerate(people):
            where = f"--openpose {src}: person {k}"
            if not isinstance(person, dict) or "pose_keypoints_2d" not in person:
                raise ValueError(f"{where}: no 'pose_keypoints_2d'")
            entry = keypoint_crop(person["pose_keypoints_2d"], where, OPENPOSE_THRESHOLD, scale)
            if entry is None:
                print(f"skip {where}: fewer than 2 keypoints with confidence > {OPENPOSE_THRESHOLD}")
                continue
            out.setdefault(name, []).append(entry)
    return out


def list_images(src):
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"--images {src}: no such file or folder")
    files = sorted(f for f in src.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {src}")
    return files


if __name__ == "__main__":
    # Smoke test: a phone portrait (EXIF orientation 6) and a 16-bit PNG read upright and in range.
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        upright = np.zeros((60, 40, 3), np.uint8)
        upright[:20, :, 0] = 255                                       # red top third
        exif = Image.Exif()
        exif[0x0112] = 6                                               # stored rotated, shown 90 deg CW
        Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(f"{tmp}/p.jpg", exif=exif.tobytes())
        img = np.asarray(read_image(f"{tmp}/p.jpg"))
        Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(f"{tmp}/g16.png")
        g = np.asarray(read_image(f"{tmp}/g16.png"))
        print(f"EXIF portrait read as {img.shape[1]}x{img.shape[0]} (red on top: {img[:15, :, 0].mean() > 200}); "
              f"16-bit 40000 -> {g[0, 0, 0]} (not 255)")
