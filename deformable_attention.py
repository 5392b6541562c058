"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Paper: Zhu, Su, Lu, Li, Wang, Dai, "Deformable DETR: Deformable Transformers for End-to-End
Object Detection", ICLR 2021, https://arxiv.org/abs/2010.04159
Used by: Yoshiyasu, "Deformable Mesh Transformer for 3D Human Mesh Recovery" (DeFormer),
CVPR 2023 (Deformable Mesh cross-Attention), and by featup_hmr.py's deformable decoder.

What this file implements
- `MSDeformAttn`: the multi-scale deformable attention module with the official parameter
  names, shapes and initialisation (`sampling_offsets`, `attention_weights`, `value_proj`,
  `output_proj`), so Deformable-DETR checkpoints load with `load_state_dict`, and the official
  forward signature `(query, reference_points, input_flatten, input_spatial_shapes,
  input_level_start_index, input_padding_mask)`.
- `ms_deform_attn_core_pytorch`: the sampling + weighted sum, via `F.grid_sample` (bilinear,
  zeros padding, align_corners=False), one level at a time.
- Level shapes are Python ints (a list of (H_l, W_l), or a CPU tensor read on the host): the
  forward never reads a device tensor back (no host synchronisation on CUDA) and runs on the
  `meta` device. A fused kernel, when one exists, brings its own module and dispatch.

Coordinate conventions (same as the official code)
- Locations are (x, y) in [0, 1] over each level's feature map, (0, 0) = top-left corner of the
  top-left pixel, (1, 1) = bottom-right corner of the bottom-right pixel. Pixel (row i, col j)
  has its centre at ((j + 0.5) / W_l, (i + 0.5) / H_l).
- `spatial_shapes[l] = (H_l, W_l)`; a level is flattened row-major (index = i * W_l + j) and the
  levels are concatenated in order, level l starting at `level_start_index[l]`.
- Sampling offsets are in pixels of each level: loc = ref + offset / (W_l, H_l).
  With (x, y, w, h) reference boxes instead: loc = (x, y) + offset / n_points * (w, h) / 2.
- Outside the map, values are zero (bilinear weights of the out-of-map corners are dropped).
- Attention weights: softmax over n_levels * n_points jointly, per query and head.

Departures from the paper / official code
- The official CUDA op is replaced by a PyTorch core (the official repo also ships a PyTorch
  reference, used only for testing). Ours loops over levels and reduces over points right
  after sampling each level, so the largest intermediate is (B*H, Dh, Lq, P) for one level
  instead of the official reference's stacked (B*H, Dh, Lq, L*P) for all levels. Backward
  is deterministic (autograd of grid_sample), unlike the official atomicAdd kernel; works in
  any dtype (half/bfloat16/float64) and any batch size (no im2col_step constraint).
- No `im2col_step` (a CUDA-kernel batching knob with no meaning here).
- `input_spatial_shapes` / `input_level_start_index` are host-side: a list of (H_l, W_l) ints or
  a CPU tensor (the official code passes CUDA tensors that its kernel reads on the device; the
  PyTorch core needs the sizes on the host, and reading a CUDA tensor would stall the host).
- Reference points may also be given without the level axis, (B, Lq, 2) or (B, Lq, 4), and
  are then shared by all levels (convenience for callers such as DeFormer).
- The official code warns when d_model / n_heads is not a power of two (a CUDA-kernel speed
  hint); irrelevant to the PyTorch core, so no warning.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MSDeformAttn", "ms_deform_attn_core_pytorch"]


def _host_ints(x, name):
    """A list/tuple of ints or a CPU tensor -> nested Python ints. A tensor on another device is
    refused: reading it back would synchronise the host with the device on every forward."""
    if torch.is_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(f"deformable_attention: {name} must be on the host (a list of ints or a "
                             f"CPU tensor), got a {x.device.type} tensor: reading it would "
                             "synchronise with the device; pass the Python ints the caller built it from")
        return x.tolist()
    return x


def _shapes_as_list(spatial_shapes):
    """(L, 2) CPU tensor or sequence of (H_l, W_l) ints -> list of Python (H_l, W_l) tuples."""
    shapes = _host_ints(spatial_shapes, "spatial_shapes")
    if not all(len(hw) == 2 for hw in shapes):
        raise ValueError("deformable_attention: spatial_shapes must be (L, 2) (H_l, W_l), got "
                         f"{spatial_shapes!r}")
    return [(int(h), int(w)) for h, w in shapes]


def ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights):
    """Bilinear multi-scale sampling + attention-weighted sum (the core of MSDeformAttn).

    Args:
        value: (B, S, H, Dh) per-head values of all levels, flattened row-major per level and
            concatenated over levels; S = sum_l H_l * W_l.
        spatial_shapes: list of L (H_l, W_l) ints (or an (L, 2) CPU tensor).
        sampling_locations: (B, Lq, H, L, P, 2) (x, y) in [0, 1] per level (values outside are
            allowed: out-of-map taps read zeros). x indexes width, y height; pixel (i, j) has its
            centre at ((j + 0.5) / W_l, (i + 0.5) / H_l) (align_corners=False convention).
        attention_weights: (B, Lq, H, L, P) weights (normally softmax over L*P; not checked).
    Returns:
        (B, Lq, H * Dh), heads concatenated in head order.

    Memory: levels are processed one at a time and the P points are reduced immediately, so
    the largest intermediate is (B*H, Dh, Lq, P) for a single level.
    """
    shapes = _shapes_as_list(spatial_shapes)
    B, S, H, Dh = value.shape
    _, Lq, H2, L, P, two = sampling_locations.shape
    if H2 != H or L != len(shapes) or two != 2:
        raise ValueError("ms_deform_attn_core_pytorch: sampling_locations must be (B, Lq, H, L, P, 2) "
                         f"with H={H}, L={len(shapes)}; got {tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != (B, Lq, H, L, P):
        raise ValueError("ms_deform_attn_core_pytorch: attention_weights must be (B, Lq, H, L, P) = "
                         f"{(B, Lq, H, L, P)}; got {tuple(attention_weights.shape)}")
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"ms_deform_attn_core_pytorch: value has S={S} positions but "
                         f"spatial_shapes {shapes} sum to {sum(h * w for h, w in shapes)}")
    # grid_sample wants [-1, 1]; -1 = left/top edge of the first pixel (align_corners=False).
    grids = 2 * sampling_locations - 1                                  # (B, Lq, H, L, P, 2)
    out = None
    start = 0
    for lvl, (h_l, w_l) in enumerate(shapes):
        v = value[:, start:start + h_l * w_l]                           # (B, H_l*W_l, H, Dh)
        start += h_l * w_l
        # (B, H_l*W_l, H, Dh) -> (B, H, Dh, H_l*W_l) -> (B*H, Dh, H_l, W_l)
        v = v.permute(0, 2, 3, 1).reshape(B * H, Dh, h_l, w_l)
        # (B, Lq, H, P, 2) -> (B, H, Lq, P, 2) -> (B*H, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * H, Lq, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                          align_corners=False)                          # (B*H, Dh, Lq, P)
        # (B, Lq, H, P) -> (B, H, Lq, P) -> (B*H, 1, Lq, P)
        a = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(B * H, 1, Lq, P)
        s = (s * a).sum(-1)                                             # (B*H, Dh, Lq)
        out = s if out is None else out + s
    # (B*H, Dh, Lq) -> (B, H*Dh, Lq) -> (B, Lq, H*Dh)
    return out.reshape(B, H * Dh, Lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), plain PyTorch.

    Args:
        d_model: channels C of queries and values (must be divisible by n_heads).
        n_levels: L feature levels.
        n_heads: H heads, head dim Dh = C / H.
        n_points: P sampling points per head and level.
    Parameters (official names): sampling_offsets Linear(C, H*L*P*2), attention_weights
    Linear(C, H*L*P), value_proj Linear(C, C), output_proj Linear(C, C).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"deformable_attention.MSDeformAttn: d_model ({d_model}) must be "
                             f"divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        """Official init: offsets point along H evenly spaced directions, the direction scaled so
        its largest component is 1, point p at distance (p + 1); uniform attention; xavier
        projections with zero bias."""
        H, L, P = self.n_heads, self.n_levels, self.n_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(H, dtype=torch.float32) * (2.0 * math.pi / H)
        d = torch.stack([theta.cos(), theta.sin()], -1)                # (H, 2)
        d = d / d.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, P + 1, dtype=torch.float32)            # (P,)
        bias = d[:, None, None, :] * scale[None, None, :, None]         # (H, 1, P, 2)
        bias = bias.expand(H, L, P, 2)                                  # (H, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))          # (H*L*P*2,)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    # -- pieces of the forward, public so callers/tests can inspect where attention looks --
    def sampling_locations(self, query, reference_points, input_spatial_shapes):
        """Where each head samples.

        Args:
            query: (B, Lq, C).
            reference_points: (B, Lq, L, 2) points (x, y) in [0, 1], or (B, Lq, L, 4) boxes
                (cx, cy, w, h) normalised; or (B, Lq, 2) / (B, Lq, 4) shared by all levels.
            input_spatial_shapes: L (H_l, W_l) ints (or an (L, 2) CPU tensor).
        Returns:
            (B, Lq, H, L, P, 2) (x, y) in [0, 1] coordinates of each level (may lie outside).
        """
        B, Lq, _ = query.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        ref = reference_points
        if ref.dim() == 3:
            ref = ref[:, :, None, :].expand(B, Lq, L, ref.shape[-1])   # (B, Lq, K) -> (B, Lq, L, K)
        if ref.dim() != 4 or ref.shape[:3] != (B, Lq, L) or ref.shape[-1] not in (2, 4):
            raise ValueError("deformable_attention.MSDeformAttn: reference_points must be "
                             f"(B, Lq, L, 2|4) = ({B}, {Lq}, {L}, 2|4) or (B, Lq, 2|4); got "
                             f"{tuple(reference_points.shape)}")
        # (B, Lq, H*L*P*2) -> (B, Lq, H, L, P, 2)
        off = self.sampling_offsets(query).view(B, Lq, H, L, P, 2)
        if ref.shape[-1] == 2:
            shapes = _shapes_as_list(input_spatial_shapes)
            if len(shapes) != L:
                raise ValueError(f"deformable_attention.MSDeformAttn: {L} levels expected, "
                                 f"spatial_shapes has {len(shapes)}")
            # offsets in pixels of each level -> [0, 1] units: divide x by W_l and y by H_l, with
            # Python scalars (a (W_l, H_l) tensor would be a host-to-device copy per call)
            off = torch.stack([torch.stack([off[:, :, :, l, :, 0] / w, off[:, :, :, l, :, 1] / h], -1)
                               for l, (h, w) in enumerate(shapes)], 3)   # L x (B, Lq, H, P, 2) -> (B, Lq, H, L, P, 2)
            return ref[:, :, None, :, None, :] + off
        return (ref[:, :, None, :, None, :2]
                + off / P * ref[:, :, None, :, None, 2:] * 0.5)

    def attention_probs(self, query):
        """(B, Lq, C) -> (B, Lq, H, L, P) softmax over L*P jointly per head."""
        B, Lq, _ = query.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        a = self.attention_weights(query).view(B, Lq, H, L * P)         # (B, Lq, H*L*P) -> (B, Lq, H, L*P)
        return F.softmax(a, -1).view(B, Lq, H, L, P)                    # -> (B, Lq, H, L, P)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index=None, input_padding_mask=None):
        """
        Args:
            query: (B, Lq, C) query features (positional embedding already added by the caller).
            reference_points: (B, Lq, L, 2) (x, y) in [0, 1], (0, 0) top-left, or
                (B, Lq, L, 4) boxes (cx, cy, w, h) normalised; (B, Lq, 2|4) = same for all levels.
            input_flatten: (B, S, C) values, levels flattened row-major and concatenated,
                S = sum_l H_l * W_l.
            input_spatial_shapes: L (H_l, W_l) ints (or an (L, 2) CPU tensor), host-side.
            input_level_start_index: L ints (or an (L,) CPU tensor), start of each level in S
                (checked if given; it follows from the shapes).
            input_padding_mask: (B, S) bool, True = padding (value zeroed), or None.
        Returns:
            (B, Lq, C).
        """
        B, Lq, C = query.shape
        if C != self.d_model:
            raise ValueError(f"deformable_attention.MSDeformAttn: query must be (B, Lq, {self.d_model}), "
                             f"got {tuple(query.shape)}")
        if input_flatten.dim() != 3 or input_flatten.shape[0] != B or input_flatten.shape[2] != C:
            raise ValueError(f"deformable_attention.MSDeformAttn: input_flatten must be (B={B}, S, "
                             f"C={C}), got {tuple(input_flatten.shape)}")
        shapes = _shapes_as_list(input_spatial_shapes)
        S = input_flatten.shape[1]
        if len(shapes) != self.n_levels or sum(h * w for h, w in shapes) != S:
            raise ValueError(f"deformable_attention.MSDeformAttn: input_spatial_shapes {shapes} must "
                             f"have {self.n_levels} levels summing to S={S}")
        if input_level_start_index is not None:
            starts = [0]
            for h, w in shapes[:-1]:
                starts.append(starts[-1] + h * w)
            if [int(s) for s in _host_ints(input_level_start_index, "input_level_start_index")] != starts:
                raise ValueError("deformable_attention.MSDeformAttn: input_level_start_index "
                                 f"{list(input_level_start_index)} != cumulative sizes {starts}")
        value = self.value_proj(input_flatten)                          # (B, S, C)
        if input_padding_mask is not None:
            if tuple(input_padding_mask.shape) != (B, S):
                raise ValueError("deformable_attention.MSDeformAttn: input_padding_mask must be "
                                 f"(B, S) = {(B, S)}, got {tuple(input_padding_mask.shape)}")
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, self.n_heads, C // self.n_heads)      # (B, S, C) -> (B, S, H, Dh)
        loc = self.sampling_locations(query, reference_points, shapes)
        attn = self.attention_probs(query)                              # (B, Lq, H, L, P)
        out = ms_deform_attn_core_pytorch(value, shapes, loc, attn)     # (B, Lq, C)
        return self.output_proj(out)                                    # (B, Lq, C)


if __name__ == "__main__":
    torch.manual_seed(0)
    shapes = [(28, 28), (14, 14), (7, 7), (4, 4)]
    starts = [0, 784, 980, 1029]
    m = MSDeformAttn(64, 4, 8, 4)
    q, x = torch.randn(2, 100, 64), torch.randn(2, sum(h * w for h, w in shapes), 64)
    y = m(q, torch.rand(2, 100, 4, 2), x, shapes, starts)
    print("MSDeformAttn out", tuple(y.shape), "params", sum(p.numel() for p in m.parameters()))
