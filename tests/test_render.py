"""render.py: z-buffer occlusion, depth, coverage rules, culling, batching, chunking, overlay."""
import numpy as np
import torch

from mesh import icosphere
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
