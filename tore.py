"""TORE: token reduction (GTR + ITP) on FastMETRO, in plain PyTorch.

Paper: Dou, Wu, Lin, Cao, Wu, Wan, Komura, Wang, "TORE: Token Reduction for Efficient Human Mesh
Recovery with Transformer", ICCV 2023, https://arxiv.org/abs/2211.10705
Official code: https://github.com/Frank-ZY-Dou/TORE (FastMETRO variant: the model in
tore/modeling_fm/bert/modeling_metro.py, the loss in tore/tools/run_tore_fm_bodymesh.py; read for
facts, no code copied).

Needs fastmetro.py (TORE is a modification of FastMETRO: same transformer, positional
encoding, camera, loss terms): it uses fastmetro's public Transformer, PositionEmbeddingSine,
check_topology, mesh_adjacency, register_mesh_buffers, upsample_mesh, gt_mesh_levels, the loss
terms and convert_official_state_dict; copy both files together (and fastmetro.py's own needs).
Importing it avoids duplicating ~300 lines of transformer and loss code.

What this file implements
- Geometry Token Reduction (GTR, `use_gtr`): only the J body (joint) tokens go through the two main
  encoder-decoder transformers (stage 1 d=512, stage 2 d=128; no decoder mask). A third
  encoder-decoder, the Neural Shape Regressor (`transformer_3`, d=128, FFN 512, 8 heads, the same
  layer count), takes [stage-2 camera feature; J stage-2 joint features] as encoder input (sine
  encoding over a J x 1 grid on the joint features) and decodes V2 learned vertex queries
  (`vertex_token_embed`, d=128) whose self-attention is masked by the coarse-mesh adjacency
  (1-ring + self). `xyz_regressor_j` on the joint features, `xyz_regressor_v` on the vertex
  features; fixed barycentric upsampling V2 -> V1 -> V0 (nothing learnable). One shared
  `dim_reduce_enc` for the camera and image features, `dim_reduce_dec` for the joints.
- Image Token Pruning (ITP, `use_itp`): after `conv_1x1`, `token_selector_conv2d` Conv2d(d1, d1/4,
  3, pad 1) -> GELU -> flatten -> `token_selector_fc` Linear(d1/4, M) -> softmax over the h*w
  positions -> clustering matrix (B, M, h*w) @ image tokens -> `layer_norm` LayerNorm([M, d1]);
  M = int(h*w * keep_ratio) (0.8 -> 39 of 49, 0.5 -> 24). The M cluster tokens get the sine
  encoding of an M x 1 grid (as the official code).
- `TORE.loss(out, targets)`: the official TORE training loss: 1000 * (3D token joints + 3D joints
  from the mesh, hip-midpoint centred, confidence-weighted L1) + 100 * 0.33 * (L1(V2) + L1(V1) +
  L1(V0)) against the H36M-pelvis-centred GT meshes (predictions NOT re-centred, as the official
  TORE script) + 100 * (2D projections of both joint sets) + w(epoch) * L_ITP with
  w = 1e-3 * sigmoid(epoch - 3). L_ITP: project the centred GT full mesh with the predicted camera
  onto the h x w grid, a cell is 1 if any vertex falls in it; min-max normalise each cluster's
  h*w weights; L_ITP = sum over (samples with has_smpl, clusters, cells) of weight * (1 - cell).
  Optional `edge_normal_loss` (official flag, "false" in the official training command):
  + 100 * normal + 1000 * edge-length (face-based) on the full mesh.
- Switches: GTR and ITP are independent. GTR off = FastMETRO's token path (J + V2 masked queries in
  both main transformers, FastMETRO's module names incl. `coarse2intermediate_upsample`); ITP off =
  all h*w image tokens with the 2D sine grid.
- Checkpoint layout (GTR + ITP, the released models): `backbone.*`, `conv_1x1`,
  `token_selector_conv2d`, `token_selector_fc`, `layer_norm`, `transformer_{1,2,3}.*` (FastMETRO
  transformer layout), `dim_reduce_enc`, `dim_reduce_dec`, `cam_token_embed`, `joint_token_embed`,
  `vertex_token_embed`, `xyz_regressor_j`, `xyz_regressor_v`, `cam_predictor`
  (`official_key_names()` lists them; tested). Masks and up maps are non-persistent buffers.

Departures from the paper / official code
- The ITP conv width is d1/4 (the paper's c' = c/4; the official code hard-codes 512 -> 128, the
  same at d1 = 512); M is computed from the feature grid of `input_size` (h*w = 49 at 224x224; the
  official code hard-codes 49). The ITP grid in the loss uses the real h x w (official: 7 x 7).
- The NSR encoder has `num_layers` layers (the training model file); another copy of the model in
  the official repository (used for inference) builds it with 1 encoder layer: set
  `nsr_enc_layers=1` to load such a checkpoint.
- The official ITP loss uses a python double loop for min-max normalisation and
  `mask[b, x, y] = 1` followed by a transpose; here vectorised (same result: cell index
  row = floor((y + 1) / 2 * h), col = floor((x + 1) / 2 * w), valid if inside the grid). For
  non-square inputs the normalised coordinates (one length min(H, W), data.normalise_pixels) are
  first rescaled to the grid's extent (x * L / W, y * L / H); at 224x224 this is the official map.
- The ITP loss is a plain sum over samples, clusters and cells (official code; it grows with the
  batch size), not normalised as the paper's formula; the official 1e-3 weight goes with the sum. `targets["epoch"]` must be the fractional epoch (iteration / iterations per epoch) for
  the sigmoid schedule to match; an integer epoch gives a step-wise schedule.
- Predicted meshes are compared with the pelvis-centred GT without re-centring (official TORE
  script; FastMETRO's script centres predictions by their own pelvis), so TORE learns to output
  pelvis-centred meshes. 2D projections use the un-centred joints, as the official script.
- "ITP@20%" in the paper = keep_ratio 0.8 (20% pruned). The "tiny" preset (ours) has no dropout.
- GTR-off and ITP-off variants have no released checkpoints; their names are chosen as above.
  The official training always uses GTR (+ ITP in the FastMETRO variant).
- TORE's GTR on the METRO (encoder-only, BERT-style) architecture is NOT implemented: it needs the
  METRO/BERT encoder stack (3 encoders 2051 -> 1024 -> 256 -> 128 with their own layer layout),
  which is not part of this repository.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastmetro as fm

__all__ = ["TOREConfig", "PRESETS", "TRAIN_DEFAULTS", "TORE", "build_tore", "official_key_names",
           "itp_mask", "itp_loss", "itp_loss_weight"]


@dataclass
class TOREConfig:
    backbone: str = "resnet50"
    input_size: tuple = (224, 224)                # (H, W); the feature grid is input_size / 32
    num_layers: int = 3                           # FastMETRO_L (official default); S = 1
    nsr_enc_layers: int | None = None             # None -> num_layers
    model_dim_1: int = 512
    model_dim_2: int = 128
    model_dim_3: int = 128                        # NSR width; must equal model_dim_2
    feedforward_dim_1: int = 2048
    feedforward_dim_2: int = 512
    feedforward_dim_3: int = 512
    nhead: int = 8
    dropout: float = 0.1
    conv_1x1_dim: int | None = None               # None -> backbone.out_channels
    feature_stride: int = 32
    use_gtr: bool = True
    use_itp: bool = True
    keep_ratio: float = 0.8                       # ITP: M = int(h*w * keep_ratio)
    hip_indices: tuple = (2, 3)
    # Loss (official run_tore_fm_bodymesh.py defaults / training command).
    joints_loss_weight: float = 1000.0
    vertices_loss_weight: float = 100.0           # also the 2D-joint weight (official)
    vloss_w_full: float = 0.33
    vloss_w_sub: float = 0.33
    vloss_w_sub2: float = 0.33
    itp_loss_weight: float = 1e-3
    itp_loss_epoch_offset: float = 3.0            # weight * sigmoid(epoch - 3)
    edge_normal_loss: bool = False
    normal_loss_weight: float = 100.0
    edge_loss_weight: float = 1000.0

    def feature_hw(self):
        return self.input_size[0] // self.feature_stride, self.input_size[1] // self.feature_stride


def _p(layers, backbone, **kw):
    return TOREConfig(backbone=backbone, num_layers=layers, **kw)


PRESETS = {
    # FastMETRO-L + GTR + ITP@20% (released checkpoints) and the paper's other variants.
    "L-R50": _p(3, "resnet50"),
    "L-H64": _p(3, "hrnet_w64"),
    "L-Eb0": _p(3, "efficientnet_b0"),
    "L-R50-GTR": _p(3, "resnet50", use_itp=False),
    "L-R50-ITP50": _p(3, "resnet50", keep_ratio=0.5),
    "S-R50-GTR": _p(1, "resnet50", use_itp=False),
    # CPU quickstart / tests: small widths, one layer per stage, no dropout (as fastmetro "tiny").
    "tiny": _p(1, "resnet_tiny", model_dim_1=64, model_dim_2=32, model_dim_3=32, feedforward_dim_1=128,
               feedforward_dim_2=64, feedforward_dim_3=64, nhead=4, dropout=0.0),
}

# Official training: AdamW lr 1e-4 (wd 1e-4), gradient clipping by VALUE 0.3, 60 epochs, batch 16
# per GPU x 4 GPUs, lr x 0.1 after half of the epochs (adjust_learning_rate).
TRAIN_DEFAULTS = dict(lr=1e-4, weight_decay=1e-4, clip_grad_norm=0.3, clip_mode="value", epochs=60,
                      batch_per_gpu=16, paper_global_batch=64, lr_drop_epochs=[30])


class TORE(nn.Module):
    """TORE on FastMETRO; see the file header."""

    def __init__(self, cfg: TOREConfig, backbone: nn.Module, topology: dict):
        super().__init__()
        nv = fm.check_topology(topology, "tore.py")
        self.cfg = cfg
        self.backbone = backbone
        J = int(topology["joint_regressor"][0].shape[0])
        V0, V1, V2 = nv[:3]
        self.num_joints, self.num_vertices = J, V2
        self.num_vertices_levels = (V0, V1, V2)
        d1, d2, d3 = cfg.model_dim_1, cfg.model_dim_2, cfg.model_dim_3
        L = cfg.num_layers
        c_in = cfg.conv_1x1_dim or getattr(backbone, "out_channels", None)
        if c_in is None:
            raise ValueError("tore.py: cfg.conv_1x1_dim is None and the backbone has no `out_channels`")
        h, w = cfg.feature_hw()
        self.keep_num = int(h * w * cfg.keep_ratio) if cfg.use_itp else h * w
        if cfg.use_itp and self.keep_num < 1:
            raise ValueError(f"tore.py: keep_ratio {cfg.keep_ratio} leaves no image token on a {h}x{w} grid")

        if cfg.use_itp:
            self.token_selector_conv2d = nn.Conv2d(d1, d1 // 4, kernel_size=3, stride=1, padding=1)
            self.token_selector_fc = nn.Linear(d1 // 4, self.keep_num)
            self.layer_norm = nn.LayerNorm([self.keep_num, d1])
        self.transformer_1 = fm.Transformer(d1, cfg.nhead, L, L, cfg.feedforward_dim_1, cfg.dropout)
        self.transformer_2 = fm.Transformer(d2, cfg.nhead, L, L, cfg.feedforward_dim_2, cfg.dropout)
        self.cam_token_embed = nn.Embedding(1, d1)
        self.joint_token_embed = nn.Embedding(J, d1)
        self.position_encoding_1 = fm.PositionEmbeddingSine(d1 // 2)
        self.position_encoding_2 = fm.PositionEmbeddingSine(d2 // 2)
        self.cam_predictor = nn.Linear(d2, 3)
        self.conv_1x1 = nn.Conv2d(c_in, d1, kernel_size=1)
        adj = fm.mesh_adjacency(topology["faces"][2], V2, self_loops=True)
        if cfg.use_gtr:
            if d3 != d2:
                raise ValueError(f"tore.py: the NSR takes the stage-2 joint features, so model_dim_3 ({d3}) "
                                 f"must equal model_dim_2 ({d2})")
            nsr_enc = cfg.nsr_enc_layers if cfg.nsr_enc_layers is not None else L
            self.transformer_3 = fm.Transformer(d3, cfg.nhead, nsr_enc, L, cfg.feedforward_dim_3, cfg.dropout)
            self.dim_reduce_enc = nn.Linear(d1, d2)
            self.dim_reduce_dec = nn.Linear(d1, d2)
            self.vertex_token_embed = nn.Embedding(V2, d3)
            self.position_encoding_3 = fm.PositionEmbeddingSine(d3 // 2)
            self.xyz_regressor_j = nn.Linear(d2, 3)
            self.xyz_regressor_v = nn.Linear(d3, 3)
            self.register_buffer("attention_mask", ~adj, persistent=False)          # (V2, V2), True = blocked
        else:
            self.dim_reduce_enc_cam = nn.Linear(d1, d2)
            self.dim_reduce_enc_img = nn.Linear(d1, d2)
            self.dim_reduce_dec = nn.Linear(d1, d2)
            self.vertex_token_embed = nn.Embedding(V2, d1)
            self.xyz_regressor = nn.Linear(d2, 3)
            self.coarse2intermediate_upsample = nn.Linear(V2, V1)
            mask = torch.zeros(J + V2, J + V2, dtype=torch.bool)
            mask[J:, J:] = ~adj
            self.register_buffer("attention_mask", mask, persistent=False)          # (J+V2, J+V2)
        fm.register_mesh_buffers(self, topology)

    # --------------------------------------------------------------------- forward
    def image_tokens(self, features):
        """(B, C, h, w) -> tokens (B, T, d1), pos_1 (1, T, d1), pos_2 (1, T, d2), clusters (B, M, h*w)
        or None; T = M with ITP, h*w without."""
        if features.dim() != 4 or features.shape[1] != self.conv_1x1.in_channels:
            raise ValueError(f"tore.py: backbone output must be (B, {self.conv_1x1.in_channels}, h, w), "
                             f"got {tuple(features.shape)}")
        _, _, h, w = features.shape
        x = self.conv_1x1(features)                                            # (B, d1, h, w)
        clusters = None
        if self.cfg.use_itp:
            if (h, w) != self.cfg.feature_hw():
                raise ValueError(f"tore.py: ITP was built for a {self.cfg.feature_hw()} feature grid "
                                 f"(input_size {self.cfg.input_size}), got {h}x{w}")
            s = F.gelu(self.token_selector_conv2d(x))                          # (B, d1/4, h, w)
            # (B, d1/4, h, w) -> (B, d1/4, h*w) -> (B, h*w, d1/4) -> (B, h*w, M)
            s = self.token_selector_fc(s.flatten(2).transpose(1, 2))
            clusters = s.softmax(1).transpose(1, 2)                            # softmax over positions -> (B, M, h*w)
            # (B, M, h*w) @ (B, h*w, d1) -> (B, M, d1), then LayerNorm over [M, d1]
            tokens = self.layer_norm(clusters @ x.flatten(2).transpose(1, 2))
            gh, gw = self.keep_num, 1                                          # official: an M x 1 sine grid
        else:
            tokens = x.flatten(2).transpose(1, 2)                              # (B, d1, h, w) -> (B, h*w, d1)
            gh, gw = h, w
        pos_1 = self.position_encoding_1(gh, gw, x.device, x.dtype)[None]      # (1, T, d1)
        pos_2 = self.position_encoding_2(gh, gw, x.device, x.dtype)[None]      # (1, T, d2)
        return tokens, pos_1, pos_2, clusters

    def forward_head(self, features):
        """Everything after the backbone: features (B, C, h, w) -> output dict (see forward)."""
        B, J = features.shape[0], self.num_joints
        img, pos_1, pos_2, clusters = self.image_tokens(features)
        cam_token = self.cam_token_embed.weight[None].expand(B, -1, -1)        # (1, d1) -> (B, 1, d1)
        if self.cfg.use_gtr:
            j_tokens = self.joint_token_embed.weight[None].expand(B, -1, -1)   # (J, d1) -> (B, J, d1)
            cam_1, img_1, j_1 = self.transformer_1(img, cam_token, j_tokens, pos_1)
            cam_2, _, j_2 = self.transformer_2(self.dim_reduce_enc(img_1), self.dim_reduce_enc(cam_1),
                                               self.dim_reduce_dec(j_1), pos_2)
            # Neural Shape Regressor: encoder over [camera; J joint features], vertex queries masked.
            pos_3 = self.position_encoding_3(J, 1, features.device, img.dtype)[None]   # (1, J, d3)
            v_tokens = self.vertex_token_embed.weight[None].expand(B, -1, -1)  # (V2, d3) -> (B, V2, d3)
            _, _, v_feat = self.transformer_3(j_2, cam_2, v_tokens, pos_3, self.attention_mask)
            joints = self.xyz_regressor_j(j_2)                                 # (B, J, 3)
            v2 = self.xyz_regressor_v(v_feat)                                  # (B, V2, 3)
            v1 = fm.upsample_mesh(v2, self.up_index_1, self.up_weight_1)       # (B, V2, 3) -> (B, V1, 3)
        else:
            jv = torch.cat([self.joint_token_embed.weight, self.vertex_token_embed.weight], 0)
            jv = jv[None].expand(B, -1, -1)                                    # (J+V2, d1) -> (B, J+V2, d1)
            cam_1, img_1, jv_1 = self.transformer_1(img, cam_token, jv, pos_1, self.attention_mask)
            cam_2, _, jv_2 = self.transformer_2(self.dim_reduce_enc_img(img_1), self.dim_reduce_enc_cam(cam_1),
                                                self.dim_reduce_dec(jv_1), pos_2, self.attention_mask)
            xyz = self.xyz_regressor(jv_2)                                     # (B, J+V2, 3)
            joints, v2 = xyz[:, :J], xyz[:, J:]
            v1 = self.coarse2intermediate_upsample(v2.transpose(1, 2)).transpose(1, 2)  # (B, 3, V2) -> (B, V1, 3)
        v0 = fm.upsample_mesh(v1, self.up_index_0, self.up_weight_0)           # (B, V1, 3) -> (B, V0, 3)
        cam = self.cam_predictor(cam_2).reshape(B, 3)                          # (B, 1, 3) -> (B, 3)
        out = {"vertices": v0, "vertices_intermediate": v1, "vertices_coarse": v2, "joints": joints, "cam": cam}
        if clusters is not None:
            out["clusters"] = clusters
        return out

    def forward(self, images):
        """images (B, 3, H, W) ImageNet-normalised, H, W = cfg.input_size (224x224).

        Returns a dict: "vertices" (B, V0, 3) metres (trained pelvis-centred), "vertices_intermediate"
        (B, V1, 3), "vertices_coarse" (B, V2, 3), "joints" (B, J, 3) from the body tokens, metres,
        "cam" (B, 3) weak perspective (s, tx, ty); with ITP "clusters" (B, M, h*w), each row a
        distribution over the h*w feature positions (sums to 1).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"tore.py: images must be (B, 3, H, W), got {tuple(images.shape)}")
        return self.forward_head(self.backbone(images))

    # --------------------------------------------------------------------- loss
    def loss(self, out, targets):
        """Official TORE (FastMETRO variant) training loss.

        targets: "joints3d" (B, J, 4), "joints2d" (B, J, 3), "vertices" (B, V0, 3) GT mesh (metres,
        not centred), "has_smpl" (B,), "has_3d" (B,), "epoch" (float, fractional epoch; for the ITP
        schedule; 0 if absent). Returns (scalar loss, logs dict of floats).
        """
        cfg = self.cfg
        B = out["vertices"].shape[0]
        fm.check_targets(targets, B, self.num_joints, self.num_vertices_levels[0], "tore.py loss")
        has_smpl, has_3d = targets["has_smpl"], targets["has_3d"]
        gt_v0, gt_v1, gt_v2 = fm.gt_mesh_levels(self, targets["vertices"])
        v0, v1, v2, cam = out["vertices"], out["vertices_intermediate"], out["vertices_coarse"], out["cam"]
        joints_mesh = torch.einsum("jv,bvc->bjc", self.joint_regressor, v0)    # (B, J, 3), not centred
        joints_tok = out["joints"]

        l_j3d = (fm.keypoint_3d_loss(joints_tok, targets["joints3d"], has_3d, cfg.hip_indices)
                 + fm.keypoint_3d_loss(joints_mesh, targets["joints3d"], has_3d, cfg.hip_indices))
        l_vert = (cfg.vloss_w_sub2 * fm.vertices_loss(v2, gt_v2, has_smpl)
                  + cfg.vloss_w_sub * fm.vertices_loss(v1, gt_v1, has_smpl)
                  + cfg.vloss_w_full * fm.vertices_loss(v0, gt_v0, has_smpl))
        l_j2d = (fm.keypoint_2d_loss(fm.weak_perspective_project(joints_tok, cam), targets["joints2d"])
                 + fm.keypoint_2d_loss(fm.weak_perspective_project(joints_mesh, cam), targets["joints2d"]))
        loss = cfg.joints_loss_weight * l_j3d + cfg.vertices_loss_weight * (l_vert + l_j2d)
        logs = {"loss_3d_joints": l_j3d.item(), "loss_vertices": l_vert.item(), "loss_2d_joints": l_j2d.item()}
        if "clusters" in out:
            h, w = self.cfg.feature_hw()
            w_itp = itp_loss_weight(float(targets.get("epoch", 0.0)), cfg.itp_loss_weight, cfg.itp_loss_epoch_offset)
            l_itp = itp_loss(out["clusters"], fm.weak_perspective_project(gt_v0, cam), has_smpl, h, w,
                             cfg.input_size)
            loss = loss + w_itp * l_itp
            logs["loss_itp"], logs["itp_weight"] = l_itp.item(), w_itp
        if cfg.edge_normal_loss:
            l_n = fm.normal_loss(v0, gt_v0, self.faces_0, has_smpl)
            l_e = _edge_length_face_loss(v0, gt_v0, self.faces_0, has_smpl)
            loss = loss + cfg.normal_loss_weight * l_n + cfg.edge_loss_weight * l_e
            logs["loss_normal"], logs["loss_edge"] = l_n.item(), l_e.item()
        logs["loss"] = loss.item()
        return loss, logs


def itp_loss_weight(epoch, base=1e-3, offset=3.0):
    """Official schedule: base * sigmoid(epoch - offset), in float64 as the official numpy code."""
    z = float(epoch) - float(offset)
    sig = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0            # official form; no overflow
    return float(base) * sig


def itp_mask(points_2d, h, w, input_size=None):
    """points_2d (B, N, 2) normalised crop coordinates (x right, y down; one length L = min(H, W)
    for both axes, data.normalise_pixels) -> (B, h*w) float, 1 where a cell of the h x w grid
    (row-major) contains at least one point. input_size (H, W) of the crop; None = square
    (the grid then spans [-1, 1] on both axes, as the official 224x224 code)."""
    H, W = input_size if input_size is not None else (1, 1)
    L = min(H, W)
    x = (points_2d[..., 0] * (L / W) + 1) * 0.5 * w                           # (B, N) grid columns
    y = (points_2d[..., 1] * (L / H) + 1) * 0.5 * h                           # (B, N) grid rows
    valid = (x >= 0) & (x < w) & (y >= 0) & (y < h)                           # (B, N)
    idx = (y.clamp(0, h - 1).long() * w + x.clamp(0, w - 1).long())           # (B, N) cell index
    mask = torch.zeros(points_2d.shape[0], h * w, device=points_2d.device)
    return mask.scatter_reduce(1, idx, valid.float(), reduce="amax")


def itp_loss(clusters, points_2d, has_smpl, h, w, input_size=None):
    """clusters (B, M, h*w); points_2d (B, N, 2) GT vertices projected with the predicted camera
    (normalised crop coordinates of a crop of input_size (H, W); None = square).
    Sum over has_smpl samples, clusters and cells of minmax(clusters) * (1 - mask)."""
    sel = has_smpl > 0.5
    if not bool(sel.any()):
        return clusters.sum() * 0
    c = clusters[sel]
    lo, hi = c.min(-1, keepdim=True).values, c.max(-1, keepdim=True).values
    c = (c - lo) / (hi - lo + 1e-12)                                          # min-max per cluster
    mask = itp_mask(points_2d[sel].detach(), h, w, input_size)[:, None]                   # (b, 1, h*w)
    return (c * (1 - mask)).sum()


def _edge_length_face_loss(pred, gt, faces, has_smpl):
    """Official TORE edge loss: |len_pred - len_gt| of the 3 edges of each face (+1e-6 in sqrt)."""
    sel = has_smpl > 0.5
    if not bool(sel.any()):
        return pred.sum() * 0
    p, g = pred[sel], gt[sel]
    d = lambda v, a, b: torch.sqrt(((v[:, faces[:, a]] - v[:, faces[:, b]]) ** 2).sum(-1) + 1e-6)
    return torch.cat([(d(p, a, b) - d(g, a, b)).abs() for a, b in ((0, 1), (0, 2), (1, 2))], 1).mean()


def build_tore(preset="L-R50", backbone=None, topology=None, **overrides):
    if backbone is None or topology is None:
        raise ValueError("tore.py: build_tore needs a backbone module and a topology dict")
    return TORE(dataclasses.replace(PRESETS[preset], **overrides), backbone, topology)


def official_key_names(num_layers, nsr_enc_layers=None):
    """Non-backbone state-dict keys of the official TORE FastMETRO_Body_Network (GTR + ITP)."""
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    wb = lambda m: [f"{m}.weight", f"{m}.bias"]
    enc = [f"self_attn.{a}" for a in attn] + wb("linear1") + wb("linear2") + wb("norm1") + wb("norm2")
    dec = enc + [f"multihead_attn.{a}" for a in attn] + wb("norm3")
    keys = (wb("conv_1x1") + wb("token_selector_conv2d") + wb("token_selector_fc") + wb("layer_norm")
            + ["cam_token_embed.weight", "joint_token_embed.weight", "vertex_token_embed.weight"])
    for t in ("transformer_1", "transformer_2", "transformer_3"):
        n_enc = nsr_enc_layers if (t == "transformer_3" and nsr_enc_layers is not None) else num_layers
        keys += [f"{t}.encoder.layers.{i}.{n}" for i in range(n_enc) for n in enc] + wb(f"{t}.encoder.norm")
        keys += [f"{t}.decoder.layers.{i}.{n}" for i in range(num_layers) for n in dec] + wb(f"{t}.decoder.norm")
    for m in ("dim_reduce_enc", "dim_reduce_dec", "xyz_regressor_j", "xyz_regressor_v", "cam_predictor"):
        keys += wb(m)
    return keys


convert_official_state_dict = fm.convert_official_state_dict


if __name__ == "__main__":
    torch.manual_seed(0)
    topo = fm._smoke_topology()
    x = torch.randn(2, 3, 224, 224)
    B = x.shape[0]
    targets = {"joints3d": torch.cat([torch.randn(B, 14, 3) * 0.3, torch.ones(B, 14, 1)], -1),
               "joints2d": torch.cat([torch.rand(B, 14, 2) * 2 - 1, torch.ones(B, 14, 1)], -1),
               "vertices": torch.randn(B, topo["num_vertices"][0], 3) * 0.1,
               "has_smpl": torch.ones(B), "has_3d": torch.ones(B), "epoch": 5.0}
    for gtr, itp in ((True, True), (True, False), (False, True), (False, False)):
        model = TORE(dataclasses.replace(PRESETS["tiny"], use_gtr=gtr, use_itp=itp), fm._StandInBackbone(64), topo)
        out = model(x)
        loss, logs = model.loss(out, targets)
        loss.backward()
        n_all = sum(p.numel() for p in model.parameters())
        n_bb = sum(p.numel() for p in model.backbone.parameters())
        print(f"GTR={gtr!s:5} ITP={itp!s:5} image tokens {model.keep_num:2d}  "
              + "  ".join(f"{k} {tuple(v.shape)}" for k, v in out.items())
              + f"  loss {logs['loss']:.2f}  params (no backbone) {n_all - n_bb:,}")
