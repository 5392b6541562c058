"""Demo: a folder of photos -> for each person, the mesh (.obj), overlay pictures (.png) and the
predicted parameters (.npz). Headless (render.py rasterises in plain torch).

    python demo.py --ckpt runs/quickstart/last.pt --images data/synth/images/test --out outputs/demo
    python demo.py --ckpt model.pt --images photos/ --boxes boxes.json --out outputs/demo
    python demo.py --ckpt model.pt --images photos/ --coco detections.json --out outputs/demo
    python demo.py --ckpt model.pt --images photos/ --openpose openpose_json/ --out outputs/demo
    python demo.py --model fastmetro --preset L-H64 --weights FastMETRO-L-H64_h36m_state_dict.bin \
        --body SMPL_NEUTRAL.pkl --h36m-regressor J_regressor_h36m_correct.npy \
        --mesh-hierarchy mesh_downsampling.npz --images photos/ --out outputs/demo

Person boxes (one output per person):
- none: the image is a person crop; its largest centred square is used.
- --boxes JSON: {"image.jpg": [x1, y1, x2, y2] or a list of them} in pixels (keys are matched by
  file name, folders ignored); the crop is the box's square enlarged by --box-scale (1.2, as the
  METRO family's crops).
- --coco JSON: COCO-style person detections/keypoints: a COCO annotation file ({"images": [{id,
  file_name}], "annotations": [...]}) or a list of detections that name their image by
  "file_name" (or a string "image_id"). A detection's "bbox" [x, y, w, h] is used like a --boxes
  box; without one, its "keypoints" (x, y, v triples, v > 0 = labelled) like OpenPose's. Only
  category 1 (person), no crowd annotations, and "score" >= --min-score where given.
- --openpose DIR or FILE: OpenPose JSON ({"people": [{"pose_keypoints_2d": [x, y, c, ...]}]}),
  `<image stem>_keypoints.json` in DIR (OpenPose's --write_json naming). As SPIN's demo: the
  keypoints with confidence > 0.2, crop centre = their mean, side = their largest extent x
  --box-scale (SPIN's rescale 1.2).
Boxes are checked when loaded: a box that is empty, not 4 finite numbers, inverted or of zero
area stops the run with an error naming the file and the image / detection index.

Images: EXIF orientation applied (data.exif_upright: phone portraits come out upright, and the
boxes are in that upright frame, as cv2.imread-based tools write them); 16-bit greyscale PNGs
scaled to 8 bits (not clipped to white); alpha composited over black (the padding colour of the
crops); palette, greyscale and CMYK converted to RGB. An image that cannot be read (or whose box
lies wholly outside it) is skipped and reported; the run goes on and exits with status 1 at the
end if any image failed.

Outputs per person (`STEM` = the image's file stem; `STEM_EXT`, e.g. a_jpg and a_png, where two
inputs share a stem; `_p<k>` per person when an image has several; never two files of one run
under the same name):
- `STEM_overlay.png`: the model's input crop beside the predicted mesh drawn over it;
- `STEM.obj`, `STEM.npz` (every per-image model output, the camera translation, focal, crop).
Per image: `STEM_full.png`, every person's mesh drawn back into the whole photo (depth-ordered,
one colour per person), at most --max-size pixels on its longer side (large photos are shown
downscaled; the crops are always taken from the full-resolution image).

Camera: the weak-perspective (s, tx, ty) of a crop becomes a perspective translation for a
focal length of --focal pixels (at a crop side min(H, W) of 224), which reproduces the weak projection up
to perspective effects. In the full image the same camera has focal * (source pixels per crop
pixel) and its principal point at the crop centre: a pure scale + shift of the crop's pixels, so
the mesh lands exactly where it was drawn on the crop.
"""
import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import checkpoints
import data
import render

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
OPENPOSE_THRESHOLD = 0.2                      # SPIN demo's detection_thresh
PERSON_COLOURS = ((0.65, 0.74, 0.86), (0.90, 0.62, 0.45), (0.55, 0.83, 0.55), (0.85, 0.55, 0.80),
                  (0.90, 0.85, 0.45), (0.50, 0.80, 0.85))
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


# ----------------------------------------------------------------------------- image I/O
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


def write_obj(path, vertices, faces):
    """Wavefront OBJ: vertices (V, 3) metres, faces (F, 3) zero-based."""
    with open(path, "w") as f:
        f.write("# predicted mesh, metres, camera-aligned (x right, y down, z forward)\n")
        np.savetxt(f, vertices, fmt="v %.6f %.6f %.6f")
        np.savetxt(f, faces + 1, fmt="f %d %d %d")


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


# ----------------------------------------------------------------------------- person boxes
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


def output_stems(files, persons_per_file):
    """Output stems, one list per file (one stem per person), unique over the run (case-insensitive):
    the file stem; STEM_EXT where two inputs share a stem; _p<k> per person; _2, _3... if still taken."""
    count = Counter(f.stem.casefold() for f in files)
    taken, result = set(), []
    for f, n in zip(files, persons_per_file):
        base = f.stem if count[f.stem.casefold()] == 1 else f"{f.stem}_{f.suffix[1:]}"
        k = 1
        while True:
            cand = base if k == 1 else f"{base}_{k}"
            stems = [cand] if n <= 1 else [f"{cand}_p{j}" for j in range(n)]
            names = {s.casefold() + t for s in stems for t in (".obj", ".npz", "_overlay.png")}
            names.add(cand.casefold() + "_full.png")
            if not names & taken:
                break
            k += 1
        taken |= names
        result.append(stems)
    return result


# ----------------------------------------------------------------------------- drawing
def full_image_camera(crop_info, in_hw, focal_crop, max_scale=1.0):
    """Camera of a crop in the full image: crop_info (x0, y0, source px per crop px), model input
    (H, W), crop focal (px). Returns (focal, principal point (2,)) in full-image pixels x max_scale."""
    x0, y0, px = crop_info
    h, w = in_hw
    centre = np.array([x0 + w / 2 * px, y0 + h / 2 * px]) * max_scale
    return focal_crop * px * max_scale, centre


def draw_full_image(image, persons, faces, max_size=2048, alpha=0.8):
    """Every person's mesh drawn into the whole image, nearest surface wins.

    image: PIL RGB; persons: list of dicts with vertices (V, 3), translation (3,), crop_info,
    in_hw, focal (crop px). The output is downscaled so that its longer side <= max_size.
    Returns (H', W', 3) uint8."""
    W, H = image.size
    r = min(1.0, max_size / max(W, H))
    if r < 1.0:
        image = image.resize((max(1, round(W * r)), max(1, round(H * r))), Image.BILINEAR)
        r_x, r_y = image.size[0] / W, image.size[1] / H
        r = (r_x + r_y) / 2
    base = np.asarray(image, dtype=np.float32) / 255.0
    out = base.copy()
    best = np.full(base.shape[:2], np.inf, dtype=np.float32)
    for k, p in enumerate(persons):
        focal, centre = full_image_camera(p["crop_info"], p["in_hw"], p["focal"], r)
        rend = render.render(torch.as_tensor(p["vertices"], dtype=torch.float32)[None], torch.as_tensor(faces),
                             float(focal), torch.tensor(centre, dtype=torch.float32)[None], base.shape[:2],
                             colors=PERSON_COLOURS[k % len(PERSON_COLOURS)],
                             translation=torch.as_tensor(p["translation"], dtype=torch.float32)[None])
        depth = rend["depth"][0].numpy()
        m = rend["mask"][0].numpy() & (depth < best)
        best[m] = depth[m]
        out[m] = (1 - alpha) * base[m] + alpha * rend["rgb"][0].numpy()[m]
    return (out * 255).round().clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoints.add_model_args(p)      # --ckpt, or --weights with --model/--preset; --mesh-hierarchy
    p.add_argument("--images", required=True, help="folder of images (or one image file)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--boxes", default=None, help="JSON: file name -> [x1,y1,x2,y2] or a list of them")
    src.add_argument("--coco", default=None, help="COCO-style person detections / keypoints JSON")
    src.add_argument("--openpose", default=None, help="OpenPose JSON folder (<stem>_keypoints.json) or file")
    p.add_argument("--box-scale", type=float, default=1.2)
    p.add_argument("--min-score", type=float, default=0.5, help="--coco: lowest detection score used")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--focal", type=float, default=1000.0, help="focal length in crop pixels at a crop side of 224")
    p.add_argument("--max-size", type=int, default=2048, help="longer side of the full-image picture")
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


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


def run(args):
    """Returns (results written, [(file, reason) for every image that failed])."""
    files = list_images(args.images)
    files = files[: args.limit] if args.limit else files
    if args.boxes is not None:
        persons = load_boxes(args.boxes, args.box_scale)
    elif args.coco is not None:
        persons = load_coco(args.coco, args.box_scale, args.min_score)
    elif args.openpose is not None:
        persons = load_openpose(args.openpose, files, args.box_scale)
    else:
        persons = None
    device = torch.device(args.device)
    model, body_model, _ = checkpoints.load_for_inference(
        device, ckpt=args.ckpt, weights=args.weights, model=args.model, preset=args.preset, body=args.body,
        h36m_regressor=args.h36m_regressor, mesh_hierarchy=args.mesh_hierarchy,
        overrides=checkpoints.parse_overrides(args.set))
    in_h, in_w = model.cfg.input_size
    faces = body_model.faces.cpu()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [1 if persons is None else len(persons.get(f.name, [])) for f in files]
    if persons is not None:
        unused = sorted(set(persons) - {f.name for f in files})
        if unused:
            print(f"note: {len(unused)} file name(s) with person boxes are not among the images: "
                  f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
    stems = output_stems(files, counts)
    focal = args.focal * min(in_h, in_w) / 224

    written, failed = 0, []
    for f, n, names in zip(files, counts, stems):
        if n == 0:
            print(f"skip {f.name}: no person box for it")
            continue
        try:
            image = read_image(f)
        except UNREADABLE as e:
            print(f"skip {f}: could not read the image: {e}", file=sys.stderr)
            failed.append((f, f"could not read the image: {e}"))
            continue
        W, H = image.size
        if persons is None:
            side = min(W, H)
            entries = [(W / 2, H / 2, side)]
        else:
            entries = persons[f.name]
        drawn = []
        for k, ((cx, cy, side), stem) in enumerate(zip(entries, names)):
            if cx + side / 2 <= 0 or cy + side / 2 <= 0 or cx - side / 2 >= W or cy - side / 2 >= H:
                msg = f"person {k}: crop (centre {cx:.0f},{cy:.0f}, side {side:.0f}) lies outside the {W}x{H} image"
                print(f"skip {f}: {msg}", file=sys.stderr)
                failed.append((f, msg))
                continue
            patch, crop_info = crop(image, cx, cy, side, (in_h, in_w))
            with torch.no_grad():
                pred = model(to_tensor(patch)[None].to(device))
            verts = pred["vertices"][0].float().cpu()                         # (V, 3) metres
            cam = pred["cam"][0].float().cpu()                                # (3,) s, tx, ty
            # Weak perspective on the crop -> a perspective translation for the renderer.
            transl = render.weak_perspective_to_camera(cam[None], (in_h, in_w), focal)[0]
            over = render.overlay(patch, verts, faces, focal, translation=transl)
            Image.fromarray(np.concatenate([np.asarray(patch), over], axis=1)).save(out / f"{stem}_overlay.png")
            write_obj(out / f"{stem}.obj", verts.numpy(), faces.numpy())
            params = {k2: v[0].float().cpu().numpy() for k2, v in pred.items()
                      if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == 1}
            np.savez(out / f"{stem}.npz", camera_translation=transl.numpy(), focal_length=focal,
                     crop_origin=np.array(crop_info[:2]), crop_pixel_size=crop_info[2],
                     source_image=str(f), **params)
            drawn.append({"vertices": verts.numpy(), "translation": transl.numpy(), "crop_info": crop_info,
                          "in_hw": (in_h, in_w), "focal": focal})
            written += 1
        if drawn:
            full_stem = names[0] if n == 1 else names[0][: -len("_p0")]
            Image.fromarray(draw_full_image(image, drawn, faces.numpy(), args.max_size)).save(
                out / f"{full_stem}_full.png")
    print(f"wrote {written} results (obj, overlay png, npz; one full-image png per image) to {out}")
    return written, failed


def main(argv=None):
    written, failed = run(parse_args(argv))
    if failed:
        print(f"{len(failed)} image(s) failed:", file=sys.stderr)
        for f, why in failed:
            print(f"  {f}: {why}", file=sys.stderr)
        raise SystemExit(1)
    return written


if __name__ == "__main__":
    main()
