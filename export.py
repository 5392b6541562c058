"""Deployment export: FastMETRO, TORE, DeFormer and FeatUp-HMR through torch.export (and ONNX).

torch.export: https://pytorch.org/docs/stable/export.html ; ONNX: https://onnx.ai .

What this file implements
- `InferenceOutputs`: a thin wrapper that keeps the inference outputs of any of the four models:
  images (B, 3, H, W) in -> cam (B, 3), joints (B, J, 3), vertices (B, V, 3) out.
- `export_program(model, name)` / `save_program`: torch.export of the wrapper (backbone included)
  with a dynamic batch dimension, saved as an ExportedProgram (`.pt2`) with a JSON metadata entry
  (source, model, preset, overrides, body, input size, output names), so the file describes itself;
  `export_onnx(...)`: the same program through `torch.onnx.export(dynamo=True)` when the optional
  `onnx` package is installed (skipped with a message otherwise; never a requirement).
- `check(path)`: reloads the program, rebuilds the eager model from its recorded source (the
  checkpoint / weights file through checkpoints.py; for a random init the architecture with the
  program's own weights), and compares both on random and on synthetic rendered images (data.py),
  printing the max difference and images/s of both.

    python export.py --ckpt OUT/last.pt                  # -> OUT/last.pt2 (+ OUT/last.onnx)
    python export.py --model fastmetro --preset tiny     # random init (for testing the export)
    python export.py --model tore --preset L-H64 --weights W.bin  # released weights (checkpoints.py)
    python export.py --check OUT/last.pt2

How each model exports (no model is traced differently from how it runs eagerly)
- Block-sparse attention (DeFormer, sparse_attention.py): the plain-PyTorch "block" kernel, a
  custom autograd.Function, is traced through its forward (index_select / bmm / softmax); its
  work split is Python control flow on the batch, so under export it is sized for one sample
  with every piece covering the whole batch (sparse_attention._work_items; same math, scratch
  memory grows with the batch).
- Deformable sampling (DeFormer, FeatUp-HMR, deformable_attention.py): the PyTorch core
  (grid_sample per level). The level shapes are Python ints (deformer.py, featup_hmr.py):
  torch.export cannot read sizes back out of a tensor.
- FeatUp-HMR runs SMPL through smplx, whose `batch_rigid_transform` indexes a Python list with
  elements of the `parents` buffer. Under export that index is data-dependent, so FeatUp-HMR is
  traced with real-tensor propagation: the indices become the kinematic tree's constant values
  (range constraints u_i in [k, k] of the program). The other models never call smplx in forward.

Departures / limits
- Only the batch dimension is dynamic; the image size is the preset's `input_size` (the models
  size positional encodings and pruning from it).
- The program is traced in eval mode (no dropout); it is an inference artefact, not trainable.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

META_KEY = "hmr_export.json"
OUTPUT_NAMES = ("cam", "joints", "vertices")
IMAGENET_MEAN = (0.485, 0.456, 0.406)   # same as data.py
IMAGENET_STD = (0.229, 0.224, 0.225)
SMPLX_MODELS = ("featup_hmr",)          # models whose forward runs smplx (see the header)


class InferenceOutputs(nn.Module):
    """Keeps the deployment outputs of a model's forward dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        """images (B, 3, H, W) ImageNet-normalised -> cam (B, 3) weak perspective (s, tx, ty),
        joints (B, J, 3) metres, vertices (B, V, 3) metres (model frame)."""
        out = self.model(images)
        return out["cam"], out["joints"], out["vertices"]


# ----------------------------------------------------------------------------- loading
def build_from_spec(meta, weights=None):
    """Random-init source: meta {"model", "preset", "set", "body", "h36m_regressor", "seed"} ->
    (eval model, body model); weights: a state dict to load (strict) or None."""
    import checkpoints
    torch.manual_seed(int(meta.get("seed", 0)))
    body_model = checkpoints.build_body(meta.get("body"), meta.get("h36m_regressor"))
    hierarchy, _ = checkpoints.load_hierarchy(body_model, meta.get("mesh_hierarchy"))
    model, _ = checkpoints.build_model(meta["model"], meta["preset"], body_model,
                                       overrides=checkpoints.parse_overrides(meta.get("set")),
                                       hierarchy=hierarchy)
    if weights is not None:
        model.load_state_dict(weights)
    return model.eval(), body_model


def load_source(meta):
    """The eager model a metadata dict names -> (eval model, body model). Sources: a train.py
    checkpoint ("ckpt"), released weights ("weights" with model/preset, checkpoints.py), or a
    random init ("seed") when neither is given."""
    if not (meta.get("ckpt") or meta.get("weights")):
        return build_from_spec(meta)
    import checkpoints
    model, body_model, _ = checkpoints.load_for_inference(
        "cpu", ckpt=meta.get("ckpt"), weights=meta.get("weights"),
        model=None if meta.get("ckpt") else meta["model"], preset=None if meta.get("ckpt") else meta["preset"],
        body=meta.get("body"), h36m_regressor=meta.get("h36m_regressor"),
        mesh_hierarchy=meta.get("mesh_hierarchy"),
        overrides=None if meta.get("ckpt") else checkpoints.parse_overrides(meta.get("set")))
    return model.eval(), body_model


def load_for_export(args):
    """CLI args -> (eval model, metadata dict naming its source)."""
    if args.ckpt and (args.model or args.preset or args.weights or args.set):
        raise SystemExit("export.py: --ckpt carries its own model, preset and config; drop "
                         "--model/--preset/--weights/--set")
    if not args.ckpt and not (args.model and args.preset):
        raise SystemExit("export.py: give --ckpt, or --model and --preset (with --weights, else random init)")
    meta = {"ckpt": args.ckpt and str(Path(args.ckpt).resolve()),
            "weights": args.weights and str(Path(args.weights).resolve()),
            "model": args.model, "preset": args.preset, "set": args.set or [], "seed": args.seed,
            "body": args.body, "h36m_regressor": args.h36m_regressor, "mesh_hierarchy": args.mesh_hierarchy}
    model, _ = load_source(meta)
    if args.ckpt:                       # for the file's description only; --check reloads the checkpoint
        import checkpoints
        cfg = checkpoints.load_checkpoint(args.ckpt)["config"]
        meta.update(model=cfg["model"], preset=cfg["preset"], set=cfg.get("set") or [])
    meta["source"] = (f"checkpoint {args.ckpt}" if args.ckpt else f"weights {args.weights}" if args.weights
                      else f"random init (seed {args.seed})")
    return model, meta


# ----------------------------------------------------------------------------- export
@contextlib.contextmanager
def _real_tensor_propagation(enabled):
    """Trace with real values next to the fake ones, so data-dependent indices (smplx's
    `parents`) resolve to their (constant) values; see the file header."""
    if not enabled:
        yield
        return
    import torch._functorch.config as functorch_config
    with functorch_config.patch(fake_tensor_propagate_real_tensors=True):
        yield


def input_size_of(model):
    return tuple(int(s) for s in model.cfg.input_size)


def export_program(model, model_name, max_batch=256, example_batch=2):
    """model (eval) -> torch.export.ExportedProgram of InferenceOutputs, batch dynamic in
    [1, max_batch]. example_batch >= 2 so the tracer does not specialise on 0/1."""
    wrapper = InferenceOutputs(model).eval()
    H, W = input_size_of(model)
    example = torch.randn(example_batch, 3, H, W)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad(), _real_tensor_propagation(model_name in SMPLX_MODELS):
        return torch.export.export(wrapper, (example,), dynamic_shapes=({0: batch},), strict=False)


def _atomic_write(path, write):
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")   # torch wants the suffix
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_program(ep, path, meta):
    _atomic_write(path, lambda tmp: torch.export.save(ep, str(tmp),
                                                      extra_files={META_KEY: json.dumps(meta)}))


def load_program(path):
    """-> (ExportedProgram, metadata dict); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported program not found: {path}")
    extra = {META_KEY: ""}
    try:
        ep = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(f"could not load exported program {path}: {type(e).__name__}: {e} "
                           "(not a .pt2 written by torch.export.save, or truncated)") from e
    if not extra[META_KEY]:
        raise RuntimeError(f"{path} has no '{META_KEY}' entry: not written by export.py")
    return ep, json.loads(extra[META_KEY])


def export_onnx(ep, path):
    """ExportedProgram -> ONNX file via torch.onnx.export(dynamo=True). Returns a message."""
    if importlib.util.find_spec("onnx") is None:
        return "ONNX skipped: the optional 'onnx' package is not installed (pip install onnx onnxscript)"
    import shutil
    path = Path(path)
    # The .onnx names its weights file (<name>.onnx.data), so both are written under their final
    # names in a temporary folder next to the output, then moved (weights first).
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        tmp.mkdir()
        prog = torch.onnx.export(ep, dynamo=True, input_names=["images"], output_names=list(OUTPUT_NAMES))
        prog.save(str(tmp / path.name))
        for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".onnx"):
            os.replace(f, path.parent / f.name)
    except Exception as e:  # noqa: BLE001 - the .pt2 is the deliverable; ONNX is best effort
        return f"ONNX export failed ({type(e).__name__}): {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"wrote {path}" + (f" (+ {path.name}.data)" if (path.parent / f"{path.name}.data").exists() else "")


def graph_ops(ep):
    """Sorted names of the ATen ops in an exported program's graph."""
    return sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"})


# ----------------------------------------------------------------------------- check
def synthetic_images(body_model, input_size, n, seed=0):
    """n rendered synthetic people (data.SyntheticRenderer), resized to input_size (H, W) and
    ImageNet-normalised -> (n, 3, H, W)."""
    import data
    H, W = input_size
    r = data.SyntheticRenderer(body_model, size=max(H, W)).batch(np.random.default_rng(seed), n)
    x = torch.from_numpy(r["images"]).permute(0, 3, 1, 2).float() / 255    # (n, S, S, 3) -> (n, 3, S, S)
    x = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False,
                                        antialias=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def max_difference(a, b):
    """Per output name: max |a - b| over two tuples of tensors."""
    return {k: float((x - y).abs().max()) for k, x, y in zip(OUTPUT_NAMES, a, b)}


def images_per_second(fn, x, repeats=3):
    with torch.no_grad():
        fn(x)                                                  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def eager_from_program(ep, meta):
    """The eager reference for a program: its recorded source (checkpoint / weights file, which
    must still be there) or, for a random init, the architecture with the program's weights."""
    model, body_model = load_source(meta)
    wrapper = InferenceOutputs(model)
    if not (meta.get("ckpt") or meta.get("weights")):
        want = wrapper.state_dict()
        missing = set(want) - set(ep.state_dict)
        if missing:
            raise RuntimeError(f"exported program lacks weights for {sorted(missing)[:5]} ({len(missing)} "
                               f"tensors): not a program of {meta['model']}/{meta['preset']}")
        wrapper.load_state_dict({k: ep.state_dict[k] for k in want})
    return wrapper.eval(), body_model


def check(path, batch=4, repeats=3, synthetic=True):
    """Compare the exported program with the eager model; returns a dict of the figures."""
    ep, meta = load_program(path)
    eager, body_model = eager_from_program(ep, meta)
    exported = ep.module()
    H, W = meta["input_size"]
    g = torch.Generator().manual_seed(0)
    inputs = {f"random batch {b}": torch.randn(b, 3, H, W, generator=g) for b in sorted({1, batch})}
    if synthetic:
        inputs[f"synthetic batch {batch}"] = synthetic_images(body_model, (H, W), batch)
    result = {"diff": {}}
    with torch.no_grad():
        for name, x in inputs.items():
            d = max_difference(eager(x), exported(x))
            result["diff"][name] = d
            print(f"{name:>20}: max |exported - eager| " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    x = inputs[f"random batch {batch}"]
    result["eager_ips"] = images_per_second(eager, x, repeats)
    result["exported_ips"] = images_per_second(exported, x, repeats)
    print(f"images/s at batch {batch} ({torch.get_num_threads()} threads): eager "
          f"{result['eager_ips']:.2f}, exported {result['exported_ips']:.2f} "
          f"(ratio {result['exported_ips'] / result['eager_ips']:.2f})")
    return result


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    import checkpoints
    checkpoints.add_model_args(p)      # --ckpt, --weights, --model, --preset, --body, --h36m-regressor, ...
    p.add_argument("--seed", type=int, default=0, help="random init seed (no --ckpt/--weights)")
    p.add_argument("--out", default=None, help="output .pt2 (default: next to --ckpt, else exports/<model>_<preset>.pt2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch the program accepts")
    p.add_argument("--no-onnx", action="store_true", help="do not write the ONNX file")
    p.add_argument("--check", metavar="FILE", help="compare an exported .pt2 with the eager model")
    p.add_argument("--batch", type=int, default=4, help="--check: batch for the comparison and timing")
    p.add_argument("--repeats", type=int, default=3, help="--check: timed runs (best is reported)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.check:
        check(args.check, batch=args.batch, repeats=args.repeats)
        return
    out = Path(args.out) if args.out else (Path(args.ckpt).with_suffix(".pt2") if args.ckpt else
                                           Path("exports") / f"{args.model}_{args.preset}.pt2")
    onnx_out = out.with_suffix(".onnx")
    for f in (out, onnx_out, onnx_out.with_name(onnx_out.name + ".data")):
        if f.exists() and not args.overwrite:
            raise SystemExit(f"export.py: {f} exists; pass --overwrite to replace it or --out elsewhere")
    model, meta = load_for_export(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta.update(input_size=list(input_size_of(model)), outputs=list(OUTPUT_NAMES),
                max_batch=args.max_batch, torch=torch.__version__)
    t0 = time.perf_counter()
    ep = export_program(model, meta["model"], max_batch=args.max_batch)
    save_program(ep, out, meta)
    print(f"wrote {out} ({meta['model']}/{meta['preset']}, {meta['source']}; batch 1..{args.max_batch}, "
          f"images {meta['input_size'][0]}x{meta['input_size'][1]}; {time.perf_counter() - t0:.0f} s, "
          f"{len(graph_ops(ep))} distinct ops)")
    print("ONNX skipped: --no-onnx" if args.no_onnx else export_onnx(ep, onnx_out))


if __name__ == "__main__":
    sys.exit(main())
