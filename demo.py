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
the mesh lands exactly where it was drawn on the crop. FastMETRO's camera projects the mesh minus
its regressed pelvis (its 2D loss does; its vertices carry an arbitrary offset), so its meshes are
drawn and written in that frame (`FastMETRO.camera_frame`); the other models' cameras project
their raw vertices, as their losses do.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import checkpoints
import photo
import render

PERSON_COLOURS = ((0.65, 0.74, 0.86), (0.90, 0.62, 0.45), (0.55, 0.83, 0.55), (0.85, 0.55, 0.80),
                  (0.90, 0.85, 0.45), (0.50, 0.80, 0.85))


# ----------------------------------------------------------------------------- image I/O




def write_obj(path, vertices, faces):
    """Wavefront OBJ: vertices (V, 3) metres, faces (F, 3) zero-based."""
    with open(path, "w") as f:
        f.write("# predicted mesh, metres, camera-aligned (x right, y down, z forward)\n")
        np.savetxt(f, vertices, fmt="v %.6f %.6f %.6f")
        np.savetxt(f, faces + 1, fmt="f %d %d %d")








# ----------------------------------------------------------------------------- person boxes












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




def run(args):
    """Returns (results written, [(file, reason) for every image that failed])."""
    files = photo.list_images(args.images)
    files = files[: args.limit] if args.limit else files
    if args.boxes is not None:
        persons = photo.load_boxes(args.boxes, args.box_scale)
    elif args.coco is not None:
        persons = photo.load_coco(args.coco, args.box_scale, args.min_score)
    elif args.openpose is not None:
        persons = photo.load_openpose(args.openpose, files, args.box_scale)
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
            image = photo.read_image(f)
        except photo.UNREADABLE as e:
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
            patch, crop_info = photo.crop(image, cx, cy, side, (in_h, in_w))
            with torch.no_grad():
                pred = model(photo.to_tensor(patch)[None].to(device))
            verts = pred["vertices"]
            if hasattr(model, "camera_frame"):      # FastMETRO: its camera projects pelvis-centred meshes
                verts = model.camera_frame(verts)
            verts = verts[0].float().cpu()                                    # (V, 3) metres
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
