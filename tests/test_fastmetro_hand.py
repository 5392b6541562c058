"""fastmetro_hand.py: official FastMETRO_Hand_Network layout (strict load of the official key list),
shapes, attention mask, fixed upsampling, loss conventions, and a tiny hand model overfitting."""
import pytest
import torch
from torch import nn

import fastmetro as fm
import fastmetro_hand as fh
import hand


@pytest.fixture(scope="module")
def topo():
    return hand.HandModel().topology()


def _backbone(c=32):
    bb = nn.Sequential(nn.Conv2d(3, 8, 8, 8), nn.ReLU(), nn.Conv2d(8, c, 4, 4))   # stride 32
    bb.out_channels = c
    return bb


@pytest.mark.parametrize("layers", [1, 3])
def test_official_key_layout_loads_strictly(topo, layers):
    torch.manual_seed(0)
    m = fh.build_fastmetro_hand("tiny", _backbone(), topo, num_layers=layers)
    own = {k for k in m.state_dict() if not k.startswith("backbone.")}
    assert own == set(fh.official_hand_key_names(layers))
    assert m.joint_token_embed.weight.shape[0] == 21 and m.vertex_token_embed.weight.shape[0] == 195
    assert not hasattr(m, "coarse2intermediate_upsample")
    # the shared part is the body network's (fastmetro.FastMETROCore), with the body preset's sizes
    assert isinstance(m, fm.FastMETROCore) and m.transformer_1.encoder.layers[0].linear1.out_features == \
        fm.PRESETS["tiny"].feedforward_dim_1
    # an "official" state dict (same names, other values) loads strictly and changes the output
    other = fh.build_fastmetro_hand("tiny", _backbone(), topo, num_layers=layers)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in other.state_dict().items()}
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.xyz_regressor.weight, sd["xyz_regressor.weight"])
    with pytest.raises(RuntimeError):
        m.load_state_dict(dict(sd, **{"coarse2intermediate_upsample.weight": torch.zeros(778, 195)}))


def test_shapes_mask_and_fixed_upsampling(topo):
    torch.manual_seed(0)
    m = fh.build_fastmetro_hand("tiny", _backbone(), topo).eval()
    out = m(torch.randn(2, 3, 224, 224))
    assert out["vertices"].shape == (2, 778, 3) and out["vertices_coarse"].shape == (2, 195, 3)
    assert out["joints"].shape == (2, 21, 3) and out["cam"].shape == (2, 3)
    # fine mesh = fixed barycentric upsampling of the coarse one (kept coarse vertices exact)
    di = topo["down_index"][0]
    torch.testing.assert_close(out["vertices"][:, di], out["vertices_coarse"])
    mask = m.attention_mask
    assert mask.shape == (216, 216) and not mask[:21].any() and not mask[21:, :21].any()
    assert not mask[21:, 21:].diagonal().any()             # self loops visible
    f = topo["faces"][1]
    assert not mask[21 + f[:, 0], 21 + f[:, 1]].any()
    assert mask[21:, 21:].float().mean() > 0.9             # 1-ring only
    with pytest.raises(ValueError, match="images"):
        m(torch.randn(2, 224, 224))


def _targets(hm, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    pose = torch.randn(B, 48, generator=g) * 0.3
    o = hm(torch.zeros(B, 10), pose)
    j = o["joints"].float()
    return {"joints3d": torch.cat([j, torch.ones(B, 21, 1)], -1),
            "joints2d": torch.cat([j[..., :2] * 5, torch.ones(B, 21, 1)], -1),
            "vertices": o["vertices"].float(), "has_smpl": torch.ones(B), "has_3d": torch.ones(B)}


def test_loss_is_translation_invariant_and_zero_at_gt(topo):
    hm = hand.HandModel()
    m = fh.build_fastmetro_hand("tiny", _backbone(), topo)
    t = _targets(hm, 2)
    gt_v = t["vertices"]
    coarse = gt_v[:, topo["down_index"][0]]
    j = t["joints3d"][..., :3]
    # the 3D terms are root-centred (translation-invariant); the 2D term is not checked here
    out = {"vertices": gt_v, "vertices_coarse": coarse, "joints": j, "cam": torch.tensor([[5., 0, 0]] * 2)}
    _, logs = m.loss(out, t)
    assert logs["loss_3d_joints"] < 1e-6 and logs["loss_edge_normal"] < 2e-3
    shift = torch.tensor([0.1, -0.2, 0.3])
    out2 = {"vertices": gt_v + shift, "vertices_coarse": coarse + shift, "joints": j + shift, "cam": out["cam"]}
    _, logs2 = m.loss(out2, t)
    for k in ("loss_3d_joints", "loss_vertices", "loss_edge_normal"):
        assert abs(logs2[k] - logs[k]) < 1e-5, k
    # upsampling error of the coarse GT mesh is what remains of the vertex term
    assert logs["loss_vertices"] < 0.5 * 0.01
    with pytest.raises(ValueError, match="joints3d"):
        m.loss(out, dict(t, joints3d=t["joints3d"][:, :14]))


def test_tiny_hand_model_overfits(topo):
    torch.manual_seed(0)
    hm = hand.HandModel()
    m = fh.build_fastmetro_hand("tiny", _backbone(), topo)
    x = torch.randn(2, 3, 64, 64)
    t = _targets(hm, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    first = None
    for step in range(80):
        loss, logs = m.loss(m(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else logs
    assert logs["loss"] < 0.25 * first["loss"], (first, logs)
    assert logs["loss_3d_joints"] < 0.3 * first["loss_3d_joints"]
