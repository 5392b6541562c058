"""FreiHAND: dataset layout, loaders and the official evaluation conventions.

FreiHAND: Zimmermann, Ceylan, Yang, Russell, Argus, Brox, "FreiHAND: A Dataset for Markerless
Capture of Hand Pose and Shape from Single RGB Images", ICCV 2019, https://arxiv.org/abs/1909.04349 .
Official code: https://github.com/lmb-freiburg/freihand (eval.py, utils/fh_utils.py; read for the
conventions, no code copied).

What this file implements
- `load_annotations(root, split)`: `<split>_K.json` (N x 3x3 intrinsics), `<split>_xyz.json`
  (N x 21x3 keypoints, metres, camera frame, FreiHAND order), `<split>_mano.json` (N x 1x61:
  48 pose axis-angle with global rotation first, 10 shape, 2 uv_root, 1 scale), optional
  `<split>_verts.json` (N x 778x3) and `<split>_scale.json` (N). Every file is checked: its
  length and each entry's shape (errors name the file, the index and what was expected).
- `image_path(root, split, idx, version)`: `<root>/<split>/rgb/%08d.jpg`; the training images
  exist in 4 versions (gs, hom, sample, auto) at `idx + N * version_index` (N = number of
  annotations; 32560 for FreiHAND), the evaluation split only in "gs".
- `FreiHANDDataset`: 224x224 images (FreiHAND's size; other sizes resized) ImageNet-normalised,
  "joints3d" (21, 4) metres + conf, "joints2d" (21, 3) projected with K and normalised with
  data.normalise_pixels, "vertices" (778, 3) from verts.json when present, "pose" (48),
  "betas" (10), "has_smpl", "has_3d".
- Evaluation (eval.py's conventions): `align_w_scale` (both centred on their mean, each divided by
  its Frobenius norm + 1e-8, orthogonal Procrustes - a reflection is NOT excluded, as scipy's
  orthogonal_procrustes there - then the ground truth's scale and mean restored); mesh aligned on
  its own vertices (prediction with 778 vertices), keypoints on their own; `fscore` (a point
  matches when its nearest neighbour in the other set is closer than the threshold, strict <;
  F = 2PR/(P+R), 0 when both are 0) at 5 mm and 15 mm; `pck_auc` over 0..50 mm in 100 steps.
  `evaluate` returns PA-MPJPE / PA-MPVPE / MPJPE / MPVPE in mm (mean over all points and samples,
  which equals eval.py's mean of per-keypoint means when all points are visible, as there) and
  the F-scores (aligned and not). `write_pred_json` / `read_pred_json`: the submission format
  `[xyz_list, verts_list]`.
- `MetroFreiHANDTsv(yaml, hand_model)`: METRO's FreiHAND TSV export (microsoft/MeshTransformer
  metro/datasets/hand_mesh_tsv.py, metro/tools/tsv_demo_freihand.py, docs/DOWNLOAD.md:
  `freihand/{train,test}.yaml` naming `X.img.tsv` (key, base64 JPEG), `X.label.tsv` (key, JSON
  list whose first element holds center (2,) px, scale (box side / 200 px; 0.9 around (112, 112)
  in METRO's export), 2d_joints (21, 3) image pixels + conf, 3d_joints (21, 4) wrist-centred +
  conf, pose (48) MANO axis-angle with the camera-frame global rotation first, betas (10),
  has_2d_joints, has_3d_joints, has_smpl), `X.hw.tsv`, `X.linelist.tsv`), read with
  data.TsvDataset's machinery (yaml / composite / .lineidx / linelist, DataError naming the
  file, row and key; label shapes checked per row). As METRO's training, the GT mesh and 3D
  keypoints are MANO(pose, betas) wrist-centred (needs `hand_model`, MANO_RIGHT.pkl for real
  data; without one: the label's 3d_joints, no mesh); 3d_joints must be metres (a hand larger
  than 1 m is refused: METRO's code never reads them, so their unit is not confirmed there).
  METRO's evaluation rows carry dummy all-ones pose/betas with has_smpl 1: read as unlabelled.
  Augmentation (train=True) as METRO's hand loader: rotation N(0, 90) deg (zero w.p. 0.6),
  scale N(1, 0.25), pixel noise U[0.6, 1.4], no flip. Same sample dict as FreiHANDDataset.

Departures
- No open3d (not a dependency): nearest neighbours with scipy's cKDTree (same distances).
- Image versions are offset by the annotation count read from the files instead of the hard-coded
  32560, so tests can write a small set in the same layout.
- `write_synthetic`: procedural hands rendered (render.py) into this layout (ours, for tests and
  the hand quickstart); uv_root / scale entries of the mano file are written as 0.
- METRO's TSV: 2D keypoints go through the crop affine in continuous pixels (data.py's convention
  for the body TSV; METRO adds SPIN's +1 and rounds); GT meshes need a hand model (see above).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

import data

VERSIONS = ["gs", "hom", "sample", "auto"]
SPLITS = ["training", "evaluation"]
F_THRESHOLDS = (0.005, 0.015)  # metres (eval.py f_threshs)
IMAGE_SIZE = 224


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _load_json_list(path, entry_shape, n=None):
    """A JSON list of arrays of `entry_shape` -> (N, *entry_shape) float64; clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FreiHAND file not found: {path}")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {entry_shape} entries, got {type(data).__name__}")
    if n is not None and len(data) != n:
        raise ValueError(f"{path}: {len(data)} entries, expected {n} (as many as the xyz file)")
    out = np.zeros((len(data),) + tuple(entry_shape))
    for i, e in enumerate(data):
        try:
            a = np.asarray(e, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: entry {i} is not a numeric array (expected {entry_shape})") from None
        ok = a.shape == tuple(entry_shape) or (len(entry_shape) == 1 and a.shape == (1,) + tuple(entry_shape))
        if not ok:  # the mano file stores each entry as [[61 numbers]]
            raise ValueError(f"{path}: entry {i} has shape {a.shape}, expected {tuple(entry_shape)}")
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: entry {i} has non-finite values")
        out[i] = a.reshape(entry_shape)
    return out


def load_annotations(root, split="training"):
    """FreiHAND annotations of `split` under `root` (where training/ and evaluation/ branch off).
    Returns dict: K (N,3,3), xyz (N,21,3) m, pose (N,48), betas (N,10), uv_root (N,2),
    scale (N,) (from the mano file), verts (N,778,3) or None, size N."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    xyz = _load_json_list(root / f"{split}_xyz.json", (21, 3))
    n = len(xyz)
    K = _load_json_list(root / f"{split}_K.json", (3, 3), n)
    out = {"K": K, "xyz": xyz, "size": n, "verts": None}
    mano_path = root / f"{split}_mano.json"
    if mano_path.is_file() or split == "training":
        mano = _load_json_list(mano_path, (61,), n)
        out.update(pose=mano[:, :48], betas=mano[:, 48:58], uv_root=mano[:, 58:60], scale=mano[:, 60])
    verts_path = root / f"{split}_verts.json"
    if verts_path.is_file():
        out["verts"] = _load_json_list(verts_path, (778, 3), n)
    return out


def image_path(root, split, idx, version="gs", size=None):
    """Path of image `idx` of `split` in `version`; size = number of annotations of the split."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if split == "evaluation" and version != "gs":
        raise ValueError("the FreiHAND evaluation split has only the 'gs' version")
    offset = 0 if version == "gs" else VERSIONS.index(version) * int(size)
    return Path(root) / split / "rgb" / f"{idx + offset:08d}.jpg"


def project(xyz, K):
    """(..., N, 3) camera-frame points, (..., 3, 3) intrinsics -> (..., N, 2) pixels."""
    uvw = np.einsum("...ij,...nj->...ni", K, xyz)
    return uvw[..., :2] / uvw[..., 2:]


class FreiHANDDataset(torch.utils.data.Dataset):
    """FreiHAND samples for training/evaluation (see header for the dict layout)."""

    def __init__(self, root, split="training", versions=("gs",)):
        self.root, self.split = Path(root), split
        self.ann = load_annotations(root, split)
        self.versions = list(versions)
        for v in self.versions:
            image_path(root, split, 0, v, self.ann["size"])  # validates the version names
        self._mean = np.asarray(data.IMAGENET_MEAN, np.float32)
        self._std = np.asarray(data.IMAGENET_STD, np.float32)

    def __len__(self):
        return self.ann["size"] * len(self.versions)

    def __getitem__(self, i):
        from PIL import Image
        n = self.ann["size"]
        idx, version = i % n, self.versions[i // n]
        path = image_path(self.root, self.split, idx, version, n)
        if not path.is_file():
            raise FileNotFoundError(f"FreiHAND image not found: {path} (sample {idx}, version {version})")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                W, H = im.size
                if (H, W) != (IMAGE_SIZE, IMAGE_SIZE):
                    im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
                img = np.asarray(im, np.float32) / 255.0
        except OSError as e:
            raise ValueError(f"{path}: unreadable image ({e})") from None
        K = self.ann["K"][idx].copy()
        K[0] *= IMAGE_SIZE / W                                     # intrinsics follow the resize
        K[1] *= IMAGE_SIZE / H
        xyz = self.ann["xyz"][idx]
        uv = data.normalise_pixels(project(xyz, K), (IMAGE_SIZE, IMAGE_SIZE))
        img = (img - self._mean) / self._std
        one = np.ones((21, 1))
        item = {"image": torch.from_numpy(img.transpose(2, 0, 1).copy()),   # (H, W, 3) -> (3, H, W)
                "joints3d": torch.tensor(np.concatenate([xyz, one], 1), dtype=torch.float32),
                "joints2d": torch.tensor(np.concatenate([uv, one], 1), dtype=torch.float32),
                "K": torch.tensor(K, dtype=torch.float32), "has_3d": torch.tensor(1.0),
                "index": idx}
        if "pose" in self.ann:
            item["pose"] = torch.tensor(self.ann["pose"][idx], dtype=torch.float32)
            item["betas"] = torch.tensor(self.ann["betas"][idx], dtype=torch.float32)
        if self.ann["verts"] is not None:
            item["vertices"] = torch.tensor(self.ann["verts"][idx], dtype=torch.float32)
            item["has_smpl"] = torch.tensor(1.0)
        else:
            item["vertices"] = torch.zeros(778, 3)
            item["has_smpl"] = torch.tensor(0.0)
        return item


# ----------------------------------------------------------------------------------------------
# METRO's FreiHAND TSV (metro/datasets/hand_mesh_tsv.py, metro/tools/tsv_demo_freihand.py)
# ----------------------------------------------------------------------------------------------
METRO_HAND_LABEL_KEYS = ("center", "scale", "2d_joints", "has_2d_joints", "3d_joints", "has_3d_joints",
                         "pose", "betas", "has_smpl")
# METRO hand augmentation (HandMeshTSVDataset.augm_params): rotation N(0, 90 deg) clipped to +-180
# and zero w.p. 0.6, scale N(1, 0.25) clipped to [0.75, 1.25], pixel noise U[0.6, 1.4], never a flip
METRO_HAND_AUGMENTATION = dict(rot_factor=90.0, scale_factor=0.25, noise_factor=0.4, flip_prob=0.0,
                               rot_zero_prob=0.6)


class MetroFreiHANDTsv(data.TsvDataset):
    """METRO's FreiHAND TSV (`freihand/train.yaml`, `test.yaml`) through data.TsvDataset (yaml index,
    .lineidx, linelist, composite, DataError naming file / row / key) as FreiHANDDataset dicts;
    `hand_model` (hand.HandModel; MANO_RIGHT.pkl for real data) builds the GT meshes (see header)."""

    def __init__(self, yaml_path, hand_model=None, train=False, input_size=IMAGE_SIZE, seed=0,
                 skip_bad=False, **augmentation):
        aug = dict(METRO_HAND_AUGMENTATION, **augmentation)
        if aug["flip_prob"]:
            raise ValueError("MetroFreiHANDTsv: flip_prob must be 0 (a flipped right hand is a left "
                             "hand; METRO's hand loader never flips)")
        self.hand_model = hand_model
        super().__init__(yaml_path, train=train, input_size=(int(input_size), int(input_size)),
                         seed=seed, skip_bad=skip_bad, **aug)

    def _record(self, raw):
        key, ann, f = self.label_row(raw, METRO_HAND_LABEL_KEYS)
        s, r = self.rows[raw]
        has = {k: int(float(f(k, ()))) for k in ("has_2d_joints", "has_3d_joints", "has_smpl")}
        pose, betas = f("pose", (48,)), f("betas", (10,))
        if has["has_smpl"] and np.all(pose == 1) and np.all(betas == 1):
            has["has_smpl"] = 0   # tsv_demo_freihand.py's evaluation rows: dummy all-ones MANO, no GT
        j3d = f("3d_joints", (21, 4))
        if has["has_3d_joints"]:
            rel = j3d[:, :3] - j3d[:1, :3]
            if np.abs(rel).max() > 1.0:
                raise data.DataError(self.label_tsvs[s].path, r, "3d_joints",
                                      f"wrist-relative keypoints up to {np.abs(rel).max():.3g}: not a hand in "
                                      "metres (millimetres?); expected metres, as FreiHAND's")
        return {"imgname": key, "center": f("center", (2,)), "scale": float(f("scale", ())),
                "part": f("2d_joints", (21, 3)), "has_2d": has["has_2d_joints"], "S": j3d,
                "has_3d": has["has_3d_joints"], "pose": pose, "betas": betas,
                "has_smpl": float(has["has_smpl"]), "gender": 0}

    def process(self, img, rec, raw, flip=0, pn=(1.0, 1.0, 1.0), rot=0.0, sc=1.0):
        """One sample: crop (METRO's centre/scale box; the official crop without augmentation)
        and the FreiHANDDataset dict (see the file header)."""
        H = self.input_size[0]
        scale = rec["scale"] * sc
        try:
            if not self.train and rot == 0 and sc == 1:
                crop, A = data.official_crop(img, rec["center"], scale, H)
            else:
                A = data.crop_matrix(rec["center"], scale * 200.0, rot, (H, H))
                crop = data.warp_image(img, A, (H, H))
        except Exception as e:
            raise data.DataError(self.source, raw, "img", f"cannot decode image: {e}") from None
        x = np.minimum(crop.astype(np.float32) * (np.asarray(pn, np.float32) / 255.0), 1.0)  # (H, W, 3)
        x = (x - self._mean) / self._std
        j2d = np.zeros((21, 3))
        if rec["has_2d"]:
            j2d[:, :2] = data.normalise_pixels(data.transform_points(rec["part"][:, :2], A), (H, H))
            j2d[:, 2] = rec["part"][:, 2]
        pose = data.rotate_global_orient(rec["pose"], rot) if rec["has_smpl"] else rec["pose"].copy()
        verts, has_smpl = torch.zeros(778, 3), 0.0
        j3d, has_3d = np.zeros((21, 4)), float(rec["has_3d"])
        if rec["has_smpl"] and self.hand_model is not None:
            # METRO's training: GT mesh and 3D keypoints from MANO(pose, betas), wrist-centred
            with torch.no_grad():
                o = self.hand_model(torch.tensor(rec["betas"])[None], torch.tensor(pose)[None])
            root = o["joints"][0, :1]
            verts, has_smpl = (o["vertices"][0] - root).float(), 1.0
            j3d = np.concatenate([(o["joints"][0] - root).double().numpy(), np.ones((21, 1))], 1)
            has_3d = 1.0
        elif rec["has_3d"]:
            j3d = rec["S"].copy()
            j3d[:, :3] -= j3d[:1, :3]                                  # wrist-centred, as METRO's loader
            j3d = data.rotate_joints3d(j3d, rot)
        f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        return {"image": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),   # (H, W, 3) -> (3, H, W)
                "joints3d": f32(j3d), "joints2d": f32(j2d), "vertices": verts,
                "pose": f32(pose), "betas": f32(rec["betas"]), "has_smpl": f32(has_smpl),
                "has_3d": f32(has_3d), "has_2d": f32(float(rec["has_2d"])), "index": raw,
                "imgname": rec["imgname"], "center": f32(rec["center"]), "scale": f32(scale),
                "rot": f32(rot)}


# ----------------------------------------------------------------------------------------------
# Evaluation (eval.py conventions)
# ----------------------------------------------------------------------------------------------
def align_w_scale(gt, pred):
    """Similarity-align pred (N, 3) onto gt (N, 3) as FreiHAND's eval.py (reflection allowed)."""
    gt, pred = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    t1, t2 = gt.mean(0), pred.mean(0)
    a, b = gt - t1, pred - t2
    s1, s2 = np.linalg.norm(a) + 1e-8, np.linalg.norm(b) + 1e-8
    a, b = a / s1, b / s2
    # orthogonal Procrustes: R = argmin ||a R - b||_F over orthogonal R (U V^T of svd(a^T b))
    u, sv, vt = np.linalg.svd(a.T @ b)
    R, s = u @ vt, sv.sum()
    return (b @ R.T) * s * s1 + t1


def fscore(gt, pred, threshold):
    """F-score of two point sets (eval.py calculate_fscore). Returns (f, precision, recall)."""
    gt, pred = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    if len(gt) == 0 or len(pred) == 0:
        return 0.0, 0.0, 0.0
    d_gt = cKDTree(pred).query(gt)[0]                   # each GT point -> closest prediction
    d_pr = cKDTree(gt).query(pred)[0]                   # each prediction -> closest GT point
    precision = float((d_gt < threshold).mean())        # eval.py's names (they are swapped there)
    recall = float((d_pr < threshold).mean())
    f = 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
    return f, precision, recall


def pck_auc(distances, lo=0.0, hi=0.05, steps=100):
    """Area under the PCK curve over [lo, hi] metres (eval.py get_measures), normalised to 1."""
    d = np.asarray(distances, np.float64).reshape(-1)
    th = np.linspace(lo, hi, steps)
    pck = np.array([(d <= t).mean() for t in th])
    return float(np.sum((pck[1:] + pck[:-1]) / 2 * np.diff(th)) / (hi - lo))


def evaluate(gt_xyz, pred_xyz, gt_verts=None, pred_verts=None, thresholds=F_THRESHOLDS):
    """Per-dataset FreiHAND metrics. gt/pred xyz (B, 21, 3) metres; verts (B, 778, 3) or None.
    Returns dict: mpjpe_mm, pa_mpjpe_mm, auc_pa_j (0-50 mm), and with meshes mpvpe_mm, pa_mpvpe_mm,
    f@5mm, f@15mm (aligned), f@5mm_unaligned, f@15mm_unaligned."""
    gx, px = np.asarray(gt_xyz, np.float64), np.asarray(pred_xyz, np.float64)
    if gx.shape != px.shape or gx.ndim != 3 or gx.shape[2] != 3:
        raise ValueError(f"freihand.evaluate: xyz must both be (B, J, 3), got {gx.shape} and {px.shape}")
    al = np.stack([align_w_scale(g, p) for g, p in zip(gx, px)])
    dj, dja = np.linalg.norm(gx - px, axis=-1), np.linalg.norm(gx - al, axis=-1)
    out = {"mpjpe_mm": 1000 * dj.mean(), "pa_mpjpe_mm": 1000 * dja.mean(), "auc_pa_j": pck_auc(dja)}
    if gt_verts is not None and pred_verts is not None:
        gv, pv = np.asarray(gt_verts, np.float64), np.asarray(pred_verts, np.float64)
        if gv.shape != pv.shape or gv.shape[0] != gx.shape[0]:
            raise ValueError(f"freihand.evaluate: verts must both be (B, V, 3), got {gv.shape} and {pv.shape}")
        alv = np.stack([align_w_scale(g, p) for g, p in zip(gv, pv)])
        out["mpvpe_mm"] = 1000 * np.linalg.norm(gv - pv, axis=-1).mean()
        out["pa_mpvpe_mm"] = 1000 * np.linalg.norm(gv - alv, axis=-1).mean()
        for t in thresholds:
            name = f"f@{round(t * 1000)}mm"
            out[name] = float(np.mean([fscore(g, p, t)[0] for g, p in zip(gv, alv)]))
            out[name + "_unaligned"] = float(np.mean([fscore(g, p, t)[0] for g, p in zip(gv, pv)]))
    return {k: float(v) for k, v in out.items()}


def write_pred_json(path, xyz, verts):
    """FreiHAND submission `pred.json`: [xyz_list (B x 21 x 3), verts_list (B x 778 x 3)], metres."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump([np.asarray(xyz).tolist(), np.asarray(verts).tolist()], fh)
    tmp.replace(path)
    return path


def read_pred_json(path, size=None):
    """pred.json -> (xyz (B,21,3), verts (B,V,3)); checks the format as eval.py asserts it."""
    path = Path(path)
    with open(path) as fh:
        pred = json.load(fh)
    if not isinstance(pred, list) or len(pred) != 2:
        raise ValueError(f"{path}: expected [xyz_list, verts_list], got a {type(pred).__name__} "
                         f"of length {len(pred) if hasattr(pred, '__len__') else '?'}")
    xyz, verts = np.asarray(pred[0], np.float64), np.asarray(pred[1], np.float64)
    if size is not None and (len(xyz) != size or len(verts) != size):
        raise ValueError(f"{path}: {len(xyz)} keypoint and {len(verts)} mesh entries, expected {size}")
    if xyz.ndim != 3 or xyz.shape[1:] != (21, 3) or verts.ndim != 3 or verts.shape[2] != 3:
        raise ValueError(f"{path}: expected xyz (B, 21, 3) and verts (B, V, 3), got {xyz.shape}, {verts.shape}")
    return xyz, verts


# ----------------------------------------------------------------------------------------------
# Synthetic hands in FreiHAND's layout
# ----------------------------------------------------------------------------------------------
def hand_pose_axes(hm):
    """Rest-pose flexion and abduction axes of MANO's 15 finger joints, from the model's geometry
    (so the toy hand and MANO_RIGHT.pkl alike): palm normal n = (index1 - wrist) x (pinky1 - wrist)
    (towards the palm for a right hand); joint k's flexion axis = d_k x n, d_k its bone direction
    (towards its child joint or fingertip), so a positive angle bends the bone towards the palm;
    abduction axis n. Returns (flexion (15, 3), palm normal (3,)) unit vectors (rest frame)."""
    import hand as _hand
    v = hm.v_template.double()
    J = hm.mano.J_regressor.double() @ v                                # (16, 3) rest joints
    tip_of_chain_end = {3: 317, 6: 445, 9: 673, 12: 556, 15: 745}       # MANO_TIP_VERTEX_IDS per chain
    child = {p: k for k, p in enumerate(_hand.MANO_PARENTS) if p > 0}
    unit = lambda x: x / x.norm()
    n = unit(torch.cross(J[1] - J[0], J[7] - J[0], dim=0))
    flex = []
    for k in range(1, 16):
        end = J[child[k]] if k in child else v[tip_of_chain_end[k]]
        flex.append(unit(torch.cross(unit(end - J[k]), n, dim=0)))
    return torch.stack(flex).float(), n.float()


def sample_hand_poses(hm, n, generator):
    """(n, 48) plausible articulations (ours; no reference): per finger a curl c ~ U(-0.1, 1)
    bending its 3 joints by c * (1.2, 1.5, 1.0) rad (thumb c * (0.5, 0.6, 0.9)) + N(0, 0.08)
    each, abduction N(0, 0.15) rad at the first joint of each finger (thumb N(0, 0.3)), no twist;
    global orientation 0 (set by the caller). Fists, grasps, open and spread hands."""
    flex, normal = hand_pose_axes(hm)
    g = generator
    curl = torch.rand(n, 5, generator=g) * 1.1 - 0.1                    # index, middle, pinky, ring, thumb
    gains = torch.tensor([[1.2, 1.5, 1.0]] * 4 + [[0.5, 0.6, 0.9]])      # (5 chains, 3 joints)
    angle = (curl[:, :, None] * gains).reshape(n, 15) + 0.08 * torch.randn(n, 15, generator=g)
    abd = torch.zeros(n, 15)
    abd[:, [0, 3, 6, 9]] = 0.15 * torch.randn(n, 4, generator=g)
    abd[:, 12] = 0.3 * torch.randn(n, generator=g)
    aa = angle[..., None] * flex + abd[..., None] * normal              # (n, 15, 3) axis-angle
    return torch.cat([torch.zeros(n, 3), aa.reshape(n, 45)], 1)


def write_synthetic(root, n_train=64, n_eval=16, seed=0, model_path=None, focal=500.0, poses="plausible",
                    rotation_std=0.5):
    """Render procedural hands (hand.HandModel, toy hand unless `model_path`) with render.py into
    FreiHAND's layout under `root`: <split>_{xyz,K,mano,verts}.json and <split>/rgb/%08d.jpg
    (224x224; training only in the "gs" version). Random global rotation (palm roughly facing
    the camera: pi/2 about x plus N(0, rotation_std) rad on each axis-angle component), finger
    articulation `poses`: "plausible" (`sample_hand_poses`: finger curls and
    spreads) or "gaussian" (N(0, 0.25) rad on all 45 finger axes, twists included), shape
    N(0, 1), hand 0.45-0.6 m away, random skin tone and background colour. Deterministic for a
    seed. Returns root."""
    if poses not in ("plausible", "gaussian"):
        raise ValueError(f"write_synthetic: poses must be 'plausible' or 'gaussian', got {poses!r}")
    import hand as _hand
    import render as _render
    from PIL import Image
    root = Path(root)
    hm = _hand.HandModel(model_path)
    g = torch.Generator().manual_seed(seed)
    faces = hm.faces.long()
    for split, n in (("training", n_train), ("evaluation", n_eval)):
        (root / split / "rgb").mkdir(parents=True, exist_ok=True)
        pose = (torch.randn(n, 48, generator=g) * 0.25 if poses == "gaussian"
                else sample_hand_poses(hm, n, g))
        pose[:, :3] = torch.randn(n, 3, generator=g) * rotation_std + torch.tensor([np.pi / 2, 0.0, 0.0])
        betas = torch.randn(n, 10, generator=g)
        with torch.no_grad():
            o = hm(betas, pose)
        v, j = o["vertices"].float(), o["joints"].float()
        depth = 0.45 + 0.15 * torch.rand(n, generator=g)
        centre = v.mean(1, keepdim=True)                                   # (n, 1, 3)
        shift = torch.stack([torch.zeros(n), torch.zeros(n), depth], 1)[:, None] - centre
        v, j = v + shift, j + shift
        K = np.tile([[focal, 0, IMAGE_SIZE / 2], [0, focal, IMAGE_SIZE / 2], [0, 0, 1]], (n, 1, 1))
        skin = torch.tensor([0.85, 0.64, 0.52]) * (0.7 + 0.3 * torch.rand(n, 1, generator=g))
        bg = torch.rand(n, 1, 1, 3, generator=g).expand(n, IMAGE_SIZE, IMAGE_SIZE, 3)
        for i in range(n):
            out = _render.render(v[i:i + 1], faces, focal, torch.full((1, 2), IMAGE_SIZE / 2),
                                 (IMAGE_SIZE, IMAGE_SIZE), colors=skin[i], background=bg[i])
            img = (out["rgb"][0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(img).save(root / split / "rgb" / f"{i:08d}.jpg", quality=95)
        mano = np.concatenate([pose.numpy(), betas.numpy(), np.zeros((n, 3))], 1)[:, None]  # (n, 1, 61)
        for name, arr in (("xyz", j.numpy()), ("K", K), ("mano", mano), ("verts", v.numpy())):
            tmp = root / f"{split}_{name}.json.tmp"
            tmp.write_text(json.dumps(np.asarray(arr, np.float64).round(6).tolist()))
            tmp.replace(root / f"{split}_{name}.json")
    return root


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(2, 21, 3)) * 0.03
    pred = gt + rng.normal(size=gt.shape) * 0.002
    gv = rng.normal(size=(2, 778, 3)) * 0.03
    print(evaluate(gt, pred, gv, gv * 1.1 + 0.01))
