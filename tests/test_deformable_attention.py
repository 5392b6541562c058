"""Tests for deformable_attention.py (multi-scale deformable attention, Deformable DETR)."""
import math

import pytest
import torch

import deformable_attention as da
from deformable_attention import MSDeformAttn, ms_deform_attn_core_pytorch

SHAPES = torch.tensor([[3, 5], [2, 3], [1, 2]])  # non-square levels, (H_l, W_l)


def starts_of(shapes):
    sizes = shapes.prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def naive_core(value, shapes, loc, attn):
    """Per query, head, level and point: explicit bilinear interpolation with zero padding.
    Pixel (i, j) centre is at ((j+0.5)/W, (i+0.5)/H); x indexes width."""
    B, S, H, Dh = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = torch.zeros(B, Lq, H, Dh, dtype=value.dtype)
    starts = starts_of(shapes).tolist()
    for b in range(B):
        for q in range(Lq):
            for h in range(H):
                for lvl in range(L):
                    Hl, Wl = shapes[lvl].tolist()
                    for p in range(P):
                        x = loc[b, q, h, lvl, p, 0].item() * Wl - 0.5
                        y = loc[b, q, h, lvl, p, 1].item() * Hl - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(Dh, dtype=value.dtype)
                        for dy in (0, 1):
                            for dx in (0, 1):
                                xi, yi = x0 + dx, y0 + dy
                                w = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                if 0 <= xi < Wl and 0 <= yi < Hl:
                                    acc += w * value[b, starts[lvl] + yi * Wl + xi, h]
                        out[b, q, h] += attn[b, q, h, lvl, p] * acc
    return out.reshape(B, Lq, H * Dh)


def random_inputs(B=2, Lq=3, H=2, Dh=3, P=2, shapes=SHAPES, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = int(shapes.prod(1).sum())
    L = len(shapes)
    value = torch.randn(B, S, H, Dh, generator=g, dtype=dtype)
    loc = torch.rand(B, Lq, H, L, P, 2, generator=g, dtype=dtype) * 1.6 - 0.3  # some outside [0,1]
    attn = torch.softmax(torch.randn(B, Lq, H, L * P, generator=g, dtype=dtype), -1).view(B, Lq, H, L, P)
    return value, loc, attn


def test_core_matches_naive_loop_including_outside_points():
    value, loc, attn = random_inputs()
    assert ((loc < 0) | (loc > 1)).any()
    ref = naive_core(value, SHAPES, loc, attn)
    out = ms_deform_attn_core_pytorch(value, SHAPES, loc, attn)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_module_matches_naive_loop():
    torch.manual_seed(0)
    B, Lq, C, H, L, P = 2, 4, 8, 2, 3, 2
    m = MSDeformAttn(C, L, H, P).double()
    with torch.no_grad():  # non-trivial offsets / weights
        m.sampling_offsets.weight.normal_(0, 0.5)
        m.attention_weights.weight.normal_(0, 1.0)
    S = int(SHAPES.prod(1).sum())
    q = torch.randn(B, Lq, C, dtype=torch.float64)
    x = torch.randn(B, S, C, dtype=torch.float64)
    ref_pts = torch.rand(B, Lq, L, 2, dtype=torch.float64)
    out = m(q, ref_pts, x, SHAPES, starts_of(SHAPES))
    # Recompute with explicit formulas.
    off = m.sampling_offsets(q).view(B, Lq, H, L, P, 2)
    wh = SHAPES.flip(-1).double()                       # (L, 2) = (W_l, H_l)
    loc = ref_pts[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
    attn = torch.softmax(m.attention_weights(q).view(B, Lq, H, L * P), -1).view(B, Lq, H, L, P)
    value = m.value_proj(x).view(B, S, H, C // H)
    ref = m.output_proj(naive_core(value, SHAPES, loc, attn))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


def test_gradcheck_core_and_module():
    value, loc, attn = random_inputs(B=1, Lq=2, H=2, Dh=2, P=2)
    value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn_core_pytorch(v, SHAPES, l, a), (value, loc, attn))
    torch.manual_seed(1)
    m = MSDeformAttn(4, 3, 2, 2).double()
    with torch.no_grad():
        m.sampling_offsets.weight.normal_(0, 0.3)
    S = int(SHAPES.prod(1).sum())
    q = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, S, 4, dtype=torch.float64, requires_grad=True)
    r = torch.rand(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, r, x: m(q, r, x, SHAPES), (q, r, x))


def test_offsets_initialise_to_head_direction_pattern():
    H, L, P = 8, 4, 4
    m = MSDeformAttn(32, L, H, P)
    assert torch.all(m.sampling_offsets.weight == 0)
    assert torch.all(m.attention_weights.weight == 0) and torch.all(m.attention_weights.bias == 0)
    assert torch.all(m.value_proj.bias == 0) and torch.all(m.output_proj.bias == 0)
    bias = m.sampling_offsets.bias.view(H, L, P, 2)
    for h in range(H):
        a = 2 * math.pi * h / H
        d = torch.tensor([math.cos(a), math.sin(a)])
        d = d / d.abs().max()
        for lvl in range(L):
            for p in range(P):
                torch.testing.assert_close(bias[h, lvl, p], d * (p + 1))
    # e.g. head 0 points right (+x), head 2 of 8 points down (+y), largest component is 1
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bias[2, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([1.0, 1.0]))
    # uniform attention at init
    probs = m.attention_probs(torch.randn(1, 3, 32))
    torch.testing.assert_close(probs, torch.full_like(probs, 1.0 / (L * P)))


def _identity_module(C=1, L=1, H=1, P=1):
    m = MSDeformAttn(C, L, H, P).double()
    with torch.no_grad():
        m.sampling_offsets.bias.zero_()
        for lin in (m.value_proj, m.output_proj):
            lin.weight.copy_(torch.eye(C))
    return m


def test_xy_ordering_on_non_square_level():
    Hl, Wl = 3, 5
    shapes = torch.tensor([[Hl, Wl]])
    row, col = 1, 3                          # bright pixel at x=col, y=row
    img = torch.zeros(Hl, Wl, dtype=torch.float64)
    img[row, col] = 1.0
    x = img.reshape(1, Hl * Wl, 1)           # (H_l, W_l) -> (1, S, C=1), row-major
    m = _identity_module()
    centre = torch.tensor([(col + 0.5) / Wl, (row + 0.5) / Hl], dtype=torch.float64)
    swapped = torch.tensor([(row + 0.5) / Wl, (col + 0.5) / Hl], dtype=torch.float64)
    pts = torch.stack([centre, swapped]).view(1, 2, 1, 2)     # (B, Lq, L, 2)
    out = m(torch.zeros(1, 2, 1, dtype=torch.float64), pts, x, shapes).view(2)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0], dtype=torch.float64))
    # Half a pixel to the right in x is half-way to an empty pixel: 0.5
    pts = (centre + torch.tensor([0.5 / Wl, 0.0], dtype=torch.float64)).view(1, 1, 1, 2)
    out = m(torch.zeros(1, 1, 1, dtype=torch.float64), pts, x, shapes)
    torch.testing.assert_close(out.view(()), torch.tensor(0.5, dtype=torch.float64))
    # Offsets are in pixels of the level: +1 pixel in y from the pixel above lands on it.
    with torch.no_grad():
        m.sampling_offsets.bias.copy_(torch.tensor([0.0, 1.0]))
    above = centre - torch.tensor([0.0, 1.0 / Hl], dtype=torch.float64)
    out = m(torch.zeros(1, 1, 1, dtype=torch.float64), above.view(1, 1, 1, 2), x, shapes)
    torch.testing.assert_close(out.view(()), torch.tensor(1.0, dtype=torch.float64))


def test_reference_boxes_and_level_shared_points():
    m = MSDeformAttn(16, 3, 4, 2)
    q = torch.randn(2, 5, 16)
    boxes = torch.rand(2, 5, 3, 4)
    loc = m.sampling_locations(q, boxes, SHAPES)                       # (B, Lq, H, L, P, 2)
    # at init, head 0 (direction +x) point P-1 lies on the right edge of the box
    torch.testing.assert_close(loc[:, :, 0, :, -1, 0], boxes[..., 0] + boxes[..., 2] / 2)
    torch.testing.assert_close(loc[:, :, 0, :, -1, 1], boxes[..., 1])
    pts = torch.rand(2, 5, 2)
    torch.testing.assert_close(m.sampling_locations(q, pts, SHAPES),
                               m.sampling_locations(q, pts[:, :, None].expand(2, 5, 3, 2), SHAPES))
    with pytest.raises(ValueError, match="reference_points"):
        m.sampling_locations(q, torch.rand(2, 5, 3, 3), SHAPES)


def test_padding_mask_zeroes_masked_values():
    torch.manual_seed(0)
    C, L = 8, 3
    m = MSDeformAttn(C, L, 2, 2).double()
    with torch.no_grad():
        m.sampling_offsets.weight.normal_(0, 0.5)
    S = int(SHAPES.prod(1).sum())
    q = torch.randn(2, 4, C, dtype=torch.float64)
    x = torch.randn(2, S, C, dtype=torch.float64)
    r = torch.rand(2, 4, L, 2, dtype=torch.float64)
    mask = torch.rand(2, S) < 0.4
    out = m(q, r, x, SHAPES, None, mask)
    # masked positions are ignored: changing them changes nothing
    x2 = torch.where(mask[..., None], torch.randn_like(x) * 100, x)
    torch.testing.assert_close(m(q, r, x2, SHAPES, None, mask), out)
    # everything masked -> output = output_proj bias only
    full = m(q, r, x, SHAPES, None, torch.ones(2, S, dtype=torch.bool))
    torch.testing.assert_close(full, m.output_proj.bias.expand_as(full))


def test_batched_equals_single():
    torch.manual_seed(0)
    C, L = 16, 3
    m = MSDeformAttn(C, L, 4, 3)
    S = int(SHAPES.prod(1).sum())
    q, x, r = torch.randn(3, 6, C), torch.randn(3, S, C), torch.rand(3, 6, L, 2)
    out = m(q, r, x, SHAPES, starts_of(SHAPES))
    for b in range(3):
        torch.testing.assert_close(m(q[b:b + 1], r[b:b + 1], x[b:b + 1], SHAPES), out[b:b + 1],
                                   rtol=1e-5, atol=1e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(30, 4, 8, 4)
    m = MSDeformAttn(16, 3, 4, 2)
    S = int(SHAPES.prod(1).sum())
    q, x, r = torch.randn(1, 2, 16), torch.randn(1, S + 1, 16), torch.rand(1, 2, 3, 2)
    with pytest.raises(ValueError, match="spatial_shapes"):
        m(q, r, x, SHAPES)
    with pytest.raises(ValueError, match="level_start_index"):
        m(q, r, x[:, :S], SHAPES, torch.tensor([0, 1, 2]))


def test_shapes_as_python_ints_match_cpu_tensor_and_device_tensors_are_refused():
    torch.manual_seed(0)
    m = MSDeformAttn(16, 3, 4, 2)
    S = int(SHAPES.prod(1).sum())
    q, x, r = torch.randn(1, 2, 16), torch.randn(1, S, 16), torch.rand(1, 2, 3, 2)
    as_ints = [tuple(hw) for hw in SHAPES.tolist()]
    torch.testing.assert_close(m(q, r, x, as_ints, starts_of(SHAPES).tolist()), m(q, r, x, SHAPES))
    # a level-shape tensor on a device would have to be read back (a host sync on CUDA): refused
    with pytest.raises(ValueError, match="spatial_shapes must be on the host"):
        m(q, r, x, SHAPES.to("meta"))
    with pytest.raises(ValueError, match="input_level_start_index must be on the host"):
        m(q, r, x, SHAPES, starts_of(SHAPES).to("meta"))


def test_no_hidden_switches():
    """No impl switch, kernel registry, environment override or im2col_step (issue 13)."""
    import inspect
    assert "impl" not in inspect.signature(MSDeformAttn).parameters
    assert not hasattr(MSDeformAttn(16, 3, 4, 2), "im2col_step")
    assert not any(hasattr(da, n) for n in ("register_kernel", "_KERNELS", "available_impls", "ENV_IMPL"))
