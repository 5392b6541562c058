"""render.py: z-buffer occlusion, depth, coverage rules, culling, batching, chunking, overlay."""
import numpy as np
import torch

from mesh import icosphere
import render as render_module
from render import barycentrics, overlay, project, rasterize, render


def _icosphere(subdivisions):
    v, f = icosphere(subdivisions)
    return torch.as_tensor(v, dtype=torch.float32), torch.as_tensor(f)

H = W = 32


def _two_triangles(near_first):
    """A near red triangle (z=2) over a far green one (z=4); both cover the image centre."""
    near = torch.tensor([[-1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [0.0, 1.0, 2.0]])
    far = torch.tensor([[-5.0, -5.0, 4.0], [5.0, -5.0, 4.0], [0.0, 5.0, 4.0]])
    verts = torch.cat([near, far] if near_first else [far, near])[None]  # (1,6,3)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    red, green = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    colors = torch.stack([red, green] if near_first else [green, red])  # per face (F,3)
    return verts, faces, colors


def test_near_triangle_hides_far_one_in_any_order():
    outs = []
    for near_first in (True, False):
        v, f, c = _two_triangles(near_first)
        out = render(v, f, 10.0, torch.tensor([[W / 2, H / 2]]), (H, W), colors=c, ambient=1.0, diffuse=0.0)
        rgb, depth = out["rgb"][0], out["depth"][0]
        assert rgb[H // 2, W // 2, 0] == 1 and rgb[H // 2, W // 2, 1] == 0  # red (near) wins
        assert torch.isclose(depth[H // 2, W // 2], torch.tensor(2.0))
        # Where only the far triangle is present, it is visible at depth 4.
        only_far = out["mask"][0] & (rgb[..., 1] == 1)
        assert only_far.any() and torch.allclose(depth[only_far], torch.tensor(4.0))
        outs.append(out)
    assert torch.equal(outs[0]["mask"], outs[1]["mask"]) and torch.equal(outs[0]["rgb"], outs[1]["rgb"])


def test_depth_is_perspective_correct_on_a_tilted_plane():
    # Plane z = 3 + 0.5 x through a large quad; the depth along the ray of pixel (u, v) is
    # z = 3 / (1 - 0.5 (u - cx) / f).
    f = 20.0
    xs = torch.tensor([-1.5, 1.5])
    quad = torch.tensor([[x, y, 3 + 0.5 * x] for x in xs.tolist() for y in (-1.5, 1.5)])[None]  # (1,4,3)
    faces = torch.tensor([[0, 1, 3], [0, 3, 2]])
    center = torch.tensor([[W / 2, H / 2]])
    screen = project(quad, f, center)
    fi, depth = rasterize(screen, faces, (H, W))
    m = fi[0] >= 0
    u = torch.arange(W).float() + 0.5
    expect = (3 / (1 - 0.5 * (u - W / 2) / f)).expand(H, W)
    assert m.float().mean() > 0.3
    assert torch.allclose(depth[0][m], expect[m], rtol=1e-4)
    # Barycentrics reproduce the 3D point.
    w = barycentrics(screen, faces, fi)[0]  # (H,W,3)
    p = (quad[0][faces[fi[0].clamp(min=0)]] * w[..., None]).sum(-2)  # (H,W,3)
    assert torch.allclose(p[..., 2][m], expect[m], rtol=1e-4)


def test_square_coverage_follows_pixel_centre_rule_without_cracks():
    # Screen-space square [4.2, 20.7] x [6.0, 10.4] split into two triangles (depth 1).
    x0, x1, y0, y1 = 4.2, 20.7, 6.0, 10.4
    scr = torch.tensor([[[x0, y0, 1.0], [x1, y0, 1.0], [x1, y1, 1.0], [x0, y1, 1.0]]])
    fi, _ = rasterize(scr, torch.tensor([[0, 1, 2], [0, 2, 3]]), (H, W))
    c = torch.arange(W).float() + 0.5
    expect = ((c[None, :] >= x0) & (c[None, :] <= x1)) & ((c[:, None] >= y0) & (c[:, None] <= y1))
    assert torch.equal(fi[0] >= 0, expect)


def test_culling_chunking_and_batching_do_not_change_the_image():
    v, f = _icosphere(2)
    B = 3
    verts = v[None] * 0.5 + torch.tensor([[[0.0, 0.0, 3.0]], [[0.3, -0.2, 2.5]], [[-0.4, 0.1, 4.0]]])
    center = torch.tensor([[W / 2, H / 2]]).expand(B, 2)
    colors = (v + 1) / 2
    ref = render(verts, f, 40.0, center, (H, W), colors=colors)
    culled = render(verts, f, 40.0, center, (H, W), colors=colors, cull_backfaces=True)
    assert torch.equal(ref["mask"], culled["mask"])
    assert torch.allclose(ref["rgb"], culled["rgb"], atol=1e-5)
    scr = project(verts, 40.0, center)
    fi_a, d_a = rasterize(scr, f, (H, W))
    fi_b, d_b = rasterize(scr, f, (H, W), max_elements=64)  # many tiny chunks
    assert torch.equal(fi_a, fi_b) and torch.equal(d_a, d_b)
    for b in range(B):
        one = render(verts[b:b + 1], f, 40.0, center[b:b + 1], (H, W), colors=colors)
        assert torch.equal(one["mask"][0], ref["mask"][b])
        assert torch.allclose(one["rgb"][0], ref["rgb"][b], atol=1e-6)
    # Projected sphere centres fall on the rendered sphere; the silhouette radius is right.
    c2 = project(verts.mean(1, keepdim=True), 40.0, center)[:, 0, :2]
    for b in range(B):
        assert ref["mask"][b, int(c2[b, 1]), int(c2[b, 0])]
    area = ref["mask"][0].sum().item()
    r_pix = 40.0 * 0.5 / 3.0
    assert abs(area - np.pi * r_pix ** 2) / (np.pi * r_pix ** 2) < 0.15


def test_overlay_blends_only_on_the_mesh():
    v, f = _icosphere(1)
    img = np.full((H, W, 3), 50, np.uint8)
    out = overlay(img, v * 0.5, f, 40.0, translation=(0.0, 0.0, 3.0), alpha=0.5)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 50).all()  # background corner untouched
    assert (out[H // 2, W // 2] != 50).any()


@torch.no_grad()
def _rasterize_power_of_two_bins(screen, faces, size, cull_backfaces=False, znear=1e-3, max_elements=1 << 21):
    """The rasteriser before exact-box candidates (kept as the reference): triangles binned by
    power-of-two box sides, edge functions on every pixel of the rounded-up square box."""
    H, W = size
    B, V, _ = screen.shape
    device = screen.device
    faces = faces.to(device).long()
    F = faces.shape[0]
    tri = screen[:, faces].reshape(B * F, 3, 3).float()  # (B,V,3)[(F,3)] -> (B*F,3,3)
    xy, z = tri[..., :2], tri[..., 2]  # (T,3,2), (T,3); T = B*F
    e1, e2 = xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0]  # (T,2)
    area2 = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]  # (T,) doubled signed area
    zmin = torch.minimum(torch.minimum(z[:, 0], z[:, 1]), z[:, 2])  # (T,)
    ok = (zmin > znear) & (area2.abs() > 1e-12)  # (NaN compares False: non-finite dropped)
    if cull_backfaces:
        ok &= area2 < 0  # counter-clockwise-outward meshes face the camera when area2 < 0
    # Pixel-centre bounding box: column j is covered when xmin <= j + 0.5 <= xmax.
    lo = torch.minimum(torch.minimum(xy[:, 0], xy[:, 1]), xy[:, 2])  # (T,2) box corners
    hi = torch.maximum(torch.maximum(xy[:, 0], xy[:, 1]), xy[:, 2])
    x0 = torch.ceil(lo[:, 0] - 0.5).clamp(min=0)
    x1 = torch.floor(hi[:, 0] - 0.5).clamp(max=W - 1)
    y0 = torch.ceil(lo[:, 1] - 0.5).clamp(min=0)
    y1 = torch.floor(hi[:, 1] - 0.5).clamp(max=H - 1)
    ok &= (x1 >= x0) & (y1 >= y0)
    ids = ok.nonzero().squeeze(1)  # (T',) triangles that can cover a pixel
    # From here on work only with the T' surviving triangles (local ids 0..T'-1).
    xy, z = xy[ids], z[ids]
    x0, x1, y0, y1 = x0[ids], x1[ids], y0[ids], y1[ids]
    coef, _ = render_module._edge_coefficients(xy)  # (T',3,3)
    extent = torch.maximum(x1 - x0, y1 - y0) + 1  # box side in pixels
    # Bin by box side K = 1, 2, 4, ...: candidates per triangle = K^2 <= 4 x its box.
    level = torch.ceil(torch.log2(extent)).long()  # (T',)
    inv_z = 1.0 / z.clamp(min=znear)  # (T',3)
    local = torch.arange(ids.numel(), device=device)
    keys = torch.full((B * H * W,), render_module._NO_HIT, dtype=torch.int64, device=device)
    for lv in torch.unique(level).tolist():
        K = 1 << lv
        sel = local[level == lv]
        oy, ox = torch.meshgrid(torch.arange(K, device=device), torch.arange(K, device=device),
                                indexing="ij")
        ox, oy = ox.reshape(-1).float(), oy.reshape(-1).float()  # (K*K,)
        step = max(1, max_elements // (K * K))
        for s in range(0, sel.numel(), step):
            t = sel[s:s + step]  # (n,) local triangle ids
            px = x0[t, None] + ox  # (n,K*K) pixel columns
            py = y0[t, None] + oy
            cx, cy = px + 0.5, py + 0.5  # sample at the pixel centres
            c = coef[t]  # (n,3,3)
            w = (c[:, None, :, 0] * cx[..., None] + c[:, None, :, 1] * cy[..., None]
                 + c[:, None, :, 2])  # (n,K*K,3)
            inside = (w[..., 0] >= -1e-5) & (w[..., 1] >= -1e-5) & (w[..., 2] >= -1e-5)
            if K > 1:
                inside &= (px <= x1[t, None]) & (py <= y1[t, None])
            iz = torch.einsum("nkc,nc->nk", w, inv_z[t])  # (n,K*K) interpolated 1/z (linear in screen)
            inside &= iz > 0
            n_idx, k_idx = inside.nonzero(as_tuple=True)
            if n_idx.numel() == 0:
                continue
            tt = ids[t[n_idx]]  # (M,) hit triangle ids (global over the batch)
            b = torch.div(tt, F, rounding_mode="floor")
            pix = (b * H + py[n_idx, k_idx].long()) * W + px[n_idx, k_idx].long()  # (M,)
            depth = (1.0 / iz[n_idx, k_idx]).float()
            key = (depth.view(torch.int32).long() << 32) | (tt - b * F)
            keys.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)
    hit = keys != render_module._NO_HIT
    halves = keys.view(torch.int32).view(-1, 2)  # little-endian int64 -> (low, high) int32
    if halves.numel() and torch.tensor([1], dtype=torch.int64).view(torch.int32)[0] != 1:
        halves = halves.flip(1)  # big-endian host
    face_index = halves[:, 0].long().masked_fill_(~hit, -1)
    depth = halves[:, 1].contiguous().view(torch.float32).masked_fill(~hit, float("inf"))
    return face_index.view(B, H, W), depth.view(B, H, W)


def test_exact_box_rasteriser_equals_the_power_of_two_one():
    """Same face-index and depth buffers, bit for bit, as the previous rasteriser on a scene of
    overlapping spheres (small triangles), two large triangles crossing the image border, a
    sliver and a triangle behind the camera, with and without culling and chunking."""
    v, f = _icosphere(3)
    B, S = 2, 48
    verts = v[None] * 0.6 + torch.tensor([[[0.1, 0.0, 3.0]], [[-0.3, 0.2, 2.2]]])
    big = torch.tensor([[-3.0, -2.0, 4.0], [3.5, -1.0, 5.0], [0.0, 3.0, 4.5],       # crosses borders
                        [-1.0, -1.0, 2.6], [1.2, 0.4, 2.9], [-0.2, 1.3, 3.3],
                        [0.0, 0.0, 3.0], [0.5, 0.001, 3.0], [1.0, 0.0, 3.0],        # sliver
                        [0.0, 0.0, -1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])        # behind camera
    verts = torch.cat([verts, big[None].expand(B, -1, -1)], 1)
    n = v.shape[0]
    faces = torch.cat([f, n + torch.arange(12).view(4, 3)])
    scr = project(verts, 40.0, torch.tensor([[S / 2, S / 2]]).expand(B, 2))
    for cull in (False, True):
        for max_elements in (1 << 21, 97):
            a = rasterize(scr, faces, (S, S), cull_backfaces=cull, max_elements=max_elements)
            b = _rasterize_power_of_two_bins(scr, faces, (S, S), cull_backfaces=cull,
                                             max_elements=max_elements)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert (a[0] >= 0).float().mean() > 0.1
            assert cull or (a[0] >= len(f)).any()          # the large triangles show
