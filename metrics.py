"""Evaluation of 3D human mesh recovery by named protocols: MPJPE, PA-MPJPE and MPVE in millimetres.

Used by evaluate.py (the command) and train.py (periodic evaluation). Official evaluation code
read for facts (no code copied): METRO / FastMETRO `run_*_bodymesh.py` (`run_validate`,
`mean_per_joint_position_error`, `mean_per_vertex_position_error`, `metric_pampjpe.py`) and
SPIN's `eval.py`.

Protocols (`PROTOCOLS`; the default is "fastmetro" for every model):
- "fastmetro" (METRO / FastMETRO / TORE run scripts; reproduces FastMETRO Table 2 / TORE Table 1:
  Human3.6M protocol 2 MPJPE and PA-MPJPE, 3DPW MPVE / MPJPE / PA-MPJPE):
    predicted joints = H36M-17 regressor on the predicted 6890 mesh -> 14 LSP joints
    (H36M_TO_LSP), centred on the regressed pelvis (H36M joint 0); ground truth = the dataset's
    3D joints (J24 -> 14) centred on J24's pelvis (index 14); then BOTH sides are re-centred on
    the midpoint of LSP joints 2 and 3 (the hips), i.e. MPJPE is hip-aligned. All 14 joints count,
    whatever their confidence; samples with has_3d. PA-MPJPE: per-sample similarity Procrustes
    (reflection fixed) on the same joints. MPVE: predicted mesh minus its regressed pelvis against
    the GT mesh (neutral body model from pose/betas, as the official script) minus the GT mesh's
    regressed pelvis; samples with has_smpl.
- "spin" (SPIN's eval.py; the convention of SPIN / GraphCMR tables): predicted joints as above,
  centred on the regressed pelvis only (no hip re-centring); ground truth = the dataset's 3D
  joints centred on J24's pelvis (H36M), or for datasets without 3D joints (3DPW's SPIN npz) the
  regressor on the GT mesh centred on the GT mesh's regressed pelvis (gendered GT meshes when
  male/female bodies are given, as SPIN). All 14 joints. PA-MPJPE per sample. MPVE (not in SPIN's
  eval.py for these sets) as in "fastmetro".

Departures / readings
- The official FastMETRO script averages PA-MPJPE of every sample of a batch, weighted by the
  batch's has_3d count; on the test sets (has_3d everywhere) this equals the per-sample mean over
  has_3d samples computed here.
- Samples with a GT mesh but no 3D joints (a SPIN-style 3DPW npz under "fastmetro") take the
  regressor's joints on the GT mesh (counted as `gt_joints_from_mesh` in the results); the official
  TSVs always carry 3D joints.
- Mean-pose baseline (ours): every test sample predicted as the mean protocol-centred GT joints and
  the mean pelvis-centred GT mesh of a training set; the number any model must beat. With any yaw
  in the data this mean is a collapsed figure, so a second reference (ours) is printed where the
  sets carry SMPL poses: the training set's mean pose in the BODY frame (GT joints and mesh turned
  back by their global orientation) turned by each test sample's TRUE global orientation, i.e.
  what a model that knew the orientation and nothing else would score. Its PA-MPJPE (which
  ignores orientation) is the mean articulated pose's: a model below it knows articulation.
"""
import math

import torch

from body import axis_angle_to_matrix

H36M_TO_LSP = [3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10]
J24_TO_LSP = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18]
J24_PELVIS = 14
LSP_HIPS = (2, 3)
LSP_NAMES = ["R_Ankle", "R_Knee", "R_Hip", "L_Hip", "L_Knee", "L_Ankle", "R_Wrist", "R_Elbow",
             "R_Shoulder", "L_Shoulder", "L_Elbow", "L_Wrist", "Neck", "Head"]
PROTOCOLS = ("fastmetro", "spin")
DEFAULT_PROTOCOL = "fastmetro"


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
        return joints - (joints[:, LSP_HIPS[0]:LSP_HIPS[0] + 1] + joints[:, LSP_HIPS[1]:LSP_HIPS[1] + 1]) / 2
    if how == "pelvis":
        return joints - pelvis[:, None]
    raise ValueError(f"align must be 'pelvis' or 'hip', got {how!r}")


def check_protocol(protocol):
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {PROTOCOLS}")
    return protocol


def protocol_centre(protocol, joints, pelvis):
    """(B, 14, 3) LSP joints and their pelvis (B, 3) -> the protocol's root-relative joints."""
    check_protocol(protocol)
    rel = centre(joints, "pelvis", pelvis)
    return centre(rel, "hip") if protocol == "fastmetro" else rel


# ----------------------------------------------------------------------------- evaluation
class MetricAccumulator:
    """Sums per-sample errors (metres in, millimetres out) and per-joint errors."""

    def __init__(self):
        self.sums = {"mpjpe": 0.0, "pa_mpjpe": 0.0, "mpve": 0.0}
        self.counts = {"mpjpe": 0, "pa_mpjpe": 0, "mpve": 0}
        self.per_joint = torch.zeros(14, dtype=torch.float64)
        self.per_joint_count = torch.zeros(14, dtype=torch.float64)
        self.from_mesh = 0

    def add(self, pred_joints, gt_joints, valid, pred_verts=None, gt_verts=None, has_smpl=None):
        """pred/gt joints (B,14,3) metres, already centred by the protocol; valid (B,) bool (samples
        that have GT joints); verts (B,V,3) pelvis-centred; has_smpl (B,)."""
        valid = valid.bool()
        if valid.any():
            pj, gj = pred_joints[valid].double(), gt_joints[valid].double()
            self.sums["mpjpe"] += mpjpe(pj, gj).sum().item()
            self.sums["pa_mpjpe"] += pa_mpjpe(pj, gj).sum().item()
            n = int(valid.sum())
            self.counts["mpjpe"] += n
            self.counts["pa_mpjpe"] += n
            self.per_joint += joint_errors(pj, gj).cpu().sum(0)
            self.per_joint_count += n
        if pred_verts is not None and has_smpl is not None and (has_smpl > 0).any():
            sel = has_smpl > 0
            self.sums["mpve"] += (pred_verts[sel].double() - gt_verts[sel].double()).norm(dim=-1).mean(1).sum().item()
            self.counts["mpve"] += int(sel.sum())

    def result(self):
        out = {k: (1000 * self.sums[k] / self.counts[k] if self.counts[k] else float("nan"))
               for k in self.sums}
        out["num_samples"] = self.counts["mpjpe"]
        out["num_mesh_samples"] = self.counts["mpve"]
        out["gt_joints_from_mesh"] = self.from_mesh
        out["per_joint_mpjpe"] = {name: 1000 * float(s / c) if c else float("nan")
                                  for name, s, c in zip(LSP_NAMES, self.per_joint, self.per_joint_count)}
        return out


def _gt_vertices(batch, body_model, device, gendered):
    pose, betas = batch["pose"].to(device), batch["betas"].to(device)
    verts = body_model(betas, pose)["vertices"]                              # (B, V, 3) neutral
    if gendered:
        gender = batch["gender"].to(device)
        for code, bm in gendered.items():
            sel = gender == code
            if sel.any():
                verts[sel] = bm(betas[sel], pose[sel])["vertices"].to(verts.dtype)
    return verts


def ground_truth(batch, body_model, h36m_regressor, device, protocol=DEFAULT_PROTOCOL, gendered=None):
    """The protocol's GT: joints (B,14,3) centred, valid (B,) bool, from_mesh (B,) bool, GT mesh
    centred on its regressed pelvis (B,V,3), has_smpl (B,). `gendered`: {1: male, 2: female} body
    models for GT meshes (SPIN on 3DPW); None -> the neutral `body_model`."""
    check_protocol(protocol)
    has_smpl = batch["has_smpl"].to(device) > 0
    verts = _gt_vertices(batch, body_model, device, gendered if protocol == "spin" else None).double()
    h36m = torch.einsum("jv,bvc->bjc", h36m_regressor.double(), verts)       # (B, 17, 3)
    mesh_pelvis = h36m[:, 0]
    j3d = batch["joints3d"].to(device)                                       # (B, 24, 4)
    has_3d = batch["has_3d"].to(device) > 0
    label = protocol_centre(protocol, j3d[:, J24_TO_LSP, :3].to(verts.dtype), j3d[:, J24_PELVIS, :3].to(verts.dtype))
    from_mesh = protocol_centre(protocol, h36m[:, H36M_TO_LSP], mesh_pelvis)
    use_mesh = ~has_3d & has_smpl
    joints = torch.where(has_3d[:, None, None], label, from_mesh)
    return joints, has_3d | use_mesh, use_mesh, verts - mesh_pelvis[:, None], has_smpl.float()


def predicted(vertices, h36m_regressor, protocol=DEFAULT_PROTOCOL):
    """Predicted mesh (B,V,3) -> protocol-centred LSP joints (B,14,3) and pelvis-centred mesh."""
    h36m = torch.einsum("jv,bvc->bjc", h36m_regressor.to(vertices.dtype), vertices)  # (B, 17, 3)
    pelvis = h36m[:, 0]
    return protocol_centre(protocol, h36m[:, H36M_TO_LSP], pelvis), vertices - pelvis[:, None]


@torch.no_grad()
def evaluate(model, loader, body_model, device, protocol=DEFAULT_PROTOCOL, max_batches=None,
             baseline=None, gendered=None):
    """Run `model` over `loader` and return metrics in mm (and the baseline's, if given).

    model: maps images (B,3,H,W) to a dict with "vertices" (B,V,3) metres; None evaluates only the
    baseline. baseline: dict(joints=(14,3) protocol-centred mean joints, vertices=(V,3)
    pelvis-centred mean mesh), as returned by `mean_pose_baseline` with the same protocol.
    """
    check_protocol(protocol)
    h36m_reg = body_model.J_regressor_h36m.to(device)
    acc, base_acc, oriented_acc = MetricAccumulator(), MetricAccumulator(), MetricAccumulator()
    oriented = baseline is not None and "body_joints" in baseline
    f = getattr(body_model, "faces", None)  # (F, 3); stand-in bodies without faces: no edge metric
    f = torch.zeros(0, 3, dtype=torch.long) if f is None else f.long().to(device)
    edges = torch.unique(torch.sort(torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1)[0], dim=0)
    edge_len = lambda v: (v[:, edges[:, 0]] - v[:, edges[:, 1]]).norm(dim=-1).mean(1).sum().item()
    edge_sums = [0.0, 0.0, 0]  # predicted, ground-truth mean edge length (m) summed over samples; n
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        gt_joints, valid, from_mesh, gt_verts, has_smpl = ground_truth(batch, body_model, h36m_reg, device,
                                                                       protocol, gendered)
        if model is not None:
            out = model(batch["img"].to(device))
            pj, pv = predicted(out["vertices"].double(), h36m_reg, protocol)   # metrics in float64
            acc.add(pj, gt_joints, valid, pv, gt_verts, has_smpl)
            acc.from_mesh += int(from_mesh.sum())
            sel = has_smpl > 0  # smoothness: mean edge length of the predicted vs the GT mesh
            if sel.any() and len(edges):
                edge_sums[0] += edge_len(out["vertices"].double()[sel])
                edge_sums[1] += edge_len(gt_verts[sel].double())
                edge_sums[2] += int(sel.sum())
        if baseline is not None:
            b = gt_joints.shape[0]
            bj = baseline["joints"].to(device).expand(b, -1, -1)
            bv = baseline["vertices"].to(device).expand(b, -1, -1)
            base_acc.add(bj, gt_joints, valid, bv, gt_verts, has_smpl)
            base_acc.from_mesh += int(from_mesh.sum())
        if oriented and "pose" in batch:      # the body-frame mean turned by each sample's true orientation
            R = axis_angle_to_matrix(batch["pose"].to(device).double()[:, :3])        # (B, 3, 3)
            oj = torch.einsum("bij,nj->bni", R, baseline["body_joints"].to(device))   # (B, 14, 3)
            ov = torch.einsum("bij,vj->bvi", R, baseline["body_vertices"].to(device))  # (B, V, 3)
            has = has_smpl > 0
            oriented_acc.add(oj, gt_joints, valid & has, ov, gt_verts, has_smpl)
    if model is not None and was_training:
        model.train()
    res = {"protocol": protocol, "model": acc.result() if model is not None else None}
    if model is not None and edge_sums[2]:
        res["model"]["mean_edge_mm"] = 1000 * edge_sums[0] / edge_sums[2]
        res["model"]["gt_mean_edge_mm"] = 1000 * edge_sums[1] / edge_sums[2]
        res["model"]["edge_length_ratio"] = edge_sums[0] / max(edge_sums[1], 1e-12)
    if baseline is not None:
        res["mean_pose_baseline"] = base_acc.result()
    if oriented and oriented_acc.result()["num_samples"]:
        res["mean_pose_true_orientation"] = oriented_acc.result()
    return res


@torch.no_grad()
def mean_pose_baseline(loader, body_model, device, protocol=DEFAULT_PROTOCOL, max_batches=None):
    """Mean protocol-centred GT joints (14,3) and pelvis-centred GT mesh (V,3) over a training set;
    with SMPL poses in the set also their means in the body frame ("body_joints", "body_vertices":
    the GT turned back by its global orientation, x_body = R^T x; see the file header)."""
    h36m_reg = body_model.J_regressor_h36m.to(device)
    sj = sv = bj = bv = 0
    nj = nv = nb = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        joints, valid, _, verts, has_smpl = ground_truth(batch, body_model, h36m_reg, device, protocol)
        if valid.any():
            sj = sj + joints[valid].sum(0)
            nj += int(valid.sum())
        sel = has_smpl > 0
        if sel.any():
            sv = sv + verts[sel].sum(0)
            nv += int(sel.sum())
        both = sel & valid
        if "pose" in batch and both.any():
            R = axis_angle_to_matrix(batch["pose"].to(device).double()[both, :3])   # (b, 3, 3)
            bj = bj + (joints[both] @ R).sum(0)                                    # rows: (R^T x)^T = x^T R
            bv = bv + (verts[both] @ R).sum(0)
            nb += int(both.sum())
    if nv == 0 or nj == 0:
        raise ValueError("mean_pose_baseline: the training set needs samples with 3D joints (or SMPL) "
                         "and with has_smpl=1 to build a mean pose and mesh")
    out = {"joints": sj / nj, "vertices": sv / nv}
    if nb:
        out.update(body_joints=bj / nb, body_vertices=bv / nb)
    return out


def print_table(results, title="Evaluation (mm)"):
    rows = [(name, r) for name, r in results.items() if isinstance(r, dict) and "mpjpe" in r]
    proto = results.get("protocol")
    print(f"\n{title}" + (f" - protocol {proto}" if proto else ""))
    print(f"{'':28s} {'MPJPE':>8s} {'PA-MPJPE':>9s} {'MPVE':>8s} {'N':>6s}")
    for name, r in rows:
        print(f"{name:28s} {r['mpjpe']:8.1f} {r['pa_mpjpe']:9.1f} {r['mpve']:8.1f} {r['num_samples']:6d}")
    if isinstance(results.get("model"), dict) and isinstance(results.get("mean_pose_baseline"), dict):
        ratio = results["model"]["mpjpe"] / results["mean_pose_baseline"]["mpjpe"]
        print(f"MPJPE model / mean-pose baseline = {ratio:.3f}")
    if isinstance(results.get("model"), dict) and "edge_length_ratio" in results["model"]:
        print(f"mean edge length, predicted / ground truth = {results['model']['edge_length_ratio']:.3f}")


def json_safe(x):
    """A results dict with every NaN replaced by None (json.dumps would write invalid NaN)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


if __name__ == "__main__":
    # Smoke test: a prediction 10 mm off everywhere, both protocols.
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(4, 14, 3, generator=g, dtype=torch.float64) * 0.3
    for p in PROTOCOLS:
        moved = gt + torch.tensor([0.0, 0.0, 0.01], dtype=torch.float64)
        pj = protocol_centre(p, moved, moved[:, 2])
        gj = protocol_centre(p, gt, gt[:, 2])
        acc = MetricAccumulator()
        acc.add(pj, gj, torch.ones(4, dtype=torch.bool))
        r = acc.result()
        print(f"{p}: MPJPE {r['mpjpe']:.3f} mm (a translation: 0 after centring), PA {r['pa_mpjpe']:.3f}")
