"""Tests for sparse_attention.py: SCAP construction, orderings, block density, and the
block-sparse attention kernel against the dense reference (outputs, gradients, gradcheck,
reordering invariance, padding, locality, batching, errors).  Small meshes only."""
import pytest
import torch

import sparse_attention as sa


@pytest.fixture
def one_thread():
    """Tiny-op loops (gradcheck) on a shared, oversubscribed 2-core box: many small parallel ops
    each pay a thread-pool wake-up; one thread is 10-50x faster here.  Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_scap(rings=10, segments=7, joints=3, seed=0):
    body = sa.synthetic_body(rings=rings, segments=segments, num_joints=joints,
                             num_skin_joints=6, regressor_size=4, seed=seed)
    adj = sa.mesh_adjacency(body["faces"], body["num_vertices"])
    return sa.build_scap(adj, body["skin_weights"], body["joint_regressor"])


def pair(mask, semantics, ordering="rcm", tile=8, dim=32, heads=4, workspace_mb=None,
         dtype=torch.float32, other="dense"):
    """A block module and a reference module (same weights)."""
    torch.manual_seed(0)
    blk = sa.BodySparseAttention(dim, heads, mask, tile_size=tile, ordering=ordering,
                                 semantics=semantics, impl="block", workspace_mb=workspace_mb)
    ref = sa.BodySparseAttention(dim, heads, mask, tile_size=tile, ordering=ordering,
                                 semantics=semantics, impl=other)
    ref.load_state_dict(blk.state_dict())
    return blk.to(dtype), ref.to(dtype)


# ---------------------------------------------------------------------------------------------
# SCAP
# ---------------------------------------------------------------------------------------------
def _tetrahedron_case():
    faces = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    # 5 vertices: a tetrahedron (0..3) plus an isolated vertex 4 (no faces)
    adj = sa.mesh_adjacency(faces, 5)
    skin = torch.tensor([[1.0, 0.0],     # v0 -> joint 0
                         [0.6, 0.4],     # v1 -> both
                         [0.0, 1.0],     # v2 -> joint 1
                         [0.05, 0.95],   # v3 -> both at threshold 0, joint 1 only at 0.1
                         [0.0, 1.0]])    # v4 -> joint 1
    reg = torch.tensor([[0.5, 0.45, 0.0, 0.05, 0.0],   # joint 0 from v0, v1 (and v3 below 0.1)
                        [0.0, 0.0, -0.2, 0.0, 1.2]])   # joint 1 from v4 and (negative) v2
    return adj, skin, reg


def _expected_scap(adj, skin, reg, thr, orientation):
    """The SCAP written out element by element from the definitions in the file header."""
    V, J = skin.shape
    exp = torch.zeros(J + V, J + V, dtype=torch.bool)
    for a in range(J):
        for b in range(J):
            exp[a, b] = True                                         # j2j dense
    for v in range(V):
        for j in range(J):
            skinned = bool(skin[v, j] > thr)                         # joint j skins vertex v
            regresses = bool(abs(float(reg[j, v])) > thr)            # vertex v regresses joint j
            if orientation == "flow":
                exp[J + v, j] = skinned                              # vertex query reads joint
                exp[j, J + v] = regresses                            # joint query reads vertex
            else:
                exp[j, J + v] = skinned
                exp[J + v, j] = regresses
    for a in range(V):
        for b in range(V):
            exp[J + a, J + b] = bool(adj[a, b]) or a == b            # v2v + self loops
    return exp


@pytest.mark.parametrize("orientation", sa.SCAP_ORIENTATIONS)
@pytest.mark.parametrize("thr", [0.0, 0.1])
def test_scap_tetrahedron_element_by_element(orientation, thr):
    adj, skin, reg = _tetrahedron_case()
    J, V = 2, 5
    m = sa.build_scap(adj, skin, reg, threshold=thr, orientation=orientation)
    assert m.dtype == torch.bool and m.shape == (J + V, J + V)
    exp = _expected_scap(adj, skin, reg, thr, orientation)
    assert torch.equal(m, exp), (thr, orientation, (m != exp).nonzero())


def test_scap_orientation_by_hand():
    adj, skin, reg = _tetrahedron_case()
    J = 2
    flow = sa.build_scap(adj, skin, reg)                               # the default
    assert torch.equal(flow, sa.build_scap(adj, skin, reg, orientation="flow"))
    # flow: vertex v3's query reads joint 0 (skin 0.05 > 0) but not at threshold 0.1
    assert bool(flow[J + 3, 0]) and not bool(sa.build_scap(adj, skin, reg, 0.1)[J + 3, 0])
    assert not bool(flow[J + 2, 0])                                    # v2 not skinned by joint 0
    # flow: joint 1's query reads v2 (negative regressor weight) and v4, not v0
    assert bool(flow[1, J + 2]) and bool(flow[1, J + 4]) and not bool(flow[1, J + 0])
    # joint 0 regressed by v3 with weight 0.05: read at threshold 0, not at 0.1 (both blocks)
    assert bool(flow[0, J + 3]) and not bool(sa.build_scap(adj, skin, reg, 0.1)[0, J + 3])
    old = sa.build_scap(adj, skin, reg, orientation="transposed")
    assert torch.equal(old[:J, J:], flow[J:, :J].T) and torch.equal(old[J:, :J], flow[:J, J:].T)
    assert torch.equal(old | old.T, flow | flow.T)                    # same symmetrised pattern
    with pytest.raises(ValueError, match="orientation 'sideways'"):
        sa.build_scap(adj, skin, reg, orientation="sideways")


def test_mesh_adjacency_symmetric_and_self_loops():
    faces = torch.tensor([[0, 1, 2], [1, 2, 3]])
    a = sa.mesh_adjacency(faces, 4)
    assert torch.equal(a, a.T) and bool(a.diagonal().all())
    assert not bool(a[0, 3])
    assert not bool(sa.mesh_adjacency(faces, 4, self_loops=False).diagonal().any())


def test_scap_bad_shapes_clear_errors():
    adj = sa.mesh_adjacency(torch.tensor([[0, 1, 2]]), 3)
    with pytest.raises(ValueError, match=r"sparse_attention.py.*skin_weights.*\(V=3, J\)"):
        sa.build_scap(adj, torch.rand(4, 2), torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"joint_regressor.*\(J=2, V=3\)"):
        sa.build_scap(adj, torch.rand(3, 2), torch.rand(3, 3))
    with pytest.raises(ValueError, match="square"):
        sa.build_scap(torch.ones(3, 4, dtype=torch.bool), torch.rand(3, 2), torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"faces must be \(F, 3\)"):
        sa.mesh_adjacency(torch.tensor([[0, 1]]), 3)


# ---------------------------------------------------------------------------------------------
# Orderings and density
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sa.ORDERINGS)
def test_reorder_is_permutation(method):
    m = small_scap()
    perm = sa.reorder(m, method)
    assert perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(len(m)))
    dens, counts = sa.block_density(m, 8, perm)
    nT = -(-len(m) // 8)
    assert counts.shape == (nT,) and 0 < dens <= 1
    assert int(counts.sum()) == int(sa.blockify(m[perm][:, perm], 8).sum())


def test_rcm_beats_no_ordering_on_shuffled_mesh():
    m = small_scap(rings=16, segments=12)
    d_none, _ = sa.block_density(m, 8, sa.reorder(m, "none"))
    d_rcm, _ = sa.block_density(m, 8, sa.reorder(m, "rcm"))
    assert d_rcm < d_none


def test_minimum_degree_reduces_fill():
    """Symbolic Cholesky fill of a grid graph: minimum degree < natural order."""
    import numpy as np
    import scipy.sparse as sp
    n = 12
    g = sp.lil_matrix((n * n, n * n), dtype=bool)
    for i in range(n):
        for j in range(n):
            a = i * n + j
            for b in ([a + 1] if j + 1 < n else []) + ([a + n] if i + 1 < n else []):
                g[a, b] = g[b, a] = True
    g = g.tocsr()

    def fill(order):
        pos = np.empty(len(order), int)
        pos[order] = np.arange(len(order))
        nbrs = [set(pos[g.indices[g.indptr[v]:g.indptr[v + 1]]]) for v in order]
        total = 0
        for k in range(len(order)):        # eliminate in order: later neighbours form a clique
            later = {x for x in nbrs[k] if x > k}
            total += len(later)
            for x in later:
                nbrs[x] |= later - {x}
        return total

    md = sa._minimum_degree(g.indptr, g.indices, n * n)
    assert sorted(md.tolist()) == list(range(n * n))
    assert fill(md) < 0.75 * fill(np.arange(n * n))


def test_cholesky_fill_star_graph():
    """Star with n leaves: centre eliminated first fills the whole factor, centre last none."""
    n = 6
    faces = torch.tensor([[0, k, k % n + 1] for k in range(1, n + 1)])   # fan = star + rim
    adj = sa.mesh_adjacency(faces, n + 1)
    adj[1:, 1:] = torch.eye(n, dtype=torch.bool)                           # drop the rim: star
    first = torch.arange(n + 1)
    last = torch.cat([torch.arange(1, n + 1), torch.zeros(1, dtype=torch.long)])
    N = n + 1
    assert sa.cholesky_fill(adj, first) == N * (N + 1)                     # dense L and U
    assert sa.cholesky_fill(adj, last) == 2 * (N + n)                      # diagonal + centre row
    assert sa.cholesky_fill(adj) == sa.cholesky_fill(adj, first)           # None = native labels


def test_ordering_report_matches_parts():
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu
    body = sa.synthetic_body(rings=12, segments=8, num_joints=3, num_skin_joints=6, regressor_size=4)
    adj = sa.mesh_adjacency(body["faces"], body["num_vertices"])
    rows = sa.ordering_report(adj, body["skin_weights"], body["joint_regressor"], tile_size=8)
    assert [r["ordering"] for r in rows] == list(sa.ORDERINGS) + ["mmd"]
    for r in rows[:-1]:
        perm = sa.reorder(sa.build_scap(adj, body["skin_weights"], body["joint_regressor"]), r["ordering"])
        for o in sa.SCAP_ORIENTATIONS:
            m = sa.build_scap(adj, body["skin_weights"], body["joint_regressor"], orientation=o)
            dens, counts = sa.block_density(m, 8, perm)
            assert (r[f"tiles_{o}"], r[f"density_{o}"]) == (int(counts.sum()), dens)
        assert r["fill"] == sa.cholesky_fill(adj, perm[perm >= 3] - 3)
    # "mmd": the fill SuperLU reports for its own MMD ordering
    a = sp.csr_matrix(adj.numpy().astype(float))
    a.setdiag(0)
    a.eliminate_zeros()
    lap = (sp.diags(a.sum(1).A.ravel() + 1.0) - a).tocsc()
    lu = splu(lap, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options=dict(SymmetricMode=True))
    assert rows[-1]["fill"] == lu.L.nnz + lu.U.nnz
    assert rows[1]["fill"] < rows[0]["fill"]                    # amd fills less than rcm ...
    assert rows[1]["tiles_flow"] > rows[0]["tiles_flow"]        # ... but needs more tiles


def test_ordering_command_on_toy_body(capsys):
    pytest.importorskip("smplx")
    sa._ordering_main(["--levels", "2", "--tile", "16"])
    out = capsys.readouterr().out
    assert "token joints lsp14 (14)" in out and "level 2:" in out
    lines = [l.split() for l in out.splitlines() if l.split()[:1] and l.split()[0] in sa.ORDERINGS + ("mmd",)]
    assert [l[0] for l in lines] == list(sa.ORDERINGS) + ["mmd"]
    fills = {l[0]: int(l[1].replace(",", "")) for l in lines}
    assert fills["amd"] < fills["rcm"] and fills["mmd"] < fills["rcm"]
    with pytest.raises(SystemExit, match="--levels 7"):
        sa._ordering_main(["--levels", "7"])


# ---------------------------------------------------------------------------------------------
# Block kernel vs dense reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("semantics", sa.SEMANTICS)
@pytest.mark.parametrize("ordering,workspace_mb", [("rcm", None), ("amd", 0.05), ("none", 0.01)])
def test_block_equals_dense_outputs_and_grads(semantics, ordering, workspace_mb):
    m = small_scap()
    blk, ref = pair(m, semantics, ordering, workspace_mb=workspace_mb)
    assert torch.equal(blk.effective_mask(), ref.effective_mask())
    if semantics == "exact":
        assert torch.equal(blk.effective_mask(), m)
    else:                                  # block semantics contains the element pattern
        assert bool((blk.effective_mask() | ~m).all())
    torch.manual_seed(1)
    x = torch.randn(3, len(m), 32, requires_grad=True)
    yb, yr = blk(x), ref(x)
    torch.testing.assert_close(yb, yr, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(yb) / yb.numel() ** 0.5
    gb = torch.autograd.grad(yb, [x, *blk.parameters()], g)
    gr = torch.autograd.grad(yr, [x, *ref.parameters()], g)
    for a, b in zip(gb, gr):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_block_equals_naive():
    m = small_scap()
    blk, ref = pair(m, "exact", other="naive")
    x = torch.randn(2, len(m), 32)
    torch.testing.assert_close(blk(x), ref(x), atol=1e-5, rtol=1e-5)


def test_gradcheck_float64(one_thread):
    m = small_scap(rings=6, segments=6, joints=2)          # N = 38, tile 8 (padded to 40)
    plan = sa.BlockSparsePlan(m, tile_size=8, ordering="rcm", semantics="exact",
                              workspace_mb=0.005)      # several work items, split over heads
    assert plan.N == 38 and plan.nT == 5
    items = sa._work_items(plan, 1, 2, 4, 8, sa._FWD_BUFS)
    assert len(items) > len(plan.chunks)
    assert any(h1 - h0 < 2 for *_, h0, h1 in items)      # some pieces hold one head only
    q, k, v = (torch.randn(1, 2, 38, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: sa.block_sparse_attention(a, b, c, plan),
                                    (q, k, v), eps=1e-6, atol=1e-6)


def test_gradcheck_float64_dropout(one_thread):
    m = small_scap(rings=6, segments=6, joints=2)
    plan = sa.BlockSparsePlan(m, tile_size=8, semantics="block")
    q, k, v = (torch.randn(1, 2, 38, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))

    def f(a, b, c):
        torch.manual_seed(123)             # same dropout draw on every call
        return sa.block_sparse_attention(a, b, c, plan, dropout_p=0.3)
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(f(q, k, v), sa.block_sparse_attention(q, k, v, plan))


def test_reordering_is_invisible():
    m = small_scap()
    torch.manual_seed(0)
    x = torch.randn(2, len(m), 32)
    outs = []
    for ordering in sa.ORDERINGS:
        torch.manual_seed(0)
        mod = sa.BodySparseAttention(32, 4, m, tile_size=8, ordering=ordering)
        outs.append(mod(x))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N", [37, 40, 41])
def test_padding_when_not_multiple_of_tile(N):
    g = torch.Generator().manual_seed(N)
    m = torch.rand(N, N, generator=g) < 0.1
    blk, ref = pair(m, "exact", tile=8, dim=16, heads=2)
    assert blk.plan.nT * 8 >= N
    x = torch.randn(2, N, 16, requires_grad=True)
    yb, yr = blk(x), ref(x)
    assert torch.isfinite(yb).all()
    torch.testing.assert_close(yb, yr, atol=1e-5, rtol=1e-5)
    gb, = torch.autograd.grad(yb.sum(), x)
    gr, = torch.autograd.grad(yr.sum(), x)
    assert torch.isfinite(gb).all()
    torch.testing.assert_close(gb, gr, atol=1e-5, rtol=1e-5)


def test_empty_rows_get_self_loop():
    m = torch.zeros(20, 20, dtype=torch.bool)            # nothing allowed: diagonal is forced
    mod = sa.BodySparseAttention(8, 2, m, tile_size=8)
    x = torch.randn(1, 20, 8)
    y = mod(x)
    # attending only itself: output = out_proj(v_proj(x))
    torch.testing.assert_close(y, mod.out_proj(mod.v_proj(x)), atol=1e-5, rtol=1e-5)


def test_exact_mode_locality():
    """Perturbing a token outside a vertex's SCAP row leaves that vertex's output unchanged."""
    m = small_scap()
    mod = sa.BodySparseAttention(32, 4, m, tile_size=8, semantics="exact")
    x = torch.randn(1, len(m), 32)
    i = len(m) - 1                                        # a vertex row
    outside = (~m[i]).nonzero().flatten()
    inside = m[i].nonzero().flatten()
    j = int(outside[len(outside) // 2])
    x2 = x.clone()
    x2[0, j] += 10.0
    y, y2 = mod(x), mod(x2)
    torch.testing.assert_close(y2[0, i], y[0, i], atol=1e-6, rtol=0)
    x3 = x.clone()
    x3[0, int(inside[inside != i][0])] += 10.0            # a neighbour does change it
    assert not torch.allclose(mod(x3)[0, i], y[0, i])


def _tile_members(m, tile, ordering):
    """(N, N) bool: token j lies in a non-zero tile of token i's tile row (written out from
    reorder + blockify, independently of BlockSparsePlan)."""
    perm = sa.reorder(m, ordering)
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(len(perm))
    tiles = sa.blockify(m[perm][:, perm], tile)                # (nT, nT)
    t = pos // tile                                              # tile of each token
    return tiles[t][:, t]


@pytest.mark.parametrize("ordering", ["rcm", "none"])
def test_block_mode_locality(ordering):
    """Block semantics: a token outside every tile of a row does not change that row; a token
    inside one of its tiles (even one the SCAP row excludes) does."""
    m = small_scap(rings=12, segments=8)
    T = 8
    mod = sa.BodySparseAttention(32, 4, m, tile_size=T, ordering=ordering, semantics="block")
    members = _tile_members(m, T, ordering)
    assert torch.equal(members, mod.effective_mask())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, len(m), 32, generator=g)
    y = mod(x)
    checked = 0
    for i in (len(m) - 1, len(m) // 2, 1):                      # two vertex rows and a joint row
        outside = (~members[i]).nonzero().flatten()
        if len(outside) == 0:
            continue
        x2 = x.clone()
        x2[0, outside] += 10 * torch.randn(len(outside), 32, generator=g)
        torch.testing.assert_close(mod(x2)[0, i], y[0, i], atol=1e-5, rtol=0)
        extra = (members[i] & ~m[i]).nonzero().flatten()        # in a tile, not in the SCAP row
        if len(extra):
            x3 = x.clone()
            x3[0, int(extra[0])] += 10.0
            assert not torch.allclose(mod(x3)[0, i], y[0, i])
            checked += 1
    assert checked >= 1


def test_batched_equals_single():
    m = small_scap()
    mod = sa.BodySparseAttention(32, 4, m, tile_size=8)
    x = torch.randn(3, len(m), 32)
    yb = mod(x)
    for b in range(3):
        torch.testing.assert_close(yb[b:b + 1], mod(x[b:b + 1]), atol=1e-6, rtol=1e-6)


def test_bad_shapes_and_args_clear_errors():
    m = small_scap()
    mod = sa.BodySparseAttention(32, 4, m, tile_size=8)
    with pytest.raises(ValueError, match=r"x must be \(B, N=%d, C=32\)" % len(m)):
        mod(torch.randn(2, len(m) + 1, 32))
    with pytest.raises(ValueError, match=r"x must be"):
        mod(torch.randn(len(m), 32))
    with pytest.raises(ValueError, match="square"):
        sa.BodySparseAttention(32, 4, torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be 2-D"):
        sa.BodySparseAttention(32, 4, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="not divisible"):
        sa.BodySparseAttention(30, 4, m)
    with pytest.raises(ValueError, match="unknown impl"):
        sa.BodySparseAttention(32, 4, m, impl="flash")
    with pytest.raises(ValueError, match="unknown method 'metis'"):
        sa.reorder(m, "metis")
    with pytest.raises(ValueError, match="unknown ordering"):
        sa.BodySparseAttention(32, 4, m, ordering="metis")
    with pytest.raises(ValueError, match="sequence length"):
        sa.block_sparse_attention(*(torch.randn(1, 2, 5, 4) for _ in range(3)), mod.plan)


def test_no_cuda_hook_and_no_environment_override(monkeypatch):
    m = small_scap()
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        sa.BodySparseAttention(32, 4, m, impl="cuda")
    monkeypatch.setenv("BODY_SPARSE_ATTENTION_IMPL", "dense")     # the old override: ignored
    assert sa.BodySparseAttention(32, 4, m).impl == "block"
    import inspect
    assert "os.environ" not in inspect.getsource(sa)


def test_plan_shared_between_layers_and_not_in_state_dict():
    m = small_scap()
    plan = sa.BlockSparsePlan(m, tile_size=8, semantics="block")
    a = sa.BodySparseAttention(32, 4, m, plan=plan)
    b = sa.BodySparseAttention(32, 4, m, plan=plan)
    assert a.plan is b.plan and a.semantics == "block" and a.tile_size == 8
    c = sa.BodySparseAttention(32, 4, m, tile_size=8)         # no hidden cache: its own plan
    assert c.plan is not a.plan and c.semantics == "exact"
    x = torch.randn(1, len(m), 32)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {f"{p}_proj.{w}" for p in ("q", "k", "v", "out")
                                   for w in ("weight", "bias")}
    with pytest.raises(ValueError, match="plan must be a BlockSparsePlan of the 20-token mask"):
        sa.BodySparseAttention(32, 4, torch.ones(20, 20, dtype=torch.bool), plan=plan)


def test_kernel_scratch_follows_the_workspace_budget():
    """Work pieces fit the budget (default: one (B, H, N, D) input in the backward) and the output
    comes back in the original order without padded copies of q, k, v."""
    m = small_scap(rings=12, segments=10)
    plan = sa.BlockSparsePlan(m, tile_size=8)
    B, H, D = 2, 4, 8
    for budget in (None, 0.01):
        plan.workspace_mb = budget
        items = sa._work_items(plan, B, H, D, 4, sa._BWD_BUFS, N=len(m), share=1)
        sizes = sa._workspace_sizes(items, 8, D, sa._BWD_BUFS, False)
        limit = max(2 ** 18, B * H * len(m) * D * 4) if budget is None else budget * 2 ** 20
        scores = sum(v for k, v in sizes.items() if k in sa._BWD_BUFS["tt"] + sa._BWD_BUFS["td"])
        one_slot = (2 * 64 + 4 * 8 * D) * 4
        assert scores * 4 <= max(limit, one_slot * max(S for _, _, _, S, *_ in items))
        # every (batch, head, query row tile) appears in exactly one piece
        seen = torch.zeros(B, H, plan.nT, dtype=torch.long)
        for _, r0, r1, *_, b0, b1, h0, h1 in items:
            seen[b0:b1, h0:h1, r0:r1] += 1
        assert bool((seen == 1).all())
    q = torch.randn(B, H, len(m), D)
    o = sa.block_sparse_attention(q, q, q, plan)
    assert o.shape == q.shape


def test_train_mode_dropout_runs_and_eval_is_deterministic():
    m = small_scap()
    mod = sa.BodySparseAttention(32, 4, m, tile_size=8, dropout=0.5)
    x = torch.randn(2, len(m), 32, requires_grad=True)
    mod.train()
    y = mod(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    mod.eval()
    torch.testing.assert_close(mod(x), mod(x))
