"""visualize.py: each subcommand writes its pictures, and what is drawn is what the model computes
(attention rows sum to 1 and the drawn map is that row; the cluster partition is the argmax of the
model's clustering matrix; DeFormer's first-block sampling points are the projected mesh plus the
model's offsets; one PCA basis for both feature maps; the SCAP tile map and density are the
model's). Tiny presets, random weights, toy body."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import photo  # noqa: E402
import checkpoints  # noqa: E402
import visualize as V  # noqa: E402


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = tmp_path_factory.mktemp("vis_ckpt")
    torch.manual_seed(0)
    body = checkpoints.build_body()
    paths = {}
    for name in checkpoints.MODELS:
        model, _ = checkpoints.build_model(name, "tiny", body)
        paths[name] = out / f"{name}.pt"
        torch.save({"model": model.state_dict(), "config": {"model": name, "preset": "tiny", "set": []}},
                   paths[name])
    rng = np.random.default_rng(0)
    img = out / "photo.png"
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(img)
    paths["image"] = img
    return paths


def model_input(ckpt, image):
    """The model and the input tensor visualize.py used (same crop: largest centred square)."""
    model, body, _ = checkpoints.load_model_from_checkpoint(ckpt, "cpu")
    im = photo.read_image(image)
    W, H = im.size
    patch, _ = photo.crop(im, W / 2, H / 2, min(W, H), tuple(model.cfg.input_size))
    return model, body, photo.to_tensor(patch)[None]


def drawn_cells(path, row, col, panel_hw, grid_hw):
    """Values read back from a bare heat panel at the cell centres, (h, w) in [0, 1]."""
    panel = V.read_panel(path, row, col, panel_hw)
    ys, xs = V.cell_centres(grid_hw, panel_hw)
    return V.invert_colormap(panel[ys][:, xs])


def test_colormap_round_trip():
    x = np.linspace(0, 1, 256)
    assert np.abs(V.invert_colormap(V.colormap(x)) - x).max() <= 1 / 255 + 1e-9


def test_attention_fastmetro(ckpts, tmp_path):
    res = V.main(["attention", "--ckpt", str(ckpts["fastmetro"]), "--image", str(ckpts["image"]),
                  "--joints", "13,6", "--vertices", "0,7", "--out", str(tmp_path)])
    assert all(Path(f).stat().st_size > 0 for f in res["files"])
    d = np.load(res["npz"])
    h, w = d["feature_hw"]
    model, _, x = model_input(ckpts["fastmetro"], ckpts["image"])
    J = model.num_joints
    for stage in (1, 2):
        probs = d[f"s{stage}_l0_cross_probs"]                                  # (H, J+V2, h*w)
        assert probs.shape[1:] == (J + model.num_vertices, h * w)
        np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
        for label, row in (("joint13_Head", 13), ("vertex0007", J + 7)):
            maps = d[f"s{stage}_l0_cross_{label}"]                             # (H, h, w)
            np.testing.assert_allclose(maps, probs[:, row].reshape(-1, h, w), atol=1e-7)
            png = tmp_path / "attention" / f"s{stage}_l0_cross_{label}.png"
            for col, m in enumerate([maps.mean(0), *maps]):                    # bottom row: bare maps
                np.testing.assert_allclose(drawn_cells(png, 1, col, res["panel_hw"], (h, w)), m / m.max(),
                                           atol=2 / 255)
        self_p = d[f"s{stage}_l0_self_probs"]                                  # (H, N, N)
        mask = d[f"s{stage}_l0_self_mask"]
        assert np.array_equal(mask, model.attention_mask.numpy())
        np.testing.assert_allclose(self_p.sum(-1), 1, atol=1e-5)
        assert self_p[:, mask].max() == 0 and mask.any()
        pic = np.asarray(Image.open(tmp_path / "attention" / f"s{stage}_l0_self.png").convert("RGB"))
        body = pic[V.TITLE:V.TITLE + mask.shape[0], :mask.shape[1]]
        assert (body[mask] == V.BLOCKED).all() and not (body[~mask] == V.BLOCKED).all(-1).any()


def test_attention_recorder_refuses_a_wrong_recomputation(ckpts, tmp_path, monkeypatch):
    uniform = lambda module, q, k, mask=None: torch.full((q.shape[0], module.num_heads, q.shape[1], k.shape[1]),
                                                         1.0 / k.shape[1])
    monkeypatch.setattr(V, "attention_probs", uniform)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        V.main(["attention", "--ckpt", str(ckpts["fastmetro"]), "--image", str(ckpts["image"]),
                "--out", str(tmp_path)])


def test_attention_tore_maps_clusters_to_cells(ckpts, tmp_path):
    res = V.main(["attention", "--ckpt", str(ckpts["tore"]), "--image", str(ckpts["image"]),
                  "--joints", "12", "--vertices", "3", "--out", str(tmp_path)])
    d = np.load(res["npz"])
    h, w = d["feature_hw"]
    c = d["clusters"]                                                          # (M, h*w)
    probs = d["s1_l0_cross_probs"]                                             # (H, J, M): over cluster tokens
    assert probs.shape[-1] == c.shape[0]
    maps = d["s1_l0_cross_joint12_Neck"]
    np.testing.assert_allclose(maps, (probs[:, 12] @ c).reshape(-1, h, w), atol=1e-6)
    np.testing.assert_allclose(maps.sum((1, 2)), 1, atol=1e-5)
    nsr = d["s3_l0_cross_vertex0003"]                                          # (H, 1, J): NSR vertex -> joints
    np.testing.assert_allclose(nsr.sum((1, 2)), 1, atol=1e-5)


def test_clusters_partition_is_the_models_argmax(ckpts, tmp_path):
    res = V.main(["clusters", "--ckpt", str(ckpts["tore"]), "--image", str(ckpts["image"]), "--out", str(tmp_path)])
    d = np.load(res["npz"])
    model, _, x = model_input(ckpts["tore"], ckpts["image"])
    with torch.no_grad():
        clusters = model(x)["clusters"][0].numpy()                             # (M, h*w)
    np.testing.assert_allclose(d["clusters"], clusters, atol=1e-6)
    np.testing.assert_allclose(clusters.sum(1), 1, atol=1e-5)
    assert np.array_equal(d["assignment"], clusters.argmax(0))
    h, w = d["feature_hw"]
    part = V.read_panel(res["files"][0], 0, 2, res["panel_hw"])
    ys, xs = V.cell_centres((h, w), res["panel_hw"])
    assert np.array_equal(part[ys][:, xs].reshape(-1, 3), d["palette"][d["assignment"]])
    k = int(d["assignment"][0])                                                # a cluster's own weight map
    col, row = k % res["columns"], k // res["columns"]
    np.testing.assert_allclose(drawn_cells(res["files"][1], row, col, res["small_hw"], (h, w)),
                               (clusters[k] / clusters[k].max()).reshape(h, w), atol=2 / 255)


def test_sampling_first_block_is_projected_mesh_plus_offsets(ckpts, tmp_path):
    res = V.main(["sampling", "--ckpt", str(ckpts["deformer"]), "--image", str(ckpts["image"]),
                  "--joints", "0,13", "--vertices", "5", "--out", str(tmp_path)])
    assert all(Path(f).stat().st_size > 0 for f in res["files"])
    d = np.load(res["npz"])
    model, _, x = model_input(ckpts["deformer"], ckpts["image"])
    with torch.no_grad():
        out = model(x)
        cam = out["cam"][0]
        pts = torch.cat([out["joints_per_step"][0][0], out["vertices_per_step"][0][0]])  # (J+V, 3) step 0
        ref = (cam[0] * (pts[:, :2] + cam[1:]) + 1) / 2                        # weak perspective -> [0, 1]
        np.testing.assert_allclose(d["block0_ref"], ref.numpy(), atol=1e-5)
        attn_mod = model.stages[0][0].cross_attn
        q = torch.as_tensor(d["block0_query"])                                 # (N, D)
        off = attn_mod.sampling_offsets(q).view(q.shape[0], attn_mod.n_heads, attn_mod.n_levels,
                                                attn_mod.n_points, 2)        # (N, H, L, P, 2) pixels of each level
    shapes = d["block0_shapes"]                                                # (L, 2) (H_l, W_l)
    expect = ref.numpy()[:, None, None, None] + off.numpy() / shapes[:, ::-1][None, None, :, None]
    np.testing.assert_allclose(d["block0_loc"], expect, atol=1e-5)
    np.testing.assert_allclose(d["block0_attn"].sum((-1, -2)), 1, atol=1e-5)   # softmax over levels x points
    assert list(d["level_per_step"]) == out["level_per_step"]


def test_features_share_one_pca_basis(ckpts, tmp_path):
    res = V.main(["features", "--ckpt", str(ckpts["featup_hmr"]), "--image", str(ckpts["image"]), "--out", str(tmp_path)])
    d = np.load(res["npz"])
    model, _, x = model_input(ckpts["featup_hmr"], ckpts["image"])
    with torch.no_grad():
        levels = model.feature_levels(x)
    for i, layer in enumerate(("middle", "last")):
        lo, hi = levels[2 + i][0], levels[i][0]                                # (C, h, w), (C, rh, rw)
        C, h, w = lo.shape
        basis, mean = torch.as_tensor(d[f"{layer}_basis"]), torch.as_tensor(d[f"{layer}_mean"])
        np.testing.assert_allclose((basis @ basis.T).numpy(), np.eye(3), atol=1e-5)
        X = lo.reshape(C, -1).T
        _, _, vt = torch.linalg.svd(X - X.mean(0), full_matrices=False)
        np.testing.assert_allclose((basis @ vt[:3].T).abs().numpy(), np.eye(3), atol=1e-4)   # the PCA of lo
        rng = torch.as_tensor(d[f"{layer}_range_lo"]), torch.as_tensor(d[f"{layer}_range_hi"])
        for feat, key in ((lo, "lowres"), (hi, "upsampled")):                  # both through the same basis
            np.testing.assert_allclose(d[f"{layer}_{key}_rgb"], V.pca_rgb(feat, mean, basis, *rng).numpy(), atol=1e-5)
        assert hi.shape[1] > h
        drawn = V.read_panel(res["files"][0], i, 2, res["panel_hw"])
        ys, xs = V.cell_centres(hi.shape[1:], res["panel_hw"])
        np.testing.assert_allclose(drawn[ys][:, xs] / 255.0, d[f"{layer}_upsampled_rgb"], atol=1 / 255 + 1e-6)


def test_scap_tiles_and_density_are_the_models(tmp_path):
    res = V.main(["scap", "--model", "deformer", "--preset", "tiny", "--set", "semantics=exact",
                  "--out", str(tmp_path)])
    d = np.load(res["npz"])
    model, _, _, _ = V.load(V.parse_args(["scap", "--model", "deformer", "--set", "semantics=exact"]))
    from sparse_attention import blockify
    for s, blocks in enumerate(model.stages):
        attn = blocks[0].self_attn
        mask, perm = torch.as_tensor(d[f"stage{s}_mask"]), torch.as_tensor(d[f"stage{s}_perm"])
        assert torch.equal(mask, attn.effective_mask())                        # exact semantics: the SCAP itself
        assert torch.equal(perm, attn.plan.perm)
        tiles = d[f"stage{s}_tiles"]
        assert np.array_equal(tiles, blockify(mask[perm][:, perm], attn.tile_size).numpy())
        assert float(d[f"stage{s}_density"]) == pytest.approx(attn.plan.density)
        side, k = int(d[f"stage{s}_side"]), int(d[f"stage{s}_tile_px"])
        pic = V.read_panel(res["files"][s], 0, 2, (side, side))
        centres = (np.arange(tiles.shape[0]) * k + k // 2)
        assert np.array_equal(pic[centres][:, centres, 0] == 0, tiles)


def test_mesh_views(ckpts, tmp_path):
    res = V.main(["mesh", "--ckpt", str(ckpts["fastmetro"]), "--image", str(ckpts["image"]), "--view-size", "48",
                  "--out", str(tmp_path)])
    assert all(Path(f).stat().st_size > 0 for f in res["files"])
    d = np.load(res["npz"])
    model, _, x = model_input(ckpts["fastmetro"], ckpts["image"])
    with torch.no_grad():
        drawn = model.camera_frame(model(x)["vertices"])             # FastMETRO: the camera's frame
        np.testing.assert_allclose(d["vertices"], drawn[0].numpy(), atol=1e-5)
    masks = [d[f"{k}_mask"] for k in ("front", "side", "top")]
    assert all(m.any() for m in masks) and not np.array_equal(masks[0], masks[1])


def test_wrong_model_is_refused(ckpts, tmp_path):
    with pytest.raises(SystemExit, match="TORE"):
        V.main(["clusters", "--ckpt", str(ckpts["fastmetro"]), "--image", str(ckpts["image"]), "--out", str(tmp_path)])


def test_released_weights_draw_the_same_as_the_checkpoint(ckpts, tmp_path):
    """--weights (a bare state dict, checkpoints.py's released-checkpoint path) gives the same maps."""
    bare = tmp_path / "state_dict.bin"
    torch.save(torch.load(ckpts["fastmetro"], weights_only=True)["model"], bare)
    a = V.main(["attention", "--ckpt", str(ckpts["fastmetro"]), "--image", str(ckpts["image"]),
                "--out", str(tmp_path / "a")])
    b = V.main(["attention", "--weights", str(bare), "--model", "fastmetro", "--preset", "tiny",
                "--image", str(ckpts["image"]), "--out", str(tmp_path / "b")])
    da, db = np.load(a["npz"]), np.load(b["npz"])
    assert sorted(da.files) == sorted(db.files)
    for k in da.files:
        np.testing.assert_allclose(da[k], db[k], atol=1e-6)


@pytest.mark.parametrize("size", [(224, 224), (256, 192), (384, 288)])
def test_projection_to_pixels_follows_the_data_convention(size):
    """visualize draws projected vertices with the same one-length normalisation as data.py's
    labels, so the dots are right on non-square crops too."""
    import data
    rng = np.random.default_rng(0)
    pts, cam = rng.normal(size=(40, 3)), np.array([0.9, 0.1, -0.2])
    want = data.pixels_from_normalised(cam[0] * (pts[:, :2] + cam[1:]), size)
    np.testing.assert_allclose(V.project_pixels(pts, cam, *size), want, atol=1e-9)
