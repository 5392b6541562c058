"""Tests for mesh.py: adjacency, gathers, COMA-style hierarchy, GraphCMR loader, disk cache."""
import os
import pickle
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import mesh
from mesh import (MeshHierarchy, adjacency, adjacency_dense, build_hierarchy, edges,
                  get_hierarchy, hierarchy_cache_key, load_graphcmr, upsample)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def icosphere(subdivisions, radius=1.0, centre=(0, 0, 0), scale=(1, 1, 1)):
    v, f = mesh.icosphere(subdivisions)
    return v * radius * np.asarray(scale) + np.asarray(centre), f


def multipart():
    """Disjoint closed parts of different sizes and resolutions (like the toy body's parts)."""
    parts = [icosphere(3, 0.15, (0, 0, 0), (1.0, 2.0, 0.8)),   # "torso"
             icosphere(3, 0.05, (0.3, 0.0, 0), (1.0, 4.0, 1.0)),  # "arm" (overlaps nothing)
             icosphere(2, 0.10, (0, 0.4, 0)),                     # "head"
             icosphere(2, 0.03, (0.32, -0.25, 0))]                # "hand"
    vs, fs, off = [], [], 0
    for v, f in parts:
        vs.append(v)
        fs.append(f + off)
        off += len(v)
    return np.concatenate(vs), np.concatenate(fs), len(parts)


def check_closed_manifold(v, f):
    assert f.min() >= 0 and f.max() < len(v)
    assert np.all((f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])), "degenerate"
    assert len(np.unique(np.sort(f, 1), axis=0)) == len(f), "duplicate faces"
    e = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    assert np.all(counts == 2), "every edge of a closed surface has exactly two faces"
    # consistent orientation: each directed half edge appears once
    he = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    assert len(np.unique(he, axis=0)) == len(he)
    assert len(np.unique(f)) == len(v), "every vertex is used"


def check_hierarchy(h: MeshHierarchy, factors=(4, 4)):
    for l, fac in enumerate(factors):
        vf, vc = h.num_vertices[l], h.num_vertices[l + 1]
        assert vc == int(np.ceil(vf / fac))
        d = h.down_index[l]
        assert len(np.unique(d)) == vc
        np.testing.assert_array_equal(h.vertices[l + 1], h.vertices[l][d])  # kept subset
        D, U = h.D(l), h.U(l)
        assert D.shape == (vc, vf) and U.shape == (vf, vc)
        assert np.all(np.diff(D.indptr) == 1) and np.all(D.data == 1)  # one-hot
        assert abs(D @ U - sp.identity(vc)).max() == 0  # D U = I exactly
        assert h.up_index[l].shape == (vf, 3) and h.up_weight[l].shape == (vf, 3)
        assert np.all(h.up_weight[l] >= 0)
        np.testing.assert_allclose(h.up_weight[l].sum(1), 1.0, atol=1e-12)
        assert np.all(np.diff(U.indptr) <= 3)
        # each U row's indices form a coarse face (or a kept vertex's one-hot row)
        faces = {tuple(sorted(t)) for t in h.faces[l + 1].tolist()}
        kept = np.zeros(vf, bool)
        kept[d] = True
        rows = [tuple(sorted(r)) for r in h.up_index[l][~kept].tolist()]
        assert all(r in faces for r in rows)
        # gathers equal the sparse matrices; downsample(upsample(x)) == x for any x
        x = torch.randn(2, vc, 5, dtype=torch.float64)
        up = h.upsample(x, l)
        np.testing.assert_allclose(up[0].numpy(), U @ x[0].numpy(), atol=1e-12)
        assert torch.equal(h.downsample(up, l), x)
        xf = torch.randn(2, vf, 5, dtype=torch.float64)
        np.testing.assert_allclose(h.downsample(xf, l)[1].numpy(), D @ xf[1].numpy())
        # upsampling the coarse positions then downsampling returns them exactly
        cv = torch.from_numpy(h.vertices[l + 1])[None]
        assert torch.equal(h.downsample(h.upsample(cv, l), l), cv)


# ---------------------------------------------------------------------------------------------
# basic topology
# ---------------------------------------------------------------------------------------------
def test_edges_and_adjacency():
    v, f = icosphere(2)
    f_bad = np.concatenate([f, [[f[0, 0], f[0, 0], f[0, 1]]]])  # degenerate: adds no self loop
    e = edges(torch.from_numpy(f_bad))
    assert e.dtype == torch.long and e.shape == (3 * len(f) // 2, 2)
    assert torch.all(e[:, 0] < e[:, 1])
    assert len(torch.unique(e, dim=0)) == len(e)
    a = adjacency(f_bad, len(v))
    assert isinstance(a, sp.csr_matrix) and a.dtype == bool and a.shape == (len(v), len(v))
    assert (a != a.T).nnz == 0, "symmetric"
    assert a.diagonal().sum() == 0, "no self loops unless asked"
    deg = np.bincount(e.numpy().ravel(), minlength=len(v))
    np.testing.assert_array_equal(np.asarray(a.sum(1)).ravel(), deg)
    a1 = adjacency(f, len(v), self_loops=True)
    assert a1.diagonal().all() and (a1 != a1.T).nnz == 0
    np.testing.assert_array_equal(np.asarray(a1.sum(1)).ravel(), deg + 1)
    ad = adjacency_dense(f, len(v), self_loops=True)
    assert ad.dtype == torch.bool and torch.equal(ad, torch.from_numpy(a1.toarray()))
    with pytest.raises(ValueError, match=r"\(F, 3\)"):
        adjacency(np.zeros((4, 2), int), 10)
    with pytest.raises(ValueError, match="out of range"):
        adjacency(f, 5)


def test_upsample_gather_matches_matrix_and_grads():
    g = torch.Generator().manual_seed(0)
    vc, vf = 7, 11
    index = torch.randint(0, vc, (vf, 3), generator=g)
    weight = torch.rand(vf, 3, generator=g, dtype=torch.float64)
    dense = torch.zeros(vf, vc, dtype=torch.float64).index_put_(
        (torch.arange(vf)[:, None].expand(-1, 3), index), weight, accumulate=True)
    x = torch.randn(4, vc, 2, dtype=torch.float64, requires_grad=True)
    out = upsample(x, index, weight)
    assert out.shape == (4, vf, 2)
    torch.testing.assert_close(out, dense @ x)
    assert torch.autograd.gradcheck(lambda t: upsample(t, index, weight), (x,))
    # float32 input, numpy index/weight
    out32 = upsample(x.detach().float(), index.numpy(), weight.numpy())
    assert out32.dtype == torch.float32
    with pytest.raises(ValueError, match="index and weight"):
        upsample(x, index, weight[:, :2])


# ---------------------------------------------------------------------------------------------
# hierarchy
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sphere_hierarchy():
    v, f = icosphere(4, radius=0.5)  # 2562 vertices
    return v, f, build_hierarchy(v, f)


def test_hierarchy_on_sphere(sphere_hierarchy):
    v, f, h = sphere_hierarchy
    assert h.num_vertices == [2562, 641, 161]
    np.testing.assert_array_equal(h.vertices[0], v)
    np.testing.assert_array_equal(h.faces[0], f)
    for l in range(3):
        check_closed_manifold(h.vertices[l], h.faces[l])
        # still a sphere: Euler characteristic 2, outward normals
        assert h.num_vertices[l] - len(edges(h.faces[l])) + len(h.faces[l]) == 2
        p = h.vertices[l][h.faces[l]]
        n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
        assert np.all((n * p.mean(1)).sum(1) > 0)
    check_hierarchy(h)
    # the surface is kept: fine vertices lie close to the upsampled coarse surface
    for level, tol in ((1, 0.01), (2, 0.03)):
        err = mesh.surface_error(h, level)
        assert err.mean() < tol * 0.5, (level, err.mean())
    # a fine vertex's upsampled position is its projection: within the radius, near the sphere
    up = h.upsample(torch.from_numpy(h.vertices[1])[None], 0)[0].numpy()
    r = np.linalg.norm(up, axis=1)
    assert np.all(r <= 0.5 + 1e-9) and r.min() > 0.45


def test_hierarchy_on_disjoint_parts():
    v, f, nparts = multipart()
    h = build_hierarchy(v, f)
    check_hierarchy(h)
    for l in range(3):
        check_closed_manifold(h.vertices[l], h.faces[l])
        comp = mesh._components(h.faces[l], h.num_vertices[l])
        assert comp.max() + 1 == nparts, "every closed part survives decimation"
        # closed genus-0 parts: V - E + F = 2 per part
        assert h.num_vertices[l] - len(edges(h.faces[l])) + len(h.faces[l]) == 2 * nparts
    for l in range(2):
        fine = mesh._components(h.faces[l], h.num_vertices[l])
        coarse = fine[h.down_index[l]]
        # upsampling never mixes parts: every weight comes from the vertex's own part
        assert np.all(coarse[h.up_index[l]] == fine[:, None])
    err = mesh.surface_error(h, 2)
    assert err.mean() < 0.02


def test_toy_body_surface_is_kept(tmp_path):
    from body import load_smpl_pickle, toy_body_path

    path = toy_body_path(cache_dir=tmp_path)
    data = load_smpl_pickle(path)
    v, f = np.asarray(data["v_template"], np.float64), np.asarray(data["f"], np.int64)
    t0 = time.perf_counter()
    h = build_hierarchy(v, f)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"toy body hierarchy took {elapsed:.1f} s"
    check_hierarchy(h)
    for l in range(1, 3):
        err = mesh.surface_error(h, l)
        print(f"toy body level {l}->0: mean {err.mean() * 1e3:.2f} mm, max {err.max() * 1e3:.2f} mm,"
              f" built in {elapsed:.2f} s, sizes {h.num_vertices}")
        assert err.mean() < 0.02, f"level {l}: mean fine-to-upsampled distance {err.mean():.4f} m"


def test_build_hierarchy_bad_input():
    v, f = icosphere(1)
    with pytest.raises(ValueError, match=r"\(V, 3\)"):
        build_hierarchy(v[:, :2], f)
    with pytest.raises(ValueError, match="out of range"):
        build_hierarchy(v[:10], f)
    with pytest.raises(ValueError, match="factors"):
        build_hierarchy(v, f, factors=(1,))
    v0, f0 = icosphere(0)  # 12 vertices: a closed surface cannot go below 4
    with pytest.raises(RuntimeError, match="target 3"):
        build_hierarchy(v0, f0, factors=(4,))


def test_build_is_deterministic(small_hierarchy):
    h = build_hierarchy(small_hierarchy.vertices[0], small_hierarchy.faces[0])
    for name in ("faces", "down_index", "up_index", "up_weight"):
        for a, b in zip(getattr(h, name), getattr(small_hierarchy, name)):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# save / load / torch
# ---------------------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path, sphere_hierarchy):
    _, _, h = sphere_hierarchy
    p = tmp_path / "h.npz"
    h.save(p)
    h2 = MeshHierarchy.load(p)
    for name in ("vertices", "faces", "down_index", "up_index", "up_weight"):
        for a, b in zip(getattr(h, name), getattr(h2, name)):
            np.testing.assert_array_equal(a, b)
    t = h2.to_torch()
    assert t["num_vertices"] == h.num_vertices
    assert t["faces"][1].dtype == torch.long and t["template"][2].dtype == torch.float32
    assert t["up_index"][0].shape == (h.num_vertices[0], 3)
    with pytest.raises(ValueError, match="h.npz"):
        np.savez(p, num_levels=np.array(3), vertices_0=np.zeros((3, 3)))
        MeshHierarchy.load(p)
    with pytest.raises(ValueError, match=r"down_index\[0\]"):
        MeshHierarchy(h.vertices, h.faces, [h.down_index[0][:5], h.down_index[1]],
                      h.up_index, h.up_weight)


# ---------------------------------------------------------------------------------------------
# GraphCMR mesh_downsampling.npz
# ---------------------------------------------------------------------------------------------
class _Evil:
    """Unpickling this would call os.getcwd (harmless stand-in for arbitrary code)."""

    def __reduce__(self):
        return (os.getcwd, ())


def _object_array(items):
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def write_graphcmr(path, h, **override):
    """Write `h` in GraphCMR's layout: object arrays of scipy sparse matrices / face arrays."""
    n = h.num_levels
    keys = dict(
        A=_object_array([sp.csc_matrix(adjacency(h.faces[l], h.num_vertices[l]).astype(float))
                         for l in range(n)]),
        U=_object_array([sp.csc_matrix(h.U(l)) for l in range(n - 1)]),
        D=_object_array([sp.csc_matrix(h.D(l)) for l in range(n - 1)]),
        F=_object_array([f.astype(np.uint32) for f in h.faces]),
        M=_object_array([_Evil() for _ in range(n)]),  # psbody meshes in the real file: skipped
    )
    keys.update(override)
    keys = {k: v for k, v in keys.items() if v is not None}
    np.savez(path, **keys)


@pytest.fixture(scope="module")
def small_hierarchy():
    v, f = icosphere(3, radius=0.3)  # 642 -> 161 -> 41
    return build_hierarchy(v, f)


def test_graphcmr_loader_roundtrip(tmp_path, small_hierarchy):
    h = small_hierarchy
    p = tmp_path / "mesh_downsampling.npz"
    write_graphcmr(p, h)
    for without_m in (False, True):
        if without_m:  # files without M load the same
            write_graphcmr(p, h, M=None)
        g = load_graphcmr(p, vertices=h.vertices[0])
        assert isinstance(g, MeshHierarchy) and g.num_vertices == h.num_vertices
        for l in range(h.num_levels):
            np.testing.assert_array_equal(g.faces[l], h.faces[l])
            np.testing.assert_array_equal(g.vertices[l], h.vertices[l])
        for l in range(h.num_levels - 1):
            np.testing.assert_array_equal(g.down_index[l], h.down_index[l])
            assert abs(g.U(l) - h.U(l)).max() < 1e-12
            x = torch.randn(3, h.num_vertices[l + 1], 2, dtype=torch.float64)
            torch.testing.assert_close(g.upsample(x, l), h.upsample(x, l))
            assert torch.equal(g.downsample(g.upsample(x, l), l), x)
    # without a template the topology is still there, positions unknown
    g = load_graphcmr(p)
    assert g.num_vertices == h.num_vertices and np.isnan(g.vertices[1]).all()


@pytest.mark.parametrize("case, match", [
    ("missing_U", r"missing key 'U'"),
    ("D_not_onehot", r"D\[0\].*one-hot"),
    ("D_shape", r"D\[1\] expected shape"),
    ("U_chain", r"U\[1\] expected shape"),
    ("U_dense_rows", r"U\[0\].*1 to 3 weights"),
    ("F_count", r"len\(F\)=2"),
    ("F_range", r"F\[2\] expected shape"),
    ("evil_U", r"refusing to load"),
    ("template", r"template has"),
    ("not_zip", r"not an npz"),
])
def test_graphcmr_malformed(tmp_path, small_hierarchy, case, match):
    h = small_hierarchy
    p = tmp_path / "mesh_downsampling.npz"
    U = [sp.csc_matrix(h.U(l)) for l in range(2)]
    D = [sp.csc_matrix(h.D(l)) for l in range(2)]
    F = list(h.faces)
    template = h.vertices[0]
    if case == "missing_U":
        write_graphcmr(p, h, U=None)
    elif case == "D_not_onehot":
        d = D[0].tolil()
        d[0, 5] = 1.0
        write_graphcmr(p, h, D=_object_array([d.tocsc(), D[1]]))
    elif case == "D_shape":
        write_graphcmr(p, h, D=_object_array([D[0], D[1].T.tocsc()]))
    elif case == "U_chain":
        write_graphcmr(p, h, U=_object_array([U[0], U[1][:-1]]))
    elif case == "U_dense_rows":
        write_graphcmr(p, h, U=_object_array([sp.csc_matrix(np.ones(U[0].shape)), U[1]]))
    elif case == "F_count":
        write_graphcmr(p, h, F=_object_array(F[:2]))
    elif case == "F_range":
        write_graphcmr(p, h, F=_object_array([F[0], F[1], F[2] + 1000]))
    elif case == "evil_U":
        write_graphcmr(p, h, U=_object_array([_Evil(), U[1]]))
    elif case == "template":
        write_graphcmr(p, h)
        template = template[:-1]
    elif case == "not_zip":
        p.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=match) as info:
        load_graphcmr(p, vertices=template)
    assert "mesh_downsampling.npz" in str(info.value)


def test_graphcmr_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_graphcmr(tmp_path / "nope.npz")


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
def test_get_hierarchy_cache(tmp_path, monkeypatch, small_hierarchy):
    v, f = small_hierarchy.vertices[0], small_hierarchy.faces[0]
    model = tmp_path / "model.pkl"
    model.write_bytes(pickle.dumps({"v_template": v, "f": f}))
    cache = tmp_path / "cache"
    h1 = get_hierarchy(model, v, f, cache_dir=cache)
    files = list(cache.glob("mesh_hierarchy_*.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def no_build(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(mesh, "build_hierarchy", no_build)
    h2 = get_hierarchy(model, v, f, cache_dir=cache)  # hit: loaded, not rebuilt
    for name in ("vertices", "faces", "down_index", "up_index", "up_weight"):
        for a, b in zip(getattr(h1, name), getattr(h2, name)):
            np.testing.assert_array_equal(a, b)
    # HMR_CACHE is the default cache dir
    monkeypatch.setenv("HMR_CACHE", str(cache))
    get_hierarchy(model, v, f)
    # a changed model file changes the key (and would rebuild)
    key1 = hierarchy_cache_key(model, v, f)
    model.write_bytes(model.read_bytes() + b"\0")
    assert hierarchy_cache_key(model, v, f) != key1
    with pytest.raises(AssertionError, match="cache miss"):
        get_hierarchy(model, v, f, cache_dir=cache)
    monkeypatch.undo()
    # a corrupt cache file is rebuilt
    files[0].write_bytes(b"garbage")
    model.write_bytes(pickle.dumps({"v_template": v, "f": f}))
    h3 = get_hierarchy(model, v, f, cache_dir=cache)
    np.testing.assert_array_equal(h3.up_index[1], h1.up_index[1])
    assert MeshHierarchy.load(files[0]).num_vertices == h1.num_vertices
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        get_hierarchy(tmp_path / "missing.pkl", v, f, cache_dir=cache)


def test_get_hierarchy_graphcmr(tmp_path, small_hierarchy):
    h = small_hierarchy
    p = tmp_path / "mesh_downsampling.npz"
    write_graphcmr(p, h)
    g = get_hierarchy(None, h.vertices[0], h.faces[0], cache_dir=tmp_path / "c", graphcmr_path=p)
    np.testing.assert_array_equal(g.down_index[0], h.down_index[0])
    with pytest.raises(ValueError, match="template has"):
        get_hierarchy(None, h.vertices[0][:-2], h.faces[0][:10], cache_dir=tmp_path / "c",
                      graphcmr_path=p)


def test_graphcmr_python2_era_pickles(tmp_path, small_hierarchy):
    """Protocol-2 pickles with the old module paths (numpy.core, scipy.sparse.csc) still load."""
    import io
    import zipfile

    h = small_hierarchy
    p = tmp_path / "mesh_downsampling.npz"
    write_graphcmr(p, h, M=None)
    with zipfile.ZipFile(p) as z:
        members = {n: z.read(n) for n in z.namelist()}
    for key in ("U", "D"):
        arr = _object_array([getattr(h, key)(l).tocsc() for l in range(h.num_levels - 1)])
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False,
                                                   "shape": arr.shape})
        payload = pickle.dumps(arr, protocol=2, fix_imports=True)
        payload = payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        payload = payload.replace(b"scipy.sparse._csc\n", b"scipy.sparse.csc\n")
        assert b"scipy.sparse.csc\n" in payload
        members[f"{key}.npy"] = buf.getvalue() + payload
    with zipfile.ZipFile(p, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    g = load_graphcmr(p, vertices=h.vertices[0])
    for l in range(h.num_levels - 1):
        np.testing.assert_array_equal(g.down_index[l], h.down_index[l])
        assert abs(g.U(l) - h.U(l)).max() < 1e-12
