"""Body model: SMPL loading without chumpy, a procedural SMPL-format "toy body", rotations, cameras.

SMPL: A Skinned Multi-Person Linear Model (Loper, Mahmood, Romero, Pons-Moll, Black; SIGGRAPH Asia
2015), https://smpl.is.tue.mpg.de . 6D rotations: On the Continuity of Rotation Representations in
Neural Networks (Zhou et al., CVPR 2019), https://arxiv.org/abs/1812.07035 .

What this file implements
- `load_smpl_pickle(path)`: a restricted unpickler for the official SMPL `.pkl` files. chumpy arrays
  (`chumpy.ch.Ch` ...) become numpy arrays through a tiny stand-in class, scipy.sparse matrices are
  rebuilt from their stored arrays, numpy arrays are allowed; every other global is refused with an
  error naming the file and the global (a pickle that would run `os.system` raises, never runs).
  Keys, shapes and finiteness are validated (errors name the file, the key and what was expected).
  Nothing in this project hands a pickle to smplx (its loader unpickles without limits): smplx
  gets the arrays as a `data_struct`.
- `toy_body_path()`: a procedural body written in SMPL's own pickle format (same keys and dtypes),
  loadable by `smplx.SMPL(model_path=...)`. Deterministic, generated in well under 5 s, cached in
  `$HMR_CACHE` or `~/.cache/hmr`, written atomically; a cached file that fails the restricted
  load or the validation is rebuilt. Design (SMPL rest frame: metres, y up,
  T-pose, facing +z, subject's left at +x, pelvis joint at the origin):
    * SMPL's 24-joint kinematic tree with adult proportions (about 1.72 m tall).
    * 15 closed surfaces, one per body part: torso, neck, head (with a nose), and for each side
      upper arm (from the collar joint, so it forms the shoulder), forearm, hand, thigh, shin, foot.
      Each part is a lofted tube around a straight axis with (super)elliptic cross-sections and
      rounded end caps, so hands and feet are box-like, the head is an egg with a nose, the torso
      has hips, waist, chest and shoulders. Parts overlap at the joints (no stitching): simple,
      watertight per part, outward-oriented faces, and every part is a separate colourable region.
    * exactly 6890 vertices and 13720 triangles (SMPL: 6890 / 13776), so smplx's default extra-joint
      vertex ids are valid indices.
    * linear-blend-skinning weights: each part follows its bone's joint; across each joint the
      weight moves smoothly (cubic smoothstep over a few cm) to the parent/child joint; the upper
      torso blends laterally into the collars.
    * 10 shape directions = the derivative of the generator with respect to 10 body measurements
      (overall size, girth, leg length, torso length, arm length, shoulder width, hip width, belly,
      head size, limb thickness); left/right symmetric by construction (vert_sym_idxs included).
    * posedirs are zero (no pose correctives).
    * J_regressor: each joint lies on the axis of one part; its row averages the two vertex rings
      that bracket the joint along that axis (linear interpolation), so `J_regressor @ v_template`
      reproduces the designed skeleton exactly and follows the surface under shape changes.
    * an H36M-17 regressor (17, V) built the same way from the skeleton, written next to the model
      as `<stem>_h36m.npy`.
- `anny_body_path(gender)`: the Anny-derived body (assets/anny_<gender>_v1.pkl.gz, written by
  anny_body.py; Apache-2.0 / CC0, see assets/NOTICE) checked against assets/anny_manifest.json and
  unpacked into the cache as an SMPL `.pkl` with its `_h36m.npy` sidecar. `BodyModel("anny")`,
  `--body anny` and `"toy"` name the embedded bodies.
- Topology identity (`topology_identity`): a body file may declare `topology_name` and
  `topology_face_sha256` (the Anny body does; checked against its faces). Guards that would take a
  6890-vertex, 13776-face mesh for SMPL use the identity instead: smplx's SMPL-H vertex ids for the
  extra joints, an SMPL-named H36M regressor (J_regressor_h36m_correct.npy) next to the file or
  passed in, and an explicit mesh hierarchy (e.g. GraphCMR's) whose faces are not the body's.
- `BodyModel`: wraps `smplx.SMPL` (built from a `data_struct`, so smplx never unpickles anything),
  forward(betas, pose as axis-angle or rotation matrices) -> vertices and the 24 SMPL joints;
  H36M-17 / LSP-14 joints from the mesh; `topology()` gives the mesh-hierarchy dict the models take.
- Rotation conversions (axis-angle, matrix, quaternion internally, 6D) and cameras (weak
  perspective, perspective).

Departures from SMPL / official code (and why)
- The toy body is not SMPL: it is a stand-in so that everything runs and is testable without the
  licensed SMPL files. Its pose correctives are zero and its shape space is hand-designed.
- Unused official keys (J_regressor_prior, weights_prior, pose_training_info) are not written.
- `rot6d_to_matrix` defaults to the HMR2/ProHMR layout (first 3 numbers = first column,
  next 3 = second column); SPIN's interleaved layout (`x.view(3, 2)`) is `layout="spin"`.
- H36M "Neck/Nose" and "Head" for the toy body are points on the head's centre line (nose height
  and near the crown), not surface points.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------
SMPL_JOINT_NAMES = [
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hand", "right_hand",
]
SMPL_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
H36M_JOINT_NAMES = [
    "Pelvis", "R_Hip", "R_Knee", "R_Ankle", "L_Hip", "L_Knee", "L_Ankle", "Spine", "Thorax",
    "Neck/Nose", "Head", "L_Shoulder", "L_Elbow", "L_Wrist", "R_Shoulder", "R_Elbow", "R_Wrist",
]
LSP_JOINT_NAMES = [
    "R_Ankle", "R_Knee", "R_Hip", "L_Hip", "L_Knee", "L_Ankle", "R_Wrist", "R_Elbow",
    "R_Shoulder", "L_Shoulder", "L_Elbow", "L_Wrist", "Neck", "Head",
]
H36M_TO_LSP = [3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10]
J24_TO_LSP = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18]
LSP_TO_SMPL = [8, 5, 2, 1, 4, 7, 21, 19, 17, 16, 18, 20, 12, 15]
# nearest SMPL-24 kinematic joint of each H36M-17 joint (consistent with LSP_TO_SMPL)
H36M_TO_SMPL = [0, 2, 5, 8, 1, 4, 7, 6, 12, 15, 15, 16, 18, 20, 17, 19, 21]

SMPL_KEYS = {  # key -> expected shape, V = vertices, NB = shape components, F = faces
    "v_template": "(V, 3)", "shapedirs": "(V, 3, NB)", "posedirs": "(V, 3, 207)",
    "J_regressor": "(24, V)", "weights": "(V, 24)", "kintree_table": "(2, 24)", "f": "(F, 3)",
}
SMPL_FILE_NAMES = {  # gender -> candidate file names inside a model directory
    "neutral": ["SMPL_NEUTRAL.pkl", "basicModel_neutral_lbs_10_207_0_v1.0.0.pkl",
                "basicmodel_neutral_lbs_10_207_0_v1.1.0.pkl"],
    "male": ["SMPL_MALE.pkl", "basicmodel_m_lbs_10_207_0_v1.0.0.pkl",
             "basicModel_m_lbs_10_207_0_v1.0.0.pkl", "basicmodel_m_lbs_10_207_0_v1.1.0.pkl"],
    "female": ["SMPL_FEMALE.pkl", "basicModel_f_lbs_10_207_0_v1.0.0.pkl",
               "basicmodel_f_lbs_10_207_0_v1.1.0.pkl"],
}
H36M_REGRESSOR_NAME = "J_regressor_h36m_correct.npy"

TOY_VERSION = 1  # bump whenever the generator's output changes (names the cached file)
TOY_FILE_NAME = f"SMPL_NEUTRAL_TOY_v{TOY_VERSION}.pkl"  # smplx.create infers "smpl" from the prefix


# ----------------------------------------------------------------------------------------------
# Restricted unpickler
# ----------------------------------------------------------------------------------------------
class _ChumpyStandIn:
    """Receives a chumpy object's pickled state; converted to a numpy array after loading."""
    _qualname = "chumpy.?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self._state = state


class _SparseStandIn(_ChumpyStandIn):
    """Receives a scipy.sparse matrix's pickled state; rebuilt from its arrays after loading."""
    _format = "csc"


def _np_attr(mod, name):
    import importlib
    for m in (mod.replace("numpy.core", "numpy._core"), mod):
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {mod}.{name}")


class _RestrictedUnpickler(pickle.Unpickler):
    _NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
              ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
              ("numpy", "ndarray"), ("numpy", "dtype")}
    _BUILTINS = {"object", "set", "frozenset", "complex", "bytearray", "bytes", "slice"}
    _SPARSE = {"csc_matrix": "csc", "csr_matrix": "csr", "coo_matrix": "coo",
               "csc_array": "csc", "csr_array": "csr", "coo_array": "coo"}

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")
        self._path = path
        self._stubs = {}

    def _refuse(self, module, name, why=""):
        raise pickle.UnpicklingError(
            f"{self._path}: refusing to unpickle global '{module}.{name}'{why}. An SMPL model file "
            "may only contain numpy arrays, scipy.sparse matrices and chumpy arrays (converted to "
            "numpy); nothing else is loaded, so a malicious file cannot run code.")

    def _stub(self, module, name, base, **attrs):
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(name, (base,), dict(_qualname=f"{module}.{name}", **attrs))
        return self._stubs[key]

    def find_class(self, module, name):
        if module == "chumpy" or module.startswith("chumpy."):
            return self._stub(module, name, _ChumpyStandIn)
        if module.startswith("scipy.sparse") and name in self._SPARSE:
            return self._stub(module, name, _SparseStandIn, _format=self._SPARSE[name])
        if (module, name) in self._NUMPY:
            return _np_attr(module, name)
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            import builtins
            return getattr(builtins, name)
        if module in ("copyreg", "copy_reg") and name == "_reconstructor":
            return self._reconstructor
        if module == "_codecs" and name == "encode":
            return self._encode
        self._refuse(module, name)

    def _reconstructor(self, cls, base, state):
        # copyreg._reconstructor(cls, object, None) == object.__new__(cls); only for stand-ins.
        if not (isinstance(cls, type) and issubclass(cls, _ChumpyStandIn)) or base is not object:
            self._refuse("copyreg", "_reconstructor", f" for {cls!r}")
        return cls.__new__(cls)

    def _encode(self, obj, encoding="utf-8", errors="strict"):
        # Python 3 writes bytes at protocol <= 2 as _codecs.encode(str, 'latin1').
        if not isinstance(obj, str) or encoding.lower().replace("-", "") not in ("latin1", "utf8"):
            self._refuse("_codecs", "encode", f" with encoding {encoding!r}")
        return obj.encode(encoding, errors)


def _state_dict(stub):
    state = getattr(stub, "_state", None)
    if isinstance(state, tuple):  # (dict, slotstate)
        state = next((s for s in state if isinstance(s, dict)), None)
    return state if isinstance(state, dict) else {}


def _to_plain(obj, path, key):
    """Replace stand-ins by numpy arrays / scipy.sparse matrices, recursively."""
    if isinstance(obj, _SparseStandIn):
        st = {k: _to_plain(v, path, key) for k, v in _state_dict(obj).items()}
        shape = tuple(int(s) for s in st.get("_shape", st.get("shape", ())))
        try:
            if obj._format == "coo":
                return sp.coo_matrix((st["data"], (st["row"], st["col"])), shape=shape)
            cls = sp.csc_matrix if obj._format == "csc" else sp.csr_matrix
            return cls((st["data"], st["indices"], st["indptr"]), shape=shape)
        except KeyError as e:
            raise ValueError(f"{path}: key '{key}': sparse matrix state lacks {e}") from None
    if isinstance(obj, _ChumpyStandIn):
        st = _state_dict(obj)
        if "x" in st:
            return np.asarray(_to_plain(st["x"], path, key))
        if obj._args:
            return np.asarray(_to_plain(obj._args[0], path, key))
        raise ValueError(f"{path}: key '{key}': chumpy object {obj._qualname} stores no array "
                         "under 'x' (only plain chumpy arrays are supported)")
    if isinstance(obj, dict):
        return {k: _to_plain(v, path, k if key is None else key) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v, path, key) for v in obj)
    return obj


def _shape(x):
    return tuple(x.shape) if hasattr(x, "shape") else None


def validate_smpl_arrays(data, path="<arrays>"):
    """Check SMPL's keys and shapes; raises ValueError naming the file, key and expected shape."""
    missing = [k for k in SMPL_KEYS if k not in data]
    if missing:
        raise ValueError(
            f"{path}: not an SMPL model file: missing key(s) {missing}; an SMPL pickle has "
            + ", ".join(f"{k} {s}" for k, s in SMPL_KEYS.items()) + f" (found keys {sorted(data)})")
    kt = _shape(data["kintree_table"])
    if kt is None or len(kt) != 2 or kt[0] != 2 or kt[1] != 24:
        hint = {16: " (16 joints: looks like a MANO hand model)",
                52: " (52 joints: looks like SMPL+H)", 55: " (55 joints: looks like SMPL-X)"}
        n = kt[1] if kt is not None and len(kt) == 2 else None
        raise ValueError(f"{path}: key 'kintree_table' has shape {kt}, expected (2, 24): not an "
                         f"SMPL body model{hint.get(n, '')}")
    vt = _shape(data["v_template"])
    if vt is None or len(vt) != 2 or vt[1] != 3:
        raise ValueError(f"{path}: key 'v_template' has shape {vt}, expected (V, 3)")
    V = vt[0]
    expect = {"shapedirs": (V, 3, None), "posedirs": (V, 3, 207), "J_regressor": (24, V),
              "weights": (V, 24), "f": (None, 3)}
    for k, e in expect.items():
        s = _shape(data[k])
        if s is None or len(s) != len(e) or any(a is not None and a != b for a, b in zip(e, s)):
            want = SMPL_KEYS[k].replace("V", str(V))
            raise ValueError(f"{path}: key '{k}' has shape {s}, expected {want} "
                             f"(V = {V} vertices from v_template)")
    f = np.asarray(data["f"])
    if f.size and (f.min() < 0 or f.max() >= V):
        raise ValueError(f"{path}: key 'f' indexes vertices outside [0, {V})")
    for k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        x = data[k].data if sp.issparse(data[k]) else np.asarray(data[k])
        try:
            bad = int(x.size - np.isfinite(x).sum())
        except TypeError:
            raise ValueError(f"{path}: key '{k}' is not numeric (dtype {x.dtype})") from None
        if bad:
            raise ValueError(f"{path}: key '{k}' has {bad} non-finite (NaN/inf) entries: the model "
                             "file is damaged")
    return data


def load_smpl_pickle(path, validate=True):
    """Load an SMPL-format .pkl (official with chumpy, or cleaned) without chumpy.

    Returns a dict of numpy arrays / scipy.sparse matrices (other entries kept as plain Python).
    Raises FileNotFoundError / ValueError / pickle.UnpicklingError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SMPL model file not found: {path} (expected an SMPL .pkl such as SMPL_NEUTRAL.pkl or "
            "basicModel_neutral_lbs_10_207_0_v1.0.0.pkl; see README)")
    with open(path, "rb") as fh:
        if fh.read(2) == b"\x1f\x8b":
            raise ValueError(f"{path}: gzip-compressed, not a pickle: decompress it first (gunzip), or "
                             "for the shipped Anny-derived bodies pass 'anny' / 'anny-male' / 'anny-female'")
        fh.seek(0)
        try:
            obj = _RestrictedUnpickler(fh, path).load()
        except pickle.UnpicklingError as e:
            if str(e).startswith(str(path)):  # our refusal: already names file and global
                raise
            raise ValueError(f"{path}: not a readable SMPL pickle (UnpicklingError: {e})") from e
        except Exception as e:  # truncated / not a pickle / broken state
            raise ValueError(f"{path}: not a readable SMPL pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict of SMPL arrays with keys "
                         f"{list(SMPL_KEYS)}, got {type(obj).__name__}")
    data = _to_plain(obj, path, None)
    return validate_smpl_arrays(data, path) if validate else data


H36M_ORDERINGS = {
    # name -> (rows 1-3 side, rows 4-6 side); sides in SMPL's rest frame (subject's left at +x).
    "metro": "rows 1-3 = right hip/knee/ankle, rows 4-6 = left (J_regressor_h36m_correct.npy of "
             "METRO/FastMETRO, used with H36M_TO_LSP)",
    "spin": "rows 1-3 = left hip/knee/ankle, rows 4-6 = right (J_regressor_h36m.npy of SPIN/GraphCMR, "
            "used with SPIN's H36M_TO_J14)",
}
_H36M_SWAP = [0, 4, 5, 6, 1, 2, 3] + list(range(7, 17))   # the SPIN file's rows -> METRO's order


def h36m_regressor_ordering(reg, template, path="<regressor>"):
    """'metro' or 'spin': which leg rows of a (17, V) H36M regressor are the right leg, judged on
    the body's rest template (V, 3) in SMPL's frame (subject's right at x < 0). Raises ValueError
    naming the file and both known orderings when the geometry fits neither (arms are checked too:
    rows 11-13 left arm, 14-16 right arm in both files)."""
    x = (np.asarray(reg, dtype=np.float64) @ np.asarray(template, dtype=np.float64))[:, 0]   # (17,)
    right_first = bool((x[1:4] < 0).all() and (x[4:7] > 0).all())
    left_first = bool((x[1:4] > 0).all() and (x[4:7] < 0).all())
    arms_ok = bool((x[11:14] > 0).all() and (x[14:17] < 0).all())
    if arms_ok and right_first:
        return "metro"
    if arms_ok and left_first:
        return "spin"
    raise ValueError(f"{path}: cannot tell which H36M joint ordering this regressor has: on the body "
                     f"template the joints' x (subject's left > 0) are rows 1-6 {np.round(x[1:7], 3).tolist()}, "
                     f"arms 11-16 {np.round(x[11:17], 3).tolist()}. Known orderings: "
                     f"metro: {H36M_ORDERINGS['metro']}; spin: {H36M_ORDERINGS['spin']}. Is it the "
                     "regressor of this body model?")


def load_h36m_regressor(path, num_vertices, template=None, return_ordering=False):
    """Load a (17, V) H36M joint regressor .npy (e.g. J_regressor_h36m_correct.npy), checked:
    finite, no empty (all-zero) row. With `template` (V, 3) its leg ordering is detected
    (`h36m_regressor_ordering`); a SPIN-ordered file (J_regressor_h36m.npy) is returned with its
    rows put in METRO's order, so H36M_TO_LSP gives the right joints (SPIN's own joint map does
    the same). Returns the (17, V) float32 array (and the detected ordering)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"H36M regressor not found: {path} (expected a (17, "
                                f"{num_vertices}) .npy such as {H36M_REGRESSOR_NAME})")
    try:
        reg = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from e
    if reg.shape != (17, num_vertices):
        raise ValueError(f"{path}: H36M regressor has shape {reg.shape}, expected (17, "
                         f"{num_vertices})")
    reg = reg.astype(np.float64)
    bad = np.nonzero(~np.isfinite(reg).all(1))[0]
    if bad.size:
        raise ValueError(f"{path}: H36M regressor rows {bad.tolist()} contain NaN or inf "
                         f"(joints {[H36M_JOINT_NAMES[i] for i in bad]}); expected finite weights")
    empty = np.nonzero(np.abs(reg).sum(1) == 0)[0]
    if empty.size:
        raise ValueError(f"{path}: H36M regressor rows {empty.tolist()} are all zero (joints "
                         f"{[H36M_JOINT_NAMES[i] for i in empty]}); every joint needs vertex weights")
    ordering = None
    if template is not None:
        ordering = h36m_regressor_ordering(reg, template, path)
        if ordering == "spin":
            reg = reg[_H36M_SWAP]
    reg = reg.astype(np.float32)
    return (reg, ordering) if return_ordering else reg


def find_smpl_file(model_dir, gender="neutral"):
    """The SMPL .pkl for `gender` ('neutral'|'male'|'female') inside `model_dir`."""
    model_dir = Path(model_dir)
    if gender not in SMPL_FILE_NAMES:
        raise ValueError(f"gender must be one of {list(SMPL_FILE_NAMES)}, got {gender!r}")
    for name in SMPL_FILE_NAMES[gender]:
        for cand in (model_dir / name, model_dir / "smpl" / name):
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"no {gender} SMPL model in {model_dir}: expected one of "
                            f"{SMPL_FILE_NAMES[gender]}")


# ----------------------------------------------------------------------------------------------
# Toy body generator
# ----------------------------------------------------------------------------------------------
TOY_PART_NAMES = [
    "torso", "neck", "head",
    "left_upper_arm", "left_forearm", "left_hand", "right_upper_arm", "right_forearm", "right_hand",
    "left_thigh", "left_shin", "left_foot", "right_thigh", "right_shin", "right_foot",
]
# (n_theta, n_rings) per part kind: vertices = n_theta * n_rings + 2 poles; chosen so that the
# whole body has exactly 6890 vertices with ~1.5-2.5 cm spacing.
_RES = {"torso": (46, 38), "neck": (16, 12), "head": (32, 20), "upper_arm": (20, 24),
        "forearm": (16, 18), "hand": (16, 14), "thigh": (24, 24), "shin": (20, 19), "foot": (16, 12)}
# 10 shape directions: (body measurement, change per unit beta). "scale" multiplies everything,
# girth multiplies all radii, the others are relative lengths/widths (belly in metres).
TOY_SHAPE_DIRECTIONS = [("scale", 0.04), ("girth", 0.10), ("leg", 0.05), ("torso", 0.06),
                        ("arm", 0.05), ("shoulder", 0.07), ("hip", 0.07), ("belly", 0.025),
                        ("head", 0.06), ("limb", 0.15)]
_P0 = dict(scale=1.0, girth=1.0, leg=1.0, torso=1.0, arm=1.0, shoulder=1.0, hip=1.0, belly=0.0,
           head=1.0, limb=1.0)


def _smoothstep(x, delta):
    """0 for x < -delta, 1 for x > delta, cubic in between."""
    u = np.clip((x + delta) / (2 * delta), 0.0, 1.0)
    return u * u * (3 - 2 * u)


def _toy_layout(p):
    """Skeleton and part specs for body measurements p (unscaled, pelvis at the origin)."""
    a = np.asarray
    g, lb, ty, hs = p["girth"], p["limb"], p["torso"], p["head"]
    J = np.zeros((24, 3))
    J[3], J[6], J[9] = (0, 0.10 * ty, 0), (0, 0.22 * ty, 0), (0, 0.28 * ty, 0)
    J[12] = (0, 0.48 * ty, 0)
    J[15] = J[12] + (0, 0.08 * hs, 0)
    top = 0.44 * ty
    parts, regs = [], {}
    # torso: lofted along +y from just below the hips to the shoulders
    y0 = -0.10
    yk = a([-0.10, 0.0, 0.12 * ty, 0.26 * ty, 0.375 * ty, top])
    w = a([0.165 * p["hip"], 0.158 * p["hip"], 0.135, 0.150, 0.172 * p["shoulder"],
           0.178 * p["shoulder"]]) * g
    d = a([0.105, 0.100, 0.092, 0.105, 0.095, 0.085]) * g
    w[1:3] += a([0.5, 0.6]) * p["belly"]
    d[1:3] += a([0.8, 1.0]) * p["belly"]
    tk = (yk - y0) / (top - y0)
    parts.append(dict(name="torso", kind="torso", A=a([0, y0, 0]), B=a([0, top, 0]), ref=a([0, 0, 1.]),
                      knots=(tk, w, d), caps=(0.065, 0.07), chain=[0, 3, 6, 9, 12],
                      bounds=[J[j, 1] - y0 for j in (3, 6, 9, 12)], deltas=[0.03] * 4))
    regs.update({j: (0, J[j, 1] - y0) for j in (0, 3, 6, 9)})
    # neck (carries the neck and head joints) and head (egg with a nose)
    na = J[12] - (0, 0.07, 0)
    nb = J[15] + (0, 0.02, 0)
    nr = 0.05 * g
    parts.append(dict(name="neck", kind="neck", A=na, B=nb, ref=a([0, 0, 1.]),
                      knots=(a([0., 1.]), a([nr, nr]), a([nr, nr * 1.05])), caps=(0.025, 0.025),
                      chain=[9, 12, 15], bounds=[J[12, 1] - na[1], J[15, 1] - na[1]],
                      deltas=[0.03, 0.025]))
    regs[12] = (1, J[12, 1] - na[1])
    regs[15] = (1, J[15, 1] - na[1])
    ha = J[15] + a([0, 0.035, 0.01]) * hs
    hb = J[15] + a([0, 0.115, 0.01]) * hs
    parts.append(dict(name="head", kind="head", A=ha, B=hb, ref=a([0, 0, 1.]),
                      knots=(a([0., 0.5, 1.]), a([0.066, 0.074, 0.076]) * hs,
                             a([0.083, 0.094, 0.095]) * hs), caps=(0.07 * hs, 0.07 * hs),
                      chain=[12, 15], bounds=[J[15, 1] - ha[1]], deltas=[0.02],
                      bump=(0.025 * hs, 0.03 * hs, 0.45, 0.02 * hs)))
    h36m = {9: (2, 0.0), 10: (2, 0.14 * hs)}  # h36m index -> (part, s); hips etc. added below
    # limbs, left (+x) then right (-x)
    limb_r = g * lb
    for side, sx in (("left", 1.0), ("right", -1.0)):
        L = side == "left"
        col, sh, elb, wri, hnd, hip, kne, ank, ft = (
            (13, 16, 18, 20, 22, 1, 4, 7, 10) if L else (14, 17, 19, 21, 23, 2, 5, 8, 11))
        J[col] = (sx * 0.07 * p["shoulder"], top, 0)
        J[sh] = (sx * 0.18 * p["shoulder"], top, 0)
        J[elb] = J[sh] + (sx * 0.29 * p["arm"], 0, 0)
        J[wri] = J[elb] + (sx * 0.25 * p["arm"], 0, 0)
        J[hnd] = J[wri] + (sx * 0.08 * p["arm"], 0, 0)
        tip = J[wri] + (sx * 0.18 * p["arm"], 0, 0)
        J[hip] = (sx * 0.09 * p["hip"], -0.08, 0)
        J[kne] = J[hip] + (sx * 0.005, -0.42 * p["leg"], 0.01)
        J[ank] = J[kne] + (-sx * 0.005, -0.40 * p["leg"], -0.03)
        heel = J[ank] + (0, -0.035, -0.05)
        toe = J[ank] + (sx * 0.015, -0.055, 0.17)
        J[ft] = heel + 0.72 * (toe - heel)
        k = len(parts)
        ua = np.linalg.norm(J[elb] - J[col])
        s_sh = np.linalg.norm(J[sh] - J[col])
        parts.append(dict(name=f"{side}_upper_arm", kind="upper_arm", A=J[col], B=J[elb],
                          ref=a([0, 0, 1.]),
                          knots=(a([0, s_sh, s_sh + 0.10, ua]) / ua,
                                 a([0.050, 0.055, 0.046, 0.038]) * limb_r,
                                 a([0.050, 0.052, 0.045, 0.038]) * limb_r), caps=(0.045, 0.035),
                          chain=[9, col, sh, elb], bounds=[0.0, s_sh, ua], deltas=[0.04] * 3))
        fa = np.linalg.norm(J[wri] - J[elb])
        parts.append(dict(name=f"{side}_forearm", kind="forearm", A=J[elb], B=J[wri],
                          ref=a([0, 0, 1.]),
                          knots=(a([0, 0.3, 1.]), a([0.038, 0.040, 0.025]) * limb_r,
                                 a([0.038, 0.043, 0.031]) * limb_r), caps=(0.035, 0.025),
                          chain=[sh, elb, wri], bounds=[0.0, fa], deltas=[0.04, 0.03]))
        s_hand = np.linalg.norm(J[hnd] - J[wri])
        parts.append(dict(name=f"{side}_hand", kind="hand", A=J[wri], B=tip, ref=a([0, 0, 1.]),
                          knots=(a([0, 0.35, 0.6, 1.]), a([0.018, 0.022, 0.016, 0.010]),
                                 a([0.027, 0.044, 0.044, 0.036])), caps=(0.015, 0.012), expo=3.0,
                          chain=[elb, wri, hnd], bounds=[0.0, s_hand], deltas=[0.015, 0.025]))
        regs.update({col: (k, 0.0), sh: (k, s_sh), elb: (k, ua), wri: (k + 1, fa),
                     hnd: (k + 2, s_hand)})
        h36m.update({(11 if L else 14): (k, s_sh), (12 if L else 15): (k, ua),
                     (13 if L else 16): (k + 1, fa)})
    for side, sx in (("left", 1.0), ("right", -1.0)):
        L = side == "left"
        hip, kne, ank, ft = (1, 4, 7, 10) if L else (2, 5, 8, 11)
        heel = J[ank] + (0, -0.035, -0.05)
        toe = J[ank] + (sx * 0.015, -0.055, 0.17)
        k = len(parts)
        th = np.linalg.norm(J[kne] - J[hip])
        parts.append(dict(name=f"{side}_thigh", kind="thigh", A=J[hip], B=J[kne], ref=a([0, 0, 1.]),
                          knots=(a([0, 0.25, 1.]), a([0.088, 0.080, 0.052]) * limb_r,
                                 a([0.088, 0.082, 0.054]) * limb_r), caps=(0.075, 0.045),
                          chain=[0, hip, kne], bounds=[0.0, th], deltas=[0.06, 0.05]))
        sn = np.linalg.norm(J[ank] - J[kne])
        parts.append(dict(name=f"{side}_shin", kind="shin", A=J[kne], B=J[ank], ref=a([0, 0, 1.]),
                          knots=(a([0, 0.3, 0.85, 1.]), a([0.050, 0.050, 0.033, 0.034]) * limb_r,
                                 a([0.052, 0.058, 0.036, 0.037]) * limb_r), caps=(0.04, 0.03),
                          chain=[hip, kne, ank], bounds=[0.0, sn], deltas=[0.05, 0.04]))
        fl = np.linalg.norm(toe - heel)
        parts.append(dict(name=f"{side}_foot", kind="foot", A=heel, B=toe, ref=a([0, 1., 0]),
                          knots=(a([0, 0.35, 0.72, 1.]), a([0.032, 0.040, 0.047, 0.040]),
                                 a([0.035, 0.040, 0.026, 0.018])), caps=(0.03, 0.02), expo=3.0,
                          chain=[ank, ft], bounds=[0.72 * fl], deltas=[0.03]))
        regs.update({hip: (k, 0.0), kne: (k + 1, 0.0), ank: (k + 1, sn), ft: (k + 2, 0.72 * fl)})
        h36m.update({(4 if L else 1): (k, 0.0), (5 if L else 2): (k + 1, 0.0),
                     (6 if L else 3): (k + 1, sn)})
    h36m[0] = h36m[1]                            # placeholder; set to the hip midpoint later
    h36m[7] = (0, 0.5 * (J[1, 1] + top) - y0)   # spine: halfway between hips and thorax
    h36m[8] = (0, top - y0)                      # thorax: torso axis at shoulder height
    assert [q["name"] for q in parts] == TOY_PART_NAMES
    return J, parts, regs, h36m


def _part_geometry(q):
    """Vertices (n,3), faces (f,3), axial coordinate s (n,), ring start indices for one part."""
    n_th, n_r = _RES[q["kind"]]
    A, B = q["A"], q["B"]
    dvec = B - A
    L = np.linalg.norm(dvec)
    dvec = dvec / L
    e2 = q["ref"] - (q["ref"] @ dvec) * dvec
    e2 /= np.linalg.norm(e2)
    e1 = np.cross(e2, dvec)  # e1 x e2 = d: rings run counter-clockwise around the axis
    c0, c1 = q["caps"]
    q0, q1 = c0 * np.pi / 2, c1 * np.pi / 2
    T = q0 + L + q1
    u = T * np.arange(1, n_r + 1) / (n_r + 1)
    phi0 = np.clip(u / q0, 0, 1) * np.pi / 2
    phi1 = np.clip((T - u) / q1, 0, 1) * np.pi / 2
    s = np.where(u < q0, -c0 * np.cos(phi0), np.where(u > q0 + L, L + c1 * np.cos(phi1), u - q0))
    m = np.where(u < q0, np.sin(phi0), np.where(u > q0 + L, np.sin(phi1), 1.0))
    t = np.clip(s / L, 0, 1)
    tk, ra_k, rb_k = q["knots"]
    ra = np.interp(t, tk, ra_k) * m
    rb = np.interp(t, tk, rb_k) * m
    theta = 2 * np.pi * np.arange(n_th) / n_th
    ex = 2.0 / q.get("expo", 2.0)
    cx = np.sign(np.cos(theta)) * np.abs(np.cos(theta)) ** ex
    cy = np.sign(np.sin(theta)) * np.abs(np.sin(theta)) ** ex
    radial = cx[:, None] * e1 + cy[:, None] * e2                            # (n_th, 3)
    off = ra[:, None, None] * cx[None, :, None] * e1 + rb[:, None, None] * cy[None, :, None] * e2
    if "bump" in q:  # nose: compact bump around theta = pi/2 (front), then re-centre each ring
        sc, hl, hw, hgt = q["bump"]
        ds = np.clip(1 - ((s - sc) / hl) ** 2, 0, None) ** 2
        dt = np.clip(1 - ((theta - np.pi / 2) / hw) ** 2, 0, None) ** 2
        off = off + hgt * (ds[:, None] * dt[None, :])[..., None] * radial[None]
        off = off - off.mean(axis=1, keepdims=True)  # ring centroids stay on the axis
    rings = A + s[:, None, None] * dvec + off                               # (n_r, n_th, 3)
    verts = np.concatenate([(A - c0 * dvec)[None], rings.reshape(-1, 3), (B + c1 * dvec)[None]])
    s_all = np.concatenate([[-c0], np.repeat(s, n_th), [L + c1]])
    # faces: quads between rings split in two, fans at the poles; outward by construction
    r = 1 + np.arange(n_r)[:, None] * n_th + np.arange(n_th)[None]         # (n_r, n_th) indices
    rn = np.roll(r, -1, axis=1)
    a_, b_, c_, d_ = r[:-1], rn[:-1], r[1:], rn[1:]
    faces = [np.stack([a_, b_, c_], -1).reshape(-1, 3), np.stack([b_, d_, c_], -1).reshape(-1, 3),
             np.stack([np.zeros(n_th, int), rn[0], r[0]], -1),
             np.stack([r[-1], rn[-1], np.full(n_th, len(verts) - 1)], -1)]
    return dict(verts=verts, faces=np.concatenate(faces), s=s_all, ring_s=s, n_theta=n_th,
                e1=e1, e2=e2, d=dvec, L=L)


def _toy_vertices(p):
    """All vertices (V,3) for measurements p; the function differentiated for shapedirs."""
    _, parts, _, _ = _toy_layout(p)
    return p["scale"] * np.concatenate([_part_geometry(q)["verts"] for q in parts])


def _ring_row(geo, offset, s, V):
    """Vertex weights (V,) whose weighted mean is the axis point at s (two bracketing rings)."""
    rs, n = geo["ring_s"], geo["n_theta"]
    i = int(np.clip(np.searchsorted(rs, s, side="right") - 1, 0, len(rs) - 2))
    alpha = (s - rs[i]) / (rs[i + 1] - rs[i])
    assert -1e-9 <= alpha <= 1 + 1e-9, "regressor point outside the part's rings"
    row = np.zeros(V)
    base = offset + 1 + i * n
    row[base:base + n] = (1 - alpha) / n
    row[base + n:base + 2 * n] = alpha / n
    return row


@functools.lru_cache(maxsize=1)
def build_toy_body():
    """Generate the toy body. Returns dict(smpl=<SMPL-format dict>, h36m_regressor (17,V),
    joints (24,3), h36m_joints (17,3), part (V,) int, vertex_ids dict) -- numpy, float64."""
    p = dict(_P0)
    J, parts, regs, h36m = _toy_layout(p)
    geos = [_part_geometry(q) for q in parts]
    sizes = [len(g["verts"]) for g in geos]
    offsets = np.cumsum([0] + sizes)[:-1]
    V = int(sum(sizes))
    v = np.concatenate([g["verts"] for g in geos])
    faces = np.concatenate([g["faces"] + o for g, o in zip(geos, offsets)])
    part = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    # skinning weights: telescoping smoothsteps along each part's axis
    W = np.zeros((V, 24))
    for q, g, o in zip(parts, geos, offsets):
        steps = [_smoothstep(g["s"] - b, dl) for b, dl in zip(q["bounds"], q["deltas"])]
        lo = [np.ones_like(g["s"])] + steps
        hi = steps + [np.zeros_like(g["s"])]
        for j, l_, h_ in zip(q["chain"], lo, hi):
            W[o:o + len(g["s"]), j] += l_ - h_
    # upper torso blends into the collars laterally
    tv = v[:sizes[0]]
    c = _smoothstep(np.abs(tv[:, 0]) - 0.115, 0.035) * _smoothstep(tv[:, 1] - 0.35, 0.05)
    coll = np.where(tv[:, 0] > 0, 13, 14)
    W[:sizes[0]] *= (1 - c)[:, None]
    W[np.arange(sizes[0]), coll] += c
    # regressors: rings around each joint
    Jreg = np.stack([_ring_row(geos[k], offsets[k], s, V) for k, s in (regs[j] for j in range(24))])
    Hreg = np.stack([_ring_row(geos[k], offsets[k], s, V) for k, s in (h36m[j] for j in range(17))])
    Hreg[0] = 0.5 * (Hreg[1] + Hreg[4])  # H36M pelvis = midpoint of the hips
    H = np.stack([parts[k]["A"] + s * geos[k]["d"] for k, s in (h36m[j] for j in range(17))])
    H[0] = 0.5 * (H[1] + H[4])
    # shape directions: central differences of the generator w.r.t. the body measurements
    S = np.zeros((V, 3, len(TOY_SHAPE_DIRECTIONS)))
    h = 1e-3
    for k, (name, step) in enumerate(TOY_SHAPE_DIRECTIONS):
        pp, pm = dict(p), dict(p)
        pp[name] += h * step
        pm[name] -= h * step
        S[:, :, k] = (_toy_vertices(pp) - _toy_vertices(pm)) / (2 * h)
    # left/right mirror map (x -> -x); exact because left and right parts mirror each other
    index = {tuple(k): i for i, k in enumerate(np.round(v * 1e7).astype(np.int64).tolist())}
    mirrored = np.round(v * (-1.0, 1.0, 1.0) * 1e7).astype(np.int64).tolist()
    sym = np.array([index.get(tuple(k), -1) for k in mirrored])
    for i in np.flatnonzero(sym < 0):  # rounding straddled a grid line: nearest vertex
        sym[i] = int(np.argmin(np.linalg.norm(v - v[i] * (-1.0, 1.0, 1.0), axis=1)))
    kintree = np.stack([np.array(SMPL_PARENTS, dtype=np.int64), np.arange(24, dtype=np.int64)])
    kintree[0, 0] = 4294967295  # as in the official files (uint32 -1)
    smpl = {
        "v_template": v.astype(np.float64),
        "shapedirs": S.astype(np.float64),
        "posedirs": np.zeros((V, 3, 207), dtype=np.float64),
        "J_regressor": sp.csc_matrix(Jreg),
        "weights": W.astype(np.float64),
        "kintree_table": kintree,
        "f": faces.astype(np.uint32),
        "J": J.astype(np.float64),
        "vert_sym_idxs": sym.astype(np.int64),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }

    def near(pt, mask=None):
        dd = np.linalg.norm(v - pt, axis=1)
        if mask is not None:
            dd = np.where(mask, dd, np.inf)
        return int(np.argmin(dd))

    head = part == 2
    vid = {"nose": int(np.argmax(np.where(head, v[:, 2], -np.inf)))}
    for sd, sx in (("l", 1.0), ("r", -1.0)):
        up = sd.upper()
        vid[f"{sd}eye"] = near(J[15] + (sx * 0.03, 0.085, 0.12), head)
        vid[f"{sd}ear"] = near(J[15] + (sx * 0.09, 0.07, 0.0), head)
        foot = part == TOY_PART_NAMES.index(f"{'left' if sx > 0 else 'right'}_foot")
        ank = J[7 if sx > 0 else 8]
        vid[f"{up}BigToe"] = near(ank + (sx * 0.0, -0.05, 0.20), foot)
        vid[f"{up}SmallToe"] = near(ank + (sx * 0.05, -0.05, 0.17), foot)
        vid[f"{up}Heel"] = near(ank + (0, -0.07, -0.09), foot)
        hand = part == TOY_PART_NAMES.index(f"{'left' if sx > 0 else 'right'}_hand")
        wr = J[20 if sx > 0 else 21]
        for name, (dx, dz) in zip(["thumb", "index", "middle", "ring", "pinky"],
                                  [(0.10, 0.06), (0.19, 0.03), (0.20, 0.01), (0.19, -0.01),
                                   (0.17, -0.03)]):
            vid[f"{sd}{name}"] = near(wr + (sx * dx, 0, dz), hand)
    return dict(smpl=smpl, h36m_regressor=Hreg, joints=J, h36m_joints=H, part=part,
                vertex_ids=vid, part_names=list(TOY_PART_NAMES))


def toy_body_part_labels():
    """(V,) int64 part index of every toy-body vertex (names in TOY_PART_NAMES), for renderers."""
    return build_toy_body()["part"].astype(np.int64)


def _atomic_write(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def h36m_sidecar(model_path):
    """Where the H36M regressor of a generated model file lives: `<stem>_h36m.npy`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + "_h36m.npy")


def write_toy_body(path):
    """Write the toy body (SMPL pickle) to `path` and its H36M regressor next to it."""
    toy = build_toy_body()
    _atomic_write(path, lambda fh: pickle.dump(toy["smpl"], fh, protocol=2))
    _atomic_write(h36m_sidecar(path), lambda fh: np.save(fh, toy["h36m_regressor"]))
    return Path(path)


def cache_dir_default():
    return Path(os.environ.get("HMR_CACHE") or Path.home() / ".cache" / "hmr")


def toy_body_path(cache_dir=None, verify=True):
    """Path of the cached toy body pickle (generated on first use, atomically). verify: read
    the cached pair through the restricted unpickler first and rebuild it if it is unreadable,
    refused (a poisoned file) or invalid (e.g. NaN): it is a derived file."""
    path = Path(cache_dir or cache_dir_default()) / TOY_FILE_NAME
    if not (path.is_file() and h36m_sidecar(path).is_file()):
        write_toy_body(path)
    elif verify:
        try:
            v = load_smpl_pickle(path)["v_template"].shape[0]
            load_h36m_regressor(h36m_sidecar(path), v)
        except (ValueError, pickle.UnpicklingError) as e:
            import warnings
            warnings.warn(f"cached toy body is unusable, rebuilding it: {e}", stacklevel=2)
            write_toy_body(path)
    return path


# ----------------------------------------------------------------------------------------------
# Anny-derived body (assets/, written by anny_body.py) and topology identity
# ----------------------------------------------------------------------------------------------
ASSET_DIR = Path(__file__).resolve().parent / "assets"
ANNY_ASSET = "anny_{gender}_v1.pkl.gz"
BODY_NAMES = ("toy", "anny")  # symbolic model paths BodyModel / --body accept


def face_sha256(faces):
    """Topology identity of a face list: sha256 of the faces as little-endian int64 (F, 3)."""
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(np.asarray(faces), dtype="<i8").tobytes()).hexdigest()


def topology_identity(data, path="<arrays>"):
    """(name, face sha256) of a loaded body file. A file that declares `topology_name` (the
    Anny-derived body does) must match its faces' hash; an undeclared 6890-vertex, 13776-face file
    is taken as SMPL ("smpl"), the toy body as "toy", anything else as "unknown"."""
    f = np.asarray(data["f"])
    h = face_sha256(f)
    name = data.get("topology_name")
    if name is not None:
        declared = data.get("topology_face_sha256")
        if declared != h:
            raise ValueError(f"{path}: key 'topology_face_sha256' is {declared!r} but the faces hash "
                             f"to {h!r}: the file's faces do not belong to topology {name!r}")
        return str(name), h
    if "TOY" in Path(str(path)).name.upper():
        return "toy", h
    if data["v_template"].shape[0] == 6890 and f.shape[0] == 13776:
        return "smpl", h
    return "unknown", h


def anny_body_path(gender="neutral", cache_dir=None, asset_dir=None):
    """Unpack assets/anny_<gender>_v1.pkl.gz (checked against assets/anny_manifest.json) into the
    cache as ANNY_<GENDER>_v1.pkl plus its `_h36m.npy` sidecar; returns the .pkl path."""
    import gzip
    import hashlib
    import json
    asset_dir = Path(asset_dir or ASSET_DIR)
    src = asset_dir / ANNY_ASSET.format(gender=gender)
    if not src.is_file():
        raise FileNotFoundError(f"Anny body asset not found: {src} (expected the compressed body "
                                "written by anny_body.py; genders shipped: see assets/anny_manifest.json)")
    blob = src.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    manifest = asset_dir / "anny_manifest.json"
    want = json.loads(manifest.read_text())["files"].get(src.name, {}).get("sha256") \
        if manifest.is_file() else None
    if want != digest:
        raise ValueError(f"{src}: sha256 {digest} does not match {manifest} ({want}): the asset is "
                         "damaged or was not written by anny_body.py")
    path = Path(cache_dir or cache_dir_default()) / f"ANNY_{gender.upper()}_v1_{digest[:12]}.pkl"
    if path.is_file() and h36m_sidecar(path).is_file():
        return path
    raw = gzip.decompress(blob)
    data = _RestrictedUnpickler(io.BytesIO(raw), src).load()
    data = validate_smpl_arrays(_to_plain(data, src, None), src)
    topology_identity(data, src)
    reg = np.asarray(data["J_regressor_h36m"], dtype=np.float32)
    _atomic_write(h36m_sidecar(path), lambda fh: np.save(fh, reg))
    _atomic_write(path, lambda fh: fh.write(raw))
    return path


def resolve_body_path(model_path):
    """None | "toy" -> the toy body; "anny" / "anny-<gender>" -> the Anny-derived body; else a path."""
    if model_path is None or str(model_path) == "toy":
        return toy_body_path()
    name = str(model_path)
    if name == "anny" or name.startswith("anny-") and not Path(name).exists():
        return anny_body_path(name.split("-", 1)[1] if "-" in name else "neutral")
    path = Path(model_path)
    for gender in ("neutral", "male", "female"):        # the shipped asset named by its file
        asset = Path(ASSET_DIR) / ANNY_ASSET.format(gender=gender)
        if path.is_file() and asset.is_file() and path.resolve() == asset.resolve():
            return anny_body_path(gender)
    return path


def carry_through_hierarchy(h, lbs_weights, regressor):
    """Skinning weights and a joint regressor of the full mesh carried to every coarser level of a
    mesh hierarchy `h` (down_index / up_index / up_weight per level). Skinning weights follow the
    kept vertices; the regressor is composed with the up maps, R_{l+1} = R_l @ U_l with
    U_l[i, idx[i, k]] += w[i, k] (exact, no dense U), so a coarse mesh upsampled to the full one
    regresses the same joints. Returns (skin list of float32 (V_l, J'), regressor list float64 (J, V_l))."""
    i64 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.long)  # noqa: E731
    skin = [lbs_weights.detach().cpu().float()]
    regs = [regressor.detach().cpu().double()]
    for l in range(len(h.vertices) - 1):
        skin.append(skin[-1][i64(h.down_index[l])])
        idx = i64(h.up_index[l])
        w = torch.as_tensor(np.asarray(h.up_weight[l]), dtype=torch.float64)
        r = regs[-1]
        nxt = torch.zeros(r.shape[0], len(h.vertices[l + 1]), dtype=torch.float64)
        nxt.index_add_(1, idx.reshape(-1), (r[:, :, None] * w[None]).reshape(r.shape[0], -1))
        regs.append(nxt)
    return skin, regs


# ----------------------------------------------------------------------------------------------
# Rotations
# ----------------------------------------------------------------------------------------------
def _skew(v):
    """(...,3) -> (...,3,3) cross-product matrix."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(aa):
    """Rodrigues: axis-angle (...,3) radians -> rotation matrix (...,3,3); smooth at 0."""
    t2 = (aa * aa).sum(-1, keepdim=True)[..., None]                # (...,1,1)
    small = t2 < 1e-6
    t2s = torch.where(small, torch.ones_like(t2), t2)
    t = t2s.sqrt()
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, 2 * torch.sin(t / 2) ** 2 / t2s)
    K = _skew(aa)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def matrix_to_quaternion(R):
    """(...,3,3) -> unit quaternion (...,4) as (w, x, y, z), w >= 0 (Shepperd's method)."""
    m = R.reshape(*R.shape[:-2], 9)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    t = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                     1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)  # 4w^2, 4x^2, 4y^2, 4z^2
    cand = torch.stack([
        torch.stack([t[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
        torch.stack([m21 - m12, t[..., 1], m01 + m10, m02 + m20], -1),
        torch.stack([m02 - m20, m01 + m10, t[..., 2], m12 + m21], -1),
        torch.stack([m10 - m01, m02 + m20, m12 + m21, t[..., 3]], -1)], -2)  # (...,4,4)
    cand = cand / (2 * t.clamp(min=0.1).sqrt())[..., None]
    best = t.argmax(-1)[..., None, None].expand(*t.shape[:-1], 1, 4)
    q = cand.gather(-2, best).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_axis_angle(q):
    """(w, x, y, z) (...,4) -> axis-angle (...,3), angle in [0, pi]."""
    q = torch.where(q[..., :1] < 0, -q, q)
    w, v = q[..., :1], q[..., 1:]
    n = v.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(n, w)
    small = n < 1e-6
    scale = torch.where(small, 2 / w.clamp(min=1e-6) - n * n / 3,
                        angle / torch.where(small, torch.ones_like(n), n))
    return v * scale


def matrix_to_axis_angle(R):
    """Rotation matrix (...,3,3) -> axis-angle (...,3), angle in [0, pi]; stable near 0 and pi."""
    return quaternion_to_axis_angle(matrix_to_quaternion(R))


def rot6d_to_matrix(x, layout="hmr2"):
    """6D (...,6) -> rotation (...,3,3) by Gram-Schmidt; the two vectors become columns 0 and 1.

    layout "hmr2": x = (col0, col1) (HMR2/ProHMR); "spin": x = R[:, :2].reshape(6) (SPIN).
    """
    if layout == "hmr2":
        a1, a2 = x[..., 0:3], x[..., 3:6]
    elif layout == "spin":
        a1, a2 = x[..., 0::2], x[..., 1::2]     # (...,6) viewed as (...,3,2): columns
    else:
        raise ValueError(f"layout must be 'hmr2' or 'spin', got {layout!r}")
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rot6d(R, layout="hmr2"):
    """Rotation (...,3,3) -> 6D (...,6), inverse of rot6d_to_matrix for rotations."""
    if layout == "hmr2":
        return torch.cat([R[..., :, 0], R[..., :, 1]], -1)
    if layout == "spin":
        return R[..., :, :2].reshape(*R.shape[:-2], 6)
    raise ValueError(f"layout must be 'hmr2' or 'spin', got {layout!r}")


# ----------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------
def weak_perspective_project(points, cam):
    """points (B,N,3) metres, cam (B,3) = (s, tx, ty) -> (B,N,2) = s * (X[..., :2] + t)."""
    return cam[:, None, :1] * (points[..., :2] + cam[:, None, 1:])


def perspective_project(points, translation, focal_length, camera_center):
    """points (B,N,3) metres (camera axes, +z forward), translation (B,3) metres, focal_length
    float | (B,) | (B,2) pixels, camera_center (B,2) pixels -> (B,N,2) pixels."""
    p = points + translation[:, None]
    f = torch.as_tensor(focal_length, dtype=p.dtype, device=p.device)
    if f.dim() == 0:
        f = f.expand(p.shape[0], 2)
    elif f.dim() == 1:
        f = f[:, None].expand(-1, 2)
    return f[:, None] * p[..., :2] / p[..., 2:3] + camera_center[:, None]


def weak_perspective_to_translation(cam, focal_length, crop_size):
    """cam (B,3) (s, tx, ty) in [-1,1] crop units -> translation (B,3) metres for a perspective
    camera with `focal_length` pixels centred on a `crop_size` crop (SPIN: tz = 2f / (s * crop))."""
    s, tx, ty = cam.unbind(-1)
    tz = 2 * focal_length / (crop_size * s + 1e-9)
    return torch.stack([tx, ty, tz], -1)


# ----------------------------------------------------------------------------------------------
# Body model
# ----------------------------------------------------------------------------------------------
class BodyModel(nn.Module):
    """SMPL (or the toy body) as a torch module.

    BodyModel(model_path=None, h36m_regressor_path=None, num_betas=10, gender="neutral"):
    model_path None / "toy" -> toy body; "anny" (or "anny-male", "anny-female") -> the Anny-derived
    body from assets/; a directory -> the `gender` SMPL file inside it; a .pkl file.
    h36m_regressor_path None -> `<stem>_h36m.npy` or J_regressor_h36m_correct.npy next to the model.
    """

    def __init__(self, model_path=None, h36m_regressor_path=None, num_betas=10, gender="neutral"):
        super().__init__()
        import smplx
        from smplx.utils import Struct
        model_path = resolve_body_path(model_path)  # None/"toy", "anny", or a file/directory
        if model_path.is_dir():
            model_path = find_smpl_file(model_path, gender)
        self.model_path = model_path
        self.is_toy = "TOY" in model_path.name.upper()
        data = load_smpl_pickle(model_path)
        nb = data["shapedirs"].shape[-1]
        if num_betas > nb:
            raise ValueError(f"{model_path}: shapedirs has {nb} shape components, "
                             f"num_betas={num_betas} requested")
        self.num_betas = num_betas
        V = data["v_template"].shape[0]
        self.num_vertices = V
        struct = Struct(**{k: (v.toarray() if sp.issparse(v) else np.asarray(v))
                           for k, v in data.items() if k in SMPL_KEYS})
        struct.shapedirs = struct.shapedirs[:, :, :num_betas]
        # topology identity, not vertex counts: a 6890-vertex Anny body is not SMPL
        self.topology_name, self.topology_hash = topology_identity(data, model_path)
        if self.is_toy and V == build_toy_body()["smpl"]["v_template"].shape[0]:
            vertex_ids = build_toy_body()["vertex_ids"]
        elif self.topology_name == "smpl":
            vertex_ids = None  # smplx's SMPL-H ids
        else:  # unknown topology: the extra joints are dropped anyway
            from smplx.vertex_ids import vertex_ids as _ids
            vertex_ids = {k: 0 for k in _ids["smplh"]}
        with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a 10-betas warning
            self.smpl = smplx.SMPL(str(model_path), data_struct=struct, num_betas=num_betas,
                                   create_betas=False, create_global_orient=False,
                                   create_body_pose=False, create_transl=False,
                                   vertex_ids=vertex_ids, gender=gender)
        smpl_reg_names = (H36M_REGRESSOR_NAME, "J_regressor_h36m.npy")
        not_smpl = self.topology_name not in ("smpl", "unknown", "toy")  # a declared identity
        if (h36m_regressor_path is not None and not_smpl
                and Path(h36m_regressor_path).name in smpl_reg_names):
            raise ValueError(f"{h36m_regressor_path}: an SMPL H36M regressor cannot be used with "
                             f"{model_path} (topology {self.topology_name!r}, not SMPL, although it "
                             f"has {V} vertices); use the body's own {h36m_sidecar(model_path).name}")
        if h36m_regressor_path is None:
            fallback = [] if not_smpl else [model_path.parent / H36M_REGRESSOR_NAME]
            for cand in [h36m_sidecar(model_path)] + fallback:
                if cand.is_file():
                    h36m_regressor_path = cand
                    break
        self.h36m_regressor_path = h36m_regressor_path
        self.h36m_regressor_ordering = None        # 'metro' or 'spin' (rows reordered to METRO's)
        if h36m_regressor_path is not None:
            reg, self.h36m_regressor_ordering = load_h36m_regressor(
                h36m_regressor_path, V, template=data["v_template"], return_ordering=True)
            if self.h36m_regressor_ordering == "spin":
                print(f"note: {h36m_regressor_path} has SPIN's joint ordering (rows 1-3 left leg); "
                      "its rows are reordered to METRO's (J_regressor_h36m_correct.npy)", flush=True)
            reg = torch.from_numpy(reg)
        else:
            reg = torch.zeros(0, V)
        self.register_buffer("J_regressor_h36m", reg)
        self._topology = {}

    # views of smplx's buffers (so .to()/.double() move one copy)
    faces = property(lambda self: self.smpl.faces_tensor)
    v_template = property(lambda self: self.smpl.v_template)
    J_regressor = property(lambda self: self.smpl.J_regressor)
    lbs_weights = property(lambda self: self.smpl.lbs_weights)
    parents = property(lambda self: self.smpl.parents)
    shapedirs = property(lambda self: self.smpl.shapedirs)

    def forward(self, betas, pose):
        """betas (B, num_betas); pose (B,72) or (B,24,3) axis-angle radians, or (B,24,3,3)
        rotation matrices (global orientation first). Returns {"vertices": (B,V,3),
        "joints": (B,24,3)} in metres, no translation; differentiable."""
        B = pose.shape[0]
        dtype = self.smpl.v_template.dtype
        pose, betas = pose.to(dtype), betas.to(dtype)
        if pose.dim() == 2 and pose.shape[1] == 72:
            pose = pose.reshape(B, 24, 3)                               # (B,72) -> (B,24,3)
        if pose.shape[1:] == (24, 3):
            go, bp, p2r = pose[:, 0], pose[:, 1:].reshape(B, 69), True  # (B,3), (B,69)
        elif pose.shape[1:] == (24, 3, 3):
            go, bp, p2r = pose[:, :1], pose[:, 1:], False               # (B,1,3,3), (B,23,3,3)
        else:
            raise ValueError(f"pose must be (B,72), (B,24,3) or (B,24,3,3), got "
                             f"{tuple(pose.shape)}")
        if betas.dim() != 2 or betas.shape[1] != self.num_betas or betas.shape[0] not in (1, B):
            raise ValueError(f"betas must be (B, {self.num_betas}) with B = {B}, got "
                             f"{tuple(betas.shape)}")
        betas = betas.expand(B, -1)
        out = self.smpl(betas=betas, body_pose=bp, global_orient=go, pose2rot=p2r)
        return {"vertices": out.vertices, "joints": out.joints[:, :24]}

    def h36m_joints(self, vertices):
        """vertices (B,V,3) -> H36M-17 joints (B,17,3)."""
        self._need_h36m()
        return torch.einsum("jv,bvc->bjc", self.J_regressor_h36m.to(vertices.dtype), vertices)

    def lsp_joints(self, vertices):
        """vertices (B,V,3) -> LSP-14 joints (B,14,3)."""
        return self.h36m_joints(vertices)[:, H36M_TO_LSP]

    def topology(self, joint_set="lsp14", hierarchy=None):
        """TOPOLOGY dict (see contract) over the mesh hierarchy (mesh.get_hierarchy, cached on
        disk and on this instance). joint_set: "lsp14" | "h36m17" | "smpl24". `hierarchy`: an
        explicit mesh.MeshHierarchy (e.g. mesh.load_graphcmr(...)) instead of the built one."""
        key = (joint_set, id(hierarchy) if hierarchy is not None else None)
        if key in self._topology:
            return self._topology[key]
        if hierarchy is not None and self.topology_name not in ("smpl", "unknown") and not np.array_equal(
                np.asarray(hierarchy.faces[0]), self.faces.cpu().numpy()):
            raise ValueError(f"the mesh hierarchy's level-0 faces ({len(hierarchy.faces[0])}) are not "
                             f"{self.model_path}'s faces (topology {self.topology_name!r}): a "
                             "hierarchy (e.g. GraphCMR's, SMPL) belongs to one body model")
        if hierarchy is None:
            import mesh
            hierarchy = mesh.get_hierarchy(self.model_path, self.v_template.cpu().numpy(),
                                           self.faces.cpu().numpy())
        h = hierarchy
        f32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
        i64 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.long)
        if joint_set not in ("lsp14", "h36m17", "smpl24"):
            raise ValueError(f"joint_set must be 'lsp14', 'h36m17' or 'smpl24', got {joint_set!r}")
        self._need_h36m()  # the dict always carries the H36M regressor (pelvis for losses)
        if joint_set == "lsp14":
            reg0, j2s = self.J_regressor_h36m[H36M_TO_LSP], LSP_TO_SMPL
        elif joint_set == "h36m17":
            reg0, j2s = self.J_regressor_h36m, H36M_TO_SMPL
        else:
            reg0, j2s = self.J_regressor, list(range(24))
        skin, regs = carry_through_hierarchy(h, self.lbs_weights, reg0)
        topo = {
            "num_vertices": [int(len(x)) for x in h.vertices],
            "faces": [i64(x) for x in h.faces],
            "template": [f32(x) for x in h.vertices],
            "up_index": [i64(x) for x in h.up_index],
            "up_weight": [f32(x) for x in h.up_weight],
            "down_index": [i64(x) for x in h.down_index],
            "skin_weights": skin,
            "joint_regressor": [r.float() for r in regs],
            "h36m_regressor": self.J_regressor_h36m.detach().cpu().float(),
            "joint_to_smpl": torch.tensor(j2s, dtype=torch.long),
            "parents": self.parents.detach().cpu().long(),
        }
        self._topology[key] = topo
        return topo

    def _need_h36m(self):
        if self.J_regressor_h36m.shape[0] != 17:
            raise FileNotFoundError(
                f"no H36M regressor for {self.model_path}: put {H36M_REGRESSOR_NAME} (17, "
                f"{self.num_vertices}) next to it or pass h36m_regressor_path")


# ----------------------------------------------------------------------------------------------
def _main():
    import argparse
    import time
    ap = argparse.ArgumentParser(description="Generate the toy body and check it with smplx.")
    ap.add_argument("--out", default=None, help="write the toy model here (default: the cache)")
    args = ap.parse_args()
    t0 = time.time()
    toy = build_toy_body()
    t_gen = time.time() - t0
    path = write_toy_body(args.out) if args.out else toy_body_path()
    s = toy["smpl"]
    V, Fn = s["v_template"].shape[0], s["f"].shape[0]
    print(f"toy body: {V} vertices, {Fn} faces, {s['kintree_table'].shape[1]} joints, "
          f"{s['shapedirs'].shape[-1]} shape directions, {len(TOY_PART_NAMES)} parts "
          f"(generated in {t_gen:.2f} s)")
    ext = s["v_template"].max(0) - s["v_template"].min(0)
    print(f"extent (x, y, z) = {np.round(ext, 3).tolist()} m")
    print(f"written: {path}\n         {h36m_sidecar(path)}")
    try:
        import mesh
        h = mesh.get_hierarchy(path, s["v_template"], s["f"].astype(np.int64))
        print("mesh hierarchy (vertices per level):", [len(x) for x in h.vertices],
              " faces:", [len(x) for x in h.faces])
    except ImportError as e:
        print(f"mesh.py not available ({e}); hierarchy skipped")
    import smplx
    from smplx.utils import Struct
    # smplx gets the arrays (data_struct), never the file: it would unpickle it without limits.
    arrays = load_smpl_pickle(path)
    struct = Struct(**{k: (v.toarray() if sp.issparse(v) else np.asarray(v))
                       for k, v in arrays.items() if k in SMPL_KEYS})
    with contextlib.redirect_stdout(io.StringIO()):
        ref = smplx.SMPL(model_path=str(path), data_struct=struct)
    out = ref(betas=torch.zeros(1, 10), body_pose=torch.zeros(1, 69),
              global_orient=torch.zeros(1, 3))
    bm = BodyModel(path)
    mine = bm(torch.zeros(1, 10), torch.zeros(1, 72))
    print(f"smplx.SMPL(data_struct=<restricted load>) runs it: vertices {tuple(out.vertices.shape)}, joints "
          f"{tuple(out.joints.shape)}; max |smplx - BodyModel| = "
          f"{(out.vertices - mine['vertices']).abs().max().item():.2e} m")


if __name__ == "__main__":
    _main()
