"""FastMETRO for 3D hand mesh recovery (the official `FastMETRO_Hand_Network`), in plain PyTorch.

Paper: Cho, Youwang, Oh, "Cross-Attention of Disentangled Modalities for 3D Human Mesh Recovery
with Transformers", ECCV 2022, https://arxiv.org/abs/2207.13820 (FreiHAND experiments).
Official code: https://github.com/postech-ami/FastMETRO (`FastMETRO_Hand_Network`,
`run_fastmetro_handmesh.py`; read for facts, no code copied).

Needs fastmetro.py (the hand network is the body network without its learnable upsampling): it
uses fastmetro's public FastMETROCore (token embeddings, both transformer stages, regressors, the
decoder mask), the loss terms, check_targets, upsample_mesh and official_key_names; copy both files
together. Only the hand-specific parts live here.

What this file implements
- `FastMETROHand(cfg, backbone, topology)`: fastmetro.FastMETROCore (the body network's two-stage
  encoder-decoder, same widths, layers, init and module names) with J = 21 joint tokens (FreiHAND order) + V1 = 195 coarse-vertex tokens; decoder self-attention mask:
  joint rows see everything, vertex rows see all joints, themselves and their 1-ring neighbours in
  the 195 mesh (the official `mano_195_adjmat`, self loops included). `xyz_regressor` and
  `cam_predictor` as in the body network; the 195 -> 778 step is the FIXED GraphCMR upsampling
  (`mesh_sampler.upsample`) - no learnable upsampling layer exists in the hand network.
- `FastMETROHand.loss`: run_fastmetro_handmesh.py's loss: everything wrist-centred (GT on its
  wrist keypoint, predicted meshes on the wrist regressed from the predicted 778 mesh, token
  joints on token 0); 3D joints L1 * conf (token joints + joints regressed from the mesh),
  vertices 0.5 * L(195) + 0.5 * L(778), edge-length GT loss (weight 1.0, per-face edges as the
  I2L-MeshNet form; fastmetro.edge_gt_loss on `face_edges`) + normal loss (0.1) on the 778 mesh with the MANO faces, 2D projections of
  both joint sets; total 1000 * L3Dj + 100 * Lvert + 100 * Ledge/normal + 100 * L2Dj.
- Checkpoint layout = the official module names: `conv_1x1`, `cam_token_embed`,
  `joint_token_embed` (21), `vertex_token_embed` (195), `transformer_{1,2}.*`, `dim_reduce_*`,
  `xyz_regressor`, `cam_predictor` (+ `backbone.*`); mask and mesh maps are non-persistent
  buffers, so an official hand state dict loads with strict=True (use
  fastmetro.convert_official_state_dict for the backbone / "module." prefix).

Shapes: B batch, J = 21 keypoints, V0 = 778 (MANO) and V1 = 195 vertices (from the topology).
Units: metres; camera (s, tx, ty) weak perspective.

Departures
- The topology dict (hand.HandModel.topology) replaces MANO's files; with the toy hand the 195
  level comes from mesh.py's decimation unless GraphCMR's mano_downsampling.npz is given.
- The official code takes the per-sample flags has_3d = has_2d = has_mesh; `targets` keeps
  separate has_3d / has_smpl entries (callers can pass the same tensor).
"""
from dataclasses import dataclass

import torch
from torch import nn

from fastmetro import (PRESETS, FastMETROCore, check_targets, edge_gt_loss, keypoint_2d_loss, keypoint_3d_loss,
                       normal_loss, official_key_names, upsample_mesh, vertices_loss,
                       weak_perspective_project)

__all__ = ["FastMETROHandConfig", "HAND_PRESETS", "FastMETROHand", "build_fastmetro_hand",
           "official_hand_key_names"]


@dataclass
class FastMETROHandConfig:
    backbone: str = "hrnet_w64"                   # official hand scripts default: hrnet-w64
    input_size: tuple = (224, 224)
    num_layers: int = 3                           # S 1, M 2, L 3 (official default FastMETRO-L)
    model_dim_1: int = 512
    model_dim_2: int = 128
    feedforward_dim_1: int = 2048
    feedforward_dim_2: int = 512
    nhead: int = 8
    dropout: float = 0.1
    attention_impl: str = "sdpa"                  # fastmetro.MultiheadAttention path ("sdpa" | "math")
    conv_1x1_dim: int | None = None
    root_index: int = 0                           # FreiHAND wrist
    # run_fastmetro_handmesh.py defaults
    joints_3d_loss_weight: float = 1000.0
    vertices_3d_loss_weight: float = 100.0
    edge_normal_loss_weight: float = 100.0
    joints_2d_loss_weight: float = 100.0
    vertices_fine_loss_weight: float = 0.5
    vertices_coarse_loss_weight: float = 0.5
    edge_gt_loss_weight: float = 1.0
    normal_loss_weight: float = 0.1


# The body presets' architectures (S/M/L x R50/H64, "tiny" for CPU tests) with the hand defaults:
# same widths, layers, heads, dropout and backbone per preset name.
_ARCHITECTURE = ("backbone", "input_size", "num_layers", "model_dim_1", "model_dim_2", "feedforward_dim_1",
                 "feedforward_dim_2", "nhead", "dropout", "attention_impl", "conv_1x1_dim")
HAND_PRESETS = {name: FastMETROHandConfig(**{k: getattr(cfg, k) for k in _ARCHITECTURE})
                for name, cfg in PRESETS.items()}
# run_fastmetro_handmesh.py: AdamW lr 1e-4 (backbone 1e-4), wd 1e-4, clip_max_norm 0.3,
# 200 epochs, StepLR(lr_drop=200) (never fires), batch 16 per GPU.
TRAIN_DEFAULTS = dict(lr=1e-4, weight_decay=1e-4, clip_grad_norm=0.3, clip_mode="norm", epochs=200,
                      batch_size=16, lr_drop_epochs=[])


def face_edges(faces):
    """(F, 3) -> (3F, 2) the three edges of every face (shared edges repeated, as the official
    per-face edge loss counts them)."""
    f = torch.as_tensor(faces).long()
    return torch.cat([f[:, [0, 1]], f[:, [0, 2]], f[:, [1, 2]]], 0)


class FastMETROHand(FastMETROCore):
    """FastMETRO hand network (see header): fastmetro.FastMETROCore with 21 joint and 195 vertex
    tokens, the fixed 195 -> 778 upsampling and the hand script's loss."""

    source_file = "fastmetro_hand.py"

    def __init__(self, cfg: FastMETROHandConfig, backbone: nn.Module, topology: dict):
        for k in ("num_vertices", "faces", "up_index", "up_weight", "down_index", "joint_regressor"):
            if k not in topology:
                raise KeyError(f"fastmetro_hand.py: topology is missing {k!r}")
        nv = [int(n) for n in topology["num_vertices"]]
        if len(nv) < 2:
            raise ValueError(f"fastmetro_hand.py: topology needs 2 levels (778 -> 195), got {nv}")
        V0, V1 = nv[:2]
        if tuple(topology["up_index"][0].shape) != (V0, 3):
            raise ValueError(f"fastmetro_hand.py: topology['up_index'][0] must be ({V0}, 3), got "
                             f"{tuple(topology['up_index'][0].shape)}")
        jr = topology["joint_regressor"][0]
        if jr.dim() != 2 or jr.shape[1] != V0:
            raise ValueError(f"fastmetro_hand.py: topology['joint_regressor'][0] must be (J, {V0}), "
                             f"got {tuple(jr.shape)}")
        super().__init__(cfg, backbone, int(jr.shape[0]), V1, topology["faces"][1])
        self.num_vertices_levels = (V0, V1)
        buf = lambda n, t: self.register_buffer(n, torch.as_tensor(t).clone(), persistent=False)
        buf("up_index_0", topology["up_index"][0].long())
        buf("up_weight_0", topology["up_weight"][0].float())
        buf("down_index_0", topology["down_index"][0].long())
        buf("joint_regressor", jr.float())                                        # (J, V0)
        buf("faces_0", torch.as_tensor(topology["faces"][0]).long())
        buf("edges_0", face_edges(topology["faces"][0]))

    def forward_head(self, features):
        """features (B, C, h, w) backbone map (forward: images (B, 3, H, W) ImageNet-normalised,
        224x224). Returns "vertices" (B, V0, 3) fine mesh, "vertices_coarse" (B, V1, 3), "joints"
        (B, J, 3) from the joint tokens (metres, model frame), "cam" (B, 3) weak perspective."""
        cam, joints, v1 = self.token_outputs(features)
        v0 = upsample_mesh(v1, self.up_index_0, self.up_weight_0)             # fixed: (B, V1, 3) -> (B, V0, 3)
        return {"vertices": v0, "vertices_coarse": v1, "joints": joints, "cam": cam}

    def loss(self, out, targets):
        """Official hand loss. targets: "joints3d" (B, J, 4) metres + conf, "joints2d" (B, J, 3)
        [-1, 1] + conf, "vertices" (B, V0, 3) GT mesh metres, "has_smpl" (B,) (= has_mesh),
        "has_3d" (B,). Returns (scalar, logs dict of floats)."""
        cfg, r = self.cfg, self.cfg.root_index
        B = out["vertices"].shape[0]
        check_targets(targets, B, self.num_joints, self.num_vertices_levels[0], "fastmetro_hand.py loss")
        has_mesh, has_3d = targets["has_smpl"], targets["has_3d"]
        gt_v0 = targets["vertices"]
        gt_root = torch.einsum("v,bvc->bc", self.joint_regressor[r], gt_v0)[:, None]   # (B, 1, 3)
        gt_v1 = gt_v0[:, self.down_index_0] - gt_root                             # (B, V1, 3)
        gt_v0 = gt_v0 - gt_root
        v0, v1 = out["vertices"], out["vertices_coarse"]
        j_mesh = torch.einsum("jv,bvc->bjc", self.joint_regressor, v0)            # (B, J, 3)
        root = j_mesh[:, r:r + 1]
        v0, v1, j_mesh = v0 - root, v1 - root, j_mesh - root
        j_tok = out["joints"] - out["joints"][:, r:r + 1]
        cam = out["cam"]
        root2 = (r, r)                                                            # "midpoint" = the wrist
        l_j3d = (keypoint_3d_loss(j_tok, targets["joints3d"], has_3d, root2)
                 + keypoint_3d_loss(j_mesh, targets["joints3d"], has_3d, root2))
        l_vert = (cfg.vertices_coarse_loss_weight * vertices_loss(v1, gt_v1, has_mesh)
                  + cfg.vertices_fine_loss_weight * vertices_loss(v0, gt_v0, has_mesh))
        l_en = (cfg.edge_gt_loss_weight * edge_gt_loss(v0, gt_v0, self.edges_0, has_mesh)
                + cfg.normal_loss_weight * normal_loss(v0, gt_v0, self.faces_0, has_mesh))
        l_j2d = (keypoint_2d_loss(weak_perspective_project(j_tok, cam), targets["joints2d"])
                 + keypoint_2d_loss(weak_perspective_project(j_mesh, cam), targets["joints2d"]))
        loss = (cfg.joints_3d_loss_weight * l_j3d + cfg.vertices_3d_loss_weight * l_vert
                + cfg.edge_normal_loss_weight * l_en + cfg.joints_2d_loss_weight * l_j2d)
        logs = {"loss_3d_joints": l_j3d.item(), "loss_vertices": l_vert.item(),
                "loss_edge_normal": l_en.item(), "loss_2d_joints": l_j2d.item(), "loss": loss.item()}
        return loss, logs


def build_fastmetro_hand(preset="L-H64", backbone=None, topology=None, **overrides):
    """HAND_PRESETS[preset] (+ overrides) -> FastMETROHand; `backbone` and `topology` required."""
    import dataclasses
    if backbone is None or topology is None:
        raise ValueError("fastmetro_hand.py: build_fastmetro_hand needs a backbone and a topology")
    if preset not in HAND_PRESETS:
        raise ValueError(f"fastmetro_hand.py: unknown preset {preset!r}; one of {list(HAND_PRESETS)}")
    return FastMETROHand(dataclasses.replace(HAND_PRESETS[preset], **overrides), backbone, topology)


def official_hand_key_names(num_layers):
    """Non-backbone state-dict keys of the official FastMETRO_Hand_Network (S/M/L = 1/2/3): the
    body network's without its learnable upsampling layer."""
    return [k for k in official_key_names(num_layers) if not k.startswith("coarse2intermediate_upsample.")]


if __name__ == "__main__":
    import hand as _hand  # smoke test only: the model itself takes a topology dict
    torch.manual_seed(0)
    stand_in = nn.Sequential(nn.Conv2d(3, 16, 8, 8), nn.ReLU(), nn.Conv2d(16, 64, 4, 4))  # stride 32
    stand_in.out_channels = 64
    hm = _hand.HandModel()
    topo = hm.topology()
    model = build_fastmetro_hand("tiny", stand_in, topo)
    x = torch.randn(2, 3, 224, 224)
    out = model(x)
    for k, v in out.items():
        print(f"{k:18s} {tuple(v.shape)}")
    g = hm(torch.zeros(2, 10), torch.randn(2, 48) * 0.2)
    tg = {"joints3d": torch.cat([g["joints"], torch.ones(2, 21, 1)], -1),
          "joints2d": torch.cat([g["joints"][..., :2] * 4, torch.ones(2, 21, 1)], -1),
          "vertices": g["vertices"].float(), "has_smpl": torch.ones(2), "has_3d": torch.ones(2)}
    loss, logs = model.loss(out, tg)
    loss.backward()
    print({k: round(v, 4) for k, v in logs.items()})
