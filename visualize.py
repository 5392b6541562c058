"""The papers' figures, drawn from a checkpoint: attention maps, token clusters, deformable
sampling points, upsampled features, the SCAP pattern and the predicted mesh. Headless PNGs
(render.py for meshes, PIL for the rest).

    python visualize.py attention --ckpt runs/q/last.pt --image photo.jpg --joints 13,6 --vertices 0,200
    python visualize.py clusters  --ckpt runs/tore/last.pt --image photo.jpg
    python visualize.py sampling  --ckpt runs/deformer/last.pt --image photo.jpg
    python visualize.py features  --ckpt runs/featup/last.pt --image photo.jpg
    python visualize.py scap      --ckpt runs/deformer/last.pt
    python visualize.py mesh      --ckpt runs/q/last.pt --image photo.jpg
    python visualize.py attention --model fastmetro --preset tiny --image photo.jpg   # random weights

Papers (figures re-drawn, no code used):
- FastMETRO: Cho et al., "Cross-Attention of Disentangled Modalities for 3D Human Mesh Recovery
  with Transformers", ECCV 2022, https://arxiv.org/abs/2207.13820 (attention maps).
- TORE: Dou et al., "TORE: Token Reduction for Efficient Human Mesh Recovery with Transformer",
  ICCV 2023, https://arxiv.org/abs/2211.10705 (image-token pruning).
- DeFormer: Yoshiyasu, "Deformable Mesh Transformer for 3D Human Mesh Recovery", CVPR 2023
  (deformable mesh cross-attention, SCAP).
- FeatUp: Fu et al., "FeatUp: A Model-Agnostic Framework for Features at Any Resolution",
  ICLR 2024, https://arxiv.org/abs/2403.10516 (PCA feature pictures).

Every subcommand takes --ckpt (a train.py checkpoint), --weights FILE with --model/--preset (a
released state dict, checkpoints.py), or --model [--preset tiny] alone (random weights, seeded by
--seed, to see what the tools draw), --image (one photo, read as demo.py reads photos (photo.py): EXIF,
16-bit, alpha) and optional --box x1,y1,x2,y2 (default: the largest centred square), and writes
`OUT/<subcommand>/*.png` plus `<subcommand>.npz` holding exactly the arrays that were drawn.

What is drawn, and how it is taken from the model (forward hooks; no model file is changed):
- attention: every decoder layer's cross-attention (softmax(q k^T / sqrt(d)) over the image
  tokens) of the chosen joint / vertex tokens, head-averaged and per head, as h x w (7x7) heat maps over
  the crop (top row blended with the crop, bottom row the bare map), and the decoder
  self-attention matrix (head-averaged) with the entries the mesh mask blocks in grey. The hook
  recomputes the probabilities from the module's inputs and checks that they reproduce the
  module's output (so a change of the attention code cannot silently draw something else).
  TORE with ITP: the memory tokens are the M cluster tokens; a map over image cells is the row
  times the clustering matrix (B, M, h*w) (still sums to 1). TORE with GTR: vertex tokens attend
  to the J joint features (the NSR decoder), drawn as a 1 x J strip.
- clusters (TORE ITP): the clustering matrix (M, h*w) the model outputs; each image cell is
  coloured by the cluster that takes the largest share of it (argmax over M), and one map per
  kept cluster token shows its weights (each a distribution over the cells).
- sampling (DeFormer): per decoder block, on each feature level, the reference points (every
  joint / vertex of the current mesh projected with the camera, white) and, for the chosen tokens,
  the sampling points coloured and sized by their attention weight; the mesh at every refinement
  step t and the projected vertices of t (orange; carried up the barycentric map where t+1 is on
  the next mesh level) and t+1 (cyan).
- features (FeatUp-HMR): PCA (3 components) of the low-resolution ViT features, fitted on the
  low-resolution map; the SAME mean, basis and colour range turn the low-res and the upsampled
  maps into RGB, side by side.
- scap (DeFormer): the SCAP pattern in the original token order and after the model's ordering
  (RCM / AMD), and its tile map (tile_size 16) with the density of non-zero tiles.
- mesh: the predicted mesh over the crop (mesh_crop.png) and from the front, side (+90 deg
  about y) and top (mesh_views.png).

Choices (no reference code draws these): heat maps use a viridis-like colour ramp (test
`invert_colormap` reads values back), each map scaled by its own maximum (titles give it);
clusters use evenly spaced hues. TORE's attention over cluster tokens carried to image cells
through the clustering matrix is our reading (each cluster token is that weighted mix of cells);
the raw rows over the M tokens are in the .npz too. Self-attention is drawn on a square-root scale.
"""
import argparse
import colorsys
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import checkpoints
import deformable_attention
import photo
import render
from sparse_attention import block_density, blockify, build_scap, mesh_adjacency, reorder

LSP_NAMES = ("R_Ankle", "R_Knee", "R_Hip", "L_Hip", "L_Knee", "L_Ankle", "R_Wrist", "R_Elbow",
             "R_Shoulder", "L_Shoulder", "L_Elbow", "L_Wrist", "Neck", "Head")
TITLE = 14                                   # title bar height above each panel (px)
GAP = 2                                      # gap between panels (px)
BLOCKED = (128, 128, 128)                    # masked self-attention entries
_RAMP = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64)
LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_RAMP)), _RAMP[:, c])
                for c in range(3)], 1).round().astype(np.uint8)        # (256, 3)


# ----------------------------------------------------------------------------- drawing helpers
def colormap(x):
    """Values in [0, 1] (any shape) -> uint8 (..., 3) colours of the ramp."""
    i = np.clip(np.round(np.asarray(x, dtype=np.float64) * 255), 0, 255).astype(np.int64)
    return LUT[i]


def invert_colormap(rgb):
    """uint8 (..., 3) colours of the ramp -> values in [0, 1] (nearest ramp entry)."""
    d = ((np.asarray(rgb, dtype=np.float64)[..., None, :] - LUT.astype(np.float64)) ** 2).sum(-1)
    return d.argmin(-1) / 255.0


def upsample_cells(grid, size):
    """(h, w, ...) cell values -> (H, W, ...) nearest: pixel (i, j) shows cell (i*h//H, j*w//W)."""
    h, w = grid.shape[:2]
    H, W = size
    rows = (np.arange(H) * h) // H
    cols = (np.arange(W) * w) // W
    return grid[rows][:, cols]


def cell_centres(hw, size):
    """Pixel (row, col) at the centre of each of the h x w cells of a panel of `size` (H, W)."""
    h, w = hw
    H, W = size
    return ((np.arange(h) + 0.5) * H / h).astype(int), ((np.arange(w) + 0.5) * W / w).astype(int)


def blend(image, overlay, alpha=0.6):
    return (np.asarray(image, np.float64) * (1 - alpha) + np.asarray(overlay, np.float64) * alpha
            ).round().clip(0, 255).astype(np.uint8)


def panel_origin(row, col, panel_hw):
    """Top-left pixel (y, x) of panel (row, col) in a figure made by `figure` (below the title)."""
    ph, pw = panel_hw
    return row * (ph + TITLE + GAP) + TITLE, col * (pw + GAP)


def figure(rows, path):
    """rows: list of lists of (title, (H, W, 3) uint8 panel), all panels one size -> PNG at path."""
    ph, pw = rows[0][0][1].shape[:2]
    ncol = max(len(r) for r in rows)
    fig = np.full((len(rows) * (ph + TITLE + GAP), ncol * (pw + GAP), 3), 255, np.uint8)
    img = Image.fromarray(fig)
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(rows):
        for c, (title, panel) in enumerate(row):
            if panel.shape[:2] != (ph, pw):
                raise ValueError(f"visualize.figure: panel {title!r} is {panel.shape[:2]}, expected {(ph, pw)}")
            y, x = panel_origin(r, c, (ph, pw))
            img.paste(Image.fromarray(panel), (x, y))
            draw.text((x + 2, y - TITLE + 1), str(title), fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def read_panel(path, row, col, panel_hw):
    """The pixels of one panel of a figure PNG (for tests and readers)."""
    y, x = panel_origin(row, col, panel_hw)
    return np.asarray(Image.open(path).convert("RGB"))[y:y + panel_hw[0], x:x + panel_hw[1]]


def heat(values, size):
    """(h, w) non-negative map -> (bare heat panel (H, W, 3), scale): the map / its maximum."""
    values = np.asarray(values, dtype=np.float64)
    top = float(values.max()) if values.size and values.max() > 0 else 1.0
    return upsample_cells(colormap(values / top), size), top


def hues(n):
    """n distinct colours (evenly spaced hues), uint8 (n, 3)."""
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(k / max(n, 1), 0.75, 0.95)]
                     for k in range(n)], dtype=np.uint8)


def dots(panel, points, colours, radius=1):
    """Draw (N, 2) pixel points (x, y) with (N, 3) uint8 colours and radius (scalar or (N,))."""
    img = Image.fromarray(panel)
    draw = ImageDraw.Draw(img)
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(points),))
    for (x, y), c, r in zip(np.asarray(points, dtype=np.float64), colours, radius):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in c))
    return np.asarray(img)


# ----------------------------------------------------------------------------- model and input
def load(args):
    """--ckpt, --weights (+ --model/--preset) or --model/--preset alone (random weights)
    -> (model, body_model, model name, topology the model was built on)."""
    device = torch.device(args.device)
    if args.ckpt or args.weights:
        model, body_model, info = checkpoints.load_for_inference(
            device, ckpt=args.ckpt, weights=args.weights, model=args.model, preset=args.preset, body=args.body,
            h36m_regressor=args.h36m_regressor, mesh_hierarchy=args.mesh_hierarchy,
            overrides=checkpoints.parse_overrides(args.set))
        name = info["model"]
    elif args.model:
        torch.manual_seed(args.seed)
        body_model = checkpoints.build_body(args.body, args.h36m_regressor).to(device)
        hierarchy, _ = checkpoints.load_hierarchy(body_model, args.mesh_hierarchy)
        model, _ = checkpoints.build_model(args.model, args.preset or "tiny", body_model,
                                           overrides=checkpoints.parse_overrides(args.set), device=device,
                                           hierarchy=hierarchy)
        model.topology_used = body_model.topology(hierarchy=hierarchy)
        model.eval()
        name = args.model
    else:
        raise SystemExit("visualize.py: give --ckpt CHECKPOINT, --weights FILE with --model/--preset, or "
                         "--model NAME [--preset PRESET] for random weights")
    return model, body_model, name, checkpoints.model_topology_view(model, body_model)


def input_crop(args, model):
    """--image (+ --box) -> (crop as uint8 (H, W, 3), model input (1, 3, H, W))."""
    if not args.image:
        raise SystemExit(f"visualize.py {args.command}: --image is required")
    image = photo.read_image(args.image)
    if args.box:
        try:
            box = [float(v) for v in args.box.split(",")]
        except ValueError:
            raise SystemExit(f"visualize.py: --box {args.box!r} must be x1,y1,x2,y2") from None
        cx, cy, side = photo.square_box(photo.check_box(box, f"--box {args.box}"), args.box_scale)
    else:
        W, H = image.size
        cx, cy, side = W / 2, H / 2, min(W, H)
    patch, _ = photo.crop(image, cx, cy, side, tuple(model.cfg.input_size))
    x = photo.to_tensor(patch)[None].to(args.device)
    return np.asarray(patch), x


def parse_indices(text, n, what):
    if not text:
        return []
    try:
        idx = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"visualize.py: --{what} {text!r} must be comma-separated integers") from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise SystemExit(f"visualize.py: --{what} {bad} out of range 0..{n - 1}")
    return idx


def mesh_overlay(patch, vertices, faces, cam, focal=1000.0):
    """Mesh (V, 3) drawn on the crop with the weak-perspective camera (s, tx, ty)."""
    h, w = patch.shape[:2]
    f = focal * min(h, w) / 224
    t = render.weak_perspective_to_camera(torch.as_tensor(cam, dtype=torch.float32)[None], (h, w), f)[0]
    return render.overlay(patch, torch.as_tensor(vertices, dtype=torch.float32), torch.as_tensor(faces), f,
                          translation=t)


def project_pixels(points, cam, H, W):
    """Weak perspective -> (x, y) crop pixels. points (N, 3) metres, cam (3,) = (s, tx, ty).
    Both axes are normalised by one length L = min(H, W), as data.normalise_pixels does."""
    uv = cam[0] * (points[:, :2] + cam[1:])                                      # (N, 2) normalised
    L = min(H, W)
    return np.stack([(uv[:, 0] * L + W) / 2, (uv[:, 1] * L + H) / 2], axis=-1)   # (N, 2) pixels


# ----------------------------------------------------------------------------- attention
def attention_probs(module, query, key, attn_mask=None):
    """What fastmetro.MultiheadAttention applies: softmax(q k^T / sqrt(d_head)) with blocked
    entries (mask True) at -inf. query (B, Lq, C), key (B, Lk, C) -> (B, H, Lq, Lk)."""
    B, Lq, C = query.shape
    H = module.num_heads
    w_q, w_k, _ = module.in_proj_weight.chunk(3)
    b_q, b_k, _ = module.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).reshape(B, Lq, H, C // H).transpose(1, 2)      # (B, H, Lq, C/H)
    k = F.linear(key, w_k, b_k).reshape(B, key.shape[1], H, C // H).transpose(1, 2)
    s = (q * (C // H) ** -0.5) @ k.transpose(-2, -1)                               # (B, H, Lq, Lk)
    if attn_mask is not None:
        s = s.masked_fill(attn_mask, float("-inf"))
    return s.softmax(-1)


def _reproduce(module, probs, value):
    """Output of the attention module from the recorded probabilities (for the check)."""
    B, Lk, C = value.shape
    H = module.num_heads
    _, _, w_v = module.in_proj_weight.chunk(3)
    _, _, b_v = module.in_proj_bias.chunk(3)
    v = F.linear(value, w_v, b_v).reshape(B, Lk, H, C // H).transpose(1, 2)       # (B, H, Lk, C/H)
    o = (probs @ v).transpose(1, 2).reshape(B, probs.shape[2], C)                  # (B, Lq, C)
    return module.out_proj(o)


class AttentionRecorder:
    """Forward hooks on attention modules; `maps[name]` = (B, H, Lq, Lk) probabilities of the last
    forward. Each recording is checked against the module's own output."""

    def __init__(self, modules):
        self.maps, self.masks, self._handles = {}, {}, []
        for name, m in modules.items():
            self._handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            query, key, value = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            with torch.no_grad():
                probs = attention_probs(module, query, key, mask)
                again = _reproduce(module, probs, value)
            if not torch.allclose(again, output, rtol=1e-3, atol=1e-4 * (1 + float(output.abs().max()))):
                raise RuntimeError(f"visualize.py: the attention recomputed for {name} does not reproduce the "
                                   f"module's output (max diff {float((again - output).abs().max()):.3g}); "
                                   "fastmetro.MultiheadAttention changed, update visualize.attention_probs")
            self.maps[name] = probs.detach().cpu()
            self.masks[name] = None if mask is None else mask.detach().cpu()
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def decoder_attention_modules(model):
    """{"s{stage}_l{layer}_{cross|self}": module} over the decoders of transformer_1/2(/3)."""
    out = {}
    for stage in (1, 2, 3):
        tr = getattr(model, f"transformer_{stage}", None)
        if tr is None:
            continue
        for l, layer in enumerate(tr.decoder.layers):
            out[f"s{stage}_l{l}_cross"] = layer.multihead_attn
            out[f"s{stage}_l{l}_self"] = layer.self_attn
    return out


def cmd_attention(args):
    model, body_model, name, topo = load(args)
    if name not in ("fastmetro", "tore"):
        raise SystemExit(f"visualize.py attention: needs a FastMETRO or TORE model, got {name}")
    patch, x = input_crop(args, model)
    J, V2 = model.num_joints, model.num_vertices
    joints = parse_indices(args.joints, J, "joints")
    verts = parse_indices(args.vertices, V2, "vertices")
    rec = AttentionRecorder(decoder_attention_modules(model))
    try:
        with torch.no_grad():
            feats = model.backbone(x)
            out = model.forward_head(feats)
    finally:
        rec.remove()
    h, w = feats.shape[-2:]
    clusters = out.get("clusters")                                               # (1, M, h*w) or None
    gtr = name == "tore" and model.cfg.use_gtr
    size = patch.shape[:2]
    dest = Path(args.out) / "attention"
    files, arrays = [], {}
    tokens = [("joint", j, f"joint{j:02d}_{LSP_NAMES[j] if J == 14 else j}") for j in joints]
    tokens += [("vertex", v, f"vertex{v:04d}") for v in verts]
    for key, probs in sorted(rec.maps.items()):
        stage = int(key[1])
        p = probs[0]                                                             # (H, Lq, Lk)
        arrays[f"{key}_probs"] = p.numpy()
        if key.endswith("_self"):
            mask = rec.masks[key]
            mean = p.mean(0).numpy()                                             # (Lq, Lq)
            arrays[f"{key}_mean"] = mean
            pic = colormap(np.sqrt(mean / max(float(mean.max()), 1e-12)))
            if mask is not None:
                arrays[f"{key}_mask"] = mask.numpy()
                pic[mask.numpy()] = BLOCKED
            k = max(1, 224 // pic.shape[0])                                      # small matrices (J x J) enlarged
            pic = pic.repeat(k, 0).repeat(k, 1)
            files.append(figure([[(f"{key} self-attention, mean of {p.shape[0]} heads (sqrt scale, grey = masked)",
                                   pic)]], dest / f"{key}.png"))
            continue
        for kind, idx, label in tokens:
            if stage == 3:                                                       # TORE NSR: vertices -> joints
                if kind != "vertex":
                    continue
                row = p[:, idx]                                                  # (H, J)
                grid_hw = (1, J)
            else:
                if kind == "vertex" and gtr:
                    continue
                row = p[:, idx if kind == "joint" else J + idx]                  # (H, Lk)
                if clusters is not None:                                         # over clusters -> over cells
                    row = row @ clusters[0].cpu()                                # (H, M) @ (M, h*w)
                grid_hw = (h, w)
            row = row.numpy()
            maps = row.reshape(row.shape[0], *grid_hw)                           # (H, h*w) -> (H, h, w)
            mean = maps.mean(0)
            arrays[f"{key}_{label}"] = maps
            arrays[f"{key}_{label}_mean"] = mean
            pics = [heat(m, size) for m in [mean, *maps]]
            titles = [f"mean (max {pics[0][1]:.3f})"] + [f"head {k} (max {t:.3f})" for k, (_, t) in enumerate(pics[1:])]
            top = [(t, blend(patch, pic)) for t, (pic, _) in zip(titles, pics)]
            bottom = [(t, pic) for t, (pic, _) in zip(titles, pics)]
            files.append(figure([top, bottom], dest / f"{key}_{label}.png"))
    if clusters is not None:
        arrays["clusters"] = clusters[0].cpu().numpy()
    np.savez(dest / "attention.npz", feature_hw=np.array([h, w]), **arrays)
    return {"files": files, "npz": dest / "attention.npz", "panel_hw": size}


# ----------------------------------------------------------------------------- clusters
def cmd_clusters(args):
    model, _, name, _ = load(args)
    if name != "tore" or not model.cfg.use_itp:
        raise SystemExit("visualize.py clusters: needs a TORE model with image-token pruning (use_itp)")
    patch, x = input_crop(args, model)
    with torch.no_grad():
        out = model(x)
    h, w = model.cfg.feature_hw()
    c = out["clusters"][0].cpu().numpy()                                         # (M, h*w)
    M = c.shape[0]
    assign = c.argmax(0)                                                         # (h*w,) winning cluster per cell
    palette = hues(M)
    size = patch.shape[:2]
    part = upsample_cells(palette[assign].reshape(h, w, 3), size)                # (H, W, 3)
    dest = Path(args.out) / "clusters"
    files = [figure([[("crop", patch), (f"{M} cluster tokens: cell -> largest share", blend(patch, part, 0.55)),
                      ("partition", part)]], dest / "clusters_partition.png")]
    small = (size[0] // 2, size[1] // 2)
    cells = np.bincount(assign, minlength=M)
    panels = [(f"{k}: {cells[k]} cells, max {c[k].max():.2f}", heat(c[k].reshape(h, w), small)[0]) for k in range(M)]
    ncol = 8
    files.append(figure([panels[i:i + ncol] for i in range(0, M, ncol)], dest / "clusters_weights.png"))
    np.savez(dest / "clusters.npz", clusters=c, assignment=assign, palette=palette, feature_hw=np.array([h, w]))
    return {"files": files, "npz": dest / "clusters.npz", "panel_hw": size, "small_hw": small, "columns": ncol}


# ----------------------------------------------------------------------------- sampling
class DeformableRecorder:
    """Forward hooks on MSDeformAttn modules: reference points, sampling locations, attention
    weights and the query of the last forward, checked against the module's output."""

    def __init__(self, modules):
        self.records, self._handles = [], []
        for m in modules:
            self._handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module, args, output):
        query, ref, flat, shapes = args[:4]
        pad = args[5] if len(args) > 5 else None
        with torch.no_grad():
            loc = module.sampling_locations(query, ref, shapes)                  # (B, N, H, L, P, 2)
            attn = module.attention_probs(query)                                 # (B, N, H, L, P)
            value = module.value_proj(flat)
            if pad is not None:
                value = value.masked_fill(pad[..., None], 0.0)
            B, S, C = value.shape
            value = value.view(B, S, module.n_heads, C // module.n_heads)        # (B, S, C) -> (B, S, H, Dh)
            again = module.output_proj(deformable_attention.ms_deform_attn_core_pytorch(value, shapes, loc, attn))
        if not torch.allclose(again, output, rtol=1e-3, atol=1e-4 * (1 + float(output.abs().max()))):
            raise RuntimeError("visualize.py: the sampling locations / weights recomputed from MSDeformAttn's "
                               "inputs do not reproduce its output; deformable_attention.py changed")
        self.records.append({"query": query.detach().cpu(), "ref": ref.detach().cpu(), "loc": loc.cpu(),
                             "attn": attn.cpu(), "shapes": torch.as_tensor(shapes).cpu()})

    def remove(self):
        for h in self._handles:
            h.remove()


def cmd_sampling(args):
    model, body_model, name, topo = load(args)
    if name != "deformer":
        raise SystemExit(f"visualize.py sampling: needs a DeFormer model, got {name}")
    patch, x = input_crop(args, model)
    blocks = [b for stage in model.stages for b in stage]
    rec = DeformableRecorder([b.cross_attn for b in blocks])
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        rec.remove()
    J = model.num_joints
    joints = parse_indices(args.joints, J, "joints") if args.joints else []
    size = patch.shape[:2]
    H, W = size
    dest = Path(args.out) / "sampling"
    files, arrays = [], {"cam": out["cam"][0].cpu().numpy()}
    levels = out["level_per_step"]
    for b, r in enumerate(rec.records):
        ref, loc, attn = r["ref"][0], r["loc"][0], r["attn"][0]                 # (N, 2), (N, Hd, L, P, 2), (N, Hd, L, P)
        N = ref.shape[0]
        chosen = joints + [J + v for v in parse_indices(args.vertices, N - J, "vertices")]
        arrays.update({f"block{b}_ref": ref.numpy(), f"block{b}_loc": loc.numpy(),
                       f"block{b}_attn": attn.numpy(), f"block{b}_query": r["query"][0].numpy(),
                       f"block{b}_shapes": r["shapes"].numpy(), f"block{b}_tokens": np.array(chosen)})
        panels = []
        for l in range(loc.shape[2]):
            hl, wl = (int(v) for v in r["shapes"][l])
            pic = dots(patch.copy(), ref.numpy() * [W, H], np.full((N, 3), 255), 1)
            for t in chosen:
                pts = loc[t, :, l].reshape(-1, 2).numpy() * [W, H]               # (Hd*P, 2) pixels
                wgt = attn[t, :, l].reshape(-1).numpy()                          # (Hd*P,)
                pic = dots(pic, pts, colormap(wgt / max(wgt.max(), 1e-12)), 1 + 4 * wgt / max(wgt.max(), 1e-12))
                pic = dots(pic, ref[t:t + 1].numpy() * [W, H], np.array([[255, 0, 0]]), 3)
            share = float(attn[chosen, :, l].sum(-1).mean()) if chosen else 0.0  # of each head's weight
            panels.append((f"block {b}, level {l} ({hl}x{wl}): {100 * share:.0f}% of the weight", pic))
        files.append(figure([panels], dest / f"block{b}.png"))
    cam = out["cam"][0].cpu().numpy()
    steps, moves = [], []
    vps = [v[0].cpu().numpy() for v in out["vertices_per_step"]]
    for t, (v, lev) in enumerate(zip(vps, levels)):
        steps.append((f"step {t} (level {lev}, {len(v)} vertices)",
                      mesh_overlay(patch, v, topo["faces"][lev].numpy(), cam)))
        arrays[f"step{t}_vertices"] = v
        if t + 1 < len(vps):
            if levels[t + 1] != lev:                                             # new stage: t carried up
                with torch.no_grad():
                    v = model.upsample(torch.as_tensor(v)[None], lev, levels[t + 1])[0].numpy()
            pic = dots(patch.copy(), project_pixels(v, cam, H, W), np.array([[255, 150, 0]] * len(v)), 1)
            pic = dots(pic, project_pixels(vps[t + 1], cam, H, W), np.array([[0, 220, 255]] * len(v)), 1)
            moves.append((f"step {t} (orange) -> {t + 1} (cyan)", pic))
    files.append(figure([steps, moves] if moves else [steps], dest / "steps.png"))
    np.savez(dest / "sampling.npz", level_per_step=np.array(levels), **arrays)
    return {"files": files, "npz": dest / "sampling.npz", "panel_hw": size}


# ----------------------------------------------------------------------------- features
def pca_basis(x, k=3):
    """x (N, C) -> mean (C,), basis (k, C) (orthonormal rows: top right singular vectors, each
    signed so that its largest-magnitude entry is positive)."""
    mean = x.mean(0)
    _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:k]
    sign = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))     # (k, 1)
    return mean, basis * sign


def pca_rgb(feat, mean, basis, lo, hi):
    """(C, h, w) features -> (h, w, 3) in [0, 1]: projection on basis, scaled by the range lo..hi."""
    C, h, w = feat.shape
    p = (feat.reshape(C, h * w).T - mean) @ basis.T                              # (C, h, w) -> (h*w, C) -> (h*w, 3)
    return ((p - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1).reshape(h, w, 3)


def cmd_features(args):
    model, _, name, _ = load(args)
    if name != "featup_hmr" or model.cfg.upsampler == "none":
        raise SystemExit("visualize.py features: needs a FeatUp-HMR model with an upsampler (jbu or bilinear)")
    patch, x = input_crop(args, model)
    with torch.no_grad():
        levels = model.feature_levels(x)                                         # [up16, up32, f16, f32]
    size = patch.shape[:2]
    dest = Path(args.out) / "features"
    rows, arrays = [], {}
    for i, layer in enumerate(("middle", "last")):
        hi_f, lo_f = levels[i][0].float().cpu(), levels[2 + i][0].float().cpu()  # (C, rh, rw), (C, h, w)
        C, h, w = lo_f.shape
        mean, basis = pca_basis(lo_f.reshape(C, h * w).T)                        # (C, h, w) -> (h*w, C)
        proj = (lo_f.reshape(C, h * w).T - mean) @ basis.T                       # (h*w, 3)
        lo_v, hi_v = proj.min(0).values, proj.max(0).values
        lo_rgb = pca_rgb(lo_f, mean, basis, lo_v, hi_v).numpy()
        hi_rgb = pca_rgb(hi_f, mean, basis, lo_v, hi_v).numpy()
        arrays.update({f"{layer}_mean": mean.numpy(), f"{layer}_basis": basis.numpy(), f"{layer}_range_lo": lo_v.numpy(),
                       f"{layer}_range_hi": hi_v.numpy(), f"{layer}_lowres_rgb": lo_rgb, f"{layer}_upsampled_rgb": hi_rgb})
        u8 = lambda a: (a * 255).round().astype(np.uint8)
        rows.append([("crop", patch), (f"{layer} layer {h}x{w} (PCA fit here)", upsample_cells(u8(lo_rgb), size)),
                     (f"{model.cfg.upsampler} x{hi_f.shape[1] // h} {hi_f.shape[1]}x{hi_f.shape[2]} (same basis)",
                      upsample_cells(u8(hi_rgb), size))])
    files = [figure(rows, dest / "features.png")]
    np.savez(dest / "features.npz", **arrays)
    return {"files": files, "npz": dest / "features.npz", "panel_hw": size}


# ----------------------------------------------------------------------------- scap
def scap_mask(model, topology, stage):
    """The SCAP (N, N) bool (True = may attend) of a DeFormer stage, built as deformer.py builds it."""
    level = model.levels[stage]
    nv = topology["num_vertices"][level]
    adj = mesh_adjacency(torch.as_tensor(topology["faces"][level]).long(), nv, self_loops=True)
    j2s = torch.as_tensor(topology["joint_to_smpl"]).long()
    return build_scap(adj, torch.as_tensor(topology["skin_weights"][level]).float()[:, j2s],
                      torch.as_tensor(topology["joint_regressor"][level]).float(),
                      threshold=model.cfg.scap_threshold, orientation=model.cfg.scap_orientation)


def downsample_bool(m, max_px):
    """(N, N) bool -> at most max_px square by max-pooling (any True in a block shows)."""
    N = m.shape[0]
    k = max(1, math.ceil(N / max_px))
    pad = torch.zeros(math.ceil(N / k) * k, math.ceil(N / k) * k, dtype=torch.bool)
    pad[:N, :N] = m
    n = pad.shape[0] // k
    return pad.view(n, k, n, k).any(3).any(1), k                                # (n*k, n*k) -> (n, n)


def cmd_scap(args):
    model, body_model, name, topo = load(args)
    if name != "deformer":
        raise SystemExit(f"visualize.py scap: needs a DeFormer model, got {name}")
    dest = Path(args.out) / "scap"
    files, arrays = [], {}
    for s, blocks in enumerate(model.stages):
        attn = blocks[0].self_attn
        mask = scap_mask(model, topo, s)
        perm = attn.plan.perm.cpu() if attn.plan is not None else reorder(mask, attn.ordering)
        ordered = mask[perm][:, perm]
        T = attn.tile_size
        tiles = blockify(ordered, T)
        density, _ = block_density(mask, T, perm)
        px = args.scap_px
        a, ka = downsample_bool(mask, px)
        b, kb = downsample_bool(ordered, px)
        n = a.shape[0]
        tile_px = max(1, n // tiles.shape[0])
        t_img = tiles.repeat_interleave(tile_px, 0).repeat_interleave(tile_px, 1)
        side = max(n, t_img.shape[0])
        to_pic = lambda m: np.pad(np.where(m.numpy()[..., None], 0, 255).astype(np.uint8).repeat(3, 2),
                                  ((0, side - m.shape[0]), (0, side - m.shape[1]), (0, 0)), constant_values=255)
        N = mask.shape[0]
        files.append(figure([[(f"SCAP level {model.levels[s]}: {N} tokens, {int(mask.sum())} pairs ({ka}:1)", to_pic(a)),
                              (f"after {attn.ordering} ordering ({kb}:1)", to_pic(b)),
                              (f"{T}x{T} tiles: {int(tiles.sum())}/{tiles.numel()} = {100 * density:.2f}%", to_pic(t_img))]],
                             dest / f"scap_level{model.levels[s]}.png"))
        arrays.update({f"stage{s}_mask": mask.numpy(), f"stage{s}_perm": perm.numpy(), f"stage{s}_tiles": tiles.numpy(),
                       f"stage{s}_density": np.array(density), f"stage{s}_tile_px": np.array(tile_px),
                       f"stage{s}_side": np.array(side)})
    np.savez(dest / "scap.npz", **arrays)
    return {"files": files, "npz": dest / "scap.npz"}


# ----------------------------------------------------------------------------- mesh
def view_render(vertices, faces, rotation, size, color=(0.65, 0.74, 0.86)):
    """Mesh (V, 3) centred, rotated by (3, 3), framed to fill ~80% of a size x size picture."""
    v = torch.as_tensor(vertices, dtype=torch.float32)
    v = (v - (v.max(0).values + v.min(0).values) / 2) @ torch.as_tensor(rotation, dtype=torch.float32).T
    radius = float(v[:, :2].abs().max().clamp(min=1e-6))
    focal = float(size)
    depth = float(v[:, 2].abs().max())
    tz = focal * radius / (0.4 * size) + depth                                   # 80% of the frame
    out = render.render(v[None], torch.as_tensor(faces), focal, None, (size, size), colors=color,
                        translation=torch.tensor([[0.0, 0.0, tz]]), background=torch.ones(size, size, 3))
    return (out["rgb"][0].numpy() * 255).round().astype(np.uint8), out["mask"][0].numpy()


def rot_y(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_x(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def cmd_mesh(args):
    model, body_model, _, _ = load(args)
    patch, x = input_crop(args, model)
    with torch.no_grad():
        out = model(x)
    v = out["vertices"]
    v = (model.camera_frame(v) if hasattr(model, "camera_frame") else v)[0].float().cpu().numpy()
    faces = body_model.faces.cpu().numpy()
    cam = out["cam"][0].float().cpu().numpy()
    size = args.view_size or patch.shape[0]
    views = {"front": np.eye(3), "side": rot_y(90), "top": rot_x(-90)}
    crop_panels = [("crop", patch), ("on the crop", mesh_overlay(patch, v, faces, cam))]
    panels, masks = [], {}
    for name, R in views.items():
        pic, m = view_render(v, faces, R, size)
        panels.append((name, pic))
        masks[name] = m
    dest = Path(args.out) / "mesh"
    files = [figure([crop_panels], dest / "mesh_crop.png"), figure([panels], dest / "mesh_views.png")]
    np.savez(dest / "mesh.npz", vertices=v, cam=cam, **{f"{k}_mask": m for k, m in masks.items()})
    return {"files": files, "npz": dest / "mesh.npz"}


# ----------------------------------------------------------------------------- CLI
COMMANDS = {"attention": cmd_attention, "clusters": cmd_clusters, "sampling": cmd_sampling,
            "features": cmd_features, "scap": cmd_scap, "mesh": cmd_mesh}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS))
    # --ckpt | --weights with --model/--preset (+ --set); body, regressor, hierarchy. --model alone:
    # random weights (preset default tiny, --set applies too).
    checkpoints.add_model_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", default=None)
    p.add_argument("--box", default=None, help="x1,y1,x2,y2 person box in the image (enlarged by --box-scale)")
    p.add_argument("--box-scale", type=float, default=1.2)
    p.add_argument("--joints", default="13,6", help="joint tokens (LSP indices) for attention / sampling")
    p.add_argument("--vertices", default="0", help="coarse-vertex tokens for attention / sampling")
    p.add_argument("--view-size", type=int, default=None, help="mesh: side of each view (default: crop height)")
    p.add_argument("--scap-px", type=int, default=512, help="scap: largest picture side of a pattern")
    p.add_argument("--out", default="outputs/visualize")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = COMMANDS[args.command](args)
    for f in result["files"]:
        print(f"wrote {f}")
    return result


if __name__ == "__main__":
    main()
