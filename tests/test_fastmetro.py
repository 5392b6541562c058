"""FastMETRO: parameter counts vs the paper, official key layout, mask semantics, shapes, overfit.

Paper parameter count (Table 1, "transformer" #Params: S 9.2M, M 17.1M, L 24.9M) = every
parameter except the CNN backbone and the 0.744M learnable upsampling layer
(`coarse2intermediate_upsample`, Linear(431, 1723)), i.e. conv_1x1 (2048 -> 512) + both
encoder-decoder transformers + dim_reduce_* + cam/joint/vertex token embeddings + xyz_regressor +
cam_predictor, with 14 joints and 431 / 1723 vertices. The official training script logs
"overall - backbone"; the paper subtracts the upsampling layer. The paper's figures equal this
count truncated to 0.1M (S: 9,297,030 -> "9.2M").
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmetro as fm


def _cfg(preset="tiny", **kw):
    return dataclasses.replace(fm.PRESETS[preset], **kw)


def _smpl_sized_topology(V=(6890, 1723, 431), J=14):
    """Shapes-only topology with SMPL's level sizes (random faces/maps), for counting."""
    g = torch.Generator().manual_seed(0)
    faces = [torch.randint(0, v, (2 * v, 3), generator=g) for v in V]
    return {"num_vertices": list(V), "faces": faces,
            "up_index": [torch.randint(0, V[1], (V[0], 3), generator=g), torch.randint(0, V[2], (V[1], 3), generator=g)],
            "up_weight": [torch.full((V[0], 3), 1 / 3), torch.full((V[1], 3), 1 / 3)],
            "down_index": [torch.arange(V[1]), torch.arange(V[2])],
            "joint_regressor": [torch.zeros(J, V[0])], "h36m_regressor": torch.zeros(17, V[0])}


class _Backbone2048(nn.Module):
    out_channels = 2048

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 2048, 32, 32)

    def forward(self, x):
        return self.proj(x)


def _consistent_topology(topo):
    """Make the H36M pelvis the LSP hip midpoint so token-2D and mesh-2D targets agree exactly."""
    topo = dict(topo)
    h36m = topo["h36m_regressor"].clone()
    jr = topo["joint_regressor"][0]
    h36m[0] = (jr[2] + jr[3]) / 2
    topo["h36m_regressor"] = h36m
    return topo


def _targets(topo, B, seed=0, centre_2d_on_pelvis=True):
    g = torch.Generator().manual_seed(seed)
    t0 = topo["template"][0]
    verts = t0[None] * (1 + 0.2 * torch.rand(B, 1, 3, generator=g)) + 0.02 * torch.randn(B, *t0.shape, generator=g)
    verts = verts + torch.tensor([0.0, 0.0, 3.0])                              # not centred (as from SMPL + transl)
    j3d = torch.einsum("jv,bvc->bjc", topo["joint_regressor"][0], verts)
    pelvis = torch.einsum("v,bvc->bc", topo["h36m_regressor"][0], verts)[:, None]
    jc = j3d - pelvis
    cam = torch.tensor([0.9, 0.05, -0.05])
    j2d = cam[0] * (jc[..., :2] + cam[1:])
    ones = torch.ones(B, j3d.shape[1], 1)
    return {"joints3d": torch.cat([j3d, ones], -1), "joints2d": torch.cat([j2d, ones], -1), "vertices": verts,
            "has_smpl": torch.ones(B), "has_3d": torch.ones(B), "pose": torch.zeros(B, 72),
            "betas": torch.zeros(B, 10), "epoch": 0.0}


# ----------------------------------------------------------------------------- paper numbers
def test_transformer_parameter_counts_match_paper():
    topo = _smpl_sized_topology()
    paper = {"S-R50": 9.2, "M-R50": 17.1, "L-R50": 24.9}
    for name, ref in paper.items():
        model = fm.FastMETRO(fm.PRESETS[name], _Backbone2048(), topo)
        up = sum(p.numel() for p in model.coarse2intermediate_upsample.parameters())
        assert up == 431 * 1723 + 1723 == 744_336                              # the paper's 0.744M
        n = sum(p.numel() for k, p in model.named_parameters()
                if not k.startswith("backbone.") and not k.startswith("coarse2intermediate_upsample."))
        assert math.floor(n / 1e5) / 10 == ref, (name, n)
        assert abs(n / 1e6 - ref) < 0.1, (name, n)


def test_official_key_layout_and_strict_load(icosphere_topology):
    for L in (1, 3):
        model = fm.FastMETRO(_cfg(num_layers=L), fm._StandInBackbone(64), icosphere_topology)
        own = {k for k in model.state_dict() if not k.startswith("backbone.")}
        assert own == set(fm.official_key_names(L))
    cfg = _cfg(use_smpl_param_regressor=True, use_learnable_upsample=True)
    model = fm.FastMETRO(cfg, fm._StandInBackbone(64), icosphere_topology).eval()
    own = {k for k in model.state_dict() if not k.startswith("backbone.")}
    assert own == set(fm.official_key_names(1, smpl_param_regressor=True, learnable_upsample=True))
    # A spot check of the literal official names.
    for k in ("transformer_1.decoder.layers.0.multihead_attn.in_proj_weight", "transformer_2.encoder.norm.bias",
              "dim_reduce_enc_cam.weight", "coarse2intermediate_upsample.weight", "vertex_token_embed.weight",
              "smpl_parameter_regressor.regressor.1.fc_block.4.running_var"):
        assert k in model.state_dict()
    # Strict round trip through a "module."-prefixed (DDP) state dict gives identical outputs.
    other = fm.FastMETRO(cfg, fm._StandInBackbone(64), icosphere_topology).eval()
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    other.load_state_dict(fm.convert_official_state_dict(sd, other), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = model(x), other(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_convert_official_resnet_backbone_keys(icosphere_topology):
    class Named(nn.Module):                                                    # torchvision-style names
        out_channels = 16

        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 4, 4), nn.BatchNorm2d(8)
            self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(2)
            self.layer1, self.layer2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 2, 2)
            self.layer3, self.layer4 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 2, 2)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    src = Named()
    official = nn.Sequential(*list(src.children()))                          # official: children[:-2] of a ResNet
    model = fm.FastMETRO(_cfg(), Named(), icosphere_topology).eval()
    sd = {("backbone." + k): v for k, v in official.state_dict().items()}
    sd.update({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")})
    model.load_state_dict(fm.convert_official_state_dict(sd, model), strict=True)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model.backbone(x), official.eval()(x))


# ----------------------------------------------------------------------------- attention
def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = fm.MultiheadAttention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4).eval()                                 # sequence-first, as the official code
    ref.load_state_dict(ours.state_dict(), strict=True)
    q, k = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = torch.rand(7, 5) > 0.6
    mask[:, 0] = False                                                         # no fully blocked row
    expect = ref(q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1), attn_mask=mask)[0].transpose(0, 1)
    for impl in ("sdpa", "math"):                                              # fused and explicit paths
        ours.impl = impl
        torch.testing.assert_close(ours(q, k, k, attn_mask=mask), expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        fm.MultiheadAttention(32, 4, impl="flash")


def _attention_before_folding(m, query, key, value, attn_mask, mask_draw=fm.dropout_mask):
    """The explicit path as it was before the mask was folded in (out-of-place masked_fill), with
    F.dropout's arithmetic (probabilities x a 0 / 1/keep mask); the mask comes from `mask_draw`
    (None: F.dropout itself, the path before issue 16's dropout_mask)."""
    B, Lq, C = query.shape
    Lk, H = key.shape[1], m.num_heads
    w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    b_q, b_k, b_v = m.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).reshape(B, Lq, H, C // H).transpose(1, 2)
    k = F.linear(key, w_k, b_k).reshape(B, Lk, H, C // H).transpose(1, 2)
    v = F.linear(value, w_v, b_v).reshape(B, Lk, H, C // H).transpose(1, 2)
    attn = (q * (C // H) ** -0.5) @ k.transpose(-2, -1)
    attn = attn.masked_fill(attn_mask, float("-inf"))
    p = m.dropout if m.training else 0.0
    if mask_draw is None or p == 0:
        attn = F.dropout(attn.softmax(-1), p)
    else:
        attn = attn.softmax(-1) * mask_draw(attn.shape, p, attn.dtype)
    out = (attn @ v).transpose(1, 2).reshape(B, Lq, C)
    return m.out_proj(out)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_folded_mask_equals_old_path_with_dropout(impl):
    """Training with dropout: the additive in-place mask gives the old masked_fill path's
    outputs exactly, under the same dropout seed, and its gradients (to rounding: the fused
    softmax-dropout backward orders the sums differently)."""
    torch.manual_seed(0)
    m = fm.MultiheadAttention(32, 4, dropout=0.3, impl=impl).train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    mask = torch.rand(9, 9) > 0.5
    mask.fill_diagonal_(False)
    g = torch.randn(2, 9, 32)
    grads = []
    for f in (lambda: m(x, x, x, attn_mask=mask), lambda: _attention_before_folding(m, x, x, x, mask)):
        torch.manual_seed(7)
        y = f()
        grads.append((y, *torch.autograd.grad(y, [x, *m.parameters()], g)))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1:], grads[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)
    assert not torch.equal(m(x, x, x, attn_mask=mask), grads[0][0])      # dropout is on


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_attention_without_dropout_is_unchanged(impl):
    """Eval mode, and training with p = 0, give the pre-issue-16 path (F.dropout) bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    mask = torch.rand(9, 9) > 0.5
    mask.fill_diagonal_(False)
    for p, train in ((0.3, False), (0.0, True)):
        m = fm.MultiheadAttention(32, 4, dropout=p, impl="math").train(train)
        expect = _attention_before_folding(m, x, x, x, mask, mask_draw=None)
        m.impl = impl
        if impl == "math":
            assert torch.equal(m(x, x, x, attn_mask=mask), expect)
        else:                                           # fused SDPA: same maths, other rounding
            torch.testing.assert_close(m(x, x, x, attn_mask=mask), expect, atol=1e-6, rtol=1e-5)


def test_dropout_mask_keep_rate_scale_and_independence():
    """dropout_mask: keep rate k/65536 (k = round(0.9 * 65536) for p = 0.1), values exactly
    {0, 65536/k}, mean 1, each of the four 16-bit lanes of a 64-bit draw unbiased, neighbours
    uncorrelated, every element written (odd sizes across chunk ends), seeded by torch."""
    k = round(0.9 * 65536)
    shape = (3, fm._MASK_CHUNK // 2 + 1)                         # 1.5 chunks + 3: odd tails
    torch.manual_seed(0)
    mask = fm.dropout_mask(shape, 0.1)
    assert mask.shape == shape and mask.dtype == torch.float32
    scale = torch.tensor(65536 / k, dtype=torch.float32)
    assert set(mask.unique().tolist()) == {0.0, float(scale)}
    keep = (mask > 0).double().flatten()
    n, rate = keep.numel(), k / 65536
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs(float(keep.mean()) - rate) < 5 * sigma
    assert abs(float(mask.double().mean()) - 1.0) < 5 * sigma * float(scale)
    lanes = keep[: n // 4 * 4].view(-1, 4).mean(0)                   # the 4 int16 of each int64
    assert (lanes - rate).abs().max() < 5 * sigma * 2
    centred = keep - keep.mean()
    for lag in (1, 4, 5):
        corr = float((centred[:-lag] * centred[lag:]).mean() / centred.square().mean())
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)
    torch.manual_seed(0)
    assert torch.equal(fm.dropout_mask(shape, 0.1), mask)           # torch's generator seeds it
    assert not torch.equal(fm.dropout_mask(shape, 0.1), mask)
    half = (fm.dropout_mask((1 << 16,), 0.5) > 0).double().mean()
    assert abs(float(half) - 0.5) < 5 * 0.5 / 256
    assert torch.equal(fm.dropout_mask((3, 5), 0.0), torch.ones(3, 5))
    assert torch.equal(fm.dropout_mask((3, 5), 1.0), torch.zeros(3, 5))
    assert fm.dropout_mask((2, 3), 0.5, torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="dropout probability must be in"):
        fm.dropout_mask((2,), 1.5)


def test_softmax_dropout_gradients():
    """The fused CPU softmax-dropout: gradcheck (same seed each call, blocked -inf entries
    included), and the same values and gradients as softmax then x * dropout_mask."""
    s = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    s[..., 2] = float("-inf")                                       # a blocked key (P = 0)
    s.requires_grad_()

    def f(x):
        torch.manual_seed(0)
        return fm.softmax_dropout(x, 0.4)
    assert torch.autograd.gradcheck(f, (s,))
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    g = torch.randn(2, 4, 9, 9)
    torch.manual_seed(1)
    y = fm.softmax_dropout(x, 0.1)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.manual_seed(1)
    y_ref = x.softmax(-1) * fm.dropout_mask(x.shape, 0.1)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(fm.softmax_dropout(x, 0.0), x.softmax(-1))


def test_dropout_is_inverted_dropout_with_that_mask():
    """fm.dropout / fm.Dropout = x * dropout_mask (outputs and gradients); identity in eval;
    the layers of the transformer use it, as the attention probabilities do."""
    x = torch.randn(4, 50, 16, requires_grad=True)
    g = torch.randn(4, 50, 16)
    layer = fm.Dropout(0.25)
    torch.manual_seed(3)
    y = layer(x)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.manual_seed(3)
    mask = fm.dropout_mask(x.shape, 0.25)
    assert torch.equal(y, x * mask) and torch.equal(gx, g * mask)
    assert torch.equal(layer.eval()(x), x) and torch.equal(fm.dropout(x, 0.0), x)
    assert isinstance(layer, nn.Dropout) and not list(layer.parameters())
    with pytest.raises(ValueError, match="inplace"):
        fm.Dropout(0.1, inplace=True).train()(x)
    t = fm.Transformer(32, 4, 1, 1, 64, 0.1)
    assert all(type(mod) is fm.Dropout for mod in t.modules() if isinstance(mod, nn.Dropout))


def test_attention_impl_is_a_config_argument(icosphere_topology):
    model = fm.FastMETRO(_cfg(attention_impl="math"), fm._StandInBackbone(64), icosphere_topology)
    impls = {mod.impl for mod in model.modules() if isinstance(mod, fm.MultiheadAttention)}
    assert impls == {"math"} and not hasattr(fm, "ATTENTION_IMPL")


def test_decoder_mask_semantics(icosphere_topology):
    torch.manual_seed(0)
    model = fm.FastMETRO(_cfg(dropout=0.0), fm._StandInBackbone(64), icosphere_topology).eval()
    J, V2 = model.num_joints, model.num_vertices
    adj = fm.mesh_adjacency(icosphere_topology["faces"][2], V2)
    m = model.attention_mask
    assert not m[:J].any() and not m[:, :J].any()                              # joints see / are seen by all
    assert torch.equal(m[J:, J:], ~adj) and not m.diagonal().any()

    captured = []
    model.transformer_1.decoder.layers[0].self_attn.register_forward_hook(lambda mod, i, o: captured.append(o))
    x = torch.randn(1, 3, 224, 224)
    v = 0
    u = int((~adj[v]).nonzero()[0])                                           # a non-neighbour of v
    w = int((adj[v] & (torch.arange(V2) != v)).nonzero()[0])                  # a neighbour of v
    with torch.no_grad():
        model(x)
        model.vertex_token_embed.weight[u] += torch.randn(model.vertex_token_embed.weight.shape[1])
        model(x)
    a, b = captured[0][0], captured[1][0]                                      # (J+V2, C) stage-1 decoder self-attn
    torch.testing.assert_close(a[J + v], b[J + v], atol=1e-6, rtol=0)         # v cannot see u
    assert not torch.allclose(a[J + u], b[J + u])
    assert not torch.allclose(a[:J], b[:J])                                    # joints see u
    captured.clear()
    with torch.no_grad():
        model.vertex_token_embed.weight[w] += torch.randn(model.vertex_token_embed.weight.shape[1])
        model(x)
    assert not torch.allclose(b[J + v], captured[0][0][J + v])               # a neighbour changes v


def test_sine_position_encoding():
    pe = fm.PositionEmbeddingSine(8)(3, 4)
    assert pe.shape == (12, 16)
    assert torch.all(pe.abs() <= 1)
    # y part constant along a row, x part constant along a column (row-major flattening)
    grid = pe.reshape(3, 4, 16)
    assert torch.allclose(grid[:, :1, :8].expand(3, 4, 8), grid[..., :8])
    assert torch.allclose(grid[:1, :, 8:].expand(3, 4, 8), grid[..., 8:])


# ----------------------------------------------------------------------------- shapes and loss
def test_output_shapes_and_loss_icosphere(icosphere_topology):
    topo = icosphere_topology
    model = fm.FastMETRO(_cfg(), fm._StandInBackbone(64), topo)
    out = model(torch.randn(3, 3, 224, 224))
    V0, V1, V2 = topo["num_vertices"]
    assert out["vertices"].shape == (3, V0, 3) and out["vertices_intermediate"].shape == (3, V1, 3)
    assert out["vertices_coarse"].shape == (3, V2, 3) and out["joints"].shape == (3, 14, 3)
    assert out["cam"].shape == (3, 3)
    t = _targets(topo, 3)
    loss, logs = model.loss(out, t)
    loss.backward()
    assert torch.isfinite(loss) and set(logs) >= {"loss", "loss_3d_joints", "loss_vertices", "loss_edge_normal",
                                                  "loss_2d_joints"}
    # No 3D / no mesh labels: those terms vanish, the loss stays finite.
    t0 = dict(t, has_smpl=torch.zeros(3), has_3d=torch.zeros(3))
    loss0, logs0 = model.loss(model(torch.randn(3, 3, 224, 224)), t0)
    assert torch.isfinite(loss0) and logs0["loss_vertices"] == 0 and logs0["loss_3d_joints"] == 0


def test_fixed_upsampling_is_barycentric(icosphere_topology):
    model = fm.FastMETRO(_cfg(), fm._StandInBackbone(64), icosphere_topology)
    v1 = torch.randn(2, icosphere_topology["num_vertices"][1], 3)
    U = torch.zeros(icosphere_topology["num_vertices"][0], v1.shape[1])
    U.scatter_add_(1, icosphere_topology["up_index"][0], icosphere_topology["up_weight"][0])
    torch.testing.assert_close(fm.upsample_mesh(v1, model.up_index_0, model.up_weight_0), U @ v1)


def test_smpl_param_regressor_outputs_rotations(icosphere_topology):
    model = fm.FastMETRO(_cfg(use_smpl_param_regressor=True), fm._StandInBackbone(64), icosphere_topology)
    out = model(torch.randn(4, 3, 224, 224))
    R = out["rotmat"]
    assert R.shape == (4, 24, 3, 3) and out["betas"].shape == (4, 10)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3).expand_as(R), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(4, 24), atol=1e-4, rtol=0)
    loss, logs = model.loss(out, _targets(icosphere_topology, 4))
    loss.backward()
    assert "loss_smpl_param" in logs
    assert model.transformer_1.encoder.layers[0].linear1.weight.grad.abs().max() < 1e-3  # main loss x 1e-8


def test_bad_inputs_raise_clear_errors(icosphere_topology):
    model = fm.FastMETRO(_cfg(), fm._StandInBackbone(64), icosphere_topology)
    with pytest.raises(ValueError, match="fastmetro.py"):
        model(torch.randn(1, 1, 224, 224))
    bad = {k: v for k, v in icosphere_topology.items() if k != "up_index"}
    with pytest.raises(KeyError, match="up_index"):
        fm.FastMETRO(_cfg(), fm._StandInBackbone(64), bad)
    out = model(torch.randn(2, 3, 224, 224))
    t = _targets(icosphere_topology, 2)
    t["joints3d"] = t["joints3d"][:, :, :3]
    with pytest.raises(ValueError, match="joints3d"):
        model.loss(out, t)


def test_toy_body_shapes():
    body = pytest.importorskip("body")
    topo = body.BodyModel().topology()
    V0, V1, V2 = topo["num_vertices"]
    model = fm.FastMETRO(_cfg(), fm._StandInBackbone(64), topo)
    out = model(torch.randn(2, 3, 224, 224))
    assert out["vertices"].shape == (2, V0, 3) and out["vertices_intermediate"].shape == (2, V1, 3)
    assert out["vertices_coarse"].shape == (2, V2, 3) and out["joints"].shape == (2, 14, 3)
    assert model.attention_mask.shape == (14 + V2, 14 + V2)
    g = torch.Generator().manual_seed(0)
    verts = topo["template"][0][None] + 0.01 * torch.randn(2, V0, 3, generator=g)
    t = {"joints3d": torch.cat([torch.einsum("jv,bvc->bjc", topo["joint_regressor"][0], verts),
                                torch.ones(2, 14, 1)], -1),
         "joints2d": torch.cat([torch.rand(2, 14, 2, generator=g) * 2 - 1, torch.ones(2, 14, 1)], -1),
         "vertices": verts, "has_smpl": torch.ones(2), "has_3d": torch.ones(2)}
    loss, _ = model.loss(out, t)
    loss.backward()
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- training
def test_tiny_overfits_one_batch(icosphere_topology):
    torch.manual_seed(0)
    topo = _consistent_topology(icosphere_topology)
    model = fm.FastMETRO(_cfg(dropout=0.0), fm._StandInBackbone(64), topo).train()
    x = torch.randn(2, 3, 64, 64)                                              # 2x2 feature grid: fast
    t = _targets(topo, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    first = None
    for step in range(300):
        loss, _ = model.loss(model(x), t)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if loss.item() < first / 10:
            break
    assert loss.item() < first / 10, (first, loss.item(), step)


def test_convert_official_keys_with_backbones_resnet(icosphere_topology):
    backbones = pytest.importorskip("backbones")
    model = fm.FastMETRO(_cfg(), backbones.build_backbone("resnet_tiny"), icosphere_topology).eval()
    inverse = {v: k for k, v in fm._RESNET_SEQ.items()}
    official = {}
    for k, v in model.state_dict().items():                                    # official Sequential layout
        if k.startswith("backbone."):
            head, _, rest = k[len("backbone."):].partition(".")
            k = f"backbone.{inverse.get(head, head)}.{rest}"
        official["module." + k] = v.clone()
    official["module.backbone.fc.weight"] = torch.zeros(10, model.backbone.out_channels)  # unused head
    assert "module.backbone.4.0.conv1.weight" in official
    model.load_state_dict(fm.convert_official_state_dict(official, model), strict=True)


def test_camera_frame_is_the_2d_loss_frame(icosphere_topology):
    """The predicted camera projects pelvis-centred meshes (the 2D loss does): camera_frame removes
    any offset of the raw vertices, and projecting its joints gives the mesh-joint 2D loss's input."""
    topo = icosphere_topology
    model = fm.FastMETRO(_cfg(), fm._StandInBackbone(64), topo).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    v = out["vertices"]
    shifted = v + torch.tensor([0.3, -0.2, 0.5])
    torch.testing.assert_close(model.camera_frame(shifted), model.camera_frame(v), atol=1e-6, rtol=0)
    assert (fm.weak_perspective_project(shifted, out["cam"]) - fm.weak_perspective_project(v, out["cam"])).abs().max() > 1e-3
    # the frame's origin is the regressed pelvis, the point the loss centres the mesh joints on
    pelvis = torch.einsum("v,bvc->bc", model.pelvis_regressor, model.camera_frame(shifted))
    assert pelvis.abs().max() < 1e-6
