"""tore_hand.py: TORE (GTR + ITP) on the 778 -> 195 hand hierarchy: key layout, fixed upsampling,
wrist-centred loss, and a tiny TORE-hand overfitting a batch."""
import pytest
import torch
from torch import nn

import hand
import tore
import tore_hand as th


@pytest.fixture(scope="module")
def topo():
    return hand.HandModel().topology()


def _backbone(c=32):
    bb = nn.Sequential(nn.Conv2d(3, 8, 8, 8), nn.ReLU(), nn.Conv2d(8, c, 4, 4))   # stride 32
    bb.out_channels = c
    return bb


def test_tore_hand_layout_and_fixed_upsampling(topo):
    torch.manual_seed(0)
    m = th.build_tore_hand("tiny", _backbone(), topo).eval()
    sd = m.state_dict()
    assert {k for k in sd if not k.startswith("backbone.")} == set(tore.official_key_names(1))
    assert sd["joint_token_embed.weight"].shape[0] == 21 and sd["vertex_token_embed.weight"].shape[0] == 195
    m.load_state_dict({k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    out = m(torch.randn(2, 3, 224, 224))
    assert out["vertices"].shape == (2, 778, 3) and out["joints"].shape == (2, 21, 3)
    torch.testing.assert_close(out["vertices"][:, topo["down_index"][0]], out["vertices_coarse"])
    torch.testing.assert_close(out["vertices_intermediate"], out["vertices"])
    with pytest.raises(ValueError, match="2-level"):
        th.tore_hand_topology(th.tore_hand_topology(topo))


def test_tore_hand_loss_wrist_centred_and_overfits(topo):
    torch.manual_seed(0)
    hm = hand.HandModel()
    m = th.build_tore_hand("tiny", _backbone(), topo, input_size=(64, 64))     # 2x2 grid, 3 ITP clusters
    o = hm(torch.zeros(2, 10), torch.randn(2, 48, generator=torch.Generator().manual_seed(0)) * 0.3)
    j, v = o["joints"].float(), o["vertices"].float()
    t = {"joints3d": torch.cat([j, torch.ones(2, 21, 1)], -1), "joints2d": torch.cat([j[..., :2] * 5, torch.ones(2, 21, 1)], -1),
         "vertices": v, "has_smpl": torch.ones(2), "has_3d": torch.ones(2), "epoch": 0.0}
    # TORE compares un-centred predictions with wrist-centred GT: the GT itself minus its wrist is exact
    w = j[:, :1]
    exact = {"vertices": v - w, "vertices_intermediate": v - w, "vertices_coarse": (v - w)[:, topo["down_index"][0]],
             "joints": j, "cam": torch.tensor([[5.0, 0, 0]] * 2)}
    _, logs = m.loss(exact, t)
    assert logs["loss_3d_joints"] < 1e-6 and logs["loss_vertices"] < 1e-6
    x = torch.randn(2, 3, 64, 64)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    first = None
    for _ in range(60):
        loss, logs = m.loss(m(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or logs
    assert logs["loss"] < 0.3 * first["loss"], (first, logs)
