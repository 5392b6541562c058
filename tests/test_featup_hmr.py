"""Tests for featup_hmr.py: FeatUp JBU upsampler (shapes, reduction to a spatial filter),
FeatUp pre-training, 6D rotations, mean-parameter start, frozen backbone, overfitting a batch.

Small stand-ins throughout: a tiny ViT-like module with forward_features (64x48 images -> 4x3
tokens) and a linear body model on the icosphere topology (conftest), so the file stays fast.
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featup
import featup_hmr as fh


# ----------------------------------------------------------------------------- stand-ins
class TinyViT(nn.Module):
    """ViT-like: 16x16 patch embedding + two token-mixing blocks; maps after block 1 and 2."""

    def __init__(self, dim=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed = nn.Conv2d(3, dim, 16, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU())
                                    for _ in range(2))
        self.dropout = nn.Dropout(0.5)  # must be disabled: the model keeps the backbone in eval
        self.feature_channels = [dim, dim]
        self.out_channels = dim

    def forward_features(self, x):
        x = self.dropout(self.patch_embed(x))                 # (B, C, H/16, W/16)
        outs = []
        for blk in self.blocks:
            x = x + blk(x)
            outs.append(x)
        return outs


class LinearBody(nn.Module):
    """Body stand-in: vertices = template + A (R - I) + S betas, joints = J v (linear)."""

    def __init__(self, topology, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        v = topology["template"][0]
        V = v.shape[0]
        self.register_buffer("v_template", v.clone())
        self.register_buffer("pose_dirs", torch.randn(24 * 9, V * 3, generator=g) * 0.02)
        self.register_buffer("shape_dirs", torch.randn(10, V * 3, generator=g) * 0.02)
        self.register_buffer("J", torch.softmax(torch.randn(24, V, generator=g) * 3, 1))
        self.register_buffer("H36M", topology["h36m_regressor"].clone())

    def forward(self, betas, pose):
        B = betas.shape[0]
        eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
        d = (pose - eye).reshape(B, -1) @ self.pose_dirs + betas @ self.shape_dirs
        v = self.v_template + d.reshape(B, -1, 3)
        return {"vertices": v, "joints": self.J @ v}

    def h36m_joints(self, vertices):
        return self.H36M @ vertices


def tiny_cfg(**kw):
    base = dict(input_size=(64, 48), d_model=32, num_layers=1, num_heads=4, num_points=2,
                dim_feedforward=32, dropout=0.0, jbu_key_dim=8, jbu_radius=2, upsample_factor=4)
    base.update(kw)
    return replace(fh.PRESETS["tiny"], **base)


def make_model(topology, **kw):
    torch.manual_seed(0)
    return fh.FeatUpHMR(tiny_cfg(**kw), TinyViT(), topology, LinearBody(topology))


def smooth_images(n, h=64, w=48, seed=0):
    """Piecewise-smooth synthetic images: blurred random blobs + edges, ImageNet-like range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h // 8, w // 8, generator=g)
    x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False)
    x = x + (torch.rand(n, 3, 1, 1, generator=g) > 0.5) * (torch.arange(w) > w // 2)
    return (x - 0.5) / 0.25


def make_targets(body, topology, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    pose = torch.randn(B, 72, generator=g) * 0.3
    betas = torch.randn(B, 10, generator=g)
    R = fh.axis_angle_to_matrix(pose.reshape(B, 24, 3))
    v = body(betas, R)["vertices"]
    j = body.h36m_joints(v)[:, fh.H36M_TO_LSP]
    cam = torch.tensor([1.0, 0.1, -0.1]).expand(B, 3)
    ones = torch.ones(B, 14, 1)
    return {"joints3d": torch.cat([j, ones], -1),
            "joints2d": torch.cat([fh.weak_perspective_project(j, cam), ones], -1),
            "vertices": v, "has_smpl": torch.ones(B), "has_3d": torch.ones(B),
            "pose": pose, "betas": betas, "epoch": 0.0}


# ----------------------------------------------------------------------------- rotations
def test_rot6d_gives_rotations():
    x = torch.randn(1000, 6, dtype=torch.float64)
    R = fh.rot6d_to_matrix(x)
    eye = torch.eye(3, dtype=torch.float64).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.det(R), torch.ones(1000, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(fh.rot6d_to_matrix(fh.matrix_to_rot6d(R)), R, atol=1e-10, rtol=0)
    aa = torch.randn(50, 3, dtype=torch.float64)
    Ra = fh.axis_angle_to_matrix(aa)
    torch.testing.assert_close(torch.det(Ra), torch.ones(50, dtype=torch.float64))
    with pytest.raises(ValueError, match="rot6d_to_matrix"):
        fh.rot6d_to_matrix(torch.randn(4, 5))


# ----------------------------------------------------------------------------- model
def test_mean_parameters_at_step_zero(icosphere_topology):
    for kw in ({}, {"decoder": "dense", "upsampler": "none"}):
        model = make_model(icosphere_topology, **kw).eval()
        # mean from "training data": every sample has the same pose and betas
        pose = (torch.randn(1, 72) * 0.4).expand(20, 72)
        betas = torch.randn(1, 10).expand(20, 10)
        mean = fh.mean_params_from_dataset(pose, betas)
        R_true = fh.axis_angle_to_matrix(pose[0].reshape(24, 3))
        torch.testing.assert_close(fh.rot6d_to_matrix(mean["pose_6d"]), R_true, atol=1e-5, rtol=0)
        model.set_mean_params(mean)
        out = model(smooth_images(3))
        torch.testing.assert_close(out["pose_rotmat"], R_true.expand(3, 24, 3, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["betas"], betas[:3])
        torch.testing.assert_close(out["cam"], mean["cam"].expand(3, 3))
        body = model.body_model(betas[:3], R_true.expand(3, 24, 3, 3))
        torch.testing.assert_close(out["vertices"], body["vertices"], atol=1e-5, rtol=0)
        assert out["joints"].shape == (3, 14, 3) and out["joints2d"].shape == (3, 14, 2)


def test_frozen_backbone_gets_no_gradient(icosphere_topology):
    model = make_model(icosphere_topology).train()
    assert not model.backbone.training                      # kept in eval (dropout off)
    out = model(smooth_images(2))
    targets = make_targets(model.body_model, icosphere_topology, 2)
    loss, logs = model.loss(out, targets)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    assert model.upsamplers[0].stages[0].range_temp.grad is not None   # JBU trained end to end
    assert model.dec_pose.weight.grad is not None
    assert set(logs) >= {"loss", "loss_pose", "loss_betas", "loss_joints3d", "loss_joints2d",
                         "loss_vertices"}


def test_variants_shapes_and_errors(icosphere_topology):
    V = icosphere_topology["num_vertices"][0]
    for kw, L in (({"upsampler": "bilinear"}, 4), ({"upsampler": "none"}, 2),
                  ({"decoder": "dense"}, 4), ({"upsample_factor": 8}, 4)):
        model = make_model(icosphere_topology, **kw)
        levels = model.feature_levels(smooth_images(2))
        assert len(levels) == L
        out = model(smooth_images(2))
        assert out["vertices"].shape == (2, V, 3) and out["pose_rotmat"].shape == (2, 24, 3, 3)
        assert out["betas"].shape == (2, 10) and out["cam"].shape == (2, 3)
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(2, 64, 48))
    with pytest.raises(ValueError, match=r"targets\['pose'\]"):
        t = make_targets(model.body_model, icosphere_topology, 2)
        t["pose"] = t["pose"][:, :69]
        model.loss(model(smooth_images(2)), t)
    with pytest.raises(ValueError, match="upsampler must be"):
        make_model(icosphere_topology, upsampler="carafe")


# ----------------------------------------------------------------------------- FeatUp checkpoint
def test_model_loads_and_freezes_a_pretrained_upsampler(icosphere_topology, tmp_path):
    torch.manual_seed(0)
    vit = TinyViT()
    pre, _ = featup.pretrain_upsampler(vit, smooth_images(4, seed=1), factor=4, steps=2, batch_size=2,
                                       n_jitters=1, max_pad=4, proj_dim=None, key_dim=8, radius=2,
                                       warmup_clip_steps=0)
    path = tmp_path / "jbu.pt"
    featup.save_upsampler_ckpt(path, pre)
    model = fh.FeatUpHMR(tiny_cfg(jbu_radius=2, upsampler_ckpt=str(path)), vit, icosphere_topology,
                         LinearBody(icosphere_topology))
    for a, b in zip(model.upsamplers.state_dict().values(), pre.upsamplers.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in model.upsamplers.parameters())
    with pytest.raises(ValueError, match="factor"):
        fh.FeatUpHMR(tiny_cfg(jbu_radius=2, upsample_factor=8, upsampler_ckpt=str(path)), vit,
                     icosphere_topology, LinearBody(icosphere_topology))
    # rebuilt from its own state dict without the file: same weights, same freezing, same output
    over = fh.restore_overrides({"jbu_radius": 2, "upsampler_ckpt": str(path), "mean_params_path": "gone.pt"})
    assert over == {"jbu_radius": 2, "freeze_upsampler": True}
    path.unlink()
    again = fh.FeatUpHMR(tiny_cfg(**over), TinyViT(seed=1), icosphere_topology, LinearBody(icosphere_topology))
    again.load_state_dict(model.state_dict())
    assert not any(p.requires_grad for p in again.upsamplers.parameters())
    x = smooth_images(2)
    torch.testing.assert_close(again.eval()(x)["vertices"], model.eval()(x)["vertices"])


# ----------------------------------------------------------------------------- overfitting
def test_tiny_model_overfits_one_batch(icosphere_topology):
    model = make_model(icosphere_topology).train()
    images = smooth_images(4, seed=3)
    targets = make_targets(model.body_model, icosphere_topology, 4, seed=3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = model.loss(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.15 * losses[0], (losses[0], losses[-1])


def test_tiny_preset_with_repository_backbone(icosphere_topology):
    backbones = pytest.importorskip("backbones")
    cfg = fh.PRESETS["tiny"]
    vit = backbones.build_backbone(cfg.backbone, **cfg.backbone_kwargs)
    model = fh.FeatUpHMR(cfg, vit, icosphere_topology, LinearBody(icosphere_topology))
    out = model(torch.randn(2, 3, *cfg.input_size))
    assert out["joints"].shape == (2, 14, 3)
    assert len(model.feature_levels(torch.randn(1, 3, *cfg.input_size))) == cfg.num_levels


def test_pretrain_cli_writes_loadable_checkpoint(tmp_path, icosphere_topology):
    pytest.importorskip("backbones")
    images = (smooth_images(4) * 0.25 + 0.5).clamp(0, 1)          # [0, 1] images as a .pt file
    torch.save(images, tmp_path / "imgs.pt")
    out = tmp_path / "jbu.pt"
    losses = fh._pretrain_cli(["--images", str(tmp_path / "imgs.pt"), "--backbone", "vit_tiny",
                               "--out", str(out), "--steps", "2", "--batch-size", "2",
                               "--n-jitters", "1", "--max-pad", "4", "--input-size", "64", "48"])
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    model = fh.build_featup_hmr("tiny", body_model=LinearBody(icosphere_topology),
                                topology=icosphere_topology, upsampler_ckpt=str(out),
                                input_size=(64, 48))
    assert not any(p.requires_grad for p in model.upsamplers.parameters())
    assert model(smooth_images(1))["vertices"].shape == (1, 162, 3)


def test_tiny_preset_trains_with_toy_body():
    """The 'tiny' preset with the repository's vit_tiny and the toy body (V=6890): a train step
    runs and every output has its contract shape (the timing is reported by bench.py)."""
    backbones = pytest.importorskip("backbones")
    body = pytest.importorskip("body")
    cfg = fh.PRESETS["tiny"]
    bm = body.BodyModel()
    model = fh.FeatUpHMR(cfg, backbones.build_backbone(cfg.backbone, **cfg.backbone_kwargs), None, bm)
    B = 2
    pose = torch.randn(B, 72) * 0.2
    betas = torch.randn(B, 10) * 0.5
    v = bm(betas, pose)["vertices"]
    j = bm.h36m_joints(v)[:, fh.H36M_TO_LSP]
    ones = torch.ones(B, 14, 1)
    targets = {"joints3d": torch.cat([j, ones], -1), "joints2d": torch.rand(B, 14, 3),
               "vertices": v, "has_smpl": torch.ones(B), "has_3d": torch.ones(B), "pose": pose,
               "betas": betas, "epoch": 0.0}
    out = model(torch.randn(B, 3, *cfg.input_size))
    assert out["vertices"].shape == (B, bm.num_vertices, 3) and out["joints"].shape == (B, 14, 3)
    loss, logs = model.loss(out, targets)
    loss.backward()
    assert math.isfinite(logs["loss"]) and model.dec_pose.weight.grad is not None


def test_trained_model_evaluates_with_the_upsampler_file_gone(tmp_path):
    """train.py --set upsampler_ckpt=FILE, then FILE is moved away: evaluate.py (and the demo's
    loader) rebuild the model from the checkpoint alone, with the same weights and freezing."""
    pytest.importorskip("backbones")
    import data
    import evaluate
    import train
    data.generate_synthetic(tmp_path / "synth", 4, split="train", seed=0, size=64)
    jbu = tmp_path / "jbu.pt"
    featup.main(["--images", str(tmp_path / "synth" / "images" / "train"), "--backbone", "vit_tiny",
                 "--layers", "2", "4", "--factor", "2", "--out", str(jbu), "--steps", "1",
                 "--batch-size", "2", "--n-jitters", "1", "--max-pad", "4", "--workers", "0"])
    run = tmp_path / "run"
    train.train(train.parse_args([
        "--model", "featup_hmr", "--preset", "tiny", "--train", str(tmp_path / "synth" / "train.npz"),
        "--out", str(run), "--steps", "1", "--batch-size", "2", "--workers", "0", "--no-progress",
        "--device", "cpu", "--set", f"upsampler_ckpt={jbu}"]))
    trained = train.load_checkpoint(run / "last.pt")["model"]
    jbu.rename(tmp_path / "moved.pt")
    model, _, _ = train.load_model_from_checkpoint(run / "last.pt", "cpu")
    assert not any(p.requires_grad for p in model.upsamplers.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k])
    res = evaluate.main(["--ckpt", str(run / "last.pt"), "--data", str(tmp_path / "synth" / "train.npz"),
                         "--workers", "0", "--device", "cpu", "--batch-size", "2",
                         "--out", str(tmp_path / "eval.json")])
    assert math.isfinite(res["model"]["mpjpe"])
