"""TORE: ITP clustering, GTR/ITP switches and token counts, NSR mask, official keys, loss, overfit."""
import dataclasses

import pytest
import torch

import fastmetro as fm
import tore
from test_fastmetro import _consistent_topology, _targets


def _cfg(preset="tiny", **kw):
    return dataclasses.replace(tore.PRESETS[preset], **kw)


def _model(topo, **kw):
    return tore.TORE(_cfg(**kw), fm._StandInBackbone(64), topo)


@pytest.mark.parametrize("keep_ratio,M", [(0.8, 39), (0.5, 24)])
def test_itp_clusters_sum_to_one_over_positions(icosphere_topology, keep_ratio, M):
    model = _model(icosphere_topology, keep_ratio=keep_ratio)
    out = model(torch.randn(2, 3, 224, 224))
    c = out["clusters"]
    assert c.shape == (2, M, 49) and model.keep_num == M
    assert torch.all(c >= 0)
    torch.testing.assert_close(c.sum(-1), torch.ones(2, M))


@pytest.mark.parametrize("gtr,itp", [(True, True), (True, False), (False, True), (False, False)])
def test_switches_change_token_counts(icosphere_topology, gtr, itp):
    topo = icosphere_topology
    J, V2 = 14, topo["num_vertices"][2]
    model = _model(topo, use_gtr=gtr, use_itp=itp).eval()
    seen = {}
    hook = lambda name: (lambda mod, args, out: seen.__setitem__(name, args[0].shape[1]))
    model.transformer_1.encoder.layers[0].register_forward_hook(hook("enc1"))
    model.transformer_1.decoder.layers[0].register_forward_hook(hook("dec1"))
    model.transformer_2.decoder.layers[0].register_forward_hook(hook("dec2"))
    if gtr:
        model.transformer_3.encoder.layers[0].register_forward_hook(hook("enc3"))
        model.transformer_3.decoder.layers[0].register_forward_hook(hook("dec3"))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    image_tokens = 39 if itp else 49                                           # int(49 * 0.8) or all 7x7
    assert seen["enc1"] == 1 + image_tokens                                    # camera + image tokens
    assert seen["dec1"] == seen["dec2"] == (J if gtr else J + V2)              # body tokens only with GTR
    if gtr:
        assert seen["enc3"] == 1 + J and seen["dec3"] == V2                    # NSR: [cam; joints] -> vertices
        assert not hasattr(model, "coarse2intermediate_upsample")             # fixed upsampling only
    assert ("clusters" in out) == itp
    assert out["vertices"].shape == (1, topo["num_vertices"][0], 3)
    loss, logs = model.loss(out, _targets(topo, 1))
    assert torch.isfinite(loss) and (("loss_itp" in logs) == itp)


def test_official_key_layout(icosphere_topology):
    for L in (1, 2):
        model = _model(icosphere_topology, num_layers=L)
        own = {k for k in model.state_dict() if not k.startswith("backbone.")}
        assert own == set(tore.official_key_names(L))
        assert model.state_dict()["layer_norm.weight"].shape == (39, 64)       # LayerNorm([M, d1])
    model = _model(icosphere_topology, num_layers=2, nsr_enc_layers=1)
    own = {k for k in model.state_dict() if not k.startswith("backbone.")}
    assert own == set(tore.official_key_names(2, nsr_enc_layers=1))


def test_nsr_vertex_mask_semantics(icosphere_topology):
    torch.manual_seed(0)
    model = _model(icosphere_topology, dropout=0.0).eval()
    V2 = model.num_vertices
    adj = fm.mesh_adjacency(icosphere_topology["faces"][2], V2)
    assert torch.equal(model.attention_mask, ~adj)
    captured = []
    model.transformer_3.decoder.layers[0].self_attn.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    x = torch.randn(1, 3, 224, 224)
    v = 0
    u = int((~adj[v]).nonzero()[0])
    with torch.no_grad():
        model(x)
        model.vertex_token_embed.weight[u] += torch.randn(model.vertex_token_embed.weight.shape[1])
        model(x)
    torch.testing.assert_close(captured[0][v], captured[1][v], atol=1e-6, rtol=0)
    assert not torch.allclose(captured[0][u], captured[1][u])


def test_itp_mask_and_loss():
    h = w = 7
    # x in [-1, 1] -> col = floor((x + 1) / 2 * 7); y likewise -> row.
    pts = torch.tensor([[[-0.99, -0.99], [0.99, -0.99], [0.0, 0.5], [1.5, 0.0]]])  # last one is outside
    m = tore.itp_mask(pts, h, w)
    expect = torch.zeros(1, 49)
    expect[0, [0 * 7 + 0, 0 * 7 + 6, 5 * 7 + 3]] = 1
    assert torch.equal(m, expect)
    # A cluster concentrated on a body cell costs nothing, on a background cell it costs.
    on, off = torch.full((1, 1, 49), 0.001), torch.full((1, 1, 49), 0.001)
    on[0, 0, 5 * 7 + 3] = 1.0
    off[0, 0, 3 * 7 + 3] = 1.0
    has = torch.ones(1)
    assert tore.itp_loss(on, pts, has, h, w).item() == pytest.approx(0.0, abs=1e-6)
    assert tore.itp_loss(off, pts, has, h, w).item() == pytest.approx(1.0, abs=1e-6)
    assert tore.itp_loss(off, pts, torch.zeros(1), h, w).item() == 0.0
    # Schedule: 1e-3 * sigmoid(epoch - 3), increasing, half at epoch 3.
    ws = [tore.itp_loss_weight(e) for e in (0.0, 3.0, 10.0, 60.0)]
    assert ws[1] == pytest.approx(0.5e-3) and ws == sorted(ws) and ws[-1] == pytest.approx(1e-3)


def test_itp_loss_pulls_clusters_to_body(icosphere_topology):
    model = _model(icosphere_topology)
    out = model(torch.randn(2, 3, 224, 224))
    t = dict(_targets(icosphere_topology, 2), epoch=10.0)
    loss, logs = model.loss(out, t)
    loss.backward()
    assert logs["loss_itp"] > 0 and model.token_selector_fc.weight.grad.abs().sum() > 0
    assert logs["itp_weight"] == pytest.approx(1e-3 / (1 + torch.exp(torch.tensor(-7.0)).item()))


def test_edge_normal_option_and_bad_input(icosphere_topology):
    model = _model(icosphere_topology, edge_normal_loss=True)
    loss, logs = model.loss(model(torch.randn(2, 3, 224, 224)), _targets(icosphere_topology, 2))
    assert torch.isfinite(loss) and "loss_edge" in logs and "loss_normal" in logs
    with pytest.raises(ValueError, match="tore.py"):
        model(torch.randn(2, 3, 160, 160))                                     # ITP built for 7x7
    with pytest.raises(ValueError, match="model_dim_3"):
        _model(icosphere_topology, model_dim_3=16)


def test_toy_body_shapes():
    body = pytest.importorskip("body")
    topo = body.BodyModel().topology()
    V0, V1, V2 = topo["num_vertices"]
    model = _model(topo)
    out = model(torch.randn(2, 3, 224, 224))
    assert out["vertices"].shape == (2, V0, 3) and out["vertices_intermediate"].shape == (2, V1, 3)
    assert out["vertices_coarse"].shape == (2, V2, 3) and out["joints"].shape == (2, 14, 3)
    assert out["clusters"].shape == (2, 39, 49) and model.attention_mask.shape == (V2, V2)


def test_tiny_overfits_one_batch(icosphere_topology):
    torch.manual_seed(0)
    topo = _consistent_topology(icosphere_topology)
    cfg = _cfg(dropout=0.0, input_size=(64, 64))                               # 2x2 grid, 3 clusters: fast
    model = tore.TORE(cfg, fm._StandInBackbone(64), topo).train()
    x = torch.randn(2, 3, 64, 64)
    t = _targets(topo, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    first = None
    for step in range(300):
        loss, _ = model.loss(model(x), t)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.3)              # official: clip by value
        opt.step()
        if loss.item() < first / 10:
            break
    assert loss.item() < first / 10, (first, loss.item(), step)
