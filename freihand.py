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

Departures
- No open3d (not a dependency): nearest neighbours with scipy's cKDTree (same distances).
- Image versions are offset by the annotation count read from the files instead of the hard-coded
  32560, so tests can write a small set in the same layout.
- `write_synthetic`: procedural hands rendered (render.py) into this layout (ours, for tests and
  the hand quickstart); uv_root / scale entries of the mano file are written as 0.
- METRO's FreiHAND TSV export is not read here (data.py's TSV reader is body-specific); not done.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

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
        import data as _data  # normalisation shared with the body datasets
        self._data = _data
        self.root, self.split = Path(root), split
        self.ann = load_annotations(root, split)
        self.versions = list(versions)
        for v in self.versions:
            image_path(root, split, 0, v, self.ann["size"])  # validates the version names
        self._mean = np.asarray(_data.IMAGENET_MEAN, np.float32)
        self._std = np.asarray(_data.IMAGENET_STD, np.float32)

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
        uv = self._data.normalise_pixels(project(xyz, K), (IMAGE_SIZE, IMAGE_SIZE))
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
def write_synthetic(root, n_train=64, n_eval=16, seed=0, model_path=None, focal=500.0):
    """Render procedural hands (hand.HandModel, toy hand unless `model_path`) with render.py into
    FreiHAND's layout under `root`: <split>_{xyz,K,mano,verts}.json and <split>/rgb/%08d.jpg
    (224x224; training only in the "gs" version). Random global rotation (palm roughly facing
    the camera), finger articulation N(0, 0.25) rad, shape N(0, 1), hand 0.45-0.6 m away, random
    skin tone and background colour. Deterministic for a seed. Returns root."""
    import hand as _hand
    import render as _render
    from PIL import Image
    root = Path(root)
    hm = _hand.HandModel(model_path)
    g = torch.Generator().manual_seed(seed)
    faces = hm.faces.long()
    for split, n in (("training", n_train), ("evaluation", n_eval)):
        (root / split / "rgb").mkdir(parents=True, exist_ok=True)
        pose = torch.randn(n, 48, generator=g) * 0.25
        pose[:, :3] = torch.randn(n, 3, generator=g) * 0.5 + torch.tensor([np.pi / 2, 0.0, 0.0])
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
