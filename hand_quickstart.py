"""Hand mesh recovery end to end on CPU: synthetic FreiHAND-layout hands -> train a tiny
FastMETRO-hand or TORE-hand -> FreiHAND evaluation table (PA-MPJPE, PA-MPVPE in mm, F@5/F@15 mm).

What this script does
- `freihand.write_synthetic` renders procedural hands (hand.py's toy hand, or --mano MANO_RIGHT.pkl)
  into FreiHAND's layout under --data: --n-train / --n-eval hands, --poses (default "plausible":
  finger curls and spreads), global rotation spread --rotation-std. The settings are recorded in
  <data>/synthetic.json; a set made with other settings is rendered again. A --data folder
  without synthetic.json is taken as a real FreiHAND download (training_*.json, training/rgb,
  evaluation_*.json, evaluation/rgb) and used as it is.
- Trains `fastmetro_hand` / `tore_hand` ("tiny" preset, resnet_tiny backbone by default) with AdamW
  (wd 1e-4) and gradient-norm clipping 0.3 (FastMETRO's hand script) for exactly --steps steps,
  lr --lr with a cosine decay to 0 over them (--lr-schedule constant: none); --max-minutes only
  guards, and the script says when it cut the run short.
- Predicts the evaluation split as FastMETRO's hand inference does (778 mesh and the 21 keypoints
  regressed from it, both centred on that wrist), writes FreiHAND's submission file
  `<out>/pred.json`, `<out>/metrics.json` and the weights `<out>/model.pt` (atomically; an
  existing --out is refused unless --overwrite), and prints the table, with the same metrics for
  the mean-shape baseline: the training-set mean of the wrist-centred GT keypoints / meshes, one
  prediction for every image, aligned like the model's (the mesh of the mean pose and shape
  parameters is the weaker baseline: 19.3 / 14.1 mm against 19.0 / 13.7 mm on the default set).

Departures
- A training loop of its own (train.py is body-only); no augmentation; no checkpoint resume (runs
  are minutes long). Not the official recipe (200 epochs, HRNet-W64, lr 1e-4 constant).
- Synthetic defaults chosen so that the tiny model learns the fingers in 1500 steps (README
  "Hands": the measurements): plausible finger curls, global rotation spread 0.1 rad, lr 2e-3.
- FastMETRO-hand's vertex loss weight is 1000 here (official 100; `QUICKSTART_OVERRIDES`, --set
  vertices_3d_loss_weight=100.0 restores it): with 100, 1500 steps of the tiny model left the mesh
  far behind the keypoints (PA-MPVPE 19.8 mm against 15.3 mm PA-MPJPE, baseline 11.1 mm on the
  old "gaussian" set); with 1000 the mesh follows the keypoints (13.2 mm). TORE-hand keeps its
  official weights (not measured here).
"""
import argparse
import ast
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import freihand as fr
import hand


# Departure from the official loss weights for this short CPU run (see the header): FastMETRO-hand's
# vertex weight 1000 (official 100). `--set vertices_3d_loss_weight=100.0` restores the official one.
QUICKSTART_OVERRIDES = {"fastmetro": {"vertices_3d_loss_weight": 1000.0}, "tore": {}}


def build(model, preset, topo, backbone_name, input_size, overrides=None):
    import backbones
    bb = backbones.build_backbone(backbone_name)
    kw = dict(overrides or {}, input_size=input_size)
    if model == "fastmetro":
        import fastmetro_hand
        return fastmetro_hand.build_fastmetro_hand(preset, bb, topo, **kw)
    if model == "tore":
        import tore_hand
        return tore_hand.build_tore_hand(preset, bb, topo, **kw)
    raise ValueError(f"--model must be fastmetro or tore, got {model!r}")


@torch.no_grad()
def predict(model, loader, regressor):
    model.eval()
    xyz, verts = [], []
    for batch in loader:
        v = model(batch["image"])["vertices"]
        j = torch.einsum("jv,bvc->bjc", regressor, v)                  # (B, 21, 3) from the mesh
        root = j[:, :1]
        xyz.append((j - root).numpy())
        verts.append((v - root).numpy())
    model.train()
    return np.concatenate(xyz), np.concatenate(verts)


def table(rows):
    keys = ["pa_mpjpe_mm", "pa_mpvpe_mm", "f@5mm", "f@15mm"]
    lines = [f"{'':22s}" + "".join(f"{k:>13s}" for k in keys)]
    for name, m in rows:
        lines.append(f"{name:22s}" + "".join(f"{m[k]:13.3f}" for k in keys))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/freihand-synth", help="FreiHAND-layout directory")
    ap.add_argument("--out", default="runs/quickstart-hand")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--model", default="fastmetro", choices=["fastmetro", "tore"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--backbone", default="resnet_tiny")
    ap.add_argument("--mano", default=None, help="MANO_RIGHT.pkl (default: the toy hand)")
    ap.add_argument("--graphcmr", default=None, help="mano_downsampling.npz (default: decimation)")
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--poses", default="plausible", choices=["plausible", "gaussian"],
                    help="synthetic finger articulation (freihand.write_synthetic)")
    ap.add_argument("--rotation-std", type=float, default=0.1,
                    help="synthetic global rotation spread, rad per axis-angle component")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--max-minutes", type=float, default=15.0, help="a guard only (says when it cut)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"],
                    help="cosine: lr decays to 0 over --steps (a fixed-length run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a model config field (e.g. vertices_3d_loss_weight=1000)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if (out / "metrics.json").exists() and not a.overwrite:
        sys.exit(f"hand_quickstart.py: {out}/metrics.json exists; pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    data = Path(a.data)
    recipe = {"n_train": a.n_train, "n_eval": a.n_eval, "seed": a.seed, "poses": a.poses,
              "rotation_std": a.rotation_std, "mano": str(a.mano) if a.mano else None}
    made = data / "synthetic.json"                   # written with our synthetic sets only
    stale = made.is_file() and json.loads(made.read_text()) != recipe
    if not (data / "training_xyz.json").is_file() or stale:
        print(f"rendering {a.n_train} + {a.n_eval} synthetic hands ({a.poses} poses) into {data} "
              + ("(replacing a set made with other settings) " if stale else "") + "...", flush=True)
        fr.write_synthetic(data, a.n_train, a.n_eval, seed=a.seed, model_path=a.mano, poses=a.poses,
                           rotation_std=a.rotation_std)
        tmp = data / "synthetic.json.tmp"
        tmp.write_text(json.dumps(recipe))
        tmp.replace(made)
    hm = hand.HandModel(a.mano)
    topo = hm.topology(graphcmr_path=a.graphcmr)
    overrides = dict(QUICKSTART_OVERRIDES[a.model])
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            sys.exit(f"hand_quickstart.py: --set {kv!r}: expected KEY=VALUE with a Python literal value")
    try:
        model = build(a.model, a.preset, topo, a.backbone, (fr.IMAGE_SIZE, fr.IMAGE_SIZE), overrides)
    except TypeError as e:                                  # dataclasses.replace: unknown field
        sys.exit(f"hand_quickstart.py: --set: {e}")
    train = fr.FreiHANDDataset(data, "training")
    test = fr.FreiHANDDataset(data, "evaluation")
    loader = torch.utils.data.DataLoader(train, batch_size=a.batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    if a.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / max(a.steps, 1))))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step, t0, logs = 0, time.time(), {}
    keys = ("joints3d", "joints2d", "vertices", "has_smpl", "has_3d")
    while step < a.steps and time.time() - t0 < 60 * a.max_minutes:
        for batch in loader:
            tg = {k: batch[k] for k in keys}
            tg["epoch"] = step * a.batch_size / len(train)
            loss, logs = model.loss(model(batch["image"]), tg)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == 1:
                print(f"step {step:5d}  loss {logs['loss']:.3f}  3d-joints {logs['loss_3d_joints']:.4f}  "
                      f"({time.time() - t0:.0f} s)", flush=True)
            if step >= a.steps or time.time() - t0 >= 60 * a.max_minutes:
                break
    reg = model.joint_regressor
    px, pv = predict(model, torch.utils.data.DataLoader(test, batch_size=a.batch_size), reg)
    gx, gv = test.ann["xyz"], test.ann["verts"]
    # Both sides wrist-centred (the predictions carry no camera translation), so the unaligned
    # figures (mpjpe_mm, mpvpe_mm, f@*_unaligned) are root-relative; the PA figures do not change.
    gx, gv = gx - gx[:, :1], gv - gx[:, :1]
    m = fr.evaluate(gx, px, gv, pv)
    # baseline: training mean of wrist-centred GT keypoints / meshes, same prediction for every image
    tx, tv = train.ann["xyz"], train.ann["verts"]
    mx = (tx - tx[:, :1]).mean(0)
    mv = (tv - tx[:, :1]).mean(0)                                      # gx, gv: wrist-centred above
    base = fr.evaluate(gx, np.repeat(mx[None], len(gx), 0), gv, np.repeat(mv[None], len(gx), 0))
    fr.write_pred_json(out / "pred.json", px, pv)
    tmp = out / "model.pt.tmp"
    torch.save({"model": model.state_dict(), "args": vars(a), "steps": step}, tmp)
    tmp.replace(out / "model.pt")
    res = {"model": a.model, "preset": a.preset, "overrides": overrides, "steps": step, "seconds": round(time.time() - t0, 1),
           "data": str(data), "n_eval": len(gx), "metrics": m, "mean_baseline": base}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out / "metrics.json")
    print(f"\nFreiHAND-style evaluation on {len(gx)} images of {data} ({step} steps, "
          f"{res['seconds']} s)")
    if step < a.steps:
        print(f"training ran {step} of {a.steps} steps - CUT SHORT by --max-minutes {a.max_minutes}: "
              "the figures below are not the fixed-step result")
    print(table([(f"{a.model}-hand {a.preset}", m), ("mean-shape baseline", base)]))
    return res


if __name__ == "__main__":
    main()
