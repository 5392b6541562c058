"""FastMETRO: transformer encoder-decoder for 3D human mesh recovery, in plain PyTorch.

Paper: Cho, Youwang, Oh, "Cross-Attention of Disentangled Modalities for 3D Human Mesh Recovery
with Transformers", ECCV 2022, https://arxiv.org/abs/2207.13820
Official code: https://github.com/postech-ami/FastMETRO (read for facts: module names, layer
order, initialisation, loss weights; no code copied).

What this file implements
- `FastMETROCore`: the part the official body and hand networks share (conv_1x1, token
  embeddings, both transformer stages, xyz_regressor, cam_predictor, decoder mask);
  `FastMETRO` (body) and fastmetro_hand.FastMETROHand subclass it.
- `FastMETRO(cfg, backbone, topology)`: backbone (B, C, h, w) -> `conv_1x1` (C -> 512) -> h*w image
  tokens; two stacked encoder-decoder transformers (stage 1: d=512, FFN 2048; stage 2: d=128,
  FFN 512; 8 heads, dropout 0.1, ReLU, pre-norm layers, a final LayerNorm after each encoder and
  decoder stack; S/M/L = 1/2/3 encoder and 1/2/3 decoder layers per stage), three
  `Linear(512, 128)` between the stages (`dim_reduce_enc_cam`, `dim_reduce_enc_img`,
  `dim_reduce_dec`). Encoder input = [camera token; image tokens]; DETR sine positional encoding
  (normalised, 2*pi, temperature 1e4) added to queries and keys of the image tokens only, at every
  layer. Decoder queries = J joint tokens + V2 coarse-vertex tokens (learned `nn.Embedding`s,
  query positional encoding = 0); decoder self-attention mask: joint rows see everything, vertex
  rows see all joints, themselves and their 1-ring neighbours in the coarse mesh. Memory = the
  encoder's image outputs (camera token excluded) with the sine encoding on the keys.
  `xyz_regressor Linear(128, 3)` shared by joints and vertices, `cam_predictor Linear(128, 3)` on
  the stage-2 camera feature, learnable `coarse2intermediate_upsample Linear(V2, V1)` and fixed
  V1 -> V0 upsampling (barycentric gather with the topology's up maps).
  Optional (off by default, as in the official scripts): `intermediate2fine_upsample
  Linear(V1, V0)` instead of the fixed up map, and the SMPL-parameter regressor.
- `FastMETRO.loss(out, targets)`: the official training loss (run_fastmetro_bodymesh.py): L1,
  confidence-weighted 3D joints (token joints + joints regressed from the full mesh, both
  hip-midpoint centred), vertices 0.25 * L(V2) + 0.5 * L(V1) + 0.25 * L(V0) (each mesh centred by
  its own H36M pelvis), edge-length (GT supervised 5.0, self 1e-4) and normal (0.1) losses on the
  intermediate mesh, 2D projections of both joint sets (token joints hip-midpoint centred, mesh
  joints pelvis centred before projecting, as the official script); total
  1000 * L3Dj + 100 * Lvert + 100 * Ledge/normal + 100 * L2Dj.
- Checkpoint layout: module and parameter names mirror the official `FastMETRO_Body_Network`
  (`conv_1x1`, `cam_token_embed`, `joint_token_embed`, `vertex_token_embed`,
  `transformer_{1,2}.{encoder,decoder}.layers.N.{self_attn, multihead_attn, linear1, linear2,
  norm1..3}`, `transformer_{1,2}.{encoder,decoder}.norm`, `dim_reduce_*`, `xyz_regressor`,
  `cam_predictor`, `coarse2intermediate_upsample`, optional `intermediate2fine_upsample`,
  `smpl_parameter_regressor.regressor.*`); attention parameters use nn.MultiheadAttention's names
  (`in_proj_weight`, `in_proj_bias`, `out_proj`). Masks and up/down maps are non-persistent
  buffers, so a released state dict loads with `strict=True`. Only the FastMETRO part is checked
  against the official key list (tests/test_fastmetro.py); `backbone.*` keys follow backbones.py.
  `convert_official_state_dict` strips a DDP "module." prefix, maps the official ResNet-50
  backbone layout (`nn.Sequential(*children[:-2])`, keys `backbone.0/1/4..7.*`) onto named ResNet
  layers and drops the unused ImageNet classifier of the official HRNet-W64 cls net; nothing else
  needs renaming. Not verified against a released .bin file (none available offline).

Shapes: B batch, J joints (14, LSP order), V0/V1/V2 vertices at mesh levels 0/1/2 (6890/1723/431
for SMPL; taken from the topology, never hard-coded), C channels. Units: metres; camera
(s, tx, ty) weak perspective, x2d = s * (X[..., :2] + t) in normalised crop
coordinates (data.normalise_pixels: one length min(H, W) for both axes; [-1, 1] at 224x224).

Parameter count as in the paper (Table 1: S 9.2M, M 17.1M, L 24.9M "transformer"): everything
except the backbone and the 0.744M learnable upsampling layer, i.e. conv_1x1 + both transformers +
dim_reduce_* + token embeddings + xyz_regressor + cam_predictor, with 431/1723 vertices and a
2048-channel backbone. Measured: S 9,297,030 / M 17,116,294 / L 24,935,558; the paper's figures
are these truncated (not rounded) to 0.1M (9.297M -> "9.2M").

Departures from the paper / official code
- Batch-first tensors (B, L, C) instead of the official sequence-first (L, B, C); parameters and
  results are the same.
- Own multi-head attention module (same parameter names and init as nn.MultiheadAttention) with
  two interchangeable paths, chosen per model (`FastMETROConfig.attention_impl`): "sdpa" (default:
  fused F.scaled_dot_product_attention without dropout, the explicit path with it, where CPU SDPA
  is slower) and "math" (always explicit q k^T / softmax / v matmuls, which
  torch.utils.flop_counter counts; it does not count CPU SDPA). The explicit path adds the mask
  in place as one additive float mask (0 / -inf), as nn.MultiheadAttention's baddbmm does, instead
  of an out-of-place masked_fill on the (B, H, Lq, Lk) scores; results are bit-identical.
- Dropout on CPU (attention probabilities and the layers' `Dropout`, an nn.Dropout subclass with
  the same names): the same inverted dropout, x * mask with independent per-element draws, but
  the mask comes from `dropout_mask` (four 16-bit uniforms per 64-bit draw of torch's generator,
  compared in cache-sized chunks) instead of bernoulli_, which cost ~8 ns per element and was
  most of the train step's extra time. Departure: the keep probability is quantised to 1/65536
  (p = 0.1 keeps with probability 58982/65536 = 0.899994 instead of 0.9) and kept entries are
  scaled by 65536/58982, so E[mask] = 1 exactly; the masks differ from F.dropout's for the same
  seed. On the attention probabilities, softmax and dropout are one autograd function
  (`softmax_dropout`): the mask buffer becomes the output and the backward needs no mask (two
  fewer (B, H, Lq, Lk) temporaries; same forward values, gradients equal up to rounding).
  Eval mode and p = 0 are unchanged, bit for bit. Other devices use F.dropout (fused there).
  Measured in `bench.py peers` (train ratio); tests check keep rate, scale, the four lanes of
  each draw, neighbour independence, gradcheck and the unchanged eval path.
- Token counts, the attention mask and the up/down maps come from the `topology` dict (any body
  model in SMPL format, e.g. the toy body or a test icosphere), not from SMPL data files. The
  learnable upsampling layer is `Linear(V2, V1)` (431 -> 1723 for SMPL).
- The joints-from-mesh regressor is `topology["joint_regressor"][0]` (the model joint set on the
  full mesh; for SMPL this is the H36M regressor followed by H36M_TO_LSP, as in the official code),
  and the pelvis is row 0 of `topology["h36m_regressor"]`. GT coarse meshes are taken with the
  topology's `down_index` (GraphCMR's one-hot D matrices in the official code).
- Edge loss edges = unique edges of `topology["faces"][1]` (the official code loads
  smpl_1723_edges.npy; same thing for SMPL); the official `uniform=True` (edge-based) form.
  Normal loss faces = every triangle of that edge graph (`edge_graph_triangles`), built here: the
  official smpl_1723_faces.npy is exactly this set for GraphCMR's mesh (3451 faces, 9 more than
  F[1]; checked: the same 3451 triangles as the official file), and it is SMPL-derived, so it is
  not shipped.
- The official 2D loss does not look at has_2d (only per-joint confidence); neither does this one.
- SMPL-parameter regressor (official `smpl_param_regressor.py`, GraphCMR style): input = the
  detached intermediate mesh (B, V1*3) -> FC(1024)+BN+ReLU -> 2 residual FC blocks -> 24*9+10;
  rotations projected to SO(3) by SVD (batched here, a per-matrix loop on CPU there). Its official
  loss also runs SMPL on the predicted parameters (3D/2D joints and vertices of that mesh); the
  model does not own a body model (the contract passes only the topology), so `loss` keeps only
  the parameter terms (MSE on rotation matrices + 0.1 * MSE on betas) with the official weighting
  1000 * L_smpl + 1e-8 * L_main. Off by default, as in the official scripts.
- Attention mask: the official code keeps it as a plain attribute; here it is
  a non-persistent buffer (moves with .to(device), still absent from the state dict).
- The SMPL-parameter regressor's input size is V1*3 from the topology (official: 1723*3).
- The "tiny" preset (ours, for CPU tests/quickstart) turns dropout off: dropout on the
  (B, heads, 445, 445) attention maps dominated the CPU step time (0.7 s -> 0.2 s at batch 8).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastMETROConfig", "PRESETS", "TRAIN_DEFAULTS", "FastMETROCore", "FastMETRO", "build_fastmetro",
           "Transformer", "PositionEmbeddingSine", "convert_official_state_dict",
           "official_key_names", "Dropout", "dropout", "dropout_mask",
           "softmax_dropout"]


# ----------------------------------------------------------------------------- config
@dataclass
class FastMETROConfig:
    backbone: str = "resnet50"                    # backbones.build_backbone name
    input_size: tuple = (224, 224)                # (H, W)
    num_layers: int = 3                           # encoder = decoder layers per stage: S 1, M 2, L 3
    model_dim_1: int = 512
    model_dim_2: int = 128
    feedforward_dim_1: int = 2048
    feedforward_dim_2: int = 512
    nhead: int = 8
    dropout: float = 0.1
    attention_impl: str = "sdpa"                  # "sdpa" | "math" (explicit, FLOP-countable)
    conv_1x1_dim: int | None = None               # backbone channels; None -> backbone.out_channels
    use_learnable_upsample: bool = False          # official option: Linear(V1, V0) for V1 -> V0
    use_smpl_param_regressor: bool = False        # official option, see header
    hip_indices: tuple = (2, 3)                   # LSP R_Hip, L_Hip (hip-midpoint centring)
    # Loss weights: official run_fastmetro_bodymesh.py defaults.
    joints_3d_loss_weight: float = 1000.0
    vertices_3d_loss_weight: float = 100.0
    edge_normal_loss_weight: float = 100.0
    joints_2d_loss_weight: float = 100.0
    vertices_fine_loss_weight: float = 0.25
    vertices_intermediate_loss_weight: float = 0.50
    vertices_coarse_loss_weight: float = 0.25
    edge_gt_loss_weight: float = 5.0
    edge_self_loss_weight: float = 1e-4
    normal_loss_weight: float = 0.1
    smpl_param_loss_weight: float = 1000.0


def _preset(layers, backbone, **kw):
    return FastMETROConfig(backbone=backbone, num_layers=layers, **kw)


PRESETS = {
    "S-R50": _preset(1, "resnet50"),
    "M-R50": _preset(2, "resnet50"),
    "L-R50": _preset(3, "resnet50"),
    "S-H64": _preset(1, "hrnet_w64"),
    "M-H64": _preset(2, "hrnet_w64"),
    "L-H64": _preset(3, "hrnet_w64"),
    # CPU quickstart / tests: same architecture, small widths, one layer per stage, no dropout
    # (dropout on the (B, H, 445, 445) attention maps dominated the CPU step time).
    "tiny": _preset(1, "resnet_tiny", model_dim_1=64, model_dim_2=32, feedforward_dim_1=128,
                    feedforward_dim_2=64, nhead=4, dropout=0.0),
}

# Official run_fastmetro_bodymesh.py: AdamW lr 1e-4, wd 1e-4, clip_grad_norm 0.3, 60 epochs,
# batch 16 per GPU x 4 GPUs; StepLR(lr_drop=100) never fires within 60 epochs -> no drop.
TRAIN_DEFAULTS = dict(lr=1e-4, weight_decay=1e-4, clip_grad_norm=0.3, clip_mode="norm", epochs=60,
                      batch_per_gpu=16, paper_global_batch=64, lr_drop_epochs=[])

H36M_PELVIS = 0
ATTENTION_IMPLS = ("sdpa", "math")


# ----------------------------------------------------------------------------- small helpers
def check_topology(topology, where="fastmetro.py"):
    need = ["num_vertices", "faces", "up_index", "up_weight", "down_index", "joint_regressor",
            "h36m_regressor"]
    missing = [k for k in need if k not in topology]
    if missing:
        raise KeyError(f"{where}: topology is missing keys {missing} (see the TOPOLOGY dict in the contract)")
    nv = [int(n) for n in topology["num_vertices"]]
    if len(nv) < 3:
        raise ValueError(f"{where}: topology['num_vertices'] needs 3 levels (fine to coarse), got {nv}")
    for l in range(2):
        ui, uw = topology["up_index"][l], topology["up_weight"][l]
        if tuple(ui.shape) != (nv[l], 3) or tuple(uw.shape) != (nv[l], 3):
            raise ValueError(f"{where}: topology['up_index'/'up_weight'][{l}] must be ({nv[l]}, 3), "
                             f"got {tuple(ui.shape)} / {tuple(uw.shape)}")
        if tuple(topology["down_index"][l].shape) != (nv[l + 1],):
            raise ValueError(f"{where}: topology['down_index'][{l}] must be ({nv[l + 1]},), "
                             f"got {tuple(topology['down_index'][l].shape)}")
    jr = topology["joint_regressor"][0]
    if jr.dim() != 2 or jr.shape[1] != nv[0]:
        raise ValueError(f"{where}: topology['joint_regressor'][0] must be (J, {nv[0]}), got {tuple(jr.shape)}")
    hr = topology["h36m_regressor"]
    if hr.dim() != 2 or hr.shape[1] != nv[0]:
        raise ValueError(f"{where}: topology['h36m_regressor'] must be (17, {nv[0]}), got {tuple(hr.shape)}")
    return nv


def mesh_adjacency(faces, num_vertices, self_loops=True):
    """(F, 3) long faces -> (V, V) bool adjacency (symmetric, 1-ring), with self loops by default."""
    faces = torch.as_tensor(faces).long()
    adj = torch.zeros(num_vertices, num_vertices, dtype=torch.bool)
    for a, b in ((0, 1), (1, 2), (2, 0)):
        adj[faces[:, a], faces[:, b]] = True
        adj[faces[:, b], faces[:, a]] = True
    if self_loops:
        adj |= torch.eye(num_vertices, dtype=torch.bool)
    return adj


def mesh_edges(faces):
    """(F, 3) faces -> (E, 2) unique undirected edges, i < j."""
    faces = torch.as_tensor(faces).long()
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 0)   # (3F, 2)
    e = torch.sort(e, dim=1).values
    return torch.unique(e, dim=0)


def edge_graph_triangles(faces, num_vertices):
    """Every triangle (3-clique) of the mesh's edge graph: (T, 3) long, sorted rows. For GraphCMR's
    1723-level mesh this is the official `smpl_1723_faces.npy` (3451 = the 3442 faces plus 9
    triangles whose edges already belong to real faces), which FastMETRO's normal loss reads."""
    e = mesh_edges(faces)                                                       # (E, 2), a < b
    adj = torch.zeros(num_vertices, num_vertices, dtype=torch.bool)
    adj[e[:, 0], e[:, 1]] = True
    adj[e[:, 1], e[:, 0]] = True
    common = adj[e[:, 0]] & adj[e[:, 1]]                                        # (E, V)
    common &= torch.arange(num_vertices)[None] > e[:, 1:2]                      # third vertex c > b
    k, c = common.nonzero(as_tuple=True)
    return torch.stack([e[k, 0], e[k, 1], c], 1)


def upsample_mesh(x, index, weight):
    """Barycentric up-sampling by gather: x (B, Vc, C), index/weight (Vf, 3) -> (B, Vf, C)."""
    # x[:, index]: (B, Vf, 3, C); weighted sum over the 3 coarse vertices -> (B, Vf, C)
    return (x[:, index] * weight[None, :, :, None].to(x.dtype)).sum(2)


def weak_perspective_project(points, cam):
    """points (B, N, 3) metres, cam (B, 3) = (s, tx, ty) -> (B, N, 2): s * (X[..., :2] + t)."""
    return cam[:, None, :1] * (points[..., :2] + cam[:, None, 1:])


def axis_angle_to_matrix(aa):
    """Rodrigues: (..., 3) axis-angle -> (..., 3, 3)."""
    angle = aa.norm(dim=-1, keepdim=True).clamp_min(1e-8)                   # (..., 1)
    axis = aa / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    # cross-product matrix: (..., 9) -> (..., 3, 3)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*aa.shape[:-1], 3, 3)
    s, c = torch.sin(angle)[..., None], torch.cos(angle)[..., None]          # (..., 1, 1)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand(k.shape)
    return eye + s * k + (1 - c) * (k @ k)


# ----------------------------------------------------------------------------- transformer
_MASK_LEVELS = 1 << 16          # keep probability resolution of dropout_mask (16 random bits)
_MASK_CHUNK = 1 << 18           # mask elements per chunk: 2^16 int64 draws = 512 KiB, stays in cache


def dropout_mask(shape, p, dtype=torch.float32, device="cpu"):
    """Inverted-dropout multiplier for CPU: (shape) tensor of independent draws, 0 with
    probability 1 - k/65536 and 65536/k otherwise, k = round((1 - p) * 65536); E[mask] = 1 exactly.

    Why: on CPU, bernoulli_ draws one mt19937 number per element (about 8 ns each on the
    project machine); here each 64-bit draw of torch's generator (full range, all 64 bits
    uniform) gives four 16-bit uniforms, compared with k in cache-sized chunks. Same generator
    (torch.manual_seed / fork_rng apply), 4x fewer draws, no full-size temporaries but the mask.
    The keep probability is quantised to 1/65536 (p = 0.1 keeps 58982/65536 = 0.899994); the
    scale is 65536/k, so the expectation is exact. `attn * dropout_mask(...)` is F.dropout's own
    arithmetic (input times a 0 / 1/(1-p) mask) with this mask."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"fastmetro.py: dropout probability must be in [0, 1], got {p}")
    k = round((1.0 - p) * _MASK_LEVELS)
    out = torch.empty(shape, dtype=dtype, device=device)
    if k == 0 or k == _MASK_LEVELS:                       # p ~ 1: all dropped; p ~ 0: all kept
        return out.fill_(float(k > 0))
    flat, n = out.view(-1), out.numel()
    scale, threshold = _MASK_LEVELS / k, k - _MASK_LEVELS // 2   # int16 draws are in [-2^15, 2^15)
    for lo in range(0, n, _MASK_CHUNK):
        hi = min(n, lo + _MASK_CHUNK)
        # (ceil((hi - lo) / 4),) int64 over the full 64-bit range -> 4 x int16 each -> (hi - lo,)
        bits = torch.empty((hi - lo + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
        torch.mul(bits.view(torch.int16)[: hi - lo] < threshold, scale, out=flat[lo:hi])
    return out

def dropout(x, p, training=True):
    """F.dropout(x, p, training) with the mask drawn by `dropout_mask` on CPU (F.dropout elsewhere,
    where it is a fused kernel). Same inverted dropout: x * mask, mask in {0, 1/keep}."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x * dropout_mask(x.shape, p, x.dtype, x.device)


class Dropout(nn.Dropout):
    """nn.Dropout (same arguments, no parameters) whose CPU mask comes from `dropout_mask`."""

    def forward(self, x):
        """x (any shape) -> same shape."""
        if self.inplace:
            raise ValueError("fastmetro.py: Dropout(inplace=True) is not supported")
        return dropout(x, self.p, self.training)

class _SoftmaxDropout(torch.autograd.Function):
    """dropout(softmax(scores, -1), p) on CPU with two fewer full-size temporaries: the mask
    buffer becomes the output (mask *= probs, in place) and the backward needs no mask.

    Backward: with dP = mask * g, softmax's gradient P * (dP - sum(P * dP)) has P * dP =
    (mask * P) * g = out * g, so d scores = t - P * rowsum(t), t = out * g (same maths as
    autograd's, other rounding)."""

    @staticmethod
    def forward(ctx, scores, p):
        probs = scores.softmax(-1)
        out = dropout_mask(probs.shape, p, probs.dtype, probs.device).mul_(probs)
        ctx.save_for_backward(probs, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        probs, out = ctx.saved_tensors
        t = out * grad                                                    # (..., Lk) = P * dP
        return t.addcmul_(probs, t.sum(-1, keepdim=True), value=-1), None


def softmax_dropout(scores, p):
    """dropout(scores.softmax(-1), p): the same values as `dropout` of the softmax (bit for bit
    in the forward, same generator draws); on CPU one fused autograd function (see
    _SoftmaxDropout), elsewhere F.dropout."""
    if p == 0:
        return scores.softmax(-1)
    if scores.device.type != "cpu":
        return F.dropout(scores.softmax(-1), p, True)
    return _SoftmaxDropout.apply(scores, p)

class MultiheadAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names and init.

    Parameters `in_proj_weight (3C, C)`, `in_proj_bias (3C,)`, `out_proj` (Linear C -> C); dropout
    on the attention probabilities. impl "sdpa" (default) uses the fused
    F.scaled_dot_product_attention when there is no dropout and the explicit path otherwise;
    "math" always takes explicit q k^T / softmax / v matmuls (counted by torch.utils.flop_counter,
    which does not count CPU SDPA). Same results.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, impl="sdpa"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"fastmetro.py: embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"fastmetro.py: unknown attention impl {impl!r}, expected one of {ATTENTION_IMPLS}")
        self.embed_dim, self.num_heads, self.dropout, self.impl = embed_dim, num_heads, dropout, impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, attn_mask=None):
        """query (B, Lq, C), key/value (B, Lk, C); attn_mask (Lq, Lk) bool, True = blocked.
        Returns (B, Lq, C)."""
        B, Lq, C = query.shape
        Lk, H = key.shape[1], self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        # (B, L, C) -> (B, L, H, C/H) -> (B, H, L, C/H)
        q = F.linear(query, w_q, b_q).reshape(B, Lq, H, C // H).transpose(1, 2)
        k = F.linear(key, w_k, b_k).reshape(B, Lk, H, C // H).transpose(1, 2)
        v = F.linear(value, w_v, b_v).reshape(B, Lk, H, C // H).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if self.impl == "sdpa" and p == 0:                                    # fused kernel (default)
            keep = None if attn_mask is None else ~attn_mask                  # SDPA: True = may attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        else:                          # explicit maths ("math"; also with dropout, where CPU SDPA is slower)
            attn = (q * (C // H) ** -0.5) @ k.transpose(-2, -1)             # (B, H, Lq, Lk)
            if attn_mask is not None:  # one additive float mask, added in place (matmul keeps no output)
                attn.add_(torch.zeros(attn_mask.shape, dtype=attn.dtype, device=attn.device)
                          .masked_fill_(attn_mask, float("-inf")))          # (Lq, Lk) broadcast
            attn = softmax_dropout(attn, p)        # CPU: cheaper mask, fused backward
            out = attn @ v                                                    # (B, H, Lq, C/H)
        out = out.transpose(1, 2).reshape(B, Lq, C)                           # (B, H, Lq, C/H) -> (B, Lq, C)
        return self.out_proj(out)


class TransformerEncoderLayer(nn.Module):
    """Pre-norm encoder layer; the positional encoding is added to queries and keys only."""

    def __init__(self, d, nhead, ff, dropout, attention_impl="sdpa"):
        super().__init__()
        self.self_attn = MultiheadAttention(d, nhead, dropout, attention_impl)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = (Dropout(dropout) for _ in range(3))

    def forward(self, src, pos):
        """src (B, L, C); pos (B or 1, L, C) (zeros on the camera token)."""
        x = self.norm1(src)
        qk = x + pos
        src = src + self.dropout1(self.self_attn(qk, qk, x))
        x = self.norm2(src)
        return src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))


class TransformerDecoderLayer(nn.Module):
    """Pre-norm decoder layer: masked self-attention, cross-attention, FFN. Query pos = 0."""

    def __init__(self, d, nhead, ff, dropout, attention_impl="sdpa"):
        super().__init__()
        self.self_attn = MultiheadAttention(d, nhead, dropout, attention_impl)
        self.multihead_attn = MultiheadAttention(d, nhead, dropout, attention_impl)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (Dropout(dropout) for _ in range(4))

    def forward(self, tgt, memory, pos, tgt_mask=None):
        """tgt (B, N, C), memory (B, L, C), pos (B or 1, L, C) added to the memory keys."""
        x = self.norm1(tgt)
        tgt = tgt + self.dropout1(self.self_attn(x, x, x, attn_mask=tgt_mask))
        x = self.norm2(tgt)
        tgt = tgt + self.dropout2(self.multihead_attn(x, memory + pos, memory))
        x = self.norm3(tgt)
        return tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))


class _Stack(nn.Module):
    """`layers` + final `norm` (official TransformerEncoder / TransformerDecoder layout)."""

    def __init__(self, layers, d):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d)


class TransformerEncoder(_Stack):
    def forward(self, src, pos):
        """src (B, L, C), pos (B or 1, L, C) -> (B, L, C) after the final LayerNorm."""
        for layer in self.layers:
            src = layer(src, pos)
        return self.norm(src)


class TransformerDecoder(_Stack):
    def forward(self, tgt, memory, pos, tgt_mask=None):
        """tgt (B, N, C), memory (B, L, C), pos (B or 1, L, C), tgt_mask (N, N) bool -> (B, N, C)."""
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, tgt_mask)
        return self.norm(tgt)


class Transformer(nn.Module):
    """FastMETRO encoder-decoder: encoder over [camera token; image tokens], decoder over the
    joint/vertex queries with the encoder's image outputs as memory. Xavier-uniform init on every
    parameter with dim > 1 (as the official `_reset_parameters`)."""

    def __init__(self, model_dim=512, nhead=8, num_enc_layers=3, num_dec_layers=3,
                 feedforward_dim=2048, dropout=0.1, attention_impl="sdpa"):
        super().__init__()
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(model_dim, nhead, feedforward_dim, dropout, attention_impl)
             for _ in range(num_enc_layers)],
            model_dim)
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(model_dim, nhead, feedforward_dim, dropout, attention_impl)
             for _ in range(num_dec_layers)],
            model_dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, img_features, cam_token, queries, pos, attention_mask=None):
        """img_features (B, L, C) image tokens; cam_token (B, 1, C); queries (B, N, C);
        pos (B or 1, L, C) sine encoding of the image tokens; attention_mask (N, N) bool
        (True = blocked) for the decoder self-attention.
        Returns cam_features (B, 1, C), enc_img_features (B, L, C), query_features (B, N, C)."""
        L = img_features.shape[1]
        src = torch.cat([cam_token, img_features], 1)                       # (B, 1 + L, C)
        pos_full = torch.cat([pos.new_zeros(pos.shape[0], 1, pos.shape[2]), pos], 1)  # no pos on camera
        enc = self.encoder(src, pos_full)
        cam_features, enc_img_features = enc.split([1, L], 1)
        dec = self.decoder(queries, enc_img_features, pos, attention_mask)
        return cam_features, enc_img_features, dec


class PositionEmbeddingSine(nn.Module):
    """DETR sine encoding over an h x w grid, normalised to (0, 2*pi], temperature 1e4.

    forward(h, w) -> (h*w, 2*num_pos_feats), row-major (y outer, x inner), channels [pos_y, pos_x]
    with sin on even and cos on odd feature indices. No parameters."""

    def __init__(self, num_pos_feats, temperature=10000.0, scale=2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale

    def forward(self, h, w, device=None, dtype=torch.float32):
        n = self.num_pos_feats
        eps = 1e-6
        y = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + eps) * self.scale   # (h,)
        x = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + eps) * self.scale   # (w,)
        dim_t = self.temperature ** (2 * (torch.arange(n, device=device) // 2).float() / n)      # (n,)

        def enc(t):                                                           # (k,) -> (k, n)
            p = t[:, None] / dim_t
            return torch.stack([p[:, 0::2].sin(), p[:, 1::2].cos()], -1).flatten(1)

        py = enc(y)[:, None, :].expand(h, w, n)                               # (h, w, n)
        px = enc(x)[None, :, :].expand(h, w, n)                               # (h, w, n)
        return torch.cat([py, px], -1).reshape(h * w, 2 * n).to(dtype)        # (h, w, 2n) -> (h*w, 2n)


# ----------------------------------------------------------------------------- SMPL-parameter regressor
class _FCBlock(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.fc_block = nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.fc_block(x)


class _FCResBlock(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.fc_block = nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU(inplace=True),
                                      nn.Linear(o, o), nn.BatchNorm1d(o))

    def forward(self, x):
        return F.relu(x + self.fc_block(x))


class SMPLParamRegressor(nn.Module):
    """(B, V1, 3) intermediate mesh -> rotmat (B, 24, 3, 3) in SO(3), betas (B, 10)."""

    def __init__(self, num_vertices, num_joints=24, num_betas=10):
        super().__init__()
        self.num_joints, self.num_betas = num_joints, num_betas
        self.regressor = nn.Sequential(_FCBlock(num_vertices * 3, 1024), _FCResBlock(1024, 1024),
                                       _FCResBlock(1024, 1024), nn.Linear(1024, num_joints * 9 + num_betas))

    def forward(self, vertices):
        """vertices (B, V1, 3) metres -> rotmat (B, 24, 3, 3) (det +1), betas (B, 10)."""
        B = vertices.shape[0]
        y = self.regressor(vertices.reshape(B, -1))                          # (B, V1, 3) -> (B, V1*3) -> (B, 24*9+10)
        rot = y[:, :self.num_joints * 9].reshape(B, self.num_joints, 3, 3)   # (B, 216) -> (B, 24, 3, 3)
        u, _, vh = torch.linalg.svd(rot)
        rot = u @ vh                                                          # nearest orthogonal matrix
        det = torch.linalg.det(rot).detach()[..., None, None]                 # +-1
        return rot * det, y[:, self.num_joints * 9:]


# ----------------------------------------------------------------------------- losses (official forms)
def keypoint_3d_loss(pred, gt, has_3d, hips=(2, 3)):
    """pred (B, J, 3), gt (B, J, 4) xyz+conf metres; both hip-midpoint centred; L1 * conf, mean
    over the samples with has_3d (zero if none)."""
    sel = has_3d > 0.5
    if not bool(sel.any()):
        return pred.sum() * 0
    pred, gt = pred[sel], gt[sel]
    conf, gt = gt[..., 3:], gt[..., :3]
    gt = gt - (gt[:, hips[0]] + gt[:, hips[1]])[:, None] / 2
    pred = pred - (pred[:, hips[0]] + pred[:, hips[1]])[:, None] / 2
    return (conf * (pred - gt).abs()).mean()


def keypoint_2d_loss(pred, gt):
    """pred (B, J, 2), gt (B, J, 3) xy in [-1, 1] + conf; L1 * conf averaged over everything."""
    return (gt[..., 2:] * (pred - gt[..., :2]).abs()).mean()


def vertices_loss(pred, gt, has_smpl):
    """L1 (mean) over the samples with has_smpl (zero if none). pred/gt (B, V, 3)."""
    sel = has_smpl > 0.5
    if not bool(sel.any()):
        return pred.sum() * 0
    return (pred[sel] - gt[sel]).abs().mean()


def _lengths(v, e):
    """v (B, V, 3), e (E, 2) -> (B, E, 1) lengths with the official +1e-8 inside the sqrt."""
    return torch.sqrt(((v[:, e[:, 0]] - v[:, e[:, 1]]) ** 2).sum(-1, keepdim=True) + 1e-8)


def edge_gt_loss(pred, gt, edges, has_smpl):
    sel = has_smpl > 0.5
    if not bool(sel.any()):
        return pred.sum() * 0
    return (_lengths(pred[sel], edges) - _lengths(gt[sel], edges)).abs().mean()


def edge_self_loss(pred, edges, has_smpl):
    sel = has_smpl > 0.5
    if not bool(sel.any()):
        return pred.sum() * 0
    return _lengths(pred[sel], edges).mean()


def normal_loss(pred, gt, faces, has_smpl):
    """|cos| between each predicted face edge and the GT face normal (I2L-MeshNet form)."""
    sel = has_smpl > 0.5
    if not bool(sel.any()):
        return pred.sum() * 0
    p, g = pred[sel], gt[sel]
    f0, f1, f2 = faces[:, 0], faces[:, 1], faces[:, 2]
    e1 = F.normalize(p[:, f1] - p[:, f0], dim=2)
    e2 = F.normalize(p[:, f2] - p[:, f0], dim=2)
    e3 = F.normalize(p[:, f2] - p[:, f1], dim=2)
    n = torch.cross(F.normalize(g[:, f1] - g[:, f0], dim=2), F.normalize(g[:, f2] - g[:, f0], dim=2), dim=2)
    n = F.normalize(n, dim=2)
    cos = torch.cat([(e * n).sum(2, keepdim=True).abs() for e in (e1, e2, e3)], 1)
    return cos.mean()


def register_mesh_buffers(module, topology):
    """Non-persistent buffers on `module` (FastMETRO, TORE): up/down maps, regressors, faces and
    edges for the loss, from a TOPOLOGY dict."""
    buf = lambda n, t: module.register_buffer(n, torch.as_tensor(t).clone(), persistent=False)
    buf("up_index_0", topology["up_index"][0].long())
    buf("up_weight_0", topology["up_weight"][0].float())
    buf("up_index_1", topology["up_index"][1].long())
    buf("up_weight_1", topology["up_weight"][1].float())
    buf("down_index_0", topology["down_index"][0].long())
    buf("down_index_1", topology["down_index"][1].long())
    buf("joint_regressor", topology["joint_regressor"][0].float())                 # (J, V0)
    buf("pelvis_regressor", topology["h36m_regressor"][H36M_PELVIS].float())       # (V0,)
    buf("faces_0", torch.as_tensor(topology["faces"][0]).long())
    buf("faces_1", torch.as_tensor(topology["faces"][1]).long())
    buf("edges_1", mesh_edges(topology["faces"][1]))
    buf("normal_faces_1", edge_graph_triangles(topology["faces"][1], int(topology["num_vertices"][1])))


def gt_mesh_levels(module, gt_v0):
    """GT full mesh (B, V0, 3) -> H36M-pelvis-centred meshes at levels 0, 1, 2, with the buffers
    `register_mesh_buffers` put on `module` (down_index_0/1, pelvis_regressor)."""
    gt_v1 = gt_v0[:, module.down_index_0]                                 # (B, V1, 3)
    gt_v2 = gt_v1[:, module.down_index_1]                                 # (B, V2, 3)
    pelvis = torch.einsum("v,bvc->bc", module.pelvis_regressor, gt_v0)[:, None]   # (B, 1, 3)
    return gt_v0 - pelvis, gt_v1 - pelvis, gt_v2 - pelvis


def check_targets(targets, B, J, V0, where):
    shapes = {"joints3d": (B, J, 4), "joints2d": (B, J, 3), "vertices": (B, V0, 3), "has_smpl": (B,),
              "has_3d": (B,)}
    for k, s in shapes.items():
        if k not in targets:
            raise KeyError(f"{where}: targets is missing {k!r} (expected shape {s})")
        if tuple(targets[k].shape) != s:
            raise ValueError(f"{where}: targets[{k!r}] must be {s}, got {tuple(targets[k].shape)}")


# ----------------------------------------------------------------------------- model
class FastMETROCore(nn.Module):
    """What the official body and hand networks share (FastMETRO_Body_Network,
    FastMETRO_Hand_Network; same module names): `conv_1x1`, the camera / joint / vertex token
    embeddings, two encoder-decoder stages with the `dim_reduce_*` layers between them,
    `xyz_regressor` and `cam_predictor`. Decoder self-attention mask (J+V, J+V), True = blocked:
    joint rows see everything, vertex rows see every joint plus themselves and their 1-ring
    neighbours in `token_faces` (the mesh of the V vertex tokens). Subclasses add their upsampling
    and loss; error messages name `source_file`."""

    source_file = "fastmetro.py"

    def __init__(self, cfg, backbone: nn.Module, num_joints: int, num_vertex_tokens: int, token_faces):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        J, V = int(num_joints), int(num_vertex_tokens)
        self.num_joints, self.num_vertices = J, V
        d1, d2 = cfg.model_dim_1, cfg.model_dim_2
        L = cfg.num_layers
        c_in = cfg.conv_1x1_dim or getattr(backbone, "out_channels", None)
        if c_in is None:
            raise ValueError(f"{self.source_file}: cfg.conv_1x1_dim is None and the backbone has no `out_channels`")

        self.transformer_1 = Transformer(d1, cfg.nhead, L, L, cfg.feedforward_dim_1, cfg.dropout, cfg.attention_impl)
        self.transformer_2 = Transformer(d2, cfg.nhead, L, L, cfg.feedforward_dim_2, cfg.dropout, cfg.attention_impl)
        self.dim_reduce_enc_cam = nn.Linear(d1, d2)
        self.dim_reduce_enc_img = nn.Linear(d1, d2)
        self.dim_reduce_dec = nn.Linear(d1, d2)
        self.cam_token_embed = nn.Embedding(1, d1)
        self.joint_token_embed = nn.Embedding(J, d1)
        self.vertex_token_embed = nn.Embedding(V, d1)
        self.position_encoding_1 = PositionEmbeddingSine(d1 // 2)
        self.position_encoding_2 = PositionEmbeddingSine(d2 // 2)
        self.xyz_regressor = nn.Linear(d2, 3)
        self.cam_predictor = nn.Linear(d2, 3)
        self.conv_1x1 = nn.Conv2d(c_in, d1, kernel_size=1)
        adj = mesh_adjacency(token_faces, V, self_loops=True)
        mask = torch.zeros(J + V, J + V, dtype=torch.bool)
        mask[J:, J:] = ~adj
        self.register_buffer("attention_mask", mask, persistent=False)

    def image_tokens(self, features):
        """(B, C, h, w) backbone map -> tokens (B, h*w, d1), pos_1 (1, h*w, d1), pos_2 (1, h*w, d2)."""
        if features.dim() != 4 or features.shape[1] != self.conv_1x1.in_channels:
            raise ValueError(f"{self.source_file}: backbone output must be (B, {self.conv_1x1.in_channels}, h, w), "
                             f"got {tuple(features.shape)}")
        _, _, h, w = features.shape
        x = self.conv_1x1(features).flatten(2).transpose(1, 2)               # (B, d1, h, w) -> (B, h*w, d1)
        pos_1 = self.position_encoding_1(h, w, x.device, x.dtype)[None]       # (1, h*w, d1)
        pos_2 = self.position_encoding_2(h, w, x.device, x.dtype)[None]       # (1, h*w, d2)
        return x, pos_1, pos_2

    def token_outputs(self, features):
        """Both transformer stages. features (B, C, h, w) -> cam (B, 3) weak perspective (s, tx, ty),
        joints (B, J, 3) and vertex-token positions (B, V, 3), metres (model frame)."""
        B = features.shape[0]
        img, pos_1, pos_2 = self.image_tokens(features)
        cam_token = self.cam_token_embed.weight[None].expand(B, -1, -1)      # (1, d1) -> (B, 1, d1)
        jv_tokens = torch.cat([self.joint_token_embed.weight, self.vertex_token_embed.weight], 0)
        jv_tokens = jv_tokens[None].expand(B, -1, -1)                         # (J+V, d1) -> (B, J+V, d1)

        cam_1, enc_img_1, jv_1 = self.transformer_1(img, cam_token, jv_tokens, pos_1, self.attention_mask)
        cam_2, _, jv_2 = self.transformer_2(self.dim_reduce_enc_img(enc_img_1), self.dim_reduce_enc_cam(cam_1),
                                            self.dim_reduce_dec(jv_1), pos_2, self.attention_mask)

        cam = self.cam_predictor(cam_2).reshape(B, 3)                         # (B, 1, 3) -> (B, 3)
        xyz = self.xyz_regressor(jv_2)                                        # (B, J+V, 3)
        return cam, xyz[:, :self.num_joints], xyz[:, self.num_joints:]

    def forward(self, images):
        """images (B, 3, H, W) ImageNet-normalised (224x224 in the papers) -> `forward_head`'s dict."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.source_file}: images must be (B, 3, H, W), got {tuple(images.shape)}")
        return self.forward_head(self.backbone(images))


class FastMETRO(FastMETROCore):
    """FastMETRO body network. See the file header for the architecture."""

    def __init__(self, cfg: FastMETROConfig, backbone: nn.Module, topology: dict):
        nv = check_topology(topology)
        J = int(topology["joint_regressor"][0].shape[0])
        V0, V1, V2 = nv[:3]
        super().__init__(cfg, backbone, J, V2, topology["faces"][2])
        self.num_vertices_levels = (V0, V1, V2)
        self.coarse2intermediate_upsample = nn.Linear(V2, V1)
        if cfg.use_learnable_upsample:
            self.intermediate2fine_upsample = nn.Linear(V1, V0)
        if cfg.use_smpl_param_regressor:
            self.smpl_parameter_regressor = SMPLParamRegressor(V1)
        register_mesh_buffers(self, topology)

    # --------------------------------------------------------------------- forward
    def forward_head(self, features):
        """Everything after the backbone. features (B, C, h, w) backbone map.

        Returns a dict:
          "vertices" (B, V0, 3) full mesh, metres (model frame, not pelvis-centred);
          "vertices_intermediate" (B, V1, 3); "vertices_coarse" (B, V2, 3);
          "joints" (B, J, 3) from the joint tokens, metres; "cam" (B, 3) weak perspective (s, tx, ty);
          with use_smpl_param_regressor also "rotmat" (B, 24, 3, 3) and "betas" (B, 10).
        """
        cam, joints, v2 = self.token_outputs(features)
        # learnable 431 -> 1723: (B, V2, 3) -> (B, 3, V2) -> (B, 3, V1) -> (B, V1, 3)
        v1 = self.coarse2intermediate_upsample(v2.transpose(1, 2)).transpose(1, 2)
        if self.cfg.use_learnable_upsample:
            v0 = self.intermediate2fine_upsample(v1.transpose(1, 2)).transpose(1, 2)  # (B, V1, 3) -> (B, V0, 3)
        else:
            v0 = upsample_mesh(v1, self.up_index_0, self.up_weight_0)         # (B, V1, 3) -> (B, V0, 3)
        out = {"vertices": v0, "vertices_intermediate": v1, "vertices_coarse": v2, "joints": joints, "cam": cam}
        if self.cfg.use_smpl_param_regressor:
            out["rotmat"], out["betas"] = self.smpl_parameter_regressor(v1.detach())
        return out

    # --------------------------------------------------------------------- loss
    def camera_frame(self, vertices):
        """The frame the predicted camera projects: vertices (B, V, 3) metres minus the mesh's
        regressed H36M pelvis, as the 2D joint loss projects them (the loss is translation-free, so
        the raw vertices carry an arbitrary offset). Demo overlays must draw these."""
        return vertices - torch.einsum("v,bvc->bc", self.pelvis_regressor, vertices)[:, None]

    def loss(self, out, targets):
        """Official FastMETRO training loss.

        out: the forward dict. targets: "joints3d" (B, J, 4) metres + conf, "joints2d" (B, J, 3)
        [-1, 1] + conf, "vertices" (B, V0, 3) GT mesh metres (not centred), "has_smpl" (B,),
        "has_3d" (B,); with the SMPL-parameter regressor also "pose" (B, 72), "betas" (B, 10).
        Returns (scalar loss, logs dict of floats).
        """
        cfg = self.cfg
        B = out["vertices"].shape[0]
        check_targets(targets, B, self.num_joints, self.num_vertices_levels[0], "fastmetro.py loss")
        has_smpl, has_3d = targets["has_smpl"], targets["has_3d"]
        gt_v0, gt_v1, gt_v2 = gt_mesh_levels(self, targets["vertices"])

        v0, v1, v2 = out["vertices"], out["vertices_intermediate"], out["vertices_coarse"]
        joints_mesh = torch.einsum("jv,bvc->bjc", self.joint_regressor, v0)   # (B, J, 3)
        pelvis = torch.einsum("v,bvc->bc", self.pelvis_regressor, v0)[:, None]
        v0, v1, v2, joints_mesh = v0 - pelvis, v1 - pelvis, v2 - pelvis, joints_mesh - pelvis
        h0, h1 = cfg.hip_indices
        joints_tok = out["joints"] - (out["joints"][:, h0] + out["joints"][:, h1])[:, None] / 2
        cam = out["cam"]

        l_j3d = (keypoint_3d_loss(joints_tok, targets["joints3d"], has_3d, cfg.hip_indices)
                 + keypoint_3d_loss(joints_mesh, targets["joints3d"], has_3d, cfg.hip_indices))
        l_vert = (cfg.vertices_coarse_loss_weight * vertices_loss(v2, gt_v2, has_smpl)
                  + cfg.vertices_intermediate_loss_weight * vertices_loss(v1, gt_v1, has_smpl)
                  + cfg.vertices_fine_loss_weight * vertices_loss(v0, gt_v0, has_smpl))
        l_edge_normal = (cfg.edge_gt_loss_weight * edge_gt_loss(v1, gt_v1, self.edges_1, has_smpl)
                         + cfg.edge_self_loss_weight * edge_self_loss(v1, self.edges_1, has_smpl)
                         + cfg.normal_loss_weight * normal_loss(v1, gt_v1, self.normal_faces_1, has_smpl))
        l_j2d = (keypoint_2d_loss(weak_perspective_project(joints_tok, cam), targets["joints2d"])
                 + keypoint_2d_loss(weak_perspective_project(joints_mesh, cam), targets["joints2d"]))
        loss = (cfg.joints_3d_loss_weight * l_j3d + cfg.vertices_3d_loss_weight * l_vert
                + cfg.edge_normal_loss_weight * l_edge_normal + cfg.joints_2d_loss_weight * l_j2d)
        logs = {"loss_3d_joints": l_j3d.item(), "loss_vertices": l_vert.item(),
                "loss_edge_normal": l_edge_normal.item(), "loss_2d_joints": l_j2d.item()}
        if cfg.use_smpl_param_regressor:
            l_smpl = self._smpl_param_loss(out, targets)
            logs["loss_smpl_param"] = l_smpl.item()
            loss = cfg.smpl_param_loss_weight * l_smpl + 1e-8 * loss
        logs["loss"] = loss.item()
        return loss, logs

    def _smpl_param_loss(self, out, targets):
        sel = targets["has_smpl"] > 0.5
        if not bool(sel.any()):
            return out["rotmat"].sum() * 0
        gt_rot = axis_angle_to_matrix(targets["pose"][sel].reshape(-1, 24, 3))  # (b, 72) -> (b, 24, 3) -> (b, 24, 3, 3)
        return (F.mse_loss(out["rotmat"][sel], gt_rot)
                + 0.1 * F.mse_loss(out["betas"][sel], targets["betas"][sel]))


def build_fastmetro(preset="L-R50", backbone=None, topology=None, **overrides):
    """PRESETS[preset] (+ overrides) -> FastMETRO. `backbone` and `topology` are required."""
    import dataclasses
    if backbone is None or topology is None:
        raise ValueError("fastmetro.py: build_fastmetro needs a backbone module and a topology dict")
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    return FastMETRO(cfg, backbone, topology)


# ----------------------------------------------------------------------------- checkpoints
_RESNET_SEQ = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def official_key_names(num_layers, smpl_param_regressor=False, learnable_upsample=False):
    """The non-backbone state-dict keys of the official FastMETRO_Body_Network (S/M/L = 1/2/3)."""
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    wb = lambda m: [f"{m}.weight", f"{m}.bias"]
    enc = [f"self_attn.{a}" for a in attn] + wb("linear1") + wb("linear2") + wb("norm1") + wb("norm2")
    dec = enc + [f"multihead_attn.{a}" for a in attn] + wb("norm3")
    keys = wb("conv_1x1") + ["cam_token_embed.weight", "joint_token_embed.weight", "vertex_token_embed.weight"]
    for t in ("transformer_1", "transformer_2"):
        for part, names in (("encoder", enc), ("decoder", dec)):
            keys += [f"{t}.{part}.layers.{i}.{n}" for i in range(num_layers) for n in names]
            keys += wb(f"{t}.{part}.norm")
    for m in ("dim_reduce_enc_cam", "dim_reduce_enc_img", "dim_reduce_dec", "xyz_regressor", "cam_predictor",
              "coarse2intermediate_upsample"):
        keys += wb(m)
    if learnable_upsample:
        keys += wb("intermediate2fine_upsample")
    if smpl_param_regressor:
        r = "smpl_parameter_regressor.regressor"
        bn = lambda m: wb(m) + [f"{m}.running_mean", f"{m}.running_var", f"{m}.num_batches_tracked"]
        keys += wb(f"{r}.0.fc_block.0") + bn(f"{r}.0.fc_block.1")
        for i in (1, 2):
            keys += wb(f"{r}.{i}.fc_block.0") + bn(f"{r}.{i}.fc_block.1")
            keys += wb(f"{r}.{i}.fc_block.3") + bn(f"{r}.{i}.fc_block.4")
        keys += wb(f"{r}.3")
    return keys


def convert_official_state_dict(state_dict, model):
    """Official FastMETRO / TORE state dict -> this model's names.

    The FastMETRO (and TORE) part needs no renaming. This strips a DDP "module." prefix; renames
    the official ResNet-50 backbone keys (torchvision children[:-2] kept in an nn.Sequential:
    backbone.0 conv1, .1 bn1, .4-.7 layer1-4) with the backbone's own `remap_keys` when it has
    one (backbones.py ResNet), else with the same fixed map; and drops unused ImageNet classifier
    weights of the backbone (`classifier.*` of the HRNet cls net, `fc.*`, `_fc.*`) when the
    backbone was built without them. Other backbone keys pass through (they follow backbones.py).
    Use `model.load_state_dict(convert_official_state_dict(sd, model), strict=True)`.
    """
    own = model.state_dict()
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    out = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "remap_keys"):
        bb = backbone.remap_keys(bb)
    else:
        bb = {(".".join([_RESNET_SEQ[k.split(".")[0]]] + k.split(".")[1:])
               if k.split(".")[0] in _RESNET_SEQ and "backbone." + k not in own else k): v for k, v in bb.items()}
    for k, v in bb.items():
        if "backbone." + k not in own and k.split(".")[0] in ("classifier", "fc", "_fc"):
            continue                                                          # unused ImageNet head
        out["backbone." + k] = v
    return out


# ----------------------------------------------------------------------------- smoke test
def _smoke_topology(J=14):
    """Inline 3-level octahedron hierarchy (6 -> 18 -> 66 vertices), loosely mesh-like."""
    v = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float32)
    f = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    levels = [(v, f)]
    ups = []
    for _ in range(2):
        v, f = levels[-1]
        mid, verts, ui, uw, faces = {}, list(v), [[i, i, i] for i in range(len(v))], [[1., 0., 0.]] * len(v), []

        def m(a, b):
            key = (min(a, b), max(a, b))
            if key not in mid:
                verts.append(torch.nn.functional.normalize((v[a] + v[b]) / 2, dim=0))
                ui.append([a, b, a]); uw.append([.5, .5, 0.])
                mid[key] = len(verts) - 1
            return mid[key]
        for a, b, c in f.tolist():
            ab, bc, ca = m(a, b), m(b, c), m(c, a)
            faces += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
        levels.append((torch.stack(verts), torch.tensor(faces)))
        ups.append((torch.tensor(ui), torch.tensor(uw)))
    levels = levels[::-1]                                    # fine to coarse
    ups = ups[::-1]
    nv = [len(l[0]) for l in levels]
    g = torch.Generator().manual_seed(0)
    h36m = torch.rand(17, nv[0], generator=g)
    h36m = h36m / h36m.sum(1, keepdim=True)
    jr = h36m[[3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10]][:J]
    return {"num_vertices": nv, "faces": [l[1] for l in levels], "template": [l[0] * 0.5 for l in levels],
            "up_index": [u[0] for u in ups], "up_weight": [u[1] for u in ups],
            "down_index": [torch.arange(nv[1]), torch.arange(nv[2])],
            "joint_regressor": [jr, None, None], "h36m_regressor": h36m}


class _StandInBackbone(nn.Module):
    """Stride-32 conv stack standing in for a CNN backbone: (B, 3, H, W) -> (B, C, H/32, W/32)."""

    def __init__(self, out_channels=64):
        super().__init__()
        self.out_channels = out_channels
        self.net = nn.Sequential(nn.Conv2d(3, 16, 8, 8), nn.ReLU(), nn.Conv2d(16, out_channels, 4, 4))

    def forward(self, x):
        return self.net(x)


if __name__ == "__main__":
    torch.manual_seed(0)
    topo = _smoke_topology()
    model = FastMETRO(PRESETS["tiny"], _StandInBackbone(64), topo)
    x = torch.randn(2, 3, 224, 224)
    out = model(x)
    for k, v in out.items():
        print(f"{k:24s} {tuple(v.shape)}")
    B = x.shape[0]
    targets = {"joints3d": torch.cat([torch.randn(B, 14, 3) * 0.3, torch.ones(B, 14, 1)], -1),
               "joints2d": torch.cat([torch.rand(B, 14, 2) * 2 - 1, torch.ones(B, 14, 1)], -1),
               "vertices": torch.randn(B, topo["num_vertices"][0], 3) * 0.1,
               "has_smpl": torch.ones(B), "has_3d": torch.ones(B)}
    loss, logs = model.loss(out, targets)
    loss.backward()
    print("loss", {k: round(v, 4) for k, v in logs.items()})
    n_all = sum(p.numel() for p in model.parameters())
    n_bb = sum(p.numel() for p in model.backbone.parameters())
    n_up = sum(p.numel() for p in model.coarse2intermediate_upsample.parameters())
    print(f"params: total {n_all:,}  backbone {n_bb:,}  transformer part (paper count) {n_all - n_bb - n_up:,}")
    # Paper-size count with SMPL-sized token counts (431 / 1723) and a 2048-channel backbone.
    for name in ("S-R50", "M-R50", "L-R50"):
        cfg = PRESETS[name]
        d1, d2, L = cfg.model_dim_1, cfg.model_dim_2, cfg.num_layers
        f1, f2 = cfg.feedforward_dim_1, cfg.feedforward_dim_2
        t1 = Transformer(d1, cfg.nhead, L, L, f1, 0.0)
        t2 = Transformer(d2, cfg.nhead, L, L, f2, 0.0)
        n = sum(p.numel() for p in [*t1.parameters(), *t2.parameters()])
        n += 3 * (d1 * d2 + d2) + (1 + 14 + 431) * d1 + 2 * (d2 * 3 + 3) + 2048 * d1 + d1
        print(f"FastMETRO-{name}: transformer params {n:,} (paper {dict(S=9.2, M=17.1, L=24.9)[name[0]]}M)")
