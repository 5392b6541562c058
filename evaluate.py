"""Evaluation of 3D human mesh recovery: MPJPE, PA-MPJPE and MPVE in millimetres.

    python evaluate.py --ckpt runs/quickstart/last.pt --data data/synth/test.npz
    python evaluate.py --ckpt model.pt --data h36m_valid_protocol2.npz --img-root /data/h36m \
        --h36m-regressor J_regressor_h36m_correct.npy --body SMPL_NEUTRAL.pkl

Conventions (METRO / FastMETRO evaluation, Human3.6M protocol 2 and 3DPW):
- Joints are the 14 LSP joints. Predicted joints are regressed from the predicted 6890-vertex mesh
  with the H36M-17 regressor and mapped with H36M_TO_LSP; ground-truth joints are the dataset's
  3D joints (J24 -> LSP-14) when it has them, otherwise the same regressor on the GT mesh
  (3DPW-style, gendered GT meshes).
- MPJPE alignment, selectable with --align:
    "pelvis" (default, METRO): prediction centred on its H36M pelvis (regressed joint 0), ground
             truth on its pelvis (J24 index 14, or H36M joint 0 of the GT mesh);
    "hip":   both centred on the midpoint of the LSP hips (joints 2 and 3).
- PA-MPJPE: per-sample similarity Procrustes (scale, rotation, translation) of the predicted
  joints onto the ground truth, with the reflection fixed (det R = +1), then MPJPE.
- MPVE: per-vertex error of the pelvis-centred predicted mesh against the pelvis-centred GT mesh
  (samples with has_smpl only).
- Mean-pose baseline: every test sample predicted as the mean root-relative training body
  (mean GT joints and mean GT mesh of the training set); the number any model must beat.
Joints with confidence 0 are left out of the joint errors.
"""
import argparse
import json
import math
from pathlib import Path

import torch

H36M_TO_LSP = [3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10]
J24_TO_LSP = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18]
J24_PELVIS = 14
LSP_NAMES = ["R_Ankle", "R_Knee", "R_Hip", "L_Hip", "L_Knee", "L_Ankle", "R_Wrist", "R_Elbow",
             "R_Shoulder", "L_Shoulder", "L_Elbow", "L_Wrist", "Neck", "Head"]


# ----------------------------------------------------------------------------- metrics
def similarity_procrustes(pred, gt, weight=None):
    """Align pred onto gt with the best similarity transform, per sample.

    pred, gt: (B, N, 3); weight: (B, N) or None (points with weight 0 do not influence the fit).
    Returns pred aligned: (B, N, 3). Reflections are excluded (det R = +1), as in SPIN/METRO.
    """
    if weight is None:
        weight = torch.ones(pred.shape[:2], dtype=pred.dtype, device=pred.device)
    w = weight / weight.sum(1, keepdim=True).clamp_min(1e-8)                # (B, N)
    mu_p = (w[..., None] * pred).sum(1, keepdim=True)                       # (B, 1, 3)
    mu_g = (w[..., None] * gt).sum(1, keepdim=True)
    p, g = pred - mu_p, gt - mu_g
    var_p = (w * (p ** 2).sum(-1)).sum(1)                                   # (B,)
    cov = torch.einsum("bn,bni,bnj->bij", w, g, p)                          # (B, 3, 3) sum w g p^T
    u, s, vh = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(u @ vh))                                # fix reflection
    e = torch.ones_like(s)
    e[:, -1] = d
    rot = u @ torch.diag_embed(e) @ vh                                      # (B, 3, 3)
    scale = (s * e).sum(1) / var_p.clamp_min(1e-12)                         # (B,)
    return scale[:, None, None] * p @ rot.transpose(1, 2) + mu_g


def joint_errors(pred, gt, conf=None):
    """Per-joint Euclidean error (B, N) in the input units; conf (B, N) masks joints (0 = unused)."""
    err = (pred - gt).norm(dim=-1)
    return err if conf is None else err * (conf > 0)


def mpjpe(pred, gt, conf=None):
    """Mean per-joint position error over joints with conf > 0, averaged per sample: (B,)."""
    conf = torch.ones(pred.shape[:2], device=pred.device) if conf is None else (conf > 0).to(pred.dtype)
    return (joint_errors(pred, gt) * conf).sum(1) / conf.sum(1).clamp_min(1)


def pa_mpjpe(pred, gt, conf=None):
    """MPJPE after per-sample similarity Procrustes alignment: (B,)."""
    w = None if conf is None else (conf > 0).to(pred.dtype)
    return mpjpe(similarity_procrustes(pred, gt, w), gt, conf)


def centre(joints, how, pelvis=None):
    """Root-centre (B, 14, 3) LSP joints by 'pelvis' (given (B, 3)) or 'hip' (midpoint of 2, 3)."""
    if how == "hip":
        return joints - (joints[:, 2:3] + joints[:, 3:4]) / 2
    if how == "pelvis":
        return joints - pelvis[:, None]
    raise ValueError(f"align must be 'pelvis' or 'hip', got {how!r}")


# ----------------------------------------------------------------------------- evaluation
class MetricAccumulator:
    """Sums per-sample errors (metres in, millimetres out) and per-joint errors."""

    def __init__(self):
        self.sums = {"mpjpe": 0.0, "pa_mpjpe": 0.0, "mpve": 0.0}
        self.counts = {"mpjpe": 0, "pa_mpjpe": 0, "mpve": 0}
        self.per_joint = torch.zeros(14, dtype=torch.float64)
        self.per_joint_count = torch.zeros(14, dtype=torch.float64)

    def add(self, pred_joints, gt_joints, conf, align, pred_pelvis=None, gt_pelvis=None,
            pred_verts=None, gt_verts=None, has_smpl=None):
        """pred/gt joints (B,14,3) metres (not centred), conf (B,14); verts (B,V,3) pelvis-centred."""
        pj = centre(pred_joints, align, pred_pelvis)
        gj = centre(gt_joints, align, gt_pelvis)
        valid = conf.sum(1) > 0
        if valid.any():
            self.sums["mpjpe"] += mpjpe(pj[valid], gj[valid], conf[valid]).sum().item()
            self.sums["pa_mpjpe"] += pa_mpjpe(pj[valid], gj[valid], conf[valid]).sum().item()
            n = int(valid.sum())
            self.counts["mpjpe"] += n
            self.counts["pa_mpjpe"] += n
            m = (conf[valid] > 0).double().cpu()
            self.per_joint += (joint_errors(pj[valid], gj[valid]).double().cpu() * m).sum(0)
            self.per_joint_count += m.sum(0)
        if pred_verts is not None and has_smpl is not None and has_smpl.any():
            sel = has_smpl > 0
            self.sums["mpve"] += (pred_verts[sel] - gt_verts[sel]).norm(dim=-1).mean(1).sum().item()
            self.counts["mpve"] += int(sel.sum())

    def result(self):
        out = {k: (1000 * self.sums[k] / self.counts[k] if self.counts[k] else float("nan"))
               for k in self.sums}
        out["num_samples"] = self.counts["mpjpe"]
        out["per_joint_mpjpe"] = {name: 1000 * float(s / c) if c else float("nan")
                                  for name, s, c in zip(LSP_NAMES, self.per_joint, self.per_joint_count)}
        return out


def ground_truth(batch, body_model, h36m_regressor, device):
    """GT LSP joints (B,14,3), confidences (B,14), pelvis (B,3) and pelvis-centred GT mesh."""
    pose, betas = batch["pose"].to(device), batch["betas"].to(device)
    has_smpl = batch["has_smpl"].to(device)
    verts = body_model(betas, pose)["vertices"]                              # (B, V, 3)
    h36m = torch.einsum("jv,bvc->bjc", h36m_regressor, verts)                # (B, 17, 3)
    mesh_pelvis = h36m[:, 0]
    j3d = batch["joints3d"].to(device)                                       # (B, 24, 4) pelvis-centred
    has_3d = batch["has_3d"].to(device) > 0
    label_joints = j3d[:, J24_TO_LSP, :3]
    label_conf = j3d[:, J24_TO_LSP, 3] * has_3d[:, None]
    mesh_joints = h36m[:, H36M_TO_LSP]
    use_label = has_3d[:, None, None]
    joints = torch.where(use_label, label_joints, mesh_joints)
    pelvis = torch.where(has_3d[:, None], j3d[:, J24_PELVIS, :3], mesh_pelvis)
    conf = torch.where(has_3d[:, None], label_conf, has_smpl[:, None].expand(-1, 14).to(j3d.dtype))
    return joints, conf, pelvis, verts - mesh_pelvis[:, None], has_smpl


@torch.no_grad()
def evaluate(model, loader, body_model, device, align="pelvis", max_batches=None, baseline=None):
    """Run `model` over `loader` and return metrics in mm (and the baseline's, if given).

    model: maps images (B,3,H,W) to a dict with "vertices" (B,V,3) metres; None evaluates only the
    baseline. baseline: dict(joints=(14,3) root-relative mean joints, vertices=(V,3) pelvis-centred
    mean mesh), as returned by `mean_pose_baseline`.
    """
    h36m_reg = body_model.J_regressor_h36m.to(device)
    acc, base_acc = MetricAccumulator(), MetricAccumulator()
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        gt_joints, conf, gt_pelvis, gt_verts, has_smpl = ground_truth(batch, body_model, h36m_reg, device)
        if model is not None:
            out = model(batch["img"].to(device))
            verts = out["vertices"].float()
            h36m = torch.einsum("jv,bvc->bjc", h36m_reg, verts)
            pred_pelvis = h36m[:, 0]
            acc.add(h36m[:, H36M_TO_LSP], gt_joints, conf, align, pred_pelvis, gt_pelvis,
                    verts - pred_pelvis[:, None], gt_verts, has_smpl)
        if baseline is not None:
            b = gt_joints.shape[0]
            bj = baseline["joints"].to(device).expand(b, -1, -1)             # root-relative already
            bv = baseline["vertices"].to(device).expand(b, -1, -1)
            zero = torch.zeros(b, 3, device=device)       # baseline joints are already root-relative
            base_acc.add(bj, gt_joints, conf, align, zero, gt_pelvis, bv, gt_verts, has_smpl)
    if model is not None and was_training:
        model.train()
    res = {"model": acc.result() if model is not None else None}
    if baseline is not None:
        res["mean_pose_baseline"] = base_acc.result()
    return res


@torch.no_grad()
def mean_pose_baseline(loader, body_model, device, align="pelvis", max_batches=None):
    """Mean root-relative GT joints (14,3) and pelvis-centred GT mesh (V,3) over a training set."""
    h36m_reg = body_model.J_regressor_h36m.to(device)
    sj = sv = 0
    nj = torch.zeros(14, 1, device=device)
    nv = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        joints, conf, pelvis, verts, has_smpl = ground_truth(batch, body_model, h36m_reg, device)
        rel = centre(joints, align, pelvis)
        m = (conf > 0).to(rel.dtype)[..., None]
        sj = sj + (rel * m).sum(0)
        nj += m.sum(0)
        sel = has_smpl > 0
        if sel.any():
            sv = sv + verts[sel].sum(0)
            nv += int(sel.sum())
    if nv == 0:
        raise ValueError("mean_pose_baseline: no training sample with has_smpl=1 to build a mean mesh")
    return {"joints": sj / nj.clamp_min(1), "vertices": sv / nv}


def print_table(results, title="Evaluation (mm)"):
    rows = [(name, r) for name, r in results.items() if isinstance(r, dict) and "mpjpe" in r]
    print(f"\n{title}")
    print(f"{'':22s} {'MPJPE':>8s} {'PA-MPJPE':>9s} {'MPVE':>8s} {'N':>6s}")
    for name, r in rows:
        print(f"{name:22s} {r['mpjpe']:8.1f} {r['pa_mpjpe']:9.1f} {r['mpve']:8.1f} {r['num_samples']:6d}")
    if isinstance(results.get("model"), dict) and isinstance(results.get("mean_pose_baseline"), dict):
        ratio = results["model"]["mpjpe"] / results["mean_pose_baseline"]["mpjpe"]
        print(f"MPJPE model / mean-pose baseline = {ratio:.3f}")


def main(argv=None):
    import train  # the builders and dataset helpers live in the trainer

    p = argparse.ArgumentParser(description="Evaluate a checkpoint (MPJPE, PA-MPJPE, MPVE in mm).")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--data", required=True, help="dataset spec (npz or TSV yaml), as train.py --val")
    p.add_argument("--img-root", default=None, help="image root for npz datasets")
    p.add_argument("--baseline-data", default=None, help="training set for the mean-pose baseline")
    p.add_argument("--align", default="pelvis", choices=["pelvis", "hip"])
    p.add_argument("--body", default=None, help="SMPL .pkl (default: the checkpoint's body model)")
    p.add_argument("--h36m-regressor", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results JSON (default: next to the checkpoint)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    model, body_model, cfg = train.load_model_from_checkpoint(args.ckpt, device, body=args.body,
                                                              h36m_regressor=args.h36m_regressor)
    loader = train.make_eval_loader(args.data, args.img_root, model.cfg.input_size,
                                    args.batch_size, args.workers)
    baseline = None
    if args.baseline_data:
        bl = train.make_eval_loader(args.baseline_data, args.img_root, model.cfg.input_size,
                                    args.batch_size, args.workers)
        baseline = mean_pose_baseline(bl, body_model, device, args.align)
    res = evaluate(model, loader, body_model, device, args.align, baseline=baseline)
    res.update(checkpoint=str(args.ckpt), data=args.data, align=args.align)
    print_table(res)
    out = Path(args.out) if args.out else Path(args.ckpt).with_suffix(".eval.json")
    out.write_text(json.dumps(res, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
