"""Headless triangle rasteriser in plain PyTorch (CPU or GPU), for synthetic data and overlays.

No paper: this is the tool the synthetic-data generator (data.py) and the demo pictures use in
place of OpenGL / pyrender / PyTorch3D, none of which are dependencies.

What it does
- `project(points, focal, center, translation)`: perspective camera (x right, y down, camera
  looks along +z), returns pixel coordinates plus camera-space depth.
- `rasterize(screen, faces, size)`: z-buffer.  Every (mesh, triangle) pair of a batch is
  handled at once: each triangle's candidates are exactly the pixel centres of its pixel
  bounding box (a flat list built with repeat_interleave, so a 3 x 5 box costs 15 candidates,
  not the 64 of a power-of-two square bin: about 2x faster at 1024 x 1024, same buffers bit for
  bit); they are tested with edge functions (barycentrics), the perspective-correct depth is
  interpolated, and the nearest triangle per pixel is found with ONE `scatter_reduce(amin)` on
  packed int64 keys `(float32 depth bits << 32) | face index` (positive float32 bit patterns
  order like the floats, so min key = nearest face).  Consecutive triangles are processed in
  passes of about `max_elements` candidates to bound memory.
- `render(...)`: batch of meshes -> RGB (Lambert shading of per-vertex or per-face colours),
  mask and depth; shading touches only the covered pixels (flat indices, row gathers).  `overlay(...)`: alpha-blend a rendered mesh onto an image.
  `weak_perspective_to_camera(...)`: the translation that makes a perspective render match a
  weak-perspective (s, tx, ty) prediction (to draw model outputs on their crops).

Conventions: continuous pixel coordinates, pixel (row i, column j) covers [j, j+1) x [i, i+1)
and is sampled at its centre (j + 0.5, i + 0.5); a principal point at (W/2, H/2) is the image
centre.  2D keypoints in data.py use the same convention; their normalised coordinates use one
length L = min(H, W) for both axes (u = (2 x - W) / L, v = (2 y - H) / L), so at H == W
u = 2 x / W - 1 is exactly `grid_sample(align_corners=False)`'s convention, and for H != W the
grid_sample coordinates are (u L / W, v L / H).

Departures / choices (no reference implementation to follow)
- Triangles with any vertex closer than `znear` are dropped, not clipped (the bodies we draw
  are always fully in front of the camera).
- Lighting is two-sided (|n . l|), so meshes with inconsistent winding still shade sensibly;
  back-face culling is optional (`cull_backfaces=True` assumes counter-clockwise-outward
  winding, as SMPL) and halves the work for closed meshes.
- No anti-aliasing (one sample per pixel); overlays look fine at 224 px and the synthetic
  images are JPEG-compressed anyway.
"""
from __future__ import annotations


import numpy as np
import torch

_NO_HIT = torch.iinfo(torch.int64).max


def project(points, focal, center, translation=None):
    """Perspective projection.

    points (B,N,3) metres, camera frame (or model frame + `translation` (B,3));
    focal: float, (B,) or (B,2) pixels; center (B,2) pixels (principal point).
    Returns (B,N,3): pixel x, pixel y, depth z (metres).
    """
    if translation is not None:
        points = points + translation[:, None, :]  # (B,N,3) + (B,1,3)
    focal = torch.as_tensor(focal, dtype=points.dtype, device=points.device)
    if focal.dim() == 0:
        focal = focal.expand(points.shape[0])
    if focal.dim() == 1:
        focal = focal[:, None].expand(-1, 2)  # (B,) -> (B,2)
    center = torch.as_tensor(center, dtype=points.dtype, device=points.device)
    z = points[..., 2:3]  # (B,N,1)
    xy = points[..., :2] / z.clamp(min=1e-9) * focal[:, None, :] + center[:, None, :]  # (B,N,2)
    return torch.cat([xy, z], dim=-1)


def _edge_coefficients(xy):
    """Barycentric edge functions of screen triangles.

    xy (T,3,2) pixel coordinates. Returns coef (T,3,3) with w_i(p) = coef[:, i] . (px, py, 1)
    and the doubled signed area (T,).
    """
    x0, y0 = xy[:, 0, 0], xy[:, 0, 1]
    x1, y1 = xy[:, 1, 0], xy[:, 1, 1]
    x2, y2 = xy[:, 2, 0], xy[:, 2, 1]
    area2 = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)  # (T,)
    inv = 1.0 / torch.where(area2 == 0, torch.ones_like(area2), area2)
    # w0 is the edge function of edge (v1, v2), w1 of (v2, v0), w2 of (v0, v1).
    a = torch.stack([y1 - y2, y2 - y0, y0 - y1], dim=1)  # (T,3)
    b = torch.stack([x2 - x1, x0 - x2, x1 - x0], dim=1)
    c = torch.stack([x1 * y2 - x2 * y1, x2 * y0 - x0 * y2, x0 * y1 - x1 * y0], dim=1)
    coef = torch.stack([a, b, c], dim=2) * inv[:, None, None]  # (T,3,3)
    return coef, area2


@torch.no_grad()
def rasterize(screen, faces, size, cull_backfaces=False, znear=1e-3, max_elements=1 << 21):
    """Z-buffer rasterisation of a batch of meshes sharing one face list.

    screen (B,V,3): pixel x, pixel y, depth (from `project`); faces (F,3) long; size (H,W).
    Returns face_index (B,H,W) long (-1 = background) and depth (B,H,W) float (inf = background),
    depth being the perspective-correct camera z of the visible surface.
    """
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
    coef, _ = _edge_coefficients(xy)  # (T',3,3)
    inv_z = 1.0 / z.clamp(min=znear)  # (T',3)
    # Per triangle, one row [a0 a1 a2 | b0 b1 b2 | c0 c1 c2 | 1/z0 1/z1 1/z2 | x0 y0 width]:
    # w_i(p) = a_i px + b_i py + c_i; candidates gather one row each.
    wx = (x1 - x0 + 1).long()  # (T',) exact box width and height in pixels
    hy = (y1 - y0 + 1).long()
    area = wx * hy  # (T',) candidate pixels: every pixel centre of the exact box, no rounding
    table = torch.cat([coef[:, :, 0], coef[:, :, 1], coef[:, :, 2], inv_z], dim=1)  # (T',12)
    corner = torch.stack([x0.long(), y0.long(), wx], dim=1)  # (T',3)
    keys = torch.full((B * H * W,), _NO_HIT, dtype=torch.int64, device=device)
    # Consecutive triangles whose boxes hold about max_elements candidates form one pass (a
    # triangle bigger than that is a pass of its own).
    ends = torch.cumsum(area, 0)  # (T',)
    total = int(ends[-1]) if ends.numel() else 0
    marks = torch.arange(max_elements, max(total, max_elements), max_elements, device=device)
    cuts = sorted({0, ids.numel(), *torch.searchsorted(ends, marks, right=True).tolist()})
    for s0, s1 in zip(cuts[:-1], cuts[1:]):
        ar = area[s0:s1]  # (n,)
        owner = torch.repeat_interleave(torch.arange(s0, s1, device=device), ar)  # (M,) local triangle
        first = torch.cumsum(ar, 0) - ar  # (n,) first candidate of each triangle
        # (index_select: several times faster than advanced indexing for row gathers on CPU)
        k = torch.arange(owner.numel(), device=device) - first.index_select(0, owner - s0)  # (M,)
        cxy = corner.index_select(0, owner)  # (M,3)
        px = cxy[:, 0] + k % cxy[:, 2]  # (M,) pixel column
        py = cxy[:, 1] + torch.div(k, cxy[:, 2], rounding_mode="floor")  # (M,) pixel row
        cx, cy = px.float() + 0.5, py.float() + 0.5  # sample at the pixel centres
        row = table.index_select(0, owner)  # (M,12)
        w = row[:, 0:3] * cx[:, None] + row[:, 3:6] * cy[:, None] + row[:, 6:9]  # (M,3)
        inside = (w[:, 0] >= -1e-5) & (w[:, 1] >= -1e-5) & (w[:, 2] >= -1e-5)
        iz = torch.einsum("mc,mc->m", w, row[:, 9:12])  # (M,) interpolated 1/z (linear in screen)
        inside &= iz > 0
        hit_idx = inside.nonzero().squeeze(1)  # (M',)
        if hit_idx.numel() == 0:
            continue
        tt = ids.index_select(0, owner.index_select(0, hit_idx))  # (M',) hit triangles (global)
        b = torch.div(tt, F, rounding_mode="floor")
        pix = (b * H + py.index_select(0, hit_idx)) * W + px.index_select(0, hit_idx)  # (M',)
        depth = (1.0 / iz.index_select(0, hit_idx)).float()
        key = (depth.view(torch.int32).long() << 32) | (tt - b * F)
        keys.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)
    hit = keys != _NO_HIT
    halves = keys.view(torch.int32).view(-1, 2)  # little-endian int64 -> (low, high) int32
    if halves.numel() and torch.tensor([1], dtype=torch.int64).view(torch.int32)[0] != 1:
        halves = halves.flip(1)  # big-endian host
    face_index = halves[:, 0].long().masked_fill_(~hit, -1)
    depth = halves[:, 1].contiguous().view(torch.float32).masked_fill(~hit, float("inf"))
    return face_index.view(B, H, W), depth.view(B, H, W)


def _barycentrics_at(screen, faces, b, i, j, f):
    """Perspective-correct barycentrics of pixels (b, i, j) covered by faces f, all (M,) long.
    Returns (M,3) weights summing to 1."""
    tri = screen.float()[b[:, None], faces[f]]  # (M,3,3)
    coef, _ = _edge_coefficients(tri[..., :2])
    p = torch.stack([j.float() + 0.5, i.float() + 0.5, torch.ones_like(f, dtype=torch.float)], 1)
    w = (coef * p[:, None, :]).sum(-1)  # (M,3) screen-space barycentrics
    w = w / tri[..., 2].clamp(min=1e-9)  # perspective correction: weight by 1/z
    return w / w.sum(-1, keepdim=True)


def barycentrics(screen, faces, face_index):
    """Perspective-correct barycentric weights of every covered pixel.

    screen (B,V,3), faces (F,3), face_index (B,H,W) from `rasterize`.
    Returns weights (B,H,W,3) (zeros on background; they sum to 1 on covered pixels).
    """
    B, H, W = face_index.shape
    pix = (face_index.reshape(-1) >= 0).nonzero().squeeze(1)  # (M,) covered pixels, flat
    f = face_index.reshape(-1).index_select(0, pix)
    b, rest = torch.div(pix, H * W, rounding_mode="floor"), pix % (H * W)
    w = _barycentrics_at(screen, faces.to(screen.device).long(), b, rest // W, rest % W, f)
    out = torch.zeros(B * H * W, 3, dtype=torch.float32, device=screen.device)
    out.index_copy_(0, pix, w)
    return out.view(B, H, W, 3)


def vertex_normals(vertices, faces):
    """Area-weighted unit vertex normals. vertices (B,V,3), faces (F,3) -> (B,V,3)."""
    B, V, _ = vertices.shape
    tri = vertices[:, faces]  # (B,F,3,3)
    n = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)  # (B,F,3)
    idx = (faces[None] + V * torch.arange(B, device=faces.device)[:, None, None]).reshape(-1)  # (B*F*3,)
    out = torch.zeros(B * V, 3, dtype=vertices.dtype, device=vertices.device)
    out.index_add_(0, idx, n[:, :, None].expand(-1, -1, 3, -1).reshape(-1, 3))  # (B*V,3)
    out = out.view(B, V, 3)
    return out / out.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def render(vertices, faces, focal, center, size, colors=None, translation=None,
           light_dir=(-0.3, -0.5, -1.0), ambient=0.45, diffuse=0.55, smooth=True,
           background=None, cull_backfaces=False):
    """Render a batch of meshes with Lambert shading.

    vertices (B,V,3) metres, camera frame (+ optional translation (B,3)); faces (F,3) long;
    focal float|(B,)|(B,2) px; center (B,2) px; size (H,W).
    colors: None (grey), (3,), (V,3) / (B,V,3) per-vertex or (F,3) / (B,F,3) per-face, in [0,1]
    (per-face when the row count equals F and differs from V).
    light_dir (3,) or (B,3): direction from the surface TOWARDS the light, camera frame;
    ambient, diffuse: float or (B,); shade = ambient + diffuse * |n . l|.
    background: None (black), or (B,H,W,3) / (H,W,3) float image in [0,1].
    Returns dict: rgb (B,H,W,3) float [0,1], mask (B,H,W) bool, depth (B,H,W) metres (0 on
    background), face_index (B,H,W) long (-1 on background).
    """
    faces = faces.to(vertices.device).long()
    if translation is not None:
        vertices = vertices + translation[:, None, :]
    B, V, _ = vertices.shape
    H, W = size
    F = faces.shape[0]
    if center is None:
        center = torch.tensor([W / 2, H / 2], device=vertices.device).expand(B, 2)
    screen = project(vertices, focal, center)  # (B,V,3)
    face_index, depth = rasterize(screen, faces, size, cull_backfaces=cull_backfaces)
    mask = face_index >= 0
    # Shade only the covered pixels, addressed by flat index (no (B,H,W)-sized temporaries).
    pix = mask.reshape(-1).nonzero().squeeze(1)  # (M,) covered pixels of the (B*H*W,) image
    f = face_index.reshape(-1).index_select(0, pix)  # (M,) visible face
    bidx, rest = torch.div(pix, H * W, rounding_mode="floor"), pix % (H * W)
    w = _barycentrics_at(screen, faces, bidx, rest // W, rest % W, f)  # (M,3)
    vf = faces.index_select(0, f)  # (M,3) vertex ids of the visible face
    # Colours.
    if colors is None:
        colors = torch.tensor([0.7, 0.7, 0.7])
    colors = torch.as_tensor(colors, dtype=torch.float32, device=vertices.device)
    if colors.dim() == 1:
        col = colors.expand(f.shape[0], 3)
    else:
        if colors.dim() == 2:
            colors = colors.expand(B, -1, -1)
        if colors.shape[1] == F and F != V:
            col = colors.reshape(B * F, 3).index_select(0, bidx * F + f)  # (M,3) per face
        else:
            col = _interpolate(colors, bidx, vf, w)  # (M,3) per vertex
    # Normals (two-sided Lambert).
    if smooth:
        vn = vertex_normals(vertices, faces)  # (B,V,3)
        n = _interpolate(vn, bidx, vf, w)  # (M,3)
    else:
        tri = vertices[bidx[:, None], vf]  # (M,3,3)
        n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    n = n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    light = torch.as_tensor(light_dir, dtype=torch.float32, device=vertices.device)
    light = light / light.norm(dim=-1, keepdim=True)
    light = light.expand(B, 3)[bidx]  # (M,3)
    amb = torch.as_tensor(ambient, dtype=torch.float32, device=vertices.device).expand(B)[bidx]
    dif = torch.as_tensor(diffuse, dtype=torch.float32, device=vertices.device).expand(B)[bidx]
    shade = amb + dif * (n * light).sum(-1).abs()  # (M,)
    if background is None:
        rgb = torch.zeros(B, H, W, 3, device=vertices.device)
    else:
        rgb = torch.as_tensor(background, dtype=torch.float32, device=vertices.device)
        rgb = rgb.expand(B, H, W, 3).clone()
    rgb.view(-1, 3).index_copy_(0, pix, (col * shade[:, None]).clamp(0, 1))
    depth = torch.where(mask, depth, torch.zeros_like(depth))
    return {"rgb": rgb, "mask": mask, "depth": depth, "face_index": face_index}


def _interpolate(values, bidx, vf, w):
    """Barycentric interpolation of per-vertex values (B,V,C) at M pixels: batch bidx (M,),
    face vertices vf (M,3), weights w (M,3) -> (M,C)."""
    B, V, C = values.shape
    rows = (bidx[:, None] * V + vf).reshape(-1)  # (M*3,) rows of the (B*V, C) table
    corner = values.reshape(B * V, C).index_select(0, rows).view(-1, 3, C)  # (M,3,C)
    return (corner * w[..., None]).sum(1)


def weak_perspective_to_camera(cam, size, focal=5000.0):
    """Translation (B,3) for which a perspective camera (focal px, principal point at the crop
    centre (W/2, H/2)) matches the weak-perspective projection (u, v) = s * (X[..., :2] + t) on a
    crop (H,W) in the repository's normalised coordinates (one length L = min(H,W) for both axes,
    u = (2 x_pix - W) / L, v = (2 y_pix - H) / L; data.normalise_pixels):
    x_pix = f X / Z + W/2 gives Z = 2 f / (L s), exact in x and in y for every H, W.
    cam (B,3) (s, tx, ty); size (H,W)."""
    H, W = size
    s, tx, ty = cam[:, 0], cam[:, 1], cam[:, 2]
    tz = 2.0 * focal / (min(H, W) * s.clamp(min=1e-9))
    return torch.stack([tx, ty, tz], dim=1)


def overlay(image, vertices, faces, focal, center=None, translation=None, color=(0.65, 0.74, 0.86),
            alpha=0.8, **render_kw):
    """Alpha-blend a rendered mesh onto an image (for demo pictures).

    image: (H,W,3) uint8 numpy / PIL image, or float in [0,1]; vertices (V,3) or (1,V,3) metres.
    Returns an (H,W,3) uint8 numpy array.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    H, W = img.shape[:2]
    v = torch.as_tensor(vertices, dtype=torch.float32)
    if v.dim() == 2:
        v = v[None]
    if center is None:
        center = torch.tensor([[W / 2, H / 2]])
    center = torch.as_tensor(center, dtype=torch.float32).reshape(1, 2)
    if translation is not None:
        translation = torch.as_tensor(translation, dtype=torch.float32).reshape(1, 3)
    out = render(v, torch.as_tensor(faces), focal, center, (H, W), colors=color,
                 translation=translation, **render_kw)
    rgb = out["rgb"][0].numpy() * 255.0
    m = out["mask"][0].numpy()[..., None] * alpha
    return (img * (1 - m) + rgb * m).round().clip(0, 255).astype(np.uint8)


if __name__ == "__main__":
    # Smoke test: a batch of spheres, timing, and an overlay written to a fresh temp file.
    import time
    torch.set_num_threads(1)  # see data.generate_synthetic: OpenMP threads spin on a busy CPU
    from mesh import icosphere
    v, f = (torch.as_tensor(a) for a in icosphere(5))  # 10242 vertices, 20480 faces (~ an SMPL mesh)
    v = v.float()
    B, H, W = 16, 224, 224
    verts = v[None] * 0.3 + torch.tensor([0.0, 0.0, 2.5])
    verts = verts.expand(B, -1, -1) + torch.randn(B, 1, 3) * torch.tensor([0.1, 0.1, 0.3])
    colors = (v + 1) / 2
    render(verts[:2], f, 300.0, None, (H, W), colors=colors)
    t0 = time.perf_counter()
    out = render(verts, f, 300.0, None, (H, W), colors=colors, cull_backfaces=True)
    dt = time.perf_counter() - t0
    print(f"rgb {tuple(out['rgb'].shape)} mask {tuple(out['mask'].shape)} "
          f"depth {tuple(out['depth'].shape)}; {B / dt:.1f} images/s "
          f"({v.shape[0]} verts, {f.shape[0]} faces)")
    img = overlay(np.full((H, W, 3), 90, np.uint8), verts[0], f, 300.0)
    from PIL import Image
    import os
    import tempfile
    fd, png = tempfile.mkstemp(prefix="render_smoke_", suffix=".png")  # never a fixed shared path
    with os.fdopen(fd, "wb") as fh:
        Image.fromarray(img).save(fh, format="PNG")
    print(f"wrote {png}")
