"""Metrics: PA-MPJPE removes similarity transforms, MPJPE measures known offsets, masking works."""
import math

import torch

import evaluate as ev


def random_rotation(gen):
    q = torch.randn(4, generator=gen, dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q
    return torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def test_pa_mpjpe_of_similarity_copy_is_zero():
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(5, 14, 3, generator=g, dtype=torch.float64)
    pred = torch.stack([2.5 * gt[i] @ random_rotation(g).T + torch.randn(3, generator=g, dtype=torch.float64)
                        for i in range(5)])
    assert ev.mpjpe(pred, gt).min() > 0.1                       # really transformed
    assert torch.allclose(ev.pa_mpjpe(pred, gt), torch.zeros(5, dtype=torch.float64), atol=1e-9)


def test_pa_mpjpe_does_not_undo_a_reflection():
    g = torch.Generator().manual_seed(1)
    gt = torch.randn(3, 14, 3, generator=g, dtype=torch.float64)
    mirrored = gt * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    assert (ev.pa_mpjpe(mirrored, gt) > 1e-3).all()


def test_mpjpe_of_known_offset_is_that_offset():
    gt = torch.randn(4, 14, 3, dtype=torch.float64)
    offset = torch.tensor([0.03, -0.04, 0.0], dtype=torch.float64)    # 5 cm
    assert torch.allclose(ev.mpjpe(gt + offset, gt), torch.full((4,), 0.05, dtype=torch.float64))


def test_confidence_masks_joints():
    gt = torch.zeros(1, 14, 3)
    pred = gt.clone()
    pred[0, 5] = torch.tensor([1.0, 0, 0])       # a big error on joint 5
    conf = torch.ones(1, 14)
    assert math.isclose(ev.mpjpe(pred, gt, conf).item(), 1 / 14, rel_tol=1e-6)
    conf[0, 5] = 0
    assert ev.mpjpe(pred, gt, conf).item() == 0.0


def test_alignment_modes():
    j = torch.randn(2, 14, 3)
    pelvis = torch.randn(2, 3)
    assert torch.allclose(ev.centre(j, "pelvis", pelvis), j - pelvis[:, None])
    hip = ev.centre(j, "hip")
    assert torch.allclose((hip[:, 2] + hip[:, 3]) / 2, torch.zeros(2, 3), atol=1e-6)


def test_accumulator_reports_millimetres_and_per_joint():
    acc = ev.MetricAccumulator()
    gt = torch.randn(3, 14, 3)
    pred = gt + torch.tensor([0.0, 0.0, 0.01])                              # 10 mm everywhere
    acc.add(pred, gt, torch.ones(3, dtype=torch.bool))
    res = acc.result()
    assert abs(res["mpjpe"] - 10.0) < 1e-3
    assert res["pa_mpjpe"] < 1e-3
    assert all(abs(v - 10.0) < 1e-3 for v in res["per_joint_mpjpe"].values())


def test_mean_pose_true_orientation_reference():
    """The body-frame mean pose turned by each sample's true orientation: exact when every sample
    has the same articulation and shape (only the orientation differs), while the camera-frame
    mean (the mean-pose baseline) is far off; samples without SMPL are not counted."""
    import numpy as np

    import data
    import metrics
    from body import BodyModel
    body = BodyModel().eval()                                     # the toy body
    g = torch.Generator().manual_seed(0)
    n = 6
    articulation = (torch.rand(1, 69, generator=g) - 0.5) * 0.6
    orient = torch.randn(n, 3, generator=g, dtype=torch.float64)  # any orientation
    pose = torch.cat([orient.float(), articulation.expand(n, -1)], 1)
    betas = torch.randn(1, 10, generator=g).expand(n, -1) * 0.5
    with torch.no_grad():
        verts = body(betas, pose)["vertices"]
    S = torch.tensor(data.h36m_to_j24(body.h36m_joints(verts).numpy().astype(np.float64)), dtype=torch.float32)
    batch = {"pose": pose, "betas": betas, "joints3d": S, "has_3d": torch.ones(n),
             "has_smpl": torch.ones(n)}
    base = metrics.mean_pose_baseline([batch], body, torch.device("cpu"))
    res = metrics.evaluate(None, [batch], body, torch.device("cpu"), baseline=base)
    oriented, mean = res["mean_pose_true_orientation"], res["mean_pose_baseline"]
    assert oriented["mpjpe"] < 0.01 and oriented["mpve"] < 0.01 and oriented["pa_mpjpe"] < 0.01   # mm
    assert mean["mpjpe"] > 50 and mean["mpve"] > 50
    half = dict(batch, has_smpl=torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert metrics.evaluate(None, [half], body, torch.device("cpu"), baseline=base)[
        "mean_pose_true_orientation"]["num_samples"] == 3
