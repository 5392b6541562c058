"""DeFormer: decoder-only deformable mesh transformer for 3D human mesh recovery.

Paper: Yoshiyasu, "Deformable Mesh Transformer for 3D Human Mesh Recovery", CVPR 2023
(poster text in shared/papers/deformer_cvpr2023_poster.txt; the official repository,
github.com/yusukey03012/DeFormer, holds a README and two figures, no code).
Deformable attention: Zhu et al., "Deformable DETR", ICLR 2021, https://arxiv.org/abs/2010.04159

Official figures (shared/papers/deformer_overview.png, deformer_summary.png) and how we read them
- Backbone maps 64x64, 32x32, 16x16, 8x8 plus a 1x1 global feature: HRNet at strides 4..32 on
  a 256x256 input (presets "paper", "dense", "hrformer"; "paper-384x288" gives 96x72 .. 12x9).
- "Transformer Decoder ... x3": joint and vertex queries -> "3D regressor / Ref. points" ->
  Body Sparse Self-Attention -> DMA, the box repeated x3. Read as 3 decoder blocks per query
  mesh level, run coarse to fine (431 then 1723 vertex queries: 6 blocks in all). The figure
  draws one query set and no hierarchy; the poster's "6904 queries" row says the default uses
  fewer than the full mesh, and the METRO family's 431 -> 1723 -> 6890 hierarchy is the one we
  have. The literal single-level reading is `mesh_levels=(1,), blocks_per_level=(3,)`.
- "Dense mesh recovery" (MLPs, "Global Scaling") after the decoder, giving body-joint and
  mesh-vertex outputs, each with a loss: `DenseMeshRecovery`. Read as: MLPs on the decoder's
  output tokens predict ONE scale per sample (the figure's MLP output multiplies the token row
  as a whole), applied to the decoder's joints and vertices about the mesh's pelvis; then the
  vertices are upsampled to the full 6890 mesh by the fixed barycentric up maps ("dense").
  Zero-initialised: the stage starts as the identity of its input mesh. Its output is the
  model's output and is supervised like every other step.

What this file implements
- Multi-scale image features: the backbone's 4 maps (strides 4..32; by default the 2D-pose
  HRNet-W48 `hrnet_w48_pose`, the poster's "pre-trained on 2D human pose: MPII or COCO":
  deep-high-resolution-net / MMPose checkpoints load into it, no classification head is built),
  each projected to the model width (1x1 conv + GroupNorm, as Deformable DETR's input_proj)
  plus a learned level embedding; a pooled global feature (the figure's 1x1).
- An initial estimate (the figure's "3D regressor") from the global feature: coarse template
  + regressed per-vertex offsets, plus the weak-perspective camera (s, tx, ty).
- A decoder-only transformer over [J joint tokens; V_l vertex tokens]. Each block:
  Body Sparse self-attention (SCAP mask, block-sparse, sparse_attention.py) ->
  Deformable Mesh cross-Attention (reference points = the current 3D joints/vertices
  projected with the current camera, multi-scale deformable attention samples there) ->
  MLP on [attended features, current coordinates] -> corrective displacements, 3D estimate
  updated (feedback loop t -> t+1) -> FFN.
- Coarse-to-fine over the mesh hierarchy (default 431 -> 1723 vertex queries; "dense" preset
  431 -> 1723 -> 6890, i.e. 6890 + 14 = "6904 queries" in the last stage), tokens and
  coordinates upsampled with the topology's barycentric up maps.
- Dense mesh recovery (global scaling, upsampling to the full mesh), see above.
- METRO-family losses at every level and every refinement step.
- `python deformer.py`: smoke test (forward + loss + backward on a stand-in, non-square input)
  and each preset's parameter count (backbone on the meta device; decoder on the toy body,
  whose levels have SMPL's vertex counts). The smoke test alone also imports body.py and
  backbones.py.

Cameras and reference points (non-square inputs)
- 2D labels and `project` use normalised crop coordinates with ONE length L = min(H, W) for
  both axes (data.py's convention: u = 2x/L - W/L, v = 2y/L - H/L), so the isotropic
  weak-perspective scale s is right at 256x192 or 384x288 too. `normalised_to_unit` maps
  them to the [0, 1] image coordinates the deformable attention samples in
  (x/W = (u L/W + 1)/2, y/H = (v L/H + 1)/2); at H == W it is (uv + 1) / 2.

Design choices where the poster is silent (simplest option consistent with it and METRO family)
1. Width 256, 8 heads, FFN 1024, dropout 0.1, pre-norm blocks, ReLU (Deformable DETR sizes);
   deformable attention with 8 heads x 4 levels x 4 points.
2. Blocks: 3 per mesh level (431, 1723) = 6 decoder blocks (the figure's x3, read above);
   "dense" preset: 2 per level on 431, 1723, 6890 (same total of 6, to bound its cost).
3. Values of the cross-attention = projected maps + level embedding (no sine positional
   encoding: sampling positions come from the mesh, as in Deformable DETR's decoder values).
4. Global feature = global-average-pool of each of the 4 raw backbone maps, concatenated,
   Linear + ReLU (the backbone's classification path is not run); it initialises the query
   tokens and the initial estimate, and is not a 5th level of the deformable attention.
5. Initial estimate: template of the coarsest query level, rotated by pi about x (datasets'
   usual global orientation, so it is upright in the image, y down) and pelvis-centred;
   X0 = template + offsets; last layer zero-initialised so X0 = template at start,
   camera bias initialised to (s=1, 0, 0). Initial joints = joint_regressor[level] @ X0. (The
   global scale moved from here to the dense mesh recovery, where the figure draws it.)
6. Query tokens: learned joint/vertex embeddings + the global feature; at each new mesh level
   the vertex tokens are upsampled (same barycentric gather as the coordinates) and a learned
   per-level vertex embedding is added. A per-block Linear(3, D) embedding of the current
   coordinates is added (DETR-style query position) to the inputs of both attentions
   (BodySparseAttention takes one input, so q, k and v all see it).
7. Camera predicted once from the global feature (not refined by the blocks); reference
   points and the displacement MLP's coordinate input are detached between blocks, as
   Deformable DETR's iterative refinement does; every step is supervised (deep supervision).
8. Each block has its own displacement MLP Linear(D+3, D)-ReLU-Linear(D, D)-ReLU-Linear(D, 3)
   with a zero-initialised last layer (starts as identity refinement); joints and vertices
   share it.
9. SCAP per mesh level from the topology: v2v = mesh adjacency + self loops, j2v = binarised
   skinning weights of each joint's nearest SMPL kinematic joint (joint_to_smpl), v2j =
   binarised joint regressor, j2j dense; orientation "flow" (vertex queries read the joints
   that skin them, joint queries the vertices that regress them; "transposed" = the reading
   before issue 17; see sparse_attention.py), `scap_threshold` on both. Paper preset uses
   "block" semantics (whole non-zero 16x16 tiles, what a block-sparse kernel computes);
   "exact" is available.
10. Loss (METRO/FastMETRO weights): 1000 * L1(3D joints) + 100 * L1(vertices) + 100 * L1(2D).
    3D joints = joint tokens and joints regressed from the mesh of the same step
    (joint_regressor[level]), both hip-midpoint centred (LSP hips 2, 3) like the GT;
    confidence- and has_3d-weighted. Vertices: prediction and GT each centred by their own
    H36M pelvis (h36m_regressor row 0, carried to coarse levels exactly through the up maps);
    GT at coarse levels by the topology's down_index; has_smpl-weighted. 2D: both joint sets
    projected with the camera, confidence-weighted. Each term is averaged over all steps
    (initial estimate, every block, the dense mesh recovery), plus the full-resolution
    upsampled output when the last query level is not the full mesh. No edge/normal loss
    (the poster does not mention one).

Departures from the paper / official code
- Official code not public: everything above is a documented choice, not a reproduction.
- No DeepSpeed / MMPose; plain PyTorch. AMD vs RCM ordering for the block-sparse attention
  is a config field (default "rcm": 2.9-4.8x fewer non-zero tiles than our AMD on the toy
  body's levels, though AMD has 1.5x less fill; `python sparse_attention.py ordering`; the
  poster uses AMD).
- The 1x1 global feature is pooled from the 4 maps, not HRNet's classification head.
- Presets "hrformer" (HRFormer-B) and the backbones' 2D-pose pre-training: the poster's rows;
  which HRFormer size DeFormer used is not stated (we take B).
- TRAIN_DEFAULTS: only AdamW and 50 epochs are from the poster; lr 1e-4, weight decay 1e-4,
  grad-norm clip 0.3 and batch 16 per GPU are FastMETRO's; no lr drop (poster silent).

Measured on the shared 2-core CPU (python bench.py deformer; ratios from one run): one training
step of the dense-query variant (6904 tokens, batch 2, hrnet_tiny backbone) with block-sparse
self-attention is 2.7x faster than fused masked SDPA at 8 heads (0.81 of its memory); at 2 heads
(where naive attention fits) 3.5x faster than SDPA and 5.6x faster than naive with 0.36 of
naive's memory (estimated 0.14 at 8 heads) (measured before issue 17's SCAP orientation and
dense mesh recovery). Paper-default model: 72.0 M parameters (pose HRNet-W48 63.6 M + decoder
8.39 M; `python deformer.py` prints every preset's). "tiny" preset, toy body, batch 8: ~0.6 s CPU
time per training step on one thread.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deformable_attention import MSDeformAttn
from sparse_attention import BodySparseAttention, build_scap, mesh_adjacency

__all__ = ["DeFormerConfig", "PRESETS", "TRAIN_DEFAULTS", "DeFormer", "build_deformer"]


@dataclass
class DeFormerConfig:
    backbone: str = "hrnet_w48_pose"            # backbones.build_backbone name (2D-pose HRNet-W48)
    input_size: tuple = (256, 256)              # (H, W); official figure: 64x64 .. 8x8 maps
    backbone_kwargs: dict = field(default_factory=dict)
    num_feature_levels: int = 4                 # last L maps of backbone.forward_features
    dim: int = 256                              # model width D
    num_heads: int = 8                          # self-attention heads
    ffn_dim: int = 1024
    dropout: float = 0.1
    deform_heads: int = 8                       # MSDeformAttn heads
    n_points: int = 4                           # MSDeformAttn points per head and level
    mesh_levels: tuple = (2, 1)                 # query mesh levels, coarse -> fine (0 = full mesh)
    blocks_per_level: tuple = (3, 3)
    tile_size: int = 16
    ordering: str = "rcm"
    semantics: str = "block"                    # "block" | "exact"
    attn_impl: str = "block"                    # "block" | "dense" | "naive"
    scap_threshold: float = 0.0                 # binarisation threshold of skin weights/regressor
    scap_orientation: str = "flow"              # "flow" | "transposed" (sparse_attention.build_scap)
    detach_refinement: bool = True
    dense_recovery: bool = True                 # the figure's "Dense mesh recovery" stage
    flip_template: bool = True                  # rotate the rest template by pi about x
    init_cam_scale: float = 1.0
    hip_indices: tuple = (2, 3)                 # LSP R_Hip, L_Hip
    pelvis_index: int = 0                       # H36M pelvis row of h36m_regressor
    w_joints3d: float = 1000.0
    w_vertices: float = 100.0
    w_joints2d: float = 100.0


# Poster table rows: "DeFormer (HRNet-W48)", "(384x288 img)", "(6904 queries)", "(HRFormer)".
PRESETS = {
    "paper": DeFormerConfig(),
    "paper-384x288": DeFormerConfig(input_size=(384, 288)),
    "dense": DeFormerConfig(mesh_levels=(2, 1, 0), blocks_per_level=(2, 2, 2)),
    "hrformer": DeFormerConfig(backbone="hrformer_b"),
    "tiny": DeFormerConfig(backbone="hrnet_tiny_pose", input_size=(224, 224), dim=64, num_heads=4,
                           ffn_dim=128, dropout=0.0, deform_heads=4, n_points=2,
                           blocks_per_level=(1, 1)),
}

# Poster: AdamW, 50 epochs, 8 x A100. lr / weight decay / clipping / batch (per GPU) are
# METRO-family values (FastMETRO: AdamW lr 1e-4, wd 1e-4, grad-norm clip 0.3, 16 per GPU), not
# from the DeFormer paper; no lr drop (the poster gives none).
TRAIN_DEFAULTS = dict(lr=1e-4, weight_decay=1e-4, clip_grad_norm=0.3, clip_mode="norm",
                      epochs=50, batch_per_gpu=16, lr_drop_epochs=[])


def _upsample(x, index, weight):
    """Barycentric gather: x (B, Vc, C), index (Vf, 3) long, weight (Vf, 3) -> (B, Vf, C)."""
    return (x[:, index] * weight[None, :, :, None]).sum(2)   # (B, Vf, 3, C) -> (B, Vf, C)


def project(points, cam):
    """Weak perspective x2d = s * (X[..., :2] + t): points (B, N, 3) m, cam (B, 3) -> (B, N, 2) in [-1, 1]."""
    return cam[:, None, :1] * (points[..., :2] + cam[:, None, 1:])


def normalised_to_unit(uv, size):
    """Normalised crop coordinates -> image coordinates in [0, 1] ((0, 0) top-left).

    uv: (..., 2) as the 2D labels and `project` give them: both axes divided by ONE length
    L = min(H, W) (u = 2 x / L - W / L, v = 2 y / L - H / L, x, y in pixels; data.py's
    convention); size: (H, W) of the input image. Returns (..., 2) (x / W, y / H).
    """
    H, W = size
    L = min(H, W)
    return (uv * uv.new_tensor([L / W, L / H]) + 1) / 2


def reference_points(points, cam, size):
    """Reference points for the deformable attention.

    points (B, N, 3) metres, cam (B, 3) weak perspective, size (H, W) of the input image ->
    (B, N, 2) (x, y) in [0, 1] of that image, i.e. of every feature map.
    """
    return normalised_to_unit(project(points, cam), size)


class DeformableMeshBlock(nn.Module):
    """Body Sparse self-attention -> Deformable Mesh cross-attention -> displacement MLP -> FFN."""

    def __init__(self, cfg, mask, plan=None):
        super().__init__()
        D = cfg.dim
        self.detach = cfg.detach_refinement
        self.coord_embed = nn.Linear(3, D)
        self.norm1 = nn.LayerNorm(D)
        self.self_attn = BodySparseAttention(D, cfg.num_heads, mask, tile_size=cfg.tile_size,
                                             ordering=cfg.ordering, semantics=cfg.semantics,
                                             impl=cfg.attn_impl, dropout=cfg.dropout, plan=plan)
        self.norm2 = nn.LayerNorm(D)
        self.cross_attn = MSDeformAttn(D, cfg.num_feature_levels, cfg.deform_heads, cfg.n_points)
        self.norm3 = nn.LayerNorm(D)
        self.disp_mlp = nn.Sequential(nn.Linear(D + 3, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(),
                                      nn.Linear(D, 3))
        nn.init.zeros_(self.disp_mlp[-1].weight)
        nn.init.zeros_(self.disp_mlp[-1].bias)
        self.norm4 = nn.LayerNorm(D)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn_dim), nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_dim, D))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens, coords, cam, image_size, memory, spatial_shapes, level_start_index,
                padding_mask=None):
        """
        Args:
            tokens: (B, N, D) joint tokens first, then vertex tokens.
            coords: (B, N, 3) current 3D joints/vertices, metres.
            cam: (B, 3) weak-perspective camera (s, tx, ty).
            image_size: (H, W) of the input image (pixels), for the reference points.
            memory: (B, S, D) flattened multi-scale values; spatial_shapes L (H_l, W_l) ints;
                level_start_index L ints; padding_mask (B, S) bool or None.
        Returns:
            tokens (B, N, D), refined coords (B, N, 3) metres, reference points (B, N, 2) in [0, 1].
        """
        c_in = coords.detach() if self.detach else coords
        pos = self.coord_embed(c_in)                                            # (B, N, D)
        tokens = tokens + self.drop(self.self_attn(self.norm1(tokens) + pos))
        ref = reference_points(coords.detach(), cam.detach(), image_size)       # (B, N, 2)
        tokens = tokens + self.drop(self.cross_attn(self.norm2(tokens) + pos, ref, memory,
                                                    spatial_shapes, level_start_index, padding_mask))
        delta = self.disp_mlp(torch.cat([self.norm3(tokens), c_in], -1))        # (B, N, D+3) -> (B, N, 3)
        coords = c_in + delta
        tokens = tokens + self.drop(self.ffn(self.norm4(tokens)))
        return tokens, coords, ref


class DenseMeshRecovery(nn.Module):
    """The official figure's "Dense mesh recovery" stage: MLPs on the decoder's output tokens give
    one global scale per sample ("Global Scaling"), which multiplies the decoder's joints and
    vertices about the mesh's pelvis; the model then upsamples the vertices to the full mesh.

    Per-token MLP Linear(D, D)-ReLU-Linear(D, D)-ReLU, mean over all J + V tokens, Linear(D, 1)
    -> g; scale = exp(g). The last layer is zero-initialised, so the stage starts as the
    identity of its input mesh (scale 1).
    """

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.scale_head = nn.Linear(dim, 1)
        nn.init.zeros_(self.scale_head.weight)
        nn.init.zeros_(self.scale_head.bias)

    def forward(self, tokens, joints, vertices, pelvis_regressor):
        """
        Args:
            tokens: (B, J + V, D) decoder output tokens (joints first).
            joints: (B, J, 3), vertices: (B, V, 3) decoder output, metres.
            pelvis_regressor: (V,) weights of the pelvis on these vertices (sum 1).
        Returns:
            joints (B, J, 3), vertices (B, V, 3) metres, scale (B,) (> 0).
        """
        h = self.token_mlp(self.norm(tokens)).mean(1)                           # (B, N, D) -> (B, D)
        scale = self.scale_head(h).squeeze(-1).exp()                             # (B, 1) -> (B,)
        centre = torch.einsum("v,bvc->bc", pelvis_regressor, vertices)[:, None]  # (B, 1, 3)
        s = scale[:, None, None]                                                 # (B, 1, 1)
        return centre + s * (joints - centre), centre + s * (vertices - centre), scale


def _check_topology(topology, levels):
    keys = ["num_vertices", "faces", "template", "up_index", "up_weight", "down_index",
            "skin_weights", "joint_regressor", "h36m_regressor", "joint_to_smpl"]
    missing = [k for k in keys if k not in topology]
    if missing:
        raise KeyError(f"deformer.DeFormer: topology dict lacks keys {missing}")
    nv = topology["num_vertices"]
    if max(levels) >= len(nv):
        raise ValueError(f"deformer.DeFormer: mesh_levels {levels} but topology has {len(nv)} levels")
    if list(levels) != sorted(levels, reverse=True) or len(set(levels)) != len(levels):
        raise ValueError(f"deformer.DeFormer: mesh_levels {levels} must go coarse -> fine (decreasing)")
    J = topology["joint_regressor"][0].shape[0]
    for l, V in enumerate(nv):
        if tuple(topology["template"][l].shape) != (V, 3):
            raise ValueError(f"deformer.DeFormer: topology['template'][{l}] must be ({V}, 3), "
                             f"got {tuple(topology['template'][l].shape)}")
        if tuple(topology["joint_regressor"][l].shape) != (J, V):
            raise ValueError(f"deformer.DeFormer: topology['joint_regressor'][{l}] must be ({J}, {V}), "
                             f"got {tuple(topology['joint_regressor'][l].shape)}")
        if topology["skin_weights"][l].shape[0] != V:
            raise ValueError(f"deformer.DeFormer: topology['skin_weights'][{l}] must be ({V}, 24)")
    for l in range(len(nv) - 1):
        if tuple(topology["up_index"][l].shape) != (nv[l], 3):
            raise ValueError(f"deformer.DeFormer: topology['up_index'][{l}] must be ({nv[l]}, 3)")
    if tuple(topology["h36m_regressor"].shape)[1:] != (nv[0],):
        raise ValueError(f"deformer.DeFormer: topology['h36m_regressor'] must be (17, {nv[0]})")


class DeFormer(nn.Module):
    """DeFormer model. `DeFormer(cfg, backbone, topology)`; see the module docstring."""

    def __init__(self, cfg, backbone, topology):
        super().__init__()
        levels = tuple(cfg.mesh_levels)
        if len(cfg.blocks_per_level) != len(levels):
            raise ValueError("deformer.DeFormer: blocks_per_level must have one entry per mesh level")
        _check_topology(topology, levels)
        self.cfg = cfg
        self.levels = levels
        self.backbone = backbone
        D, L = cfg.dim, cfg.num_feature_levels
        chans = list(backbone.feature_channels)
        if len(chans) < L:
            raise ValueError(f"deformer.DeFormer: backbone has {len(chans)} feature maps, need {L}")
        chans = chans[-L:]
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, D, 1), nn.GroupNorm(math.gcd(32, D), D)) for c in chans)
        self.level_embed = nn.Parameter(torch.randn(L, D) * 0.02)
        self.global_proj = nn.Sequential(nn.Linear(sum(chans), D), nn.ReLU())
        nv = list(topology["num_vertices"])
        self.num_vertices = nv
        self.num_joints = J = topology["joint_regressor"][0].shape[0]
        Vc = nv[levels[0]]
        self.init_head = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, Vc * 3 + 3))
        nn.init.zeros_(self.init_head[-1].weight)
        nn.init.zeros_(self.init_head[-1].bias)
        with torch.no_grad():
            self.init_head[-1].bias[-3] = cfg.init_cam_scale
        self.joint_token_embed = nn.Parameter(torch.randn(J, D) * 0.02)
        self.vertex_token_embed = nn.ParameterList(
            nn.Parameter(torch.randn(nv[l], D) * 0.02) for l in levels)

        f32 = lambda t: torch.as_tensor(t).float()
        # Topology buffers (non-persistent: they come with the topology, not the checkpoint).
        for l in range(len(nv) - 1):
            self.register_buffer(f"up_index_{l}", torch.as_tensor(topology["up_index"][l]).long(), False)
            self.register_buffer(f"up_weight_{l}", f32(topology["up_weight"][l]), False)
        # Pelvis regressor per level, exact through the up maps: r_{l+1} = U_l^T r_l.
        r = f32(topology["h36m_regressor"])[cfg.pelvis_index]                     # (V0,)
        pelvis = [r]
        down = [torch.arange(nv[0])]
        for l in range(len(nv) - 1):
            idx, w = self._up(l)
            r = torch.zeros(nv[l + 1]).index_add_(0, idx.reshape(-1), (pelvis[-1][:, None] * w).reshape(-1))
            pelvis.append(r)
            down.append(down[-1][torch.as_tensor(topology["down_index"][l]).long()])
        for l in range(len(nv)):
            template = f32(topology["template"][l])
            if cfg.flip_template:
                template = template * torch.tensor([1.0, -1.0, -1.0])
            template = template - pelvis[l] @ template                           # pelvis-centred
            self.register_buffer(f"template_{l}", template, False)
            self.register_buffer(f"pelvis_reg_{l}", pelvis[l], False)
            self.register_buffer(f"down_chain_{l}", down[l], False)
            self.register_buffer(f"joint_reg_{l}", f32(topology["joint_regressor"][l]), False)

        joint_to_smpl = torch.as_tensor(topology["joint_to_smpl"]).long()
        self.stages = nn.ModuleList()
        for l, n_blocks in zip(levels, cfg.blocks_per_level):
            adj = mesh_adjacency(torch.as_tensor(topology["faces"][l]).long(), nv[l], self_loops=True)
            mask = build_scap(adj, f32(topology["skin_weights"][l])[:, joint_to_smpl],
                              f32(topology["joint_regressor"][l]), threshold=cfg.scap_threshold,
                              orientation=cfg.scap_orientation)
            first = DeformableMeshBlock(cfg, mask)           # its attention plan serves the level
            self.stages.append(nn.ModuleList([first] + [DeformableMeshBlock(cfg, mask, first.self_attn.plan)
                                                        for _ in range(n_blocks - 1)]))
        self.recovery = DenseMeshRecovery(D) if cfg.dense_recovery else None

    def _up(self, l):
        return getattr(self, f"up_index_{l}"), getattr(self, f"up_weight_{l}")

    def upsample(self, x, src_level, dst_level):
        """Vertex data (B, V_src, C) -> (B, V_dst, C) through the up maps (dst <= src, finer)."""
        for l in range(src_level - 1, dst_level - 1, -1):
            x = _upsample(x, *self._up(l))                                      # (B, V_{l+1}, C) -> (B, V_l, C)
        return x

    def multiscale_memory(self, feats):
        """Backbone maps [(B, C_i, H_i, W_i)] -> memory (B, S, D), shapes [(H_l, W_l)] ints, starts [L ints], global (B, D)."""
        feats = feats[-self.cfg.num_feature_levels:]
        srcs, shapes = [], []
        for i, (f, proj) in enumerate(zip(feats, self.input_proj)):
            s = proj(f) + self.level_embed[i][None, :, None, None]            # (B, D, H_i, W_i)
            shapes.append(s.shape[-2:])
            srcs.append(s.flatten(2).transpose(1, 2))                          # (B, D, H_i*W_i) -> (B, H_i*W_i, D)
        memory = torch.cat(srcs, 1)                                             # (B, S, D)
        shapes = [(int(h), int(w)) for h, w in shapes]                          # L x (H_l, W_l) host ints: no device sync
        starts = [sum(h * w for h, w in shapes[:l]) for l in range(len(shapes))]  # L ints
        g = self.global_proj(torch.cat([f.mean((2, 3)) for f in feats], 1))     # (B, sum C_i) -> (B, D)
        return memory, shapes, starts, g

    def forward(self, images):
        """
        Args:
            images: (B, 3, H, W) ImageNet-normalised, H x W = cfg.input_size.
        Returns dict:
            vertices (B, V0, 3) full-resolution mesh, metres (model frame, pelvis near origin);
            joints (B, J, 3) final joint positions (LSP-14), metres;
            cam (B, 3) weak perspective (s, tx, ty), projecting to the labels' normalised
                coordinates (one length min(H, W) for both axes, see normalised_to_unit);
            vertices_per_step / joints_per_step: lists over steps (initial estimate, every
                block, then the dense mesh recovery if on) of (B, V_l, 3) / (B, J, 3);
                level_per_step: list of mesh levels (ints);
            vertices_per_level: decoder output (B, V_l, 3) of each query level (coarse -> fine);
            ref_points: list over blocks of (B, J + V_l, 2) reference points (x, y) in [0, 1];
            recovery_scale (B,): the dense mesh recovery's global scale (if on).
        """
        feats = list(self.backbone.forward_features(images))
        memory, shapes, starts, g = self.multiscale_memory(feats)
        B, D, J = images.shape[0], self.cfg.dim, self.num_joints
        size = tuple(images.shape[-2:])                                          # (H, W)
        lc = self.levels[0]
        Vc = self.num_vertices[lc]
        init = self.init_head(g)                                                 # (B, Vc*3 + 3)
        offsets = init[:, :Vc * 3].view(B, Vc, 3)                                # (B, Vc*3) -> (B, Vc, 3)
        cam = init[:, -3:]                                                       # (B, 3)
        verts = getattr(self, f"template_{lc}") + offsets                        # (B, Vc, 3)
        joints = torch.einsum("jv,bvc->bjc", getattr(self, f"joint_reg_{lc}"), verts)  # (B, J, 3)
        out = {"cam": cam, "vertices_per_step": [verts], "joints_per_step": [joints],
               "level_per_step": [lc], "vertices_per_level": [], "ref_points": []}
        tokens_j = self.joint_token_embed[None] + g[:, None]                     # (B, J, D)
        tokens_v = self.vertex_token_embed[0][None] + g[:, None]                 # (B, Vc, D)
        prev = lc
        for s, (level, blocks) in enumerate(zip(self.levels, self.stages)):
            if s > 0:
                tokens_v = self.upsample(tokens_v, prev, level) + self.vertex_token_embed[s][None]
                verts = self.upsample(verts, prev, level)                        # (B, V_prev, 3) -> (B, V_level, 3)
                prev = level
            tokens = torch.cat([tokens_j, tokens_v], 1)                          # (B, J + V_l, D)
            coords = torch.cat([joints, verts], 1)                               # (B, J + V_l, 3)
            for block in blocks:
                tokens, coords, ref = block(tokens, coords, cam, size, memory, shapes, starts)
                out["vertices_per_step"].append(coords[:, J:])
                out["joints_per_step"].append(coords[:, :J])
                out["level_per_step"].append(level)
                out["ref_points"].append(ref)
            tokens_j, tokens_v = tokens[:, :J], tokens[:, J:]                   # (B, N, D) -> (B, J, D), (B, V_l, D)
            joints, verts = coords[:, :J], coords[:, J:]
            out["vertices_per_level"].append(verts)
        if self.recovery is not None:                                            # dense mesh recovery
            joints, verts, out["recovery_scale"] = self.recovery(
                tokens, joints, verts, getattr(self, f"pelvis_reg_{prev}"))
            out["vertices_per_step"].append(verts)
            out["joints_per_step"].append(joints)
            out["level_per_step"].append(prev)
        out["vertices"] = self.upsample(verts, prev, 0)                          # (B, V_l, 3) -> (B, V0, 3)
        out["joints"] = joints
        return out

    # ------------------------------------------------------------------------------ loss
    def loss(self, out, targets):
        """METRO-family L1 losses over every step (see header item 10).

        targets: joints3d (B, J, 4) metres + conf, joints2d (B, J, 3) [-1, 1] + conf,
        vertices (B, V0, 3) metres (not centred), has_smpl (B,), has_3d (B,).
        Returns (loss scalar, logs dict of floats).
        """
        cam = out["cam"]
        B = cam.shape[0]
        dev, dt = cam.device, cam.dtype
        has_smpl = targets.get("has_smpl", torch.ones(B, device=dev)).to(dt)
        has_3d = targets.get("has_3d", torch.ones(B, device=dev)).to(dt)
        j3d, j2d = targets["joints3d"].to(dt), targets["joints2d"].to(dt)
        if j3d.shape[1] != self.num_joints:
            raise ValueError(f"deformer.loss: targets['joints3d'] must be (B, {self.num_joints}, 4), "
                             f"got {tuple(j3d.shape)}")
        hips = list(self.cfg.hip_indices)
        centre = lambda j: j - j[:, hips].mean(1, keepdim=True)                 # hip midpoint
        gt_j3 = centre(j3d[..., :3])
        w3 = j3d[..., 3:] * has_3d[:, None, None]                                # (B, J, 1)
        w2 = j2d[..., 2:]                                                        # (B, J, 1)
        gt_v0 = targets["vertices"].to(dt)                                       # (B, V0, 3)
        gt_v0 = gt_v0 - torch.einsum("v,bvc->bc", self.pelvis_reg_0, gt_v0)[:, None]
        ws = has_smpl[:, None, None]

        def l1(pred, gt, w):                                                     # weighted mean L1
            return (w * (pred - gt).abs()).sum() / (w.expand_as(pred).sum().clamp(min=1.0))

        def vert_loss(v, level):
            p = v - torch.einsum("v,bvc->bc", getattr(self, f"pelvis_reg_{level}"), v)[:, None]
            return l1(p, gt_v0[:, getattr(self, f"down_chain_{level}")], ws)

        lv = lj3 = lj2 = 0.0
        steps = list(zip(out["vertices_per_step"], out["joints_per_step"], out["level_per_step"]))
        for v, jt, level in steps:
            jm = torch.einsum("jv,bvc->bjc", getattr(self, f"joint_reg_{level}"), v)   # (B, J, 3)
            lv = lv + vert_loss(v, level)
            lj3 = lj3 + l1(centre(jt), gt_j3, w3) + l1(centre(jm), gt_j3, w3)
            lj2 = lj2 + l1(project(jt, cam), j2d[..., :2], w2) + l1(project(jm, cam), j2d[..., :2], w2)
        n = len(steps)
        lv, lj3, lj2 = lv / n, lj3 / (2 * n), lj2 / (2 * n)
        if self.levels[-1] != 0:
            lv_full = vert_loss(out["vertices"], 0)
            lv = (lv * n + lv_full) / (n + 1)
        c = self.cfg
        total = c.w_joints3d * lj3 + c.w_vertices * lv + c.w_joints2d * lj2
        logs = {"loss": float(total.detach()), "loss_joints3d": float(lj3.detach()),
                "loss_vertices": float(lv.detach()), "loss_joints2d": float(lj2.detach())}
        return total, logs


def build_deformer(preset="paper", backbone=None, topology=None, **overrides):
    """Config from PRESETS[preset] (+ overrides) -> DeFormer(cfg, backbone, topology)."""
    from dataclasses import replace
    cfg = replace(PRESETS[preset], **overrides)
    if backbone is None or topology is None:
        raise ValueError("deformer.build_deformer: pass a backbone module and a topology dict "
                         "(train.build_model builds them from backbones.py / body.py)")
    return DeFormer(cfg, backbone, topology)


# ---------------------------------------------------------------------------------- smoke test
class _StandInBackbone(nn.Module):
    """Four strided convs: maps at strides 4, 8, 16, 32 and a final pooled-channel map."""

    def __init__(self, chans=(8, 16, 24, 32)):
        super().__init__()
        self.feature_channels = list(chans)
        self.feature_strides = [4, 8, 16, 32]
        self.out_channels = chans[-1]
        ins = (3,) + tuple(chans[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, stride=4 if k == 0 else 2, padding=1)
                                   for k, (i, o) in enumerate(zip(ins, chans)))

    def forward_features(self, x):
        feats = []
        for conv in self.convs:
            x = F.relu(conv(x))
            feats.append(x)
        return feats

    def forward(self, x):
        return self.forward_features(x)[-1]


def _octahedron_topology(num_joints=14):
    """3-level hierarchy by midpoint subdivision of an octahedron (66 -> 18 -> 6 vertices)."""
    v = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float32)
    f = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    verts, faces, ups = [v], [f], []
    for _ in range(2):
        mid, vs, ui, uw, nf = {}, list(verts[0]), [[i, i, i] for i in range(len(verts[0]))], \
            [[1.0, 0.0, 0.0]] * len(verts[0]), []
        for tri in faces[0].tolist():
            m = []
            for a, b in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[2], tri[0])):
                key = (min(a, b), max(a, b))
                if key not in mid:
                    p = (verts[0][a] + verts[0][b]) / 2
                    vs.append(p / p.norm()), ui.append([a, b, a]), uw.append([0.5, 0.5, 0.0])
                    mid[key] = len(vs) - 1
                m.append(mid[key])
            a, b, c = tri
            nf += [[a, m[0], m[2]], [b, m[1], m[0]], [c, m[2], m[1]], m]
        verts.insert(0, torch.stack(vs)), faces.insert(0, torch.tensor(nf))
        ups.insert(0, (torch.tensor(ui), torch.tensor(uw)))
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(24, 3, generator=g), dim=1)
    skin = [torch.softmax(-torch.cdist(x, centres) / 0.2, 1) for x in verts]
    skin = [w * (w > 0.05) for w in skin]
    def sparse_regressor(n):                  # each joint = mean of 3 random fine vertices
        idx = torch.randint(len(verts[0]), (n, 3), generator=g)
        return torch.zeros(n, len(verts[0])).scatter_(1, idx, 1.0) / 3

    reg0 = sparse_regressor(num_joints)
    regs = [reg0]
    for idx, w in ups:
        u = torch.zeros(len(idx), int(idx.max()) + 1).scatter_add_(1, idx, w)  # (Vf, Vc)
        regs.append(regs[-1] @ u)
    return {"num_vertices": [len(x) for x in verts], "faces": faces,
            "template": [0.5 * x for x in verts], "up_index": [u[0] for u in ups],
            "up_weight": [u[1] for u in ups],
            "down_index": [torch.arange(len(verts[1])), torch.arange(len(verts[2]))],
            "skin_weights": [w / w.sum(1, keepdim=True) for w in skin], "joint_regressor": regs,
            "h36m_regressor": sparse_regressor(17),
            "joint_to_smpl": torch.tensor([8, 5, 2, 1, 4, 7, 21, 19, 17, 16, 18, 20, 12, 15][:num_joints]),
            "parents": torch.tensor([-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21])}


def preset_parameter_counts(topology, backbone_device="meta"):
    """{preset: (backbone params, decoder params) or an error string}. The backbone is built on
    `backbone_device` (meta: no memory, no weights); the decoder for real on `topology` (its
    size depends only on the vertex counts, so the toy body gives SMPL's)."""
    import backbones
    counts = {}
    for name, cfg in PRESETS.items():
        try:
            with torch.device(backbone_device):
                bb = backbones.build_backbone(cfg.backbone, **cfg.backbone_kwargs)
        except KeyError as e:
            counts[name] = f"backbone {cfg.backbone!r} is not in backbones.py ({e})"
            continue
        stand_in = _StandInBackbone(tuple(bb.feature_channels[-cfg.num_feature_levels:]))
        model = DeFormer(cfg, stand_in, topology)
        n_dec = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in stand_in.parameters())
        counts[name] = (sum(p.numel() for p in bb.parameters()), n_dec)
    return counts


if __name__ == "__main__":
    from dataclasses import replace
    torch.manual_seed(0)
    topo = _octahedron_topology()
    for name in ("tiny", "dense"):
        cfg = replace(PRESETS[name], dim=32, num_heads=4, ffn_dim=64, deform_heads=4, n_points=2,
                      dropout=0.0, input_size=(64, 48))
        model = DeFormer(cfg, _StandInBackbone(), topo)
        x = torch.randn(2, 3, *cfg.input_size)
        out = model(x)
        B = 2
        ones = torch.ones(B, 14, 1)
        targets = {"joints3d": torch.cat([torch.randn(B, 14, 3) * 0.3, ones], -1),
                   "joints2d": torch.cat([torch.rand(B, 14, 2) * 2 - 1, ones], -1),
                   "vertices": torch.randn(B, topo["num_vertices"][0], 3), "has_smpl": torch.ones(B),
                   "has_3d": torch.ones(B)}
        loss, logs = model.loss(out, targets)
        loss.backward()
        n_params = sum(p.numel() for p in model.parameters())
        n_bb = sum(p.numel() for p in model.backbone.parameters())
        print(f"[{name}] input {cfg.input_size} levels {cfg.mesh_levels} vertices "
              f"{tuple(out['vertices'].shape)} joints {tuple(out['joints'].shape)} cam "
              f"{tuple(out['cam'].shape)} steps {[tuple(v.shape) for v in out['vertices_per_step']]}")
        print(f"[{name}] params total {n_params:,} (stand-in backbone {n_bb:,}); logs "
              + ", ".join(f"{k}={v:.3f}" for k, v in logs.items()))
    try:
        from body import BodyModel
        body_topology = BodyModel().topology()         # toy body: SMPL's 6890 / 1723 / 431 vertices
    except ImportError as e:                            # smplx missing
        print(f"parameter counts skipped: {e}")
    else:
        print("\nparameters per preset (decoder on 6890 / 1723 / 431 vertices, 14 joints):")
        for name, c in preset_parameter_counts(body_topology).items():
            cfg = PRESETS[name]
            if isinstance(c, str):
                print(f"  {name:14s} {cfg.backbone:15s} {str(cfg.input_size):11s} not buildable: {c}")
            else:
                print(f"  {name:14s} {cfg.backbone:15s} {str(cfg.input_size):11s} total {sum(c) / 1e6:6.1f} M "
                      f"= backbone {c[0] / 1e6:5.1f} M + decoder {c[1] / 1e6:5.2f} M")
