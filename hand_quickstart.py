"""Hand mesh recovery end to end on CPU: synthetic FreiHAND-layout hands -> train a tiny
FastMETRO-hand or TORE-hand -> FreiHAND evaluation table (PA-MPJPE, PA-MPVPE in mm, F@5/F@15 mm).

What this script does
- `freihand.write_synthetic` renders procedural hands (hand.py's toy hand, or --mano MANO_RIGHT.pkl)
  into FreiHAND's layout under --data (skipped when the files exist); or --data points at a real
  FreiHAND download (training_*.json, training/rgb, evaluation_*.json, evaluation/rgb).
- Trains `fastmetro_hand` / `tore_hand` ("tiny" preset, resnet_tiny backbone by default) with AdamW
  and gradient-norm clipping 0.3 (FastMETRO's hand script) for --steps steps.
- Predicts the evaluation split as FastMETRO's hand inference does (778 mesh and the 21 keypoints
  regressed from it, both centred on that wrist), writes FreiHAND's submission file
  `<out>/pred.json` and `<out>/metrics.json` (atomically; an existing --out is refused unless
  --overwrite), and prints the table. Also prints the same metrics for a mean-shape baseline
  (the training-set mean keypoints/mesh, wrist-centred) so the numbers can be read against it.

Departures: a training loop of its own (train.py is body-only); no augmentation; no checkpoint
resume (runs are minutes long). Not the official training recipe (200 epochs, HRNet-W64).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import freihand as fr
import hand


def build(model, preset, topo, backbone_name, input_size):
    import backbones
    bb = backbones.build_backbone(backbone_name)
    if model == "fastmetro":
        import fastmetro_hand
        return fastmetro_hand.build_fastmetro_hand(preset, bb, topo, input_size=input_size)
    if model == "tore":
        import tore_hand
        return tore_hand.build_tore_hand(preset, bb, topo, input_size=input_size)
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
    ap.add_argument("--data", default="data/freihand_synth", help="FreiHAND-layout directory")
    ap.add_argument("--out", default="runs/quickstart-hand")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--model", default="fastmetro", choices=["fastmetro", "tore"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--backbone", default="resnet_tiny")
    ap.add_argument("--mano", default=None, help="MANO_RIGHT.pkl (default: the toy hand)")
    ap.add_argument("--graphcmr", default=None, help="mano_downsampling.npz (default: decimation)")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    if (out / "metrics.json").exists() and not a.overwrite:
        sys.exit(f"hand_quickstart.py: {out}/metrics.json exists; pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    data = Path(a.data)
    if not (data / "training_xyz.json").is_file():
        print(f"rendering {a.n_train} + {a.n_eval} synthetic hands into {data} ...", flush=True)
        fr.write_synthetic(data, a.n_train, a.n_eval, seed=a.seed, model_path=a.mano)
    hm = hand.HandModel(a.mano)
    topo = hm.topology(graphcmr_path=a.graphcmr)
    model = build(a.model, a.preset, topo, a.backbone, (fr.IMAGE_SIZE, fr.IMAGE_SIZE))
    train = fr.FreiHANDDataset(data, "training")
    test = fr.FreiHANDDataset(data, "evaluation")
    loader = torch.utils.data.DataLoader(train, batch_size=a.batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
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
            step += 1
            if step % 50 == 0 or step == 1:
                print(f"step {step:5d}  loss {logs['loss']:.3f}  3d-joints {logs['loss_3d_joints']:.4f}  "
                      f"({time.time() - t0:.0f} s)", flush=True)
            if step >= a.steps or time.time() - t0 >= 60 * a.max_minutes:
                break
    reg = model.joint_regressor
    px, pv = predict(model, torch.utils.data.DataLoader(test, batch_size=a.batch_size), reg)
    gx, gv = test.ann["xyz"], test.ann["verts"]
    m = fr.evaluate(gx, px, gv, pv)
    # baseline: training mean of wrist-centred GT keypoints / meshes, same prediction for every image
    tx, tv = train.ann["xyz"], train.ann["verts"]
    mx = (tx - tx[:, :1]).mean(0)
    mv = (tv - tx[:, :1]).mean(0)
    base = fr.evaluate(gx, np.repeat(mx[None], len(gx), 0), gv, np.repeat(mv[None], len(gx), 0))
    fr.write_pred_json(out / "pred.json", px, pv)
    res = {"model": a.model, "preset": a.preset, "steps": step, "seconds": round(time.time() - t0, 1),
           "data": str(data), "n_eval": len(gx), "metrics": m, "mean_baseline": base}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out / "metrics.json")
    print(f"\nFreiHAND-style evaluation on {len(gx)} images of {data} ({step} steps, "
          f"{res['seconds']} s)")
    print(table([(f"{a.model}-hand {a.preset}", m), ("mean-shape baseline", base)]))
    return res


if __name__ == "__main__":
    main()
