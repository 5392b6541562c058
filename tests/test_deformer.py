"""Tests for deformer.py (DeFormer) on the tiny icosphere topology (162 -> 42 -> 12 vertices)."""
from dataclasses import replace

import math

import pytest
import torch

import deformer
from deformer import PRESETS, DeFormer, project, reference_points
from sparse_attention import build_scap, mesh_adjacency


def TinyBackbone(chans=(8, 12, 16, 20)):
    """Stand-in backbone: maps at strides 4, 8, 16, 32 (the smoke test's, from deformer.py)."""
    return deformer._StandInBackbone(chans)


def tiny_cfg(**kw):
    base = dict(dim=32, num_heads=4, ffn_dim=64, deform_heads=4, n_points=2, dropout=0.0,
                input_size=(64, 64), blocks_per_level=(2, 2), tile_size=8)
    base.update(kw)
    return replace(PRESETS["tiny"], **base)


def make_model(topo, seed=0, **kw):
    torch.manual_seed(seed)
    return DeFormer(tiny_cfg(**kw), TinyBackbone(), topo)


def test_presets_and_defaults():
    p = PRESETS["paper"]
    assert p.backbone == "hrnet_w48_pose" and p.input_size == (256, 256) and p.dense_recovery
    assert p.scap_orientation == "flow" and p.semantics == "block" and p.ordering == "rcm"
    assert PRESETS["paper-384x288"].input_size == (384, 288)
    assert PRESETS["dense"].mesh_levels[-1] == 0 and PRESETS["dense"].input_size == (256, 256)
    assert PRESETS["hrformer"].backbone == "hrformer_b"
    from backbones import BACKBONES
    assert all(c.backbone in BACKBONES for c in PRESETS.values())       # every preset builds
    assert PRESETS["tiny"].backbone == "hrnet_tiny_pose"
    assert deformer.TRAIN_DEFAULTS["epochs"] == 50


def test_paper_input_gives_the_figures_maps():
    """256x256 through strides 4..32: the official figure's 64x64, 32x32, 16x16 and 8x8 maps."""
    from backbones import build_backbone
    bb = build_backbone("hrnet_tiny_pose")                     # the paper's pose HRNet, tiny widths
    with torch.no_grad():
        feats = bb.forward_features(torch.zeros(1, 3, *PRESETS["paper"].input_size))
    assert [tuple(f.shape[-2:]) for f in feats[-4:]] == [(64, 64), (32, 32), (16, 16), (8, 8)]


@pytest.mark.parametrize("levels,blocks", [((2, 1), (2, 2)), ((2, 1, 0), (1, 1, 1))])
def test_shapes_every_level(icosphere_topology, levels, blocks):
    topo = icosphere_topology
    m = make_model(topo, mesh_levels=levels, blocks_per_level=blocks).eval()
    B, J = 2, 14
    out = m(torch.randn(B, 3, 64, 64))
    nv = topo["num_vertices"]
    assert out["vertices"].shape == (B, nv[0], 3)
    assert out["joints"].shape == (B, J, 3) and out["cam"].shape == (B, 3)
    blocks_levels = [levels[0]] + [l for l, n in zip(levels, blocks) for _ in range(n)]
    expected_levels = blocks_levels + [levels[-1]]                 # + dense mesh recovery
    assert out["level_per_step"] == expected_levels
    for v, j, l in zip(out["vertices_per_step"], out["joints_per_step"], out["level_per_step"]):
        assert v.shape == (B, nv[l], 3) and j.shape == (B, J, 3)
    assert [v.shape[1] for v in out["vertices_per_level"]] == [nv[l] for l in levels]
    assert [r.shape for r in out["ref_points"]] == [(B, J + nv[l], 2) for l in blocks_levels[1:]]
    assert all(torch.isfinite(v).all() for v in out["vertices_per_step"])


def _record_cross_attn(model):
    """Hook every block's cross-attention; returns list of (query, reference_points, shapes)."""
    calls = []
    for stage in model.stages:
        for block in stage:
            block.cross_attn.register_forward_pre_hook(
                lambda mod, args, calls=calls: calls.append((mod, args[0].detach(), args[1].detach(), args[3])))
    return calls


def test_reference_points_follow_camera_and_mesh(icosphere_topology):
    m = make_model(icosphere_topology).eval()
    x = torch.randn(2, 3, 64, 64)
    calls = _record_cross_attn(m)
    with torch.no_grad():
        out = m(x)
    J = m.num_joints
    # Reference point of every block = projection of that block's input coordinates.
    coords0 = torch.cat([out["joints_per_step"][0], out["vertices_per_step"][0]], 1)
    torch.testing.assert_close(calls[0][2], (project(coords0, out["cam"]) + 1) / 2)   # square input
    coords1 = torch.cat([out["joints_per_step"][1], out["vertices_per_step"][1]], 1)
    torch.testing.assert_close(calls[1][2], reference_points(coords1, out["cam"], (64, 64)))
    up = m.upsample(out["vertices_per_step"][2], 2, 1)                          # stage boundary
    coords2 = torch.cat([out["joints_per_step"][2], up], 1)
    torch.testing.assert_close(calls[2][2], reference_points(coords2, out["cam"], (64, 64)))
    mod, q0, ref0, shapes = calls[0]
    loc0 = mod.sampling_locations(q0, ref0, shapes)

    # Change the predicted camera only (bias of the cam outputs): s -> s + 0.3, t -> t + (0.1, -0.2).
    calls.clear()
    with torch.no_grad():
        m.init_head[-1].bias[-3:] += torch.tensor([0.3, 0.1, -0.2])
        out2 = m(x)
    cam2 = out2["cam"]
    torch.testing.assert_close(cam2, out["cam"] + torch.tensor([0.3, 0.1, -0.2]))
    torch.testing.assert_close(out2["vertices_per_step"][0], out["vertices_per_step"][0])
    s2, t2 = cam2[:, None, :1], cam2[:, None, 1:]
    expected = (s2 * (coords0[..., :2] + t2) + 1) / 2
    mod, q1, ref1, _ = calls[0]
    torch.testing.assert_close(ref1, expected)
    torch.testing.assert_close(q1, q0)                      # camera does not change the query
    loc1 = mod.sampling_locations(q1, ref1, shapes)          # (B, N, H, L, P, 2)
    torch.testing.assert_close(loc1 - loc0, (expected - ref0)[:, :, None, None, None, :].expand_as(loc0))

    # Move one coarse vertex by d (bias of its offset outputs): its reference point moves by s*d/2.
    calls.clear()
    k, d = 5, torch.tensor([0.05, -0.08, 0.3])
    with torch.no_grad():
        m.init_head[-1].bias[3 * k:3 * k + 3] += d
        out3 = m(x)
    torch.testing.assert_close(out3["vertices_per_step"][0][:, k] - out2["vertices_per_step"][0][:, k],
                               d.expand(2, 3))
    ref3 = calls[0][2]
    moved = ref3[:, J + k] - ref1[:, J + k]
    torch.testing.assert_close(moved, cam2[:, :1] * d[:2] / 2)
    # and the reference points of the joints move as the joint regressor says
    dj = m.joint_reg_2[:, k, None] * d                                          # (J, 3)
    torch.testing.assert_close(ref3[:, :J] - ref1[:, :J], cam2[:, None, :1] * dj[None, :, :2] / 2)


@pytest.mark.parametrize("size", [(48, 64), (64, 48), (40, 40)])
def test_reference_points_land_on_the_label_pixel(size):
    """Labels normalised by one length L = min(H, W) (u = 2x/L - W/L): the reference point of a
    point projecting to a label must sample the feature pixel under that label, at any H x W."""
    H, W = size
    L = min(H, W)
    g = torch.Generator().manual_seed(0)
    px = torch.stack([torch.randint(0, W, (20,), generator=g), torch.randint(0, H, (20,), generator=g)], 1)
    centre = px.float() + 0.5                                                    # pixel centres
    uv = torch.stack([2 * centre[:, 0] / L - W / L, 2 * centre[:, 1] / L - H / L], 1)   # labels
    # 3D points that the camera (s, tx, ty) projects onto those labels
    cam = torch.tensor([[0.8, 0.1, -0.2]])
    pts = torch.cat([uv / cam[:, :1] - cam[:, 1:], torch.randn(20, 1, generator=g)], 1)[None]
    torch.testing.assert_close(project(pts, cam)[0], uv)
    ref = reference_points(pts, cam, size)                                       # (1, 20, 2)
    torch.testing.assert_close(ref[0] * torch.tensor([W, H]), centre)
    # grid_sample as MSDeformAttn does it: the sampled value is that pixel's value
    img = torch.arange(H * W, dtype=torch.float32).view(1, 1, H, W)
    val = torch.nn.functional.grid_sample(img, 2 * ref[:, :, None] - 1, align_corners=False)
    torch.testing.assert_close(val.flatten(), (px[:, 1] * W + px[:, 0]).float())


def test_non_square_model_uses_image_size(icosphere_topology):
    m = make_model(icosphere_topology, input_size=(64, 48)).eval()
    calls = _record_cross_attn(m)
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 48))
    coords0 = torch.cat([out["joints_per_step"][0], out["vertices_per_step"][0]], 1)
    uv = project(coords0, out["cam"])
    expected = torch.stack([(uv[..., 0] * 48 / 48 + 1) / 2, (uv[..., 1] * 48 / 64 + 1) / 2], -1)
    torch.testing.assert_close(calls[0][2], expected)
    assert [tuple(s) for s in calls[0][3]] == [(16, 12), (8, 6), (4, 3), (2, 2)]


def test_dense_mesh_recovery_identity_at_start_and_shapes(icosphere_topology):
    topo = icosphere_topology
    m = make_model(topo).eval()
    B, J, nv = 2, 14, topo["num_vertices"]
    x = torch.randn(B, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
    # one step more than initial estimate + 4 blocks: the recovery, at the last query level
    assert len(out["vertices_per_step"]) == 1 + 4 + 1 and out["level_per_step"][-1] == 1
    assert out["vertices_per_step"][-1].shape == (B, nv[1], 3) and out["joints"].shape == (B, J, 3)
    assert out["recovery_scale"].shape == (B,) and out["vertices"].shape == (B, nv[0], 3)
    dec_v, dec_j = out["vertices_per_level"][-1], out["joints_per_step"][-2]
    torch.testing.assert_close(out["recovery_scale"], torch.ones(B))
    torch.testing.assert_close(out["vertices_per_step"][-1], dec_v, rtol=0, atol=0)   # identity
    torch.testing.assert_close(out["joints"], dec_j, rtol=0, atol=0)
    torch.testing.assert_close(out["vertices"], m.upsample(dec_v, 1, 0))
    # a global scale of 1.5 about the pelvis: joints and vertices alike, pelvis fixed
    with torch.no_grad():
        m.recovery.scale_head.bias.fill_(math.log(1.5))
        out2 = m(x)
    torch.testing.assert_close(out2["recovery_scale"], torch.full((B,), 1.5))
    pelvis = torch.einsum("v,bvc->bc", m.pelvis_reg_1, dec_v)[:, None]
    torch.testing.assert_close(out2["vertices_per_step"][-1], pelvis + 1.5 * (dec_v - pelvis))
    torch.testing.assert_close(out2["joints"], pelvis + 1.5 * (dec_j - pelvis))
    # the scale depends on the tokens (MLPs), once the last layer is trained
    with torch.no_grad():
        m.recovery.scale_head.weight.normal_(0, 0.1)
        s1 = m(x)["recovery_scale"]
        s2 = m(torch.randn(B, 3, 64, 64))["recovery_scale"]
    assert not torch.allclose(s1, s2)
    off = make_model(topo, dense_recovery=False).eval()
    with torch.no_grad():
        out3 = off(x)
    assert len(out3["vertices_per_step"]) == 1 + 4 and "recovery_scale" not in out3
    assert off.recovery is None


def _tile_members(mask, tile, ordering):
    """(N, N) bool: token j lies in a non-zero tile of token i's tile row (from reorder +
    blockify, independently of BlockSparsePlan; copy of tests/test_sparse_attention.py's)."""
    from sparse_attention import blockify, reorder
    perm = reorder(mask, ordering)
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(len(perm))
    t = pos // tile
    return blockify(mask[perm][:, perm], tile)[t][:, t]


@pytest.mark.parametrize("semantics", ["exact", "block"])
def test_block_is_sparse(icosphere_topology, semantics):
    """A token's output of a whole block (tokens and coordinates) depends only on its SCAP row
    ("exact") or on the tokens of its row's non-zero tiles ("block", the paper preset's)."""
    topo = icosphere_topology
    tile = 8 if semantics == "exact" else 2                   # 56 tokens: small tiles stay sparse
    m = make_model(topo, semantics=semantics, blocks_per_level=(1, 1), tile_size=tile).eval()
    level, J, V = 1, 14, topo["num_vertices"][1]
    block = m.stages[1][0]
    mask = build_scap(mesh_adjacency(topo["faces"][level], V, self_loops=True),
                      topo["skin_weights"][level][:, topo["joint_to_smpl"]],
                      topo["joint_regressor"][level])
    if semantics == "block":
        scap = mask
        mask = _tile_members(scap, tile, "rcm")
        assert torch.equal(mask, block.self_attn.effective_mask())
        assert bool((mask & ~scap).any()) and bool((mask >= scap).all())      # whole tiles
    g = torch.Generator().manual_seed(0)
    B, N, D = 2, J + V, 32
    tokens = torch.randn(B, N, D, generator=g)
    coords = torch.randn(B, N, 3, generator=g) * 0.3
    cam = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.1, -0.1]])
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2)]
    starts = [0, 256, 320, 336]
    memory = torch.randn(B, 340, D, generator=g)
    with torch.no_grad():
        for lin in (block.disp_mlp[-1],):                     # non-trivial displacements
            lin.weight.normal_(0, 0.1, generator=g)
        t0, c0, _ = block(tokens, coords, cam, (64, 64), memory, shapes, starts)
    checked = 0
    for row in [J + 0, J + 7, J + V - 1, 3]:                   # vertices and one joint row
        outside = ~mask[row]
        if not outside.any():
            continue
        t2, c2 = tokens.clone(), coords.clone()
        t2[:, outside] += torch.randn(B, int(outside.sum()), D, generator=g) * 3
        c2[:, outside] += torch.randn(B, int(outside.sum()), 3, generator=g)
        with torch.no_grad():
            t1, c1, _ = block(t2, c2, cam, (64, 64), memory, shapes, starts)
        torch.testing.assert_close(t1[:, row], t0[:, row], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c1[:, row], c0[:, row], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(t1[:, ~mask[row]], t0[:, ~mask[row]])       # others did change
        checked += 1
        # and a token inside the row (a neighbour other than itself) does matter
        inside = mask[row].nonzero().flatten()
        other = int(inside[inside != row][0])
        t3 = tokens.clone()
        t3[:, other] += torch.randn(B, D, generator=g) * 3   # (a constant shift would vanish in LayerNorm)
        with torch.no_grad():
            t4, _, _ = block(t3, coords, cam, (64, 64), memory, shapes, starts)
        assert not torch.allclose(t4[:, row], t0[:, row])
    assert checked >= 3
    assert mask.float().mean() < 0.6                          # really sparse


def test_loss_flags_and_finite(icosphere_topology):
    topo = icosphere_topology
    m = make_model(topo).eval()
    B, V0 = 2, topo["num_vertices"][0]
    out = m(torch.randn(B, 3, 64, 64))
    tg = {"joints3d": torch.cat([torch.randn(B, 14, 3) * 0.2, torch.ones(B, 14, 1)], -1),
          "joints2d": torch.cat([torch.rand(B, 14, 2) * 2 - 1, torch.ones(B, 14, 1)], -1),
          "vertices": torch.randn(B, V0, 3) * 0.2, "has_smpl": torch.tensor([1.0, 0.0]),
          "has_3d": torch.tensor([1.0, 0.0])}
    loss, logs = m.loss(out, tg)
    assert torch.isfinite(loss) and set(logs) >= {"loss", "loss_vertices", "loss_joints3d", "loss_joints2d"}
    tg2 = dict(tg)
    tg2["vertices"] = tg["vertices"].clone()
    tg2["vertices"][1] += 5.0                                  # sample without SMPL: ignored
    tg2["joints3d"] = tg["joints3d"].clone()
    tg2["joints3d"][1, :, :3] += torch.randn(14, 3)            # sample without 3D: ignored
    torch.testing.assert_close(m.loss(out, tg2)[0], loss)
    tg3 = dict(tg)
    tg3["vertices"] = tg["vertices"] + torch.tensor([1.0, 2.0, 3.0])   # GT translation: centred away
    torch.testing.assert_close(m.loss(out, tg3)[0], loss)


def test_overfits_one_batch(icosphere_topology):
    topo = icosphere_topology
    m = make_model(topo, blocks_per_level=(1, 1))
    B, J = 2, 14
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 64, 64, generator=g)
    # GT = a perturbed coarse mesh upsampled to full res, so every level can represent it.
    t2 = topo["template"][2] * torch.tensor([1.0, -1.0, -1.0])
    gt_v = torch.stack([t2 * torch.tensor([1.2, 0.9, 1.0]), t2 * torch.tensor([0.8, 1.1, 1.3])])
    gt_v = m.upsample(gt_v + 0.03 * torch.randn(B, *t2.shape, generator=g), 2, 0)  # (B, 12, 3) -> (B, 162, 3)
    gt_j = torch.einsum("jv,bvc->bjc", topo["joint_regressor"][0], gt_v)
    cam = torch.tensor([[0.9, 0.05, -0.02], [1.1, -0.03, 0.04]])
    ones = torch.ones(B, J, 1)
    tg = {"joints3d": torch.cat([gt_j, ones], -1), "joints2d": torch.cat([project(gt_j, cam), ones], -1),
          "vertices": gt_v, "has_smpl": torch.ones(B), "has_3d": torch.ones(B)}
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    first = None
    for step in range(250):       # about 70 steps are needed
        loss, _ = m.loss(m(x), tg)
        if first is None:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < first / 10:
            break
    assert loss.item() < first / 10, (first, loss.item(), step)


def test_bad_topology_errors(icosphere_topology):
    topo = dict(icosphere_topology)
    del topo["up_index"]
    with pytest.raises(KeyError, match="up_index"):
        make_model(topo)
    topo = dict(icosphere_topology)
    topo["template"] = [topo["template"][0][:10]] + topo["template"][1:]
    with pytest.raises(ValueError, match=r"template'\]\[0\]"):
        make_model(topo)
    with pytest.raises(ValueError, match="coarse -> fine"):
        make_model(icosphere_topology, mesh_levels=(1, 2))


def test_toy_body_topology_shapes():
    from body import BodyModel
    topo = BodyModel().topology()
    m = make_model(topo, blocks_per_level=(1, 1)).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 64, 64))
    nv = topo["num_vertices"]
    assert out["vertices"].shape == (1, nv[0], 3)
    assert [v.shape[1] for v in out["vertices_per_level"]] == [nv[2], nv[1]]
    assert out["joints"].shape == (1, 14, 3)


def test_preset_parameter_counts_and_missing_backbone(icosphere_topology, monkeypatch):
    presets = {"tiny": PRESETS["tiny"], "absent": replace(PRESETS["tiny"], backbone="no_such_net")}
    monkeypatch.setattr(deformer, "PRESETS", presets)
    counts = deformer.preset_parameter_counts(icosphere_topology, backbone_device="cpu")
    from backbones import build_backbone
    n_bb = sum(p.numel() for p in build_backbone("hrnet_tiny_pose").parameters())
    model = DeFormer(PRESETS["tiny"], build_backbone("hrnet_tiny_pose"), icosphere_topology)
    assert counts["tiny"] == (n_bb, sum(p.numel() for p in model.parameters()) - n_bb)
    assert isinstance(counts["absent"], str) and "'no_such_net'" in counts["absent"]
