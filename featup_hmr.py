"""ViTPose features + FeatUp JBU upsampling + a deformable (Deformable DETR) SMPL decoder.

Paper: J. Heo, G. Hu, "Deformable Transformer with Feature Upsampling for Human Mesh Recovery",
Stanford CS231n report, code https://github.com/jeffheo/DeformableHMR (not public at the time of
writing: everything below follows the report text, /work/shared/papers/featup_deformable_hmr.txt).
Building blocks:
- FeatUp: S. Fu, M. Hamilton, et al., ICLR 2024, https://arxiv.org/abs/2403.10516 (in featup.py).
- HMR 2.0: S. Goel et al., "Humans in 4D: Reconstructing and Tracking Humans with Transformers",
  ICCV 2023 (frozen ViTPose ViT-H backbone, 256x192 input, 6D rotations, one IEF round from the
  mean parameters).
- Deformable DETR: X. Zhu et al., ICLR 2021, https://arxiv.org/abs/2010.04159 (decoder layer:
  query self-attention, multi-scale deformable cross-attention, FFN; post-norm; learned query
  embeddings split into content + positional part; reference points = sigmoid(Linear(pos))).

Needs featup.py (the FeatUp upsampler and its pre-training) and deformable_attention.py; the
default backbone builder and the pre-training command also need backbones.py.

What this file implements (in the report's order: 3.1 features, 3.2 upsampling, 3.3 decoder, 3.4 loss)
- Upsamplers: featup.JBUStack (FeatUp's joint bilateral upsampler, pre-trained with
  `python featup.py pretrain` or `python featup_hmr.py pretrain-upsampler`, which takes a preset's
  layers / factor / window / input size), or `BilinearUpsampler`, the paper's "no FeatUp"
  baseline. `FeatUpHMRConfig.upsampler_ckpt` loads a pre-trained file at construction; once the
  model is trained its state dict holds those weights, so evaluation and the demo rebuild it
  without the file (`restore_overrides`).
- `FeatUpHMR`: frozen ViT (injected; `forward_features` returns the two layer maps, 16x12 tokens
  each at 256x192) -> per-layer channel LayerNorm (FeatUp's ChannelNorm) -> upsampler ->
  the decoder's FOUR feature levels, fine to coarse:
      level 0: u_16(f_16)  (r*16 x r*12)   FeatUp (or bilinear) x r of the middle layer
      level 1: u_32(f_32)  (r*16 x r*12)   FeatUp (or bilinear) x r of the last layer
      level 2: f_16        (16 x 12)       native middle-layer tokens
      level 3: f_32        (16 x 12)       native last-layer tokens
  (the report defines only the two upsampled maps M_16, M_32 and says the decoder uses 4 scales;
  keeping the native maps as the two coarse scales is our reading). With `upsampler="none"` only
  levels 2-3 are used (2 levels). Each level: 1x1 conv + GroupNorm(32) to d_model (Deformable
  DETR's input_proj) when the backbone width differs from d_model, else identity (the ViT tokens
  are already d_model = 1280 wide for ViT-H, report 3.3), + a learned level embedding.
  Decoder: 26 learned queries (24 pose, 1 shape, 1 camera), `num_layers` Deformable-DETR decoder
  layers (self-attention among queries, `MSDeformAttn` cross-attention over the levels, FFN), or
  the dense HMR 2.0-style variant (`decoder="dense"`: nn.MultiheadAttention over all tokens of all
  levels, DETR sine position added to the keys; preset "vit_h_dense" attends to the 2 x 192 native
  tokens, as HMR 2.0's decoder attends to the ViT tokens). Linear heads: 6D rotation
  per pose token (-> matrix by Gram-Schmidt), 10 betas from the shape token, weak-perspective
  camera (s, tx, ty) from the camera token, all zero-initialised residuals on top of the mean
  parameters (IEF, `ief_iters` rounds, 1 in the paper; the current estimate is embedded and
  added to the queries, as HMR 2.0 feeds the mean parameters as the token input).
  The injected `body_model` turns (betas, rotation matrices) into vertices; LSP-14 joints come
  from the mesh via the H36M regressor (topology["h36m_regressor"], else body_model.h36m_joints).
- `FeatUpHMR.loss`: MSE on SMPL parameters (rotation matrices vs GT rotation matrices, betas;
  weight 1), 2D and 3D LSP joints (weight 5 each), pelvis-centred vertices (weight 60), with
  has_smpl / has_3d flags and per-joint confidences (report 3.4, following CLIFF).
- `mean_params_from_dataset(pose, betas)`: mean SMPL parameters from training data (chordal L2
  mean of each joint's rotation, projected back onto SO(3)).

Departures from the paper / official code (and why)
- Which 4 maps feed the decoder: see above (the report is not explicit). No input_proj when the
  widths already match (our choice; it also brings the ViT-H total to ~715M vs the report's 714M).
- The report does not give decoder sizes: d_model 1280 (its 26 x 1280 query tokens), 8 points
  (its p = 8), 6 layers / 8 heads / FFN 1024 (HMR 2.0's decoder depth, heads and MLP width).
- 6D layout: HMR 2.0's (x = (column 0, column 1)), not SPIN's interleaved (3, 2) view.
- The dense variant reads both layers' native tokens (HMR 2.0 reads only the last layer's);
  the report's HMR 2.0 re-implementation also takes the 26 queries.
- Preset "tiny" (CPU): vit_tiny (middle/last = layers 2/4), FeatUp x2 (one JBU stage) instead of
  x4, d_model 64, 2 layers: x4 would put 4x the tokens into the decoder and cost ~1.7 s per
  batch-8 step on one CPU thread (x2: ~0.2 s).
- No deformable encoder: the frozen ViT is the encoder; the deformable decoder reads its (upsampled)
  maps directly. Deformable DETR's auxiliary per-layer losses are not used (the report does not
  mention them).
- Mean parameters: the report starts IEF from H36M mean SMPL values (a file we do not have).
  `mean_params_path` loads a dict {"pose_6d" (24,6), "betas" (10,), "cam" (3,)} (torch.save, loaded
  with weights_only=True); otherwise use `mean_params_from_dataset` + `set_mean_params`. The
  built-in default is the rest pose with global orientation pi about x (upright in the camera,
  y down), betas 0, camera (0.9, 0, 0).
- Camera: weak perspective (s, tx, ty) with x2d = s * (X[:2] + t) in normalised crop coordinates
  (repository contract, data.normalise_pixels: one length min(H, W) for both axes, so one
  isotropic s is right at 256x192; the person box is [-1, 1]^2), not HMR 2.0's perspective camera
  with focal length 5000. The reference points are learned (not projected), so they need no
  conversion.
- FeatUp itself (JBU, pre-training): see featup.py's header. The report pre-trains on 20% of COCO;
  pre-training here takes any folder of images (the synthetic set in the README).
- Upsampler training: frozen when a checkpoint is loaded (FeatUp upsamplers are used as fixed
  feature extractors), trained end to end with the decoder otherwise (`freeze_upsampler`).
- ViT-H parameter count: the report gives 714M for the full model; our count is printed by
  `python featup_hmr.py` next to it (decoder d_model 1280, 6 layers, 8 heads, 8 points, FFN 1024:
  the report's d=1280 tokens and p=8 points, HMR 2.0's depth 6 and MLP 1024).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deformable_attention import MSDeformAttn
from featup import JBUStack, channel_norm, load_upsampler_ckpt

__all__ = [
    "FeatUpHMRConfig", "PRESETS", "TRAIN_DEFAULTS", "FeatUpHMR", "build_featup_hmr",
    "restore_overrides", "BilinearUpsampler", "build_upsampler", "mean_params_from_dataset",
    "rot6d_to_matrix", "matrix_to_rot6d", "axis_angle_to_matrix",
]

H36M_TO_LSP = [3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10]
NUM_POSE = 24                      # SMPL-24 joints (global orientation + 23 body joints)
NUM_QUERIES = NUM_POSE + 2         # + shape token + camera token


# =========================================================================== small helpers
# (copies of body.py / fastmetro.py helpers, so this file stands alone; tests/test_copies.py
# checks that the copies agree)
def rot6d_to_matrix(x):
    """6D rotation (Zhou et al. 2019) -> rotation matrix by Gram-Schmidt, HMR 2.0 layout.

    Args: x (..., 6) = (a1, a2), the two 3-vectors that become columns 0 and 1 after
        orthonormalisation (HMR 2.0 / ProHMR order; body.rot6d_to_matrix(layout="hmr2")).
    Returns: (..., 3, 3) rotation matrices with columns (b1, b2, b1 x b2); orthonormal, det +1.
    """
    if x.shape[-1] != 6:
        raise ValueError(f"featup_hmr.rot6d_to_matrix: expected (..., 6), got {tuple(x.shape)}")
    a1, a2 = x[..., 0:3], x[..., 3:6]                                 # (..., 3) each
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)                          # (..., 3, 3) columns


def matrix_to_rot6d(R):
    """(..., 3, 3) -> (..., 6) = (column 0, column 1), the inverse of `rot6d_to_matrix`."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], -1)


def axis_angle_to_matrix(aa):
    """Rodrigues: (..., 3) axis-angle (radians) -> (..., 3, 3); smooth at angle 0."""
    angle = aa.norm(dim=-1, keepdim=True).unsqueeze(-1)               # (..., 1, 1)
    x, y, z = aa.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1)      # (..., 9)
    K = K.reshape(*aa.shape[:-1], 3, 3)                               # (..., 9) -> (..., 3, 3)
    small = angle < 1e-4
    safe = torch.where(small, torch.ones_like(angle), angle)
    a = torch.where(small, 1 - angle ** 2 / 6, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - angle ** 2 / 24, (1 - torch.cos(safe)) / safe ** 2)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def weak_perspective_project(points, cam):
    """(B, N, 3) metres, cam (B, 3) = (s, tx, ty) -> (B, N, 2): s * (X[:, :2] + t)."""
    return cam[:, None, :1] * (points[..., :2] + cam[:, None, 1:])


def sine_pos_2d(h, w, dim, device=None, dtype=torch.float32):
    """DETR sine position embedding (normalised with DETR's eps 1e-6, scale 2*pi, temperature 1e4)
    -> (h*w, dim); the same as fastmetro.PositionEmbeddingSine(dim // 2) (tests/test_copies.py)."""
    npf = dim // 2
    y = (torch.arange(h, device=device, dtype=dtype) + 1) / (h + 1e-6) * 2 * math.pi
    x = (torch.arange(w, device=device, dtype=dtype) + 1) / (w + 1e-6) * 2 * math.pi
    t = 10000 ** (2 * (torch.arange(npf, device=device, dtype=dtype) // 2) / npf)  # (npf,)
    py, px = y[:, None] / t, x[:, None] / t                           # (h, npf), (w, npf)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], -1).flatten(1)  # (h, npf/2, 2) -> (h, npf)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], -1).flatten(1)  # (w, npf) likewise
    pos = torch.cat([py[:, None].expand(h, w, npf), px[None].expand(h, w, npf)], -1)  # (h, w, 2*npf)
    pos = F.pad(pos, (0, dim - 2 * npf))                              # odd dim: pad one channel
    return pos.reshape(h * w, dim)                                    # (h, w, dim) -> (h*w, dim)


# =========================================================================== upsamplers (report 3.2)
class BilinearUpsampler(nn.Module):
    """The paper's baseline: bilinear x`factor` (no FeatUp); no parameters."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, source, image=None):
        """(B, C, h, w) -> (B, C, factor*h, factor*w); `image` unused."""
        h, w = source.shape[-2:]
        return F.interpolate(source, (h * self.factor, w * self.factor), mode="bilinear",
                             align_corners=False)


def build_upsampler(kind, feat_dim, factor, key_dim=32, radius=3):
    """"jbu" -> JBUStack, "bilinear" -> BilinearUpsampler."""
    if kind == "jbu":
        return JBUStack(feat_dim, factor, key_dim, radius)
    if kind == "bilinear":
        return BilinearUpsampler(factor)
    raise ValueError(f"featup_hmr: upsampler must be 'jbu', 'bilinear' or 'none', got {kind!r}")


# =========================================================================== mean parameters
def mean_params_from_dataset(pose, betas, cam=(0.9, 0.0, 0.0)):
    """Mean SMPL parameters from training data.

    Args:
        pose: (N, 72) axis-angle (radians), SMPL-24 order.
        betas: (N, 10).
        cam: mean weak-perspective camera (not in the data; HMR 2.0's mean file uses (0.9, 0, 0)).
    Returns:
        {"pose_6d": (24, 6), "betas": (10,), "cam": (3,)} float32: per joint the chordal L2 mean
        rotation (average of matrices projected onto SO(3) by SVD), mean betas.
    """
    pose = torch.as_tensor(pose, dtype=torch.float64)
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if pose.dim() != 2 or pose.shape[1] != 72 or betas.dim() != 2 or betas.shape[0] != pose.shape[0]:
        raise ValueError("featup_hmr.mean_params_from_dataset: expected pose (N, 72) and betas "
                         f"(N, B), got {tuple(pose.shape)} and {tuple(betas.shape)}")
    R = axis_angle_to_matrix(pose.reshape(-1, NUM_POSE, 3)).mean(0)   # (N, 72) -> (N, 24, 3) -> (24, 3, 3)
    U, _, Vh = torch.linalg.svd(R)
    d = torch.det(U @ Vh).sign()                                      # (24,) fix reflections
    U = torch.cat([U[..., :2], U[..., 2:] * d[:, None, None]], -1)
    Rm = U @ Vh                                                       # (24, 3, 3) in SO(3)
    return {"pose_6d": matrix_to_rot6d(Rm).float(), "betas": betas.mean(0).float(),
            "cam": torch.tensor(cam, dtype=torch.float32)}


# =========================================================================== config
@dataclass
class FeatUpHMRConfig:
    backbone: str = "vit_h"                     # backbones.build_backbone name
    input_size: tuple = (256, 192)              # (H, W), ViTPose / HMR 2.0
    feature_layers: tuple = (16, 32)            # 1-based ViT block indices of the two maps
    patch_size: int = 16
    upsampler: str = "jbu"                      # "jbu" (FeatUp) | "bilinear" | "none" (native only)
    upsample_factor: int = 4                    # r in {4, 8, 16}; the report's best is 4
    upsampler_ckpt: str | None = None           # path written by `pretrain-upsampler`
    freeze_upsampler: bool | None = None        # None: frozen iff a checkpoint is loaded
    jbu_key_dim: int = 32
    jbu_radius: int = 3
    channel_norm: bool = True                   # FeatUp's ChannelNorm on the backbone maps
    decoder: str = "deformable"                 # "deformable" | "dense" (HMR 2.0-style)
    d_model: int = 1280                         # query tokens in R^{26 x 1280} (report 3.3)
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 8                         # p = 8 sampling points per head (report 4)
    dim_feedforward: int = 1024
    dropout: float = 0.1
    ief_iters: int = 1
    num_betas: int = 10
    mean_params_path: str | None = None         # torch.save({"pose_6d","betas","cam"})
    mean_cam: tuple = (0.9, 0.0, 0.0)
    loss_weights: dict = field(default_factory=lambda: {
        "smpl": 1.0, "joints2d": 5.0, "joints3d": 5.0, "vertices": 60.0})

    @property
    def out_indices(self):
        """backbones.build_backbone(out_indices=...): 1-based layer numbers, = feature_layers."""
        return tuple(int(l) for l in self.feature_layers)

    @property
    def backbone_kwargs(self):
        """Extra kwargs for backbones.build_backbone (train.build_model reads this)."""
        return {"out_indices": self.out_indices}

    @property
    def num_levels(self):
        return 2 if self.upsampler == "none" else 4


PRESETS = {
    # The report's model: ViT-H layers 16/32, FeatUp JBU x4, deformable decoder.
    "vit_h": FeatUpHMRConfig(),
    # Table 1/2 comparisons: no FeatUp (bilinear x4), FeatUp x8 / x16, dense decoder.
    "vit_h_bilinear": FeatUpHMRConfig(upsampler="bilinear"),
    "vit_h_x8": FeatUpHMRConfig(upsample_factor=8),
    "vit_h_x16": FeatUpHMRConfig(upsample_factor=16),
    "vit_h_dense": FeatUpHMRConfig(upsampler="none", decoder="dense"),
    "vit_b": FeatUpHMRConfig(backbone="vit_b", feature_layers=(6, 12), d_model=768),
    # CPU preset: vit_tiny (4 blocks -> middle/last = 2/4), small decoder, FeatUp JBU x2 (one
    # stage, FeatUp's 7x7 window): ~0.2 s per batch-8 train step on one CPU thread, vs ~1.7 s
    # with x4 (64x48 maps: 4x the decoder tokens and JBU pixels).
    "tiny": FeatUpHMRConfig(backbone="vit_tiny", feature_layers=(2, 4), upsample_factor=2,
                            d_model=64, num_layers=2, num_heads=4, num_points=4,
                            dim_feedforward=128, dropout=0.0),
}

# Training: the report trains 50 epochs on a 20% subsample with the ViT frozen and gives no
# optimiser settings; we use HMR 2.0's (4D-Humans config: AdamW, lr 1e-5, weight decay 1e-4,
# batch 48 per GPU; no gradient clipping) and no LR drops.
TRAIN_DEFAULTS = dict(lr=1e-5, weight_decay=1e-4, clip_grad_norm=None, clip_mode="norm",
                      epochs=50, batch_per_gpu=48, lr_drop_epochs=[])


# =========================================================================== decoder layers
class DeformableDecoderLayer(nn.Module):
    """Deformable DETR decoder layer (post-norm): self-attn, MSDeformAttn cross-attn, FFN."""

    def __init__(self, d_model, n_heads, n_levels, n_points, dim_ff, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_ff), nn.Linear(dim_ff, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, reference_points, memory, shapes, start_index, mem_pos=None):
        """tgt, query_pos (B, Q, d); reference_points (B, Q, L, 2) in [0, 1]; memory (B, S, d)
        -> (B, Q, d). `mem_pos` unused (deformable attention samples by location)."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, start_index)
        tgt = self.norm1(tgt + self.dropout(tgt2))
        ff = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ff))


class DenseDecoderLayer(nn.Module):
    """Same layer with standard dense cross-attention over all memory tokens (HMR 2.0-style)."""

    def __init__(self, d_model, n_heads, dim_ff, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_ff), nn.Linear(dim_ff, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, reference_points, memory, shapes, start_index, mem_pos=None):
        """tgt, query_pos (B, Q, d); memory (B, S, d); mem_pos (1, S, d) added to the keys
        -> (B, Q, d). `reference_points`, `shapes`, `start_index` unused."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        k = memory if mem_pos is None else memory + mem_pos
        tgt2 = self.cross_attn(tgt + query_pos, k, memory, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(tgt2))
        ff = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ff))


# =========================================================================== the model
class FeatUpHMR(nn.Module):
    """Frozen ViT -> FeatUp/bilinear upsampling -> deformable (or dense) SMPL decoder -> body model.

    Args:
        cfg: FeatUpHMRConfig.
        backbone: ViT with `forward_features(x) -> [(B, C16, H/16, W/16), (B, C32, H/16, W/16)]`
            (the two chosen layers) and `feature_channels` (frozen here: no grad, eval mode).
        topology: optional TOPOLOGY dict; only "h36m_regressor" (17, V) is used (LSP joints and
            the pelvis). Without it, `body_model.h36m_joints(vertices)` is used.
        body_model: nn.Module, forward(betas (B,10), pose (B,24,3,3)) -> {"vertices": (B,V,3),
            "joints": (B,24,3)} (body.BodyModel or any stand-in).
    """

    def __init__(self, cfg, backbone, topology=None, body_model=None):
        super().__init__()
        if body_model is None:
            raise ValueError("featup_hmr.FeatUpHMR: a body_model (body.BodyModel or stand-in) is required")
        if cfg.upsampler not in ("jbu", "bilinear", "none"):
            raise ValueError(f"featup_hmr.FeatUpHMR: cfg.upsampler must be jbu|bilinear|none, got {cfg.upsampler!r}")
        if cfg.decoder not in ("deformable", "dense"):
            raise ValueError(f"featup_hmr.FeatUpHMR: cfg.decoder must be deformable|dense, got {cfg.decoder!r}")
        if cfg.ief_iters < 1:
            raise ValueError(f"featup_hmr.FeatUpHMR: cfg.ief_iters must be >= 1, got {cfg.ief_iters}")
        self.cfg = cfg
        self.backbone = backbone
        backbone.requires_grad_(False)
        backbone.eval()
        self.body_model = body_model
        dims = list(getattr(backbone, "feature_channels", []))[-2:]
        if len(dims) != 2:
            raise ValueError("featup_hmr.FeatUpHMR: backbone.feature_channels must list the two "
                             f"layer widths, got {getattr(backbone, 'feature_channels', None)}")
        self.feat_dims = dims
        if topology is not None and "h36m_regressor" in topology:
            self.register_buffer("h36m_regressor", topology["h36m_regressor"].float().clone(),
                                 persistent=False)
        else:
            self.h36m_regressor = None
            if not hasattr(body_model, "h36m_joints"):
                raise ValueError("featup_hmr.FeatUpHMR: need topology['h36m_regressor'] or "
                                 "body_model.h36m_joints for the LSP joints")

        # ---- upsamplers (one per layer) and the level list
        d, L = cfg.d_model, cfg.num_levels
        if cfg.upsampler == "none":
            self.upsamplers = nn.ModuleList()
            level_dims = dims
        else:
            self.upsamplers = nn.ModuleList(build_upsampler(cfg.upsampler, c, cfg.upsample_factor,
                                                            cfg.jbu_key_dim, cfg.jbu_radius) for c in dims)
            level_dims = dims + dims
        if cfg.upsampler_ckpt and cfg.upsampler == "jbu":
            self.load_upsampler(cfg.upsampler_ckpt)
        freeze = cfg.freeze_upsampler
        if freeze is None:
            freeze = bool(cfg.upsampler_ckpt)
        self.upsamplers.requires_grad_(not freeze)
        self._freeze_upsampler = freeze
        # Deformable DETR's input_proj (1x1 conv + GroupNorm(32)) where the width changes; the
        # identity where it does not (ViT-H/B: tokens already d_model = C wide, report 3.3).
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(math.gcd(32, d), d)) if c != d else nn.Identity()
            for c in level_dims)
        self.level_embed = nn.Parameter(torch.empty(L, d))

        # ---- queries, decoder, heads
        self.query_embed = nn.Embedding(NUM_QUERIES, 2 * d)          # (pos | content) as Deformable DETR
        self.reference_points = nn.Linear(d, 2)
        self.param_embed_pose = nn.Linear(6, d)                      # IEF: current estimate -> query
        self.param_embed_shape = nn.Linear(cfg.num_betas, d)
        self.param_embed_cam = nn.Linear(3, d)
        if cfg.decoder == "deformable":
            self.layers = nn.ModuleList(DeformableDecoderLayer(d, cfg.num_heads, L, cfg.num_points,
                                                               cfg.dim_feedforward, cfg.dropout)
                                        for _ in range(cfg.num_layers))
        else:
            self.layers = nn.ModuleList(DenseDecoderLayer(d, cfg.num_heads, cfg.dim_feedforward, cfg.dropout)
                                        for _ in range(cfg.num_layers))
        self.dec_pose = nn.Linear(d, 6)
        self.dec_shape = nn.Linear(d, cfg.num_betas)
        self.dec_cam = nn.Linear(d, 3)

        # ---- mean parameters (IEF start)
        eye6 = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])          # identity's columns 0, 1
        pose6 = eye6.repeat(NUM_POSE, 1)                              # (24, 6)
        pose6[0] = torch.tensor([1.0, 0.0, 0.0, 0.0, -1.0, 0.0])      # pi about x: diag(1, -1, -1)
        self.register_buffer("mean_pose_6d", pose6)
        self.register_buffer("mean_betas", torch.zeros(cfg.num_betas))
        self.register_buffer("mean_cam", torch.tensor(cfg.mean_cam, dtype=torch.float32))
        self._reset_parameters()
        if cfg.mean_params_path:
            self.set_mean_params(torch.load(cfg.mean_params_path, map_location="cpu", weights_only=True))

    def _reset_parameters(self):
        for layer in self.layers:                                     # MSDeformAttn keeps its own init
            dense = isinstance(layer, DenseDecoderLayer)
            for name, p in layer.named_parameters():
                if p.dim() > 1 and (dense or not name.startswith("cross_attn.")):
                    nn.init.xavier_uniform_(p)
        for proj in self.input_proj:
            if isinstance(proj, nn.Sequential):
                nn.init.xavier_uniform_(proj[0].weight, gain=1)
                nn.init.zeros_(proj[0].bias)
        nn.init.normal_(self.level_embed)
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.zeros_(self.reference_points.bias)
        for head in (self.dec_pose, self.dec_shape, self.dec_cam):   # step 0 = mean parameters
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    # ------------------------------------------------------------------ state management
    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()                                          # frozen: no dropout/BN updates
        if self._freeze_upsampler:
            self.upsamplers.eval()
        return self

    def set_mean_params(self, params):
        """params: {"pose_6d" (24,6), "betas" (num_betas,), "cam" (3,)} (e.g. mean_params_from_dataset)."""
        for key, buf, shape in (("pose_6d", self.mean_pose_6d, (NUM_POSE, 6)),
                                ("betas", self.mean_betas, (self.cfg.num_betas,)),
                                ("cam", self.mean_cam, (3,))):
            if key not in params:
                raise ValueError(f"featup_hmr.set_mean_params: missing key {key!r}")
            v = torch.as_tensor(params[key], dtype=buf.dtype)
            if tuple(v.shape) != shape:
                raise ValueError(f"featup_hmr.set_mean_params: {key!r} must be {shape}, got {tuple(v.shape)}")
            with torch.no_grad():
                buf.copy_(v)

    def load_upsampler(self, path):
        """Load a `pretrain-upsampler` checkpoint into the JBU upsamplers (factor/dims checked)."""
        cfg, state = load_upsampler_ckpt(path)
        have = (int(cfg["factor"]), list(cfg["feat_dims"]), int(cfg["radius"]), int(cfg["key_dim"]))
        need = (self.cfg.upsample_factor, list(self.feat_dims), self.cfg.jbu_radius, self.cfg.jbu_key_dim)
        if have != need:
            raise ValueError(f"featup_hmr: upsampler checkpoint {path} has (factor, feat_dims, radius, "
                             f"key_dim) = {have}; the model config needs {need}")
        if bool(cfg.get("channel_norm", True)) != self.cfg.channel_norm:
            raise ValueError(f"featup_hmr: upsampler checkpoint {path} was trained with channel_norm="
                             f"{cfg.get('channel_norm', True)}; the model config has {self.cfg.channel_norm}")
        self.upsamplers.load_state_dict(state)

    # ------------------------------------------------------------------ pieces
    def feature_levels(self, images):
        """Images (B, 3, H, W) -> list of L maps [(B, C_l, H_l, W_l)], fine to coarse (see header)."""
        with torch.no_grad():
            feats = self.backbone.forward_features(images)
        if len(feats) != 2:
            raise ValueError("featup_hmr.FeatUpHMR: backbone.forward_features must return the two "
                             f"layer maps (build it with out_indices={self.cfg.out_indices}), got {len(feats)}")
        if self.cfg.channel_norm:
            feats = [channel_norm(f) for f in feats]
        if self.cfg.upsampler == "none":
            return list(feats)
        ups = [up(f, images) for up, f in zip(self.upsamplers, feats)]   # (B, C, r*h, r*w) each
        return ups + list(feats)

    def memory(self, levels):
        """Maps -> flattened memory (B, S, d), spatial shapes [(H_l, W_l)] and level start indices
        [L] as Python ints (host-side: MSDeformAttn never reads a device tensor back), key
        position embedding (1, S, d) (DETR sine; dense decoder only, else None)."""
        srcs, shapes, pos = [], [], []
        for l, (x, proj) in enumerate(zip(levels, self.input_proj)):
            x = proj(x)                                               # (B, d, H_l, W_l)
            h, w = int(x.shape[-2]), int(x.shape[-1])
            shapes.append((h, w))
            srcs.append(x.flatten(2).transpose(1, 2) + self.level_embed[l])  # (B, d, H_l*W_l) -> (B, H_l*W_l, d)
            if self.cfg.decoder == "dense":                           # keys need positions
                pos.append(sine_pos_2d(h, w, x.shape[1], x.device, x.dtype))
        memory = torch.cat(srcs, 1)                                   # (B, S, d)
        start = [sum(h * w for h, w in shapes[:l]) for l in range(len(shapes))]  # L ints
        return memory, shapes, start, (torch.cat(pos, 0)[None] if pos else None)

    def decode(self, memory, shapes, start, mem_pos, pose6, betas, cam):
        """One IEF round: queries conditioned on the current estimate -> decoder -> residuals.

        Args: memory (B, S, d); pose6 (B, 24, 6); betas (B, 10); cam (B, 3).
        Returns: updated (pose6, betas, cam), reference points (B, 26, 2).
        """
        B = memory.shape[0]
        pos, tgt = self.query_embed.weight.split(self.cfg.d_model, dim=1)   # (26, d) each
        pos = pos[None].expand(B, -1, -1)
        est = torch.cat([self.param_embed_pose(pose6), self.param_embed_shape(betas)[:, None],
                         self.param_embed_cam(cam)[:, None]], 1)       # (B, 26, d)
        tgt = tgt[None] + est
        ref = self.reference_points(pos).sigmoid()                   # (B, 26, 2) (x, y) in [0, 1]
        ref_l = ref[:, :, None].expand(-1, -1, len(shapes), -1)      # (B, 26, 2) -> (B, 26, L, 2)
        for layer in self.layers:
            tgt = layer(tgt, pos, ref_l, memory, shapes, start, mem_pos)
        pose6 = pose6 + self.dec_pose(tgt[:, :NUM_POSE])             # (B, 24, 6)
        betas = betas + self.dec_shape(tgt[:, NUM_POSE])             # (B, 10)
        cam = cam + self.dec_cam(tgt[:, NUM_POSE + 1])               # (B, 3)
        return pose6, betas, cam, ref

    def h36m_joints(self, vertices):
        """(B, V, 3) -> (B, 17, 3) H36M joints from the mesh."""
        if self.h36m_regressor is not None:
            return torch.einsum("jv,bvc->bjc", self.h36m_regressor.to(vertices.dtype), vertices)
        return self.body_model.h36m_joints(vertices)

    # ------------------------------------------------------------------ forward / loss
    def forward(self, images):
        """
        Args:
            images: (B, 3, H, W) ImageNet-normalised, (H, W) = cfg.input_size.
        Returns dict:
            "vertices" (B, V, 3) metres, body-model frame (not centred);
            "joints" (B, 14, 3) LSP joints from the mesh (H36M regressor), metres;
            "cam" (B, 3) weak perspective (s, tx, ty); "joints2d" (B, 14, 2) normalised crop coords;
            "pose_rotmat" (B, 24, 3, 3); "pose_6d" (B, 24, 6); "betas" (B, 10);
            "joints_smpl" (B, 24, 3) kinematic joints; "reference_points" (B, 26, 2) in [0, 1].
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"featup_hmr.FeatUpHMR: images must be (B, 3, H, W), got {tuple(images.shape)}")
        B = images.shape[0]
        levels = self.feature_levels(images)
        memory, shapes, start, mem_pos = self.memory(levels)
        pose6 = self.mean_pose_6d[None].expand(B, -1, -1)
        betas = self.mean_betas[None].expand(B, -1)
        cam = self.mean_cam[None].expand(B, -1)
        for _ in range(self.cfg.ief_iters):
            pose6, betas, cam, ref = self.decode(memory, shapes, start, mem_pos, pose6, betas, cam)
        rotmat = rot6d_to_matrix(pose6)                              # (B, 24, 3, 3)
        body = self.body_model(betas, rotmat)
        verts = body["vertices"]
        joints = self.h36m_joints(verts)[:, H36M_TO_LSP]             # (B, 17, 3) -> (B, 14, 3)
        return {"vertices": verts, "joints": joints, "cam": cam,
                "joints2d": weak_perspective_project(joints, cam),
                "pose_rotmat": rotmat, "pose_6d": pose6, "betas": betas,
                "joints_smpl": body["joints"], "reference_points": ref}

    def loss(self, out, targets):
        """MSE losses (report 3.4): 1 * SMPL params + 5 * (2D + 3D joints) + 60 * vertices.

        targets: "joints3d" (B,14,4) metres+conf, "joints2d" (B,14,3) normalised+conf, "vertices"
        (B,V,3) metres, "has_smpl" (B,), "has_3d" (B,), "pose" (B,72) axis-angle, "betas" (B,10).
        3D joints are centred at the LSP hip midpoint, vertices at the H36M pelvis (regressor
        joint 0). Returns (total loss, logs dict of floats).
        """
        w = self.cfg.loss_weights
        B = out["vertices"].shape[0]
        for key, shape in (("joints3d", (B, 14, 4)), ("joints2d", (B, 14, 3)), ("pose", (B, 72)),
                           ("betas", (B, self.cfg.num_betas)), ("has_smpl", (B,)), ("has_3d", (B,))):
            if key not in targets or tuple(targets[key].shape) != shape:
                got = tuple(targets[key].shape) if key in targets else None
                raise ValueError(f"featup_hmr.loss: targets[{key!r}] must be {shape}, got {got}")
        has_smpl = targets["has_smpl"].float()
        has_3d = targets["has_3d"].float()

        def wmean(err, weight):                                       # err (B, ...), weight broadcastable
            weight = weight.expand_as(err)
            return (err * weight).sum() / weight.sum().clamp_min(1e-8)

        # SMPL parameters
        gt_rot = axis_angle_to_matrix(targets["pose"].reshape(B, NUM_POSE, 3))  # (B, 72) -> (B, 24, 3, 3)
        l_pose = wmean((out["pose_rotmat"] - gt_rot).square(), has_smpl[:, None, None, None])
        l_betas = wmean((out["betas"] - targets["betas"]).square(), has_smpl[:, None])
        # 3D joints, hip-midpoint centred (LSP R_Hip=2, L_Hip=3)
        pj, gj = out["joints"], targets["joints3d"][..., :3]
        pj = pj - pj[:, 2:4].mean(1, keepdim=True)
        gj = gj - gj[:, 2:4].mean(1, keepdim=True)
        conf3 = targets["joints3d"][..., 3:] * has_3d[:, None, None]  # (B, 14, 1)
        l_j3d = wmean((pj - gj).square(), conf3)
        # 2D joints
        l_j2d = wmean((out["joints2d"] - targets["joints2d"][..., :2]).square(),
                      targets["joints2d"][..., 2:])
        # vertices, pelvis centred
        if "vertices" in targets:
            pv, gv = out["vertices"], targets["vertices"]
            pv = pv - self.h36m_joints(pv)[:, :1]
            gv = gv - self.h36m_joints(gv)[:, :1]
            l_vert = wmean((pv - gv).square(), has_smpl[:, None, None])
        else:
            l_vert = out["vertices"].new_zeros(())
        total = (w["smpl"] * (l_pose + l_betas) + w["joints2d"] * l_j2d + w["joints3d"] * l_j3d
                 + w["vertices"] * l_vert)
        logs = {k: float(v.detach()) for k, v in (
            ("loss", total), ("loss_pose", l_pose), ("loss_betas", l_betas), ("loss_joints3d", l_j3d),
            ("loss_joints2d", l_j2d), ("loss_vertices", l_vert))}
        return total, logs


def build_featup_hmr(preset="tiny", backbone=None, body_model=None, topology=None, **overrides):
    """PRESETS[preset] (+ overrides) -> FeatUpHMR. `backbone` defaults to
    backbones.build_backbone(cfg.backbone, out_indices=cfg.out_indices) (imported lazily)."""
    from dataclasses import replace
    cfg = replace(PRESETS[preset], **overrides)
    if backbone is None:
        from backbones import build_backbone
        backbone = build_backbone(cfg.backbone, **cfg.backbone_kwargs)
    return FeatUpHMR(cfg, backbone, topology, body_model)


def restore_overrides(overrides):
    """Config overrides of a trained model -> the overrides that rebuild it for its own checkpoint.

    The files read at construction are not needed then: the upsamplers' weights from
    `upsampler_ckpt` and the mean parameters from `mean_params_path` (persistent buffers) are in
    the checkpoint's state dict. Drops both and keeps the freezing the file implied, so evaluation,
    the demo and fine-tuning rebuild the same model without the files (train.py's checkpoint loader).
    """
    out = dict(overrides or {})
    if out.get("upsampler_ckpt") and out.get("freeze_upsampler") is None:
        out["freeze_upsampler"] = True                               # what the file implied
    out.pop("upsampler_ckpt", None)
    out.pop("mean_params_path", None)
    return out


def count_parameters(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# =========================================================================== smoke test / CLI
class _StandInViT(nn.Module):
    """Minimal ViT (patch embed, pos embed, pre-norm blocks) exposing forward_features at two
    1-based layers; used by the smoke test so this file runs on its own."""

    def __init__(self, dim=64, depth=4, heads=4, patch=16, img_size=(256, 192), out_indices=(2, 4)):
        super().__init__()
        self.patch, self.out_indices = patch, tuple(out_indices)
        self.grid = (img_size[0] // patch, img_size[1] // patch)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, dim))
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.0, "gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(depth))
        self.feature_channels = [dim] * len(self.out_indices)
        self.feature_strides = [patch] * len(self.out_indices)
        self.out_channels = dim

    def forward_features(self, x):
        """(B, 3, H, W) -> [(B, dim, H/16, W/16)] at out_indices."""
        x = self.patch_embed(x)                                       # (B, C, h, w)
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]      # (B, C, h*w) -> (B, h*w, C)
        outs = []
        for k, blk in enumerate(self.blocks, start=1):               # 1-based layer numbers
            x = blk(x)
            if k in self.out_indices:
                outs.append(x.transpose(1, 2).reshape(B, C, h, w))    # (B, h*w, C) -> (B, C, h, w)
        return outs


class _StandInBody(nn.Module):
    """Body stand-in: vertices = template + W_pose (R - I) + W_shape betas (linear), joints by a
    fixed regressor; h36m_joints likewise."""

    def __init__(self, num_vertices=431, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("v_template", torch.randn(num_vertices, 3, generator=g) * 0.3)
        self.register_buffer("pose_dirs", torch.randn(NUM_POSE * 9, num_vertices * 3, generator=g) * 0.01)
        self.register_buffer("shape_dirs", torch.randn(10, num_vertices * 3, generator=g) * 0.01)
        self.register_buffer("J_regressor", torch.softmax(torch.randn(24, num_vertices, generator=g) * 3, 1))
        self.register_buffer("J_regressor_h36m", torch.softmax(torch.randn(17, num_vertices, generator=g) * 3, 1))
        self.num_vertices = num_vertices

    def forward(self, betas, pose):
        B = betas.shape[0]
        eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
        d = (pose - eye).reshape(B, -1) @ self.pose_dirs + betas @ self.shape_dirs  # (B, V*3)
        v = self.v_template + d.reshape(B, -1, 3)                     # (B, V*3) -> (B, V, 3)
        return {"vertices": v, "joints": self.J_regressor @ v}

    def h36m_joints(self, vertices):
        return self.J_regressor_h36m @ vertices


def _smoke():
    torch.manual_seed(0)
    H, W = PRESETS["tiny"].input_size
    body = _StandInBody()
    rows = []
    for name, over in [("deformable + FeatUp x2 (tiny preset)", {}),
                       ("deformable + bilinear x2", {"upsampler": "bilinear"}),
                       ("deformable + FeatUp x4", {"upsample_factor": 4}),
                       ("deformable + FeatUp x8", {"upsample_factor": 8}),
                       ("deformable + FeatUp x16", {"upsample_factor": 16}),
                       ("dense (HMR 2.0-style), native maps", {"upsampler": "none", "decoder": "dense"})]:
        from dataclasses import replace
        cfg = replace(PRESETS["tiny"], **over)
        vit = _StandInViT(dim=64, depth=4, out_indices=cfg.out_indices)
        model = FeatUpHMR(cfg, vit, None, body)
        x = torch.randn(2, 3, H, W)
        out = model(x)
        rows.append((name, count_parameters(model) - count_parameters(vit), count_parameters(vit)))
        if not over:
            for k, v in out.items():
                print(f"  out[{k!r}]: {tuple(v.shape)}")
            levels = model.feature_levels(x)
            print("  decoder levels (H_l, W_l):", [tuple(l.shape[-2:]) for l in levels])
    print("tiny preset with an inline stand-in ViT (dim 64, depth 4) and stand-in body:")
    for name, head, vit in rows:
        print(f"  {name:38s} head params {head / 1e6:7.3f}M   (+ stand-in ViT {vit / 1e6:.3f}M)")

    # ViT-H model size on the meta device (no memory), next to the report's 714M.
    print("ViT-H model (preset 'vit_h'), built on the meta device:")
    for preset in ("vit_h", "vit_h_bilinear", "vit_h_dense", "vit_b"):
        cfg = PRESETS[preset]
        try:
            from backbones import build_backbone                     # guarded: optional here
            with torch.device("meta"):
                vit = build_backbone(cfg.backbone, **cfg.backbone_kwargs)
            src = "backbones.py"
        except Exception as e:                                        # noqa: BLE001
            vit, src = None, f"not available ({type(e).__name__}: {e})"
        with torch.device("meta"):
            if vit is None:
                dims = {"vit_h": (1280, 32, 16), "vit_b": (768, 12, 12)}[cfg.backbone]
                standin = _StandInViT(dims[0], dims[1], dims[2], out_indices=cfg.out_indices)
            model = FeatUpHMR(cfg, vit if vit is not None else standin, None, _StandInBody(16))
        bb = count_parameters(model.backbone)
        total = count_parameters(model)
        note = "paper: 714M (FeatUp x4), 713M (bilinear), HMR 2.0 725M" if preset.startswith("vit_h") else ""
        if vit is None:
            print(f"  {preset:15s} backbones.py {src}; with an inline ViT of the same dims: "
                  f"total {total / 1e6:.1f}M (ViT {bb / 1e6:.1f}M, head {(total - bb) / 1e6:.1f}M)  {note}")
        else:
            print(f"  {preset:15s} total {total / 1e6:.1f}M (ViT {bb / 1e6:.1f}M, head "
                  f"{(total - bb) / 1e6:.1f}M, upsamplers {count_parameters(model.upsamplers) / 1e6:.2f}M)  {note}")


def _pretrain_cli(argv):
    """`pretrain-upsampler`: featup.py's `pretrain` with a preset's layers, factor, window, key size
    and input size as defaults (--preset, default by --backbone), so the file loads into that preset."""
    import argparse
    import featup
    ap = argparse.ArgumentParser(prog="featup_hmr.py pretrain-upsampler", add_help=False)
    ap.add_argument("--backbone", default="vit_tiny")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--layers", type=int, nargs=2, default=None)
    ap.add_argument("--factor", type=int, default=None)
    ap.add_argument("--radius", type=int, default=None)
    ap.add_argument("--key-dim", type=int, default=None)
    ap.add_argument("--input-size", type=int, nargs=2, default=None)
    known, rest = ap.parse_known_args(argv)
    preset = known.preset or {"vit_h": "vit_h", "vit_b": "vit_b", "vit_tiny": "tiny"}.get(known.backbone, "vit_h")
    if preset not in PRESETS:
        raise SystemExit(f"featup_hmr.py pretrain-upsampler: unknown --preset {preset!r}; choose one of "
                         f"{sorted(PRESETS)}")
    cfg = PRESETS[preset]
    layers = known.layers or cfg.feature_layers
    size = known.input_size or cfg.input_size
    args = ["--backbone", known.backbone, "--layers", *map(str, layers),
            "--factor", str(known.factor or cfg.upsample_factor),
            "--radius", str(cfg.jbu_radius if known.radius is None else known.radius),
            "--key-dim", str(known.key_dim or cfg.jbu_key_dim), "--input-size", *map(str, size)]
    return featup.main(args + rest)


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1 and sys.argv[1] == "pretrain-upsampler":
        _pretrain_cli(sys.argv[2:])
    elif len(sys.argv) > 1:
        raise SystemExit("usage: python featup_hmr.py [pretrain-upsampler --images DIR --out ckpt.pt ...]")
    else:
        _smoke()
