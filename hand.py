"""Hand model: MANO loading without chumpy, a procedural MANO-format "toy hand", 21 FreiHAND keypoints.

MANO: Embodied Hands: Modeling and Capturing Hands and Bodies Together (Romero, Tzionas, Black;
SIGGRAPH Asia 2017), https://mano.is.tue.mpg.de . FreiHAND: Zimmermann et al., ICCV 2019,
https://lmb.informatik.uni-freiburg.de/projects/freihand/ .

What this file implements
- `load_mano_pickle(path)`: the official `MANO_RIGHT.pkl` (chumpy inside) read through body.py's
  restricted unpickler (`body.load_smpl_pickle(..., validate=False)`: chumpy -> numpy, sparse
  rebuilt, every other global refused), then MANO's keys validated (`MANO_KEYS`; errors name the
  file, the key and the expected shape). An SMPL body file is refused here (24 joints), and
  body.py refuses a MANO file where a body is expected (its kintree check names "MANO").
- `toy_hand_path()`: a procedural right hand written in MANO's pickle format (same keys:
  v_template, shapedirs, posedirs, J_regressor, weights, kintree_table, f, hands_components,
  hands_mean, hands_coeffs), cached in `$HMR_CACHE` (or ~/.cache/hmr), written atomically,
  rebuilt when the cached file fails the restricted load or validation. Design (metres; wrist
  joint at the origin, fingers along +x, back of the hand +y, palm -y, thumb towards -z; a flat
  open hand like MANO's `flat_hand_mean` pose):
    * MANO's 16-joint tree (wrist; index, middle, pinky, ring, thumb chains of 3 joints, MANO's
      order) with adult proportions (wrist to middle tip about 19 cm).
    * 6 closed surfaces: palm and 5 fingers, each a lofted capsule (elliptic cross-sections,
      poles at both ends); exactly 778 vertices (MANO: 778) and 1532 triangles (MANO: 1538).
    * the finger-tip pole vertices sit at MANO's fingertip vertex ids used by the METRO family
      (`MANO_TIP_VERTEX_IDS`), so one keypoint definition serves both models.
    * skinning: finger vertices follow the joint at the proximal end of their bone, blended
      smoothly (smoothstep over about 1 cm) across each joint; palm vertices follow the wrist.
    * 10 shape directions = derivative of the generator w.r.t. 10 hand measurements (scale, palm
      width, palm length, palm thickness, finger length, finger thickness, thumb length, index
      length, pinky length, finger spread).
    * J_regressor: each joint interpolates the two vertex rings bracketing it along its capsule's
      axis, so `J_regressor @ v_template` reproduces the designed joints exactly.
    * posedirs zero (no pose correctives); hands_components = identity (45 x 45), hands_mean 0.
- `HandModel`: smplx.MANO built from a `data_struct` (smplx never unpickles anything); forward
  (betas, pose (B,16,3) axis-angle or (B,48)) -> 778 vertices and 21 keypoints in FreiHAND order;
  `topology()` gives the 778 -> 195 hierarchy dict the hand models take (GraphCMR-style
  `mano_downsampling.npz` when given, else mesh.py's decimator with factor 4).

Departures (and why)
- The toy hand is not MANO: a stand-in so that everything runs without the licensed file.
- 21 keypoints: MANO's 16 regressed joints + the fingertip vertices [745, 317, 445, 556, 673]
  reordered to FreiHAND's order, as FastMETRO's `_mano.py` does (its list prints 444 for the
  middle tip but its one-hot row uses 445; the row is what runs, so 445).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn

import body

# ----------------------------------------------------------------------------------------------
MANO_JOINT_NAMES = [
    "wrist", "index1", "index2", "index3", "middle1", "middle2", "middle3", "pinky1", "pinky2",
    "pinky3", "ring1", "ring2", "ring3", "thumb1", "thumb2", "thumb3",
]
MANO_PARENTS = [-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14]
FREIHAND_JOINT_NAMES = [
    "Wrist", "Thumb_1", "Thumb_2", "Thumb_3", "Thumb_4", "Index_1", "Index_2", "Index_3",
    "Index_4", "Middle_1", "Middle_2", "Middle_3", "Middle_4", "Ring_1", "Ring_2", "Ring_3",
    "Ring_4", "Pinky_1", "Pinky_2", "Pinky_3", "Pinky_4",
]
# fingertip vertices (thumb, index, middle, ring, pinky) appended as keypoints 16..20
MANO_TIP_VERTEX_IDS = [745, 317, 445, 556, 673]
# 16 MANO joints + 5 tips -> FreiHAND order
MANO_TO_FREIHAND = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]
FREIHAND_ROOT = 0  # wrist
FREIHAND_SKELETON = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9),
                     (9, 10), (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17),
                     (17, 18), (18, 19), (19, 20)]

MANO_KEYS = {  # key -> expected shape
    "v_template": "(V, 3)", "shapedirs": "(V, 3, NB)", "posedirs": "(V, 3, 135)",
    "J_regressor": "(16, V)", "weights": "(V, 16)", "kintree_table": "(2, 16)", "f": "(F, 3)",
    "hands_components": "(45, 45)", "hands_mean": "(45,)",
}
MANO_NUM_VERTICES = 778
TOY_HAND_VERSION = 1
TOY_HAND_FILE_NAME = f"MANO_RIGHT_TOY_v{TOY_HAND_VERSION}.pkl"

# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------
def _shape(x):
    return tuple(x.shape) if hasattr(x, "shape") else None


def validate_mano_arrays(data, path="<arrays>"):
    """Check MANO's keys and shapes; raises ValueError naming the file, key and expected shape."""
    missing = [k for k in MANO_KEYS if k not in data]
    kt = _shape(data.get("kintree_table"))
    if kt is not None and len(kt) == 2 and kt[1] == 24:
        raise ValueError(f"{path}: key 'kintree_table' has shape {kt}, expected (2, 16): this is "
                         "an SMPL body model, not a MANO hand model")
    if missing:
        raise ValueError(
            f"{path}: not a MANO hand model file: missing key(s) {missing}; a MANO pickle has "
            + ", ".join(f"{k} {s}" for k, s in MANO_KEYS.items()) + f" (found keys {sorted(data)})")
    if kt is None or kt != (2, 16):
        raise ValueError(f"{path}: key 'kintree_table' has shape {kt}, expected (2, 16) (MANO)")
    vt = _shape(data["v_template"])
    if vt is None or len(vt) != 2 or vt[1] != 3:
        raise ValueError(f"{path}: key 'v_template' has shape {vt}, expected (V, 3)")
    V = vt[0]
    expect = {"shapedirs": (V, 3, None), "posedirs": (V, 3, 135), "J_regressor": (16, V),
              "weights": (V, 16), "f": (None, 3), "hands_components": (45, 45),
              "hands_mean": (45,)}
    for k, e in expect.items():
        s = _shape(data[k])
        if s is None or len(s) != len(e) or any(a is not None and a != b for a, b in zip(e, s)):
            raise ValueError(f"{path}: key '{k}' has shape {s}, expected "
                             f"{MANO_KEYS[k].replace('V', str(V))} (V = {V} from v_template)")
    f = np.asarray(data["f"])
    if f.size and (f.min() < 0 or f.max() >= V):
        raise ValueError(f"{path}: key 'f' indexes vertices outside [0, {V})")
    if V <= max(MANO_TIP_VERTEX_IDS):
        raise ValueError(f"{path}: {V} vertices, but the fingertip keypoints need vertex ids "
                         f"{MANO_TIP_VERTEX_IDS} (MANO has {MANO_NUM_VERTICES})")
    for k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights",
              "hands_components", "hands_mean"):
        x = data[k].data if sp.issparse(data[k]) else np.asarray(data[k])
        try:
            bad = int(x.size - np.isfinite(x).sum())
        except TypeError:
            raise ValueError(f"{path}: key '{k}' is not numeric (dtype {x.dtype})") from None
        if bad:
            raise ValueError(f"{path}: key '{k}' has {bad} non-finite entries: damaged model file")
    return data


def load_mano_pickle(path, validate=True):
    """MANO .pkl (official with chumpy, or the toy hand) -> dict of numpy / scipy.sparse arrays,
    read through body.py's restricted unpickler. Raises FileNotFoundError / ValueError /
    pickle.UnpicklingError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MANO model file not found: {path} (expected MANO_RIGHT.pkl "
                                "from mano.is.tue.mpg.de, or omit it for the toy hand)")
    data = body.load_smpl_pickle(path, validate=False)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict of MANO arrays, got {type(data).__name__}")
    return validate_mano_arrays(data, path) if validate else data


# ----------------------------------------------------------------------------------------------
# Toy hand generator
# ----------------------------------------------------------------------------------------------
TOY_HAND_PART_NAMES = ["palm", "index", "middle", "pinky", "ring", "thumb"]
_PALM_RES, _FINGER_RES = (18, 12), (10, 11)    # (n_theta, n_rings): 218 + 5 * 112 = 778 vertices
TOY_HAND_SHAPE_DIRECTIONS = [("scale", 0.04), ("palm_width", 0.06), ("palm_length", 0.06),
                             ("palm_thickness", 0.15), ("finger_length", 0.05),
                             ("finger_thickness", 0.20), ("thumb_length", 0.06),
                             ("index_length", 0.05), ("pinky_length", 0.06), ("spread", 0.15)]
_P0 = {name: 1.0 for name, _ in TOY_HAND_SHAPE_DIRECTIONS}
# per finger (MANO chain order index, middle, pinky, ring): MCP (x, z), phalanx lengths, radius
_FINGERS = {"index": ((0.088, -0.026), (0.040, 0.024, 0.020), 0.0090),
            "middle": ((0.092, -0.006), (0.044, 0.028, 0.021), 0.0092),
            "pinky": ((0.080, 0.034), (0.032, 0.019, 0.018), 0.0078),
            "ring": ((0.088, 0.014), (0.041, 0.026, 0.020), 0.0086)}


def _smoothstep(x, delta):
    u = np.clip((x + delta) / (2 * delta), 0.0, 1.0)
    return u * u * (3 - 2 * u)


def _capsule(A, B, ref, rx, ry, n_theta, n_rings, flat=0.35):
    """Closed capsule from pole A to pole B: n_rings rings of n_theta vertices + 2 poles.
    Returns vertices (n_theta*n_rings+2, 3), faces, axial coordinate s of every vertex (metres
    from A), ring axial positions (n_rings,)."""
    a = (B - A) / np.linalg.norm(B - A)
    u = ref - (ref @ a) * a
    u /= np.linalg.norm(u)
    w = np.cross(a, u)                                   # (u, w, a) right-handed
    L = np.linalg.norm(B - A)
    phi = np.pi * np.arange(1, n_rings + 1) / (n_rings + 1)
    s_ring = L * (1 - np.cos(phi)) / 2                   # (n_rings,) axial positions
    r_ring = np.sin(phi) ** flat                         # box-like capsule, rounded ends
    th = 2 * np.pi * np.arange(n_theta) / n_theta
    ring = (np.cos(th)[:, None] * u * rx + np.sin(th)[:, None] * w * ry)   # (n_theta, 3)
    v = A + s_ring[:, None, None] * a + r_ring[:, None, None] * ring[None]  # (n_rings, n_theta, 3)
    v = np.concatenate([v.reshape(-1, 3), A[None], B[None]])
    s = np.concatenate([np.repeat(s_ring, n_theta), [0.0, L]])
    idx = lambda i, j: i * n_theta + j % n_theta
    f = []
    for i in range(n_rings - 1):
        for j in range(n_theta):  # outward: (i,j), (i,j+1), (i+1,j) -- normal = -a x ... = radial
            f += [[idx(i, j), idx(i, j + 1), idx(i + 1, j)],
                  [idx(i + 1, j), idx(i, j + 1), idx(i + 1, j + 1)]]
    pa, pb = n_theta * n_rings, n_theta * n_rings + 1
    for j in range(n_theta):
        f += [[pa, idx(0, j + 1), idx(0, j)], [pb, idx(n_rings - 1, j), idx(n_rings - 1, j + 1)]]
    return v, np.asarray(f, np.int64), s, s_ring


def _toy_hand_layout(p):
    """Joints (16, 3) and capsule specs for measurements p (before the overall scale)."""
    J = np.zeros((16, 3))
    parts = []
    fl, ft, sp_ = p["finger_length"], p["finger_thickness"], p["spread"]
    pl, pw = p["palm_length"], p["palm_width"]
    # palm: from behind the wrist to the knuckles, wide along z, thin along y
    parts.append(dict(name="palm", A=np.array([-0.020, 0, 0]), B=np.array([0.098 * pl, 0, 0]),
                      ref=np.array([0, 0, 1.0]), rx=0.045 * pw, ry=0.016 * p["palm_thickness"],
                      res=_PALM_RES, chain=[0], bounds=[], reg={0: 0.020}))
    for k, (name, ((x, z), lens, r)) in enumerate(_FINGERS.items()):
        j0 = 1 + 3 * k
        lens = np.asarray(lens) * fl * (p["index_length"] if name == "index" else 1.0) * (
            p["pinky_length"] if name == "pinky" else 1.0)
        mcp = np.array([x * pl, 0.0, z * pw * sp_])
        d = np.array([1.0, 0.0, 0.12 * (z / 0.034) * (sp_ - 1.0)])
        d /= np.linalg.norm(d)
        J[j0] = mcp
        J[j0 + 1] = mcp + d * lens[0]
        J[j0 + 2] = J[j0 + 1] + d * lens[1]
        tip = J[j0 + 2] + d * lens[2]
        A = mcp - d * 0.014
        parts.append(dict(name=name, A=A, B=tip, ref=np.array([0, 0, 1.0]), rx=r * ft,
                          ry=0.9 * r * ft, res=_FINGER_RES, chain=[0, j0, j0 + 1, j0 + 2],
                          bounds=[0.014, 0.014 + lens[0], 0.014 + lens[0] + lens[1]],
                          reg={j0: 0.014, j0 + 1: 0.014 + lens[0],
                               j0 + 2: 0.014 + lens[0] + lens[1]}))
    tl = p["thumb_length"] * fl
    cmc = np.array([0.022 * pl, -0.008, -0.022 * pw])
    d = np.array([0.75, -0.10, -0.65 * sp_])
    d /= np.linalg.norm(d)
    lens = np.array([0.040, 0.032, 0.027]) * tl
    J[13] = cmc
    J[14] = cmc + d * lens[0]
    J[15] = J[14] + d * lens[1]
    tip = J[15] + d * lens[2]
    parts.append(dict(name="thumb", A=cmc - d * 0.012, B=tip, ref=np.array([0, 1.0, 0]),
                      rx=0.0105 * ft, ry=0.0095 * ft, res=_FINGER_RES, chain=[0, 13, 14, 15],
                      bounds=[0.012, 0.012 + lens[0], 0.012 + lens[0] + lens[1]],
                      reg={13: 0.012, 14: 0.012 + lens[0], 15: 0.012 + lens[0] + lens[1]}))
    return J, parts


def _toy_hand_geometry(p):
    J, parts = _toy_hand_layout(p)
    vs, fs, ss, rings, offsets, labels = [], [], [], [], [], []
    off = 0
    for k, q in enumerate(parts):
        v, f, s, s_ring = _capsule(q["A"], q["B"], q["ref"], q["rx"], q["ry"], *q["res"])
        vs.append(v), fs.append(f + off), ss.append(s), rings.append(s_ring), offsets.append(off)
        labels.append(np.full(len(v), k))
        off += len(v)
    sc = p["scale"]
    return dict(J=J * sc, v=np.concatenate(vs) * sc, f=np.concatenate(fs), s=ss, rings=rings,
                offsets=offsets, parts=parts, part=np.concatenate(labels))


def _tip_permutation(g):
    """Vertex permutation (new -> old) putting each finger's tip pole at MANO_TIP_VERTEX_IDS."""
    V = len(g["v"])
    order = {"thumb": 5, "index": 1, "middle": 2, "ring": 4, "pinky": 3}
    old_tips = []
    for name in ("thumb", "index", "middle", "ring", "pinky"):
        k = order[name]
        n = _FINGER_RES[0] * _FINGER_RES[1]
        old_tips.append(g["offsets"][k] + n + 1)         # pole B (the tip) of that capsule
    perm = np.arange(V)
    for new, old in zip(MANO_TIP_VERTEX_IDS, old_tips):  # swap so that perm[new] = old
        i, j = int(np.where(perm == old)[0][0]), new
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def build_toy_hand():
    """The toy hand as a MANO-format dict (see header), plus part labels."""
    g = _toy_hand_geometry(_P0)
    v, f, J = g["v"], g["f"], g["J"]
    V = len(v)
    assert V == MANO_NUM_VERTICES, V
    W = np.zeros((V, 16))
    R = np.zeros((16, V))
    for k, q in enumerate(g["parts"]):
        o, s, rings, nt = g["offsets"][k], g["s"][k], g["rings"][k], q["res"][0]
        idx = np.arange(o, o + len(s))
        chain, bounds = q["chain"], q["bounds"]
        w = np.zeros((len(s), len(chain)))
        w[:, 0] = 1.0
        for b, bound in enumerate(bounds):             # move weight to the next joint across each bound
            t = _smoothstep(s - bound, 0.006)
            w[:, b + 1] = t * w[:, b]
            w[:, b] *= 1 - t
        for c, j in enumerate(chain):
            W[idx, j] += w[:, c]
        for j, sj in q["reg"].items():                 # ring interpolation along the axis
            i1 = int(np.clip(np.searchsorted(rings, sj), 1, len(rings) - 1))
            t = (sj - rings[i1 - 1]) / (rings[i1] - rings[i1 - 1])
            R[j, o + (i1 - 1) * nt + np.arange(nt)] += (1 - t) / nt
            R[j, o + i1 * nt + np.arange(nt)] += t / nt
    sd = np.zeros((V, 3, len(TOY_HAND_SHAPE_DIRECTIONS)))
    for b, (name, step) in enumerate(TOY_HAND_SHAPE_DIRECTIONS):
        hi = dict(_P0, **{name: _P0[name] + step})
        lo = dict(_P0, **{name: _P0[name] - step})
        sd[:, :, b] = (_toy_hand_geometry(hi)["v"] - _toy_hand_geometry(lo)["v"]) / 2
    perm = _tip_permutation(g)                          # new index i holds old vertex perm[i]
    inv = np.argsort(perm)
    v, sd, W, R = v[perm], sd[perm], W[perm], R[:, perm]
    f = inv[f]
    kintree = np.array([[4294967295] + MANO_PARENTS[1:], list(range(16))], dtype=np.int64)
    mano = {
        "v_template": v.astype(np.float64),
        "shapedirs": sd.astype(np.float64),
        "posedirs": np.zeros((V, 3, 135)),
        "J_regressor": sp.csc_matrix(R),
        "weights": W.astype(np.float64),
        "kintree_table": kintree,
        "f": f.astype(np.uint32),
        "J": J.astype(np.float64),
        "hands_components": np.eye(45),
        "hands_mean": np.zeros(45),
        "hands_coeffs": np.zeros((1, 45)),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    return dict(mano=mano, joints=J, part=g["part"][perm], part_names=list(TOY_HAND_PART_NAMES))


def write_toy_hand(path):
    """Write the toy hand (MANO pickle, protocol 2) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = build_toy_hand()["mano"]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(data, fh, protocol=2)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def toy_hand_path(cache_dir=None, verify=True):
    """Cached toy hand pickle (generated on first use; rebuilt if unreadable/refused/invalid)."""
    path = Path(cache_dir or body.cache_dir_default()) / TOY_HAND_FILE_NAME
    if not path.is_file():
        write_toy_hand(path)
    elif verify:
        try:
            load_mano_pickle(path)
        except (ValueError, pickle.UnpicklingError) as e:
            import warnings
            warnings.warn(f"cached toy hand is unusable, rebuilding it: {e}", stacklevel=2)
            write_toy_hand(path)
    return path


def keypoint_regressor(J_regressor):
    """(16, V) MANO joint regressor -> (21, V) FreiHAND-order keypoint regressor (tips one-hot)."""
    R = J_regressor.toarray() if sp.issparse(J_regressor) else np.asarray(J_regressor)
    tips = np.zeros((5, R.shape[1]))
    tips[np.arange(5), MANO_TIP_VERTEX_IDS] = 1.0
    return np.concatenate([R, tips])[MANO_TO_FREIHAND]


# ----------------------------------------------------------------------------------------------
class HandModel(nn.Module):
    """MANO (or the toy hand) as a torch module.

    HandModel(model_path=None, num_betas=10): None -> toy hand; else a MANO_RIGHT.pkl.
    Pose is the full 48-dim axis-angle (global orient + 15 joints), added to MANO's hands_mean
    as smplx does with flat_hand_mean=False (the toy hand's mean is 0).
    """

    def __init__(self, model_path=None, num_betas=10):
        super().__init__()
        import smplx
        from smplx.utils import Struct
        model_path = Path(model_path) if model_path is not None else toy_hand_path()
        self.model_path = model_path
        data = load_mano_pickle(model_path)
        nb = data["shapedirs"].shape[-1]
        if num_betas > nb:
            raise ValueError(f"{model_path}: shapedirs has {nb} components, num_betas={num_betas}")
        self.num_betas = num_betas
        arrays = {k: (v.toarray() if sp.issparse(v) else np.asarray(v))
                  for k, v in data.items() if k in MANO_KEYS}
        struct = Struct(**arrays)
        struct.shapedirs = struct.shapedirs[:, :, :num_betas]
        from smplx.vertex_ids import vertex_ids as _ids
        with contextlib.redirect_stdout(io.StringIO()):
            self.mano = smplx.MANO(str(model_path), data_struct=struct, is_rhand=True,
                                   use_pca=False, flat_hand_mean=False, num_betas=num_betas,
                                   create_betas=False, create_global_orient=False,
                                   create_hand_pose=False, create_transl=False,
                                   vertex_ids={k: 0 for k in _ids["smplh"]})
        self.num_vertices = arrays["v_template"].shape[0]
        self.register_buffer("keypoint_regressor",
                             torch.as_tensor(keypoint_regressor(arrays["J_regressor"]),
                                             dtype=torch.float32))
        self._topology = {}

    faces = property(lambda self: self.mano.faces_tensor)
    v_template = property(lambda self: self.mano.v_template)
    parents = property(lambda self: self.mano.parents)

    def forward(self, betas, pose):
        """betas (B, num_betas); pose (B, 48) or (B, 16, 3) axis-angle radians (global first).
        Returns {"vertices": (B, 778, 3), "joints": (B, 21, 3) FreiHAND order, "mano_joints":
        (B, 16, 3)} in metres, no translation."""
        B = pose.shape[0]
        dtype = self.mano.v_template.dtype
        pose, betas = pose.to(dtype), betas.to(dtype)
        if pose.shape[1:] == (16, 3):
            pose = pose.reshape(B, 48)                                   # (B,16,3) -> (B,48)
        if pose.dim() != 2 or pose.shape[1] != 48:
            raise ValueError(f"pose must be (B, 48) or (B, 16, 3) axis-angle, got {tuple(pose.shape)}")
        if betas.dim() != 2 or betas.shape[1] != self.num_betas or betas.shape[0] not in (1, B):
            raise ValueError(f"betas must be (B, {self.num_betas}), got {tuple(betas.shape)}")
        out = self.mano(betas=betas.expand(B, -1), global_orient=pose[:, :3], hand_pose=pose[:, 3:])
        v = out.vertices
        return {"vertices": v, "joints": self.keypoints(v), "mano_joints": out.joints[:, :16]}

    def keypoints(self, vertices):
        """vertices (B, 778, 3) -> 21 FreiHAND keypoints (B, 21, 3)."""
        return torch.einsum("jv,bvc->bjc", self.keypoint_regressor.to(vertices.dtype), vertices)

    def topology(self, hierarchy=None, graphcmr_path=None):
        """Hand TOPOLOGY dict over 778 -> 195: num_vertices, faces, template, up_index/weight,
        down_index, skin_weights, joint_regressor (21 keypoints per level), parents.
        graphcmr_path: GraphCMR-style `mano_downsampling.npz` (U, D, F); else decimation x4."""
        key = (id(hierarchy) if hierarchy is not None else None, str(graphcmr_path))
        if key in self._topology:
            return self._topology[key]
        import mesh
        if hierarchy is None:
            hierarchy = mesh.get_hierarchy(self.model_path, self.v_template.cpu().numpy(),
                                           self.faces.cpu().numpy(), graphcmr_path=graphcmr_path,
                                           factors=(4,))
        h = hierarchy
        f32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
        i64 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.long)
        skin, regs = body.carry_through_hierarchy(h, self.mano.lbs_weights, self.keypoint_regressor)
        topo = {
            "num_vertices": [int(len(x)) for x in h.vertices],
            "faces": [i64(x) for x in h.faces],
            "template": [f32(x) for x in h.vertices],
            "up_index": [i64(x) for x in h.up_index],
            "up_weight": [f32(x) for x in h.up_weight],
            "down_index": [i64(x) for x in h.down_index],
            "skin_weights": skin,
            "joint_regressor": [r.float() for r in regs],
            "root_index": FREIHAND_ROOT,
            "parents": self.parents.detach().cpu().long(),
        }
        self._topology[key] = topo
        return topo


def _main():
    import time
    t = time.time()
    path = toy_hand_path()
    hand = HandModel(path)
    out = hand(torch.zeros(1, 10), torch.zeros(1, 48))
    v, j = out["vertices"][0], out["joints"][0]
    print(f"toy hand {path} ({time.time() - t:.1f} s): V={v.shape[0]} F={hand.faces.shape[0]}")
    print("extent (m):", (v.max(0).values - v.min(0).values).numpy().round(3))
    print("wrist->middle tip (m):", float((j[12] - j[0]).norm()))
    topo = hand.topology()
    print("hierarchy:", topo["num_vertices"])


if __name__ == "__main__":
    _main()
