"""TORE on hands: tore.TORE (GTR + ITP, FastMETRO variant) with FastMETRO-hand's token counts.

Paper: Dou et al., "TORE: Token Reduction for Efficient Human Mesh Recovery with Transformer",
ICCV 2023, https://arxiv.org/abs/2211.10705 (reports hand mesh recovery on FreiHAND).
Official code: https://github.com/Frank-ZY-Dou/TORE - it holds body scripts only
(run_tore_fm_bodymesh.py, run_tore_m_bodymesh.py); there is NO official TORE hand network or hand
training script, so this file is our reading, documented here.

What this file implements
- `tore_hand_topology(hand_topology)`: the 2-level hand hierarchy (778 -> 195, hand.HandModel.topology)
  as the 3-level dict tore.TORE takes: levels 778 / 778 / 195, the middle level an exact identity
  copy of the full mesh (identity up/down maps), so the NSR's 195 vertex queries are upsampled by
  the fixed 195 -> 778 map and nothing else (as FastMETRO-hand; no learnable upsampling exists
  with GTR). `h36m_regressor` rows are the wrist keypoint row: tore.py centres the GT meshes on
  row 0 ("pelvis"), which for hands is the wrist, as FastMETRO's hand script centres on the wrist.
- `HAND_PRESETS`: TORE presets with `hip_indices=(0, 0)` (keypoints centred on the wrist, the
  midpoint of (0, 0)) and vertex weights 0.33 on the 195 and 778 levels (`vloss_w_sub` = 0: the
  identity middle level would count the 778 mesh twice). Everything else - GTR (21 joint tokens
  in stages 1-2, NSR with 195 adjacency-masked vertex queries), ITP (keep 0.8), loss weights,
  training defaults - is TORE's body setting unchanged.
- `build_tore_hand(preset, backbone, hand_topology)`; checkpoint keys = tore.official_key_names
  (the TORE body layout with 21 joint and 195 vertex embeddings).

Departures
- No released TORE hand checkpoint or script exists to match; the reading above is ours.
"""
import dataclasses

import torch

import tore

__all__ = ["HAND_PRESETS", "tore_hand_topology", "build_tore_hand"]

_HAND = dict(hip_indices=(0, 0), vloss_w_sub=0.0)
HAND_PRESETS = {name: dataclasses.replace(tore.PRESETS[name], **_HAND)
                for name in ("L-R50", "L-H64", "L-R50-GTR", "tiny")}


def tore_hand_topology(topology):
    """Hand TOPOLOGY (levels 778, 195) -> the 3-level dict tore.TORE takes (778, 778, 195)."""
    nv = [int(n) for n in topology["num_vertices"]]
    if len(nv) != 2:
        raise ValueError(f"tore_hand.py: expected the 2-level hand topology (778 -> 195), got levels {nv}")
    V0, V1 = nv
    ident_i = torch.arange(V0)[:, None].repeat(1, 3)                   # (V0, 3)
    ident_w = torch.tensor([1.0, 0.0, 0.0]).repeat(V0, 1)              # (V0, 3)
    r0 = topology["joint_regressor"][0]
    wrist = r0[int(topology.get("root_index", 0))]
    out = {
        "num_vertices": [V0, V0, V1],
        "faces": [topology["faces"][0], topology["faces"][0], topology["faces"][1]],
        "template": [topology["template"][0], topology["template"][0], topology["template"][1]],
        "up_index": [ident_i, topology["up_index"][0]],
        "up_weight": [ident_w, topology["up_weight"][0]],
        "down_index": [torch.arange(V0), topology["down_index"][0]],
        "joint_regressor": [r0, r0, topology["joint_regressor"][1]],
        "h36m_regressor": wrist[None].repeat(17, 1),                   # row 0 = wrist (centring)
    }
    for k in ("skin_weights", "parents", "root_index"):
        if k in topology:
            out[k] = topology[k]
    return out


def build_tore_hand(preset="L-H64", backbone=None, topology=None, **overrides):
    """HAND_PRESETS[preset] (+ overrides) -> tore.TORE on the hand topology (2-level dict)."""
    if backbone is None or topology is None:
        raise ValueError("tore_hand.py: build_tore_hand needs a backbone and the hand topology")
    if preset not in HAND_PRESETS:
        raise ValueError(f"tore_hand.py: unknown preset {preset!r}; one of {list(HAND_PRESETS)}")
    return tore.TORE(dataclasses.replace(HAND_PRESETS[preset], **overrides), backbone,
                     tore_hand_topology(topology))


if __name__ == "__main__":
    import hand as _hand  # smoke test only
    from torch import nn
    torch.manual_seed(0)
    stand_in = nn.Sequential(nn.Conv2d(3, 16, 8, 8), nn.ReLU(), nn.Conv2d(16, 64, 4, 4))
    stand_in.out_channels = 64
    hm = _hand.HandModel()
    model = build_tore_hand("tiny", stand_in, hm.topology())
    out = model(torch.randn(2, 3, 224, 224))
    for k, v in out.items():
        print(f"{k:24s} {tuple(v.shape)}")
    g = hm(torch.zeros(2, 10), torch.randn(2, 48) * 0.2)
    tg = {"joints3d": torch.cat([g["joints"], torch.ones(2, 21, 1)], -1).float(),
          "joints2d": torch.cat([g["joints"][..., :2] * 4, torch.ones(2, 21, 1)], -1).float(),
          "vertices": g["vertices"].float(), "has_smpl": torch.ones(2), "has_3d": torch.ones(2), "epoch": 5.0}
    loss, logs = model.loss(out, tg)
    loss.backward()
    print({k: round(v, 4) for k, v in logs.items()})
