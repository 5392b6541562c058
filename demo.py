"""Demo: a folder of images -> for each, the mesh (.obj), an overlay picture (.png) and the
predicted parameters (.npz). Headless (render.py rasterises in plain torch).

    python demo.py --ckpt runs/quickstart/last.pt --images data/synth/images/test --out outputs/demo
    python demo.py --ckpt model.pt --images photos/ --boxes boxes.json --out outputs/demo

Images are person crops by default: the largest centred square is used. With --boxes, a JSON file
maps each image file name to a box [x1, y1, x2, y2] in pixels (or a list of boxes, one output per
box); the crop is the box's square enlarged by --box-scale (1.2, as the METRO family's crops).

The overlay PNG shows the model's input crop and, beside it, the predicted mesh drawn over it: the
weak-perspective camera (s, tx, ty) becomes a perspective translation for a focal length of
--focal pixels (at a crop side min(H, W) of 224), which reproduces the weak projection up to
perspective effects. The .npz holds every per-image output of the model (vertices, joints, camera, and SMPL
parameters for models that predict them) plus that translation, the focal length and the crop.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import render
import train

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


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
    """
    h, w = out_hw
    box_w, box_h = side * w / min(h, w), side * h / min(h, w)
    x0, y0 = cx - box_w / 2, cy - box_h / 2
    patch = image.transform((w, h), Image.AFFINE, (box_w / w, 0, x0, 0, box_h / h, y0),
                            resample=Image.BILINEAR)
    return patch, (x0, y0, box_w / w)            # crop origin and pixels-per-crop-pixel


def to_tensor(patch):
    x = torch.from_numpy(np.asarray(patch, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H,W,3)->(3,H,W)
    return (x - MEAN) / STD


def load_boxes(path):
    if path is None:
        return None
    try:
        boxes = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--boxes {path}: could not read a JSON object: {e}") from e
    if not isinstance(boxes, dict):
        raise ValueError(f"--boxes {path}: expected {{\"image.jpg\": [x1, y1, x2, y2], ...}}")
    return boxes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--images", required=True, help="folder of images (or one image file)")
    p.add_argument("--boxes", default=None, help="JSON: file name -> [x1,y1,x2,y2] or a list of them")
    p.add_argument("--box-scale", type=float, default=1.2)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--focal", type=float, default=1000.0, help="focal length in crop pixels at 224")
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    p.add_argument("--body", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    model, body_model, _ = train.load_model_from_checkpoint(args.ckpt, device, body=args.body)
    in_h, in_w = model.cfg.input_size
    faces = body_model.faces.cpu()
    src = Path(args.images)
    files = [src] if src.is_file() else sorted(f for f in src.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {src}")
    files = files[: args.limit] if args.limit else files
    boxes = load_boxes(args.boxes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    written = 0
    for f in files:
        try:
            image = Image.open(f).convert("RGB")
        except OSError as e:
            raise ValueError(f"could not read image {f}: {e}") from e
        if boxes is not None:
            entry = boxes.get(f.name)
            if entry is None:
                print(f"skip {f.name}: no box in {args.boxes}")
                continue
            entries = entry if entry and isinstance(entry[0], (list, tuple)) else [entry]
        else:
            side = min(image.size)
            entries = [[(image.size[0] - side) / 2, (image.size[1] - side) / 2,
                        (image.size[0] + side) / 2, (image.size[1] + side) / 2]]
        for k, box in enumerate(entries):
            cx, cy, side = square_box(box, args.box_scale if boxes is not None else 1.0)
            patch, (x0, y0, px) = crop(image, cx, cy, side, (in_h, in_w))
            with torch.no_grad():
                pred = model(to_tensor(patch)[None].to(device))
            verts = pred["vertices"][0].float().cpu()                         # (V, 3) metres
            cam = pred["cam"][0].float().cpu()                                # (3,) s, tx, ty
            # Weak perspective on the crop -> a perspective translation for the renderer.
            focal = args.focal * min(in_h, in_w) / 224
            transl = render.weak_perspective_to_camera(cam[None], (in_h, in_w), focal)[0]
            drawn = render.overlay(patch, verts, faces, focal, translation=transl)
            side_by_side = np.concatenate([np.asarray(patch), drawn], axis=1)   # (H, 2W, 3)
            stem = f.stem if len(entries) == 1 else f"{f.stem}_{k}"
            Image.fromarray(side_by_side).save(out / f"{stem}_overlay.png")
            write_obj(out / f"{stem}.obj", verts.numpy(), faces.numpy())
            params = {k2: v[0].float().cpu().numpy() for k2, v in pred.items()
                      if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == 1}
            np.savez(out / f"{stem}.npz", camera_translation=transl.numpy(), focal_length=focal,
                     crop_origin=np.array([x0, y0]), crop_pixel_size=px, **params)
            written += 1
    print(f"wrote {written} results (obj, overlay png, npz) to {out}")
    return written


if __name__ == "__main__":
    main()
