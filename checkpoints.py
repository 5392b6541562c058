"""Building models and loading their weights: the one home of "preset -> model" and "file -> loaded
model", shared by train.py, evaluate.py and demo.py (scripts import this file, never each other).

What this file implements
- `build_body(path, h36m_regressor)`: body.BodyModel (toy body when `path` is None).
- `load_hierarchy(body_model, mesh_hierarchy=None)`: the mesh hierarchy the model is built on and
  its identity. None -> the body's decimated hierarchy (mesh.get_hierarchy); a file -> GraphCMR's
  `mesh_downsampling.npz` (mesh.load_graphcmr through get_hierarchy's cache). The identity
  (`source`, `file`, `file_sha256`, `sha256` of the level arrays) is stored in train.py's
  checkpoints and compared when they are loaded, so a model never silently runs on another
  hierarchy than the one it was trained on.
- `build_model(name, preset, body_model, ..., hierarchy=None)`: preset (+ --set overrides) ->
  backbone (backbones.py) -> topology (body.topology over `hierarchy`) -> model.
- `read_state_dict(path)`: a released checkpoint (`.bin`/`.pth`), bare or wrapped in
  `state_dict`/`model`/`module`, read with torch.load(weights_only=True).
- `load_official_weights(model, name, preset, path, body_model)`: converts the official key layout
  (the model file's `convert_official_state_dict`) and loads strictly. When the file does not fit,
  the error lists missing/unexpected keys and shape mismatches and names the presets the file does
  fit, found by comparing its keys and shapes with every preset of FastMETRO and TORE (backbones
  built on the meta device, heads on a parameter-free stand-in backbone).
- `check_official_hierarchy(body_model, mesh_hierarchy, what)`: released FastMETRO/TORE weights
  were trained on GraphCMR's hierarchy; with the real SMPL body and no `--mesh-hierarchy` file this
  stops with an error saying which file is needed and where to get it (the decimated hierarchy has
  the same level sizes, so the weights would load and silently give wrong meshes).
- `load_model_from_checkpoint(path, ...)`: rebuilds a train.py checkpoint's model and checks its
  hierarchy identity. `load_for_inference(...)`: `--ckpt` or `--weights` with `--model/--preset`
  for evaluate.py and demo.py; returns (model, body_model, info) where `info` records the source,
  the hierarchy identity and the H36M regressor's identity (for the results JSON).

Departures: none from official code (this is glue). Checkpoints written before the hierarchy
identity existed load with a printed note (nothing to compare them with).
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

import body as body_lib
from backbones import build_backbone

MODELS = ("fastmetro", "tore", "deformer", "featup_hmr")
MODEL_CLASSES = {"fastmetro": "FastMETRO", "tore": "TORE", "deformer": "DeFormer", "featup_hmr": "FeatUpHMR"}
# Models with released official checkpoints in the METRO-family key layout (--weights).
OFFICIAL_MODELS = ("fastmetro", "tore")
GRAPHCMR_HELP = ("mesh_downsampling.npz (GraphCMR's SMPL hierarchy 6890/1723/431; in the FastMETRO "
                 "repository at src/modeling/data/mesh_downsampling.npz, also in GraphCMR's data/ "
                 "folder: https://github.com/nkolot/GraphCMR)")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net")


# ----------------------------------------------------------------------------- small helpers
def model_module(name):
    """The model file for `name` (imported lazily so one broken model does not block the rest)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    return __import__(name)


def parse_overrides(items):
    """--set key=value pairs -> dict with Python literals (ints, floats, bools, tuples)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_body(args_body=None, h36m_regressor=None, gender="neutral"):
    return body_lib.BodyModel(model_path=args_body, h36m_regressor_path=h36m_regressor, gender=gender)


def regressor_identity(body_model):
    """{'file', 'sha256', 'ordering'} of the body's H36M regressor (for checkpoints and results)."""
    path = getattr(body_model, "h36m_regressor_path", None)
    return {"file": str(path) if path else None,
            "sha256": sha256_file(path) if path and Path(path).is_file() else None,
            "ordering": getattr(body_model, "h36m_regressor_ordering", None)}


# ----------------------------------------------------------------------------- hierarchy
def hierarchy_hash(h):
    """sha256 of a MeshHierarchy's content: faces per level, the one-hot down maps and the
    upsampling matrices U in canonical sparse form (zeros dropped, sorted, weights rounded to
    1e-7), so the same hierarchy read from GraphCMR's file or built here hashes the same."""
    d = hashlib.sha256(b"mesh-hierarchy-identity-v1")
    for l in range(len(h.faces)):
        d.update(np.ascontiguousarray(h.faces[l], dtype=np.int64).tobytes())
    for l in range(len(h.down_index)):
        d.update(np.ascontiguousarray(h.down_index[l], dtype=np.int64).tobytes())
        u = h.U(l).tocsr()
        u.sum_duplicates()
        u.eliminate_zeros()
        u.sort_indices()
        for a in (u.indptr, u.indices):
            d.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        d.update(np.round(np.asarray(u.data, dtype=np.float64), 7).tobytes())
    return d.hexdigest()


def load_hierarchy(body_model, mesh_hierarchy=None):
    """-> (mesh.MeshHierarchy, identity dict). mesh_hierarchy: None (decimated) or GraphCMR npz."""
    import mesh
    v = body_model.v_template.detach().cpu().numpy()
    f = body_model.faces.detach().cpu().numpy()
    if mesh_hierarchy is None:
        h = mesh.get_hierarchy(body_model.model_path, v, f)
        ident = {"source": "decimated", "file": None, "file_sha256": None}
    else:
        p = Path(mesh_hierarchy)
        if not p.is_file():
            raise FileNotFoundError(f"--mesh-hierarchy {p}: file not found (expected {GRAPHCMR_HELP})")
        h = mesh.get_hierarchy(body_model.model_path, v, f, graphcmr_path=p)
        ident = {"source": "graphcmr", "file": str(p), "file_sha256": sha256_file(p)}
    ident["sha256"] = hierarchy_hash(h)
    ident["num_vertices"] = [int(len(x)) for x in h.vertices]
    return h, ident


def is_real_smpl(body_model):
    return not getattr(body_model, "is_toy", False) and int(body_model.num_vertices) == 6890


def check_official_hierarchy(body_model, mesh_hierarchy, what="--weights"):
    """Released weights + real SMPL need GraphCMR's hierarchy file (never a silent substitute)."""
    if mesh_hierarchy is None and is_real_smpl(body_model):
        raise ValueError(
            f"{what}: the released FastMETRO/TORE weights were trained on GraphCMR's mesh hierarchy, "
            f"and the body model {body_model.model_path} is SMPL; the hierarchy this project "
            "decimates has the same level sizes (6890/1723/431) but other vertices, so the weights "
            f"would load and give wrong meshes. Pass --mesh-hierarchy {GRAPHCMR_HELP}.")


def check_hierarchy_identity(stored, ident, path):
    """Compare a checkpoint's stored hierarchy identity with the one built now."""
    if not stored:
        print(f"note: {path} records no mesh hierarchy (older checkpoint); using the "
              f"{ident['source']} hierarchy {ident.get('file') or ''}".rstrip(), flush=True)
        return
    if stored.get("sha256") != ident["sha256"]:
        raise ValueError(
            f"{path}: the model was trained on the {stored.get('source')} mesh hierarchy "
            f"{stored.get('file') or '(decimated from the body model)'} (sha256 {str(stored.get('sha256'))[:12]}), "
            f"but the hierarchy built now is the {ident['source']} one {ident.get('file') or '(decimated)'} "
            f"(sha256 {ident['sha256'][:12]}). Pass --mesh-hierarchy with the training run's file "
            "(or none for a decimated hierarchy) and the same --body.")


# ----------------------------------------------------------------------------- building
def build_model(name, preset, body_model, pretrained_backbone=None, overrides=None, device="cpu",
                hierarchy=None):
    """Preset -> config (+ overrides) -> backbone -> topology (over `hierarchy`) -> model."""
    mod = model_module(name)
    if preset not in mod.PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {name}; choose one of {sorted(mod.PRESETS)}")
    cfg = dataclasses.replace(mod.PRESETS[preset], **(overrides or {}))
    backbone_kw = getattr(cfg, "backbone_kwargs", None) or {}
    backbone = build_backbone(cfg.backbone, pretrained=pretrained_backbone, **backbone_kw)
    topology = body_model.topology(hierarchy=hierarchy)
    kwargs = {"body_model": body_model} if name == "featup_hmr" else {}
    model = getattr(mod, MODEL_CLASSES[name])(cfg, backbone, topology, **kwargs)
    return model.to(device), cfg


# ----------------------------------------------------------------------------- reading files
def load_checkpoint(path, map_location="cpu", required=()):
    """torch.load(weights_only=True) with errors that name the file and say what is wrong;
    `required`: keys the loaded dict must hold (train.py's resume asks for its own)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise RuntimeError(f"could not read checkpoint {path}: the file is empty (0 bytes; an "
                           "interrupted copy?): delete it or restore it from a backup")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(f"could not read checkpoint {path} with weights_only=True: "
                           f"{type(e).__name__}: {e or 'no details'} (not a torch checkpoint, truncated, "
                           "or written by an incompatible torch; a file holding a pickled module, like "
                           "the official model.bin, cannot be read safely: use the state dict file, "
                           "state_dict.bin)") from e
    if required and not isinstance(ck, dict):
        raise RuntimeError(f"checkpoint {path} holds a {type(ck).__name__}, expected a dict with keys "
                           f"{list(required)} (a checkpoint written by train.py)")
    missing = [k for k in required if k not in ck]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks key(s) {missing} (found {sorted(ck)}): not a "
                           "checkpoint written by train.py" + (", or a weights-only file: it cannot "
                           "be resumed" if "model" in ck else ""))
    return ck


def unwrap_state_dict(obj, path):
    """A state dict (str -> Tensor), possibly wrapped in state_dict/model/module (nested)."""
    for _ in range(4):
        if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: no state dict inside (got {type(obj).__name__}); expected a dict of "
                         f"tensors, possibly wrapped in one of {_WRAPPERS}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path}: not a state dict: entries {bad[:5]} are not str -> Tensor "
                         f"(keys found: {list(obj)[:8]})")
    return dict(obj)


def read_state_dict(path):
    return unwrap_state_dict(load_checkpoint(path), path)


# ----------------------------------------------------------------------------- preset inference
class _NoParamBackbone(nn.Module):
    """Parameter-free stand-in: the heads only read `out_channels` at construction."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels


_BACKBONES = {}
_HEADS = {}


def _meta_backbone(name, kwargs):
    """A backbone built on the meta device (keys and shapes only; cached)."""
    key = (name, repr(sorted(kwargs.items())))
    if key not in _BACKBONES:
        with torch.device("meta"):
            _BACKBONES[key] = build_backbone(name, **kwargs)
    return _BACKBONES[key]


def _head_signature(name, preset, topology, out_channels):
    """{key: shape} of a preset's non-backbone part for `topology` (a parameter-free backbone)."""
    key = (name, preset, tuple(topology["num_vertices"]), int(topology["joint_regressor"][0].shape[0]), out_channels)
    if key not in _HEADS:
        mod = model_module(name)
        head = getattr(mod, MODEL_CLASSES[name])(mod.PRESETS[preset], _NoParamBackbone(out_channels), topology)
        _HEADS[key] = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    return _HEADS[key]


def _same(sd, sig):
    return set(sd) == set(sig) and all(tuple(sd[k].shape) == sig[k] for k in sig)


def fitting_presets(state_dict, topology, models=OFFICIAL_MODELS):
    """[(model, preset)] whose keys and shapes equal the (converted) official `state_dict`.
    Backbones are compared first (meta device, once per backbone); heads are built only for the
    presets whose backbone fits."""
    out = []
    for name in models:
        mod = model_module(name)
        for preset, cfg in mod.PRESETS.items():
            try:
                backbone = _meta_backbone(cfg.backbone, getattr(cfg, "backbone_kwargs", None) or {})
                bsig = {"backbone." + k: tuple(v.shape) for k, v in backbone.state_dict().items()}
                # convert_official_state_dict only reads the model's keys and its backbone
                conv = mod.convert_official_state_dict(state_dict, _SigView(backbone, bsig))
                if not _same({k: v for k, v in conv.items() if k.startswith("backbone.")}, bsig):
                    continue
                hsig = _head_signature(name, preset, topology, backbone.out_channels)
            except Exception:  # noqa: BLE001 - a preset that cannot be built does not fit
                continue
            if _same({k: v for k, v in conv.items() if not k.startswith("backbone.")}, hsig):
                out.append((name, preset))
    return out


class _SigView(nn.Module):
    """What convert_official_state_dict reads of a model: state_dict() keys and .backbone."""

    def __init__(self, backbone, sig):
        super().__init__()
        self.backbone = backbone
        self._sig = sig

    def state_dict(self, *a, **k):  # noqa: D401 - keys are all it needs
        return dict.fromkeys(self._sig)


# ----------------------------------------------------------------------------- loading weights
def _mismatch_report(model, converted):
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    shapes = sorted(k for k in set(own) & set(converted) if tuple(own[k].shape) != tuple(converted[k].shape))
    show = lambda ks: f"{len(ks)} {ks[:8]}{' ...' if len(ks) > 8 else ''}"  # noqa: E731
    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    if shapes:
        parts.append("shape mismatches: " + ", ".join(
            f"{k} file {tuple(converted[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes[:8]))
    return "; ".join(parts)


def load_official_weights(model, name, preset, path, body_model=None):
    """Load a released state dict (official key layout) into `model` strictly; clear errors."""
    if name not in OFFICIAL_MODELS:
        raise ValueError(f"--weights: official checkpoints are supported for {OFFICIAL_MODELS}, not {name!r}")
    sd = read_state_dict(path)
    converted = model_module(name).convert_official_state_dict(sd, model)
    report = _mismatch_report(model, converted)
    if report:
        topology = model_topology_view(model, body_model)
        fits = fitting_presets(sd, topology) if topology is not None else []
        hint = (f"The file fits: {', '.join(f'--model {m} --preset {p}' for m, p in fits)}."
                if fits else "No preset of fastmetro or tore fits this file (other body model, "
                "custom config or not a FastMETRO/TORE checkpoint).")
        nsr = {int(k.split(".")[3]) for k in converted if k.startswith("transformer_3.encoder.layers.")}
        want = getattr(model.cfg, "nsr_enc_layers", None) or getattr(model.cfg, "num_layers", None)
        if name == "tore" and nsr and max(nsr) + 1 != want:
            hint += (f" Its NSR encoder (transformer_3.encoder) has {max(nsr) + 1} layer(s): add "
                     f"--set nsr_enc_layers={max(nsr) + 1} (the official inference copy of TORE builds 1).")
        raise ValueError(f"--weights {path} does not fit --model {name} --preset {preset}: {report}. {hint}")
    model.load_state_dict(converted, strict=True)
    return {"source": "official", "file": str(path), "sha256": sha256_file(path), "num_tensors": len(converted)}


def model_topology_view(model, body_model):
    """The topology a model was built with (re-derived from the body model's cache)."""
    if body_model is None:
        return None
    topo = getattr(model, "topology_used", None)
    if topo is not None:
        return topo
    cached = list(getattr(body_model, "_topology", {}).values())
    return cached[-1] if cached else body_model.topology()


# ----------------------------------------------------------------------------- whole-model loading
def load_model_from_checkpoint(path, device, body=None, h36m_regressor=None, mesh_hierarchy=None):
    """Rebuild the model a train.py checkpoint was trained with and load its weights."""
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no 'config'/'model' entries); "
                         "for a released official state dict use --weights FILE with --model and --preset")
    cfg = ck["config"]
    body_model = build_body(body or cfg.get("body"), h36m_regressor or cfg.get("h36m_regressor")).to(device)
    stored = cfg.get("mesh_hierarchy_identity")
    if mesh_hierarchy is None and stored and stored.get("source") == "graphcmr":
        mesh_hierarchy = stored.get("file")
        if not mesh_hierarchy or not Path(mesh_hierarchy).is_file():
            raise FileNotFoundError(f"{path} was trained on the GraphCMR hierarchy {mesh_hierarchy}, which "
                                    f"is not there; pass --mesh-hierarchy {GRAPHCMR_HELP}")
    hierarchy, ident = load_hierarchy(body_model, mesh_hierarchy)
    check_hierarchy_identity(stored, ident, path)
    overrides = parse_overrides(cfg.get("set"))
    restore = getattr(model_module(cfg["model"]), "restore_overrides", None)
    if restore is not None:                  # files read at construction whose contents the state dict holds
        overrides = restore(overrides)
    model, _ = build_model(cfg["model"], cfg["preset"], body_model, overrides=overrides,
                           device=device, hierarchy=hierarchy)
    model.load_state_dict(ck["model"])
    model.eval()
    info = {"source": "checkpoint", "file": str(path), "model": cfg["model"], "preset": cfg["preset"],
            "mesh_hierarchy": ident, "h36m_regressor": regressor_identity(body_model)}
    return model, body_model, info


def load_for_inference(device, ckpt=None, weights=None, model=None, preset=None, body=None,
                       h36m_regressor=None, mesh_hierarchy=None, overrides=None):
    """evaluate.py / demo.py: a train.py checkpoint (--ckpt) or a released state dict (--weights
    with --model and --preset). Returns (model in eval mode, body_model, info dict)."""
    if (ckpt is None) == (weights is None):
        raise ValueError("give exactly one of --ckpt (a train.py checkpoint) or --weights (a released "
                         "state dict, with --model and --preset)")
    if ckpt is not None:
        if overrides:
            raise ValueError(f"--set {sorted(overrides)}: applies to --weights only (a train.py checkpoint "
                             "carries its own config)")
        return load_model_from_checkpoint(ckpt, device, body, h36m_regressor, mesh_hierarchy)
    if model is None or preset is None:
        raise ValueError("--weights needs --model and --preset (e.g. --model fastmetro --preset L-H64)")
    body_model = build_body(body, h36m_regressor).to(device)
    check_official_hierarchy(body_model, mesh_hierarchy)
    hierarchy, ident = load_hierarchy(body_model, mesh_hierarchy)
    net, _ = build_model(model, preset, body_model, overrides=overrides, device="cpu", hierarchy=hierarchy)
    net.topology_used = body_model.topology(hierarchy=hierarchy)
    loaded = load_official_weights(net, model, preset, weights, body_model)
    net = net.to(device).eval()
    info = {**loaded, "model": model, "preset": preset, "mesh_hierarchy": ident,
            "h36m_regressor": regressor_identity(body_model)}
    return net, body_model, info


def add_model_args(p):
    """The model-source options of evaluate.py and demo.py (see load_for_inference)."""
    p.add_argument("--ckpt", default=None, help="checkpoint written by train.py")
    p.add_argument("--weights", default=None,
                   help="released state dict in the official key layout (.bin/.pth), with --model/--preset")
    p.add_argument("--model", default=None, choices=MODELS, help="with --weights")
    p.add_argument("--preset", default=None, help="with --weights, e.g. L-H64")
    p.add_argument("--body", default=None, help="SMPL .pkl (default: the checkpoint's / the toy body)")
    p.add_argument("--h36m-regressor", default=None, help="J_regressor_h36m_correct.npy (or SPIN's file)")
    p.add_argument("--mesh-hierarchy", default=None,
                   help="GraphCMR mesh_downsampling.npz (needed for released weights with real SMPL)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --weights: override a preset field, e.g. --set nsr_enc_layers=1")


if __name__ == "__main__":
    # Smoke test: a tiny FastMETRO written in the official layout loads back through --weights.
    import tempfile
    bm = build_body()
    net, _ = build_model("fastmetro", "tiny", bm)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "state_dict.bin"
        torch.save(net.state_dict(), f)
        loaded, _, info = load_for_inference("cpu", weights=f, model="fastmetro", preset="tiny")
        same = all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
        print(f"official-layout tiny FastMETRO: {info['num_tensors']} tensors, identical after loading: {same}")
        try:
            load_for_inference("cpu", weights=f, model="tore", preset="tiny")
        except ValueError as e:
            print("wrong model/preset ->", str(e)[-160:])
