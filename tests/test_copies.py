"""Copies that agree (issue 13): small helpers are repeated so that each model file stands alone;
this file checks that every copy gives the same result as the others."""
import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import body
import data
import deformer
import evaluate
import fastmetro
import featup_hmr
import mesh
import sparse_attention

ROOT = Path(__file__).resolve().parents[1]


def _axis_angles():
    g = torch.Generator().manual_seed(0)
    aa = torch.randn(200, 3, generator=g, dtype=torch.float64)
    aa = aa * (torch.rand(200, 1, generator=g, dtype=torch.float64) * math.pi / aa.norm(dim=1, keepdim=True))
    tiny = torch.randn(20, 3, generator=g, dtype=torch.float64) * 1e-5    # the small-angle branches
    near_pi = torch.nn.functional.normalize(torch.randn(20, 3, generator=g, dtype=torch.float64), dim=1) * (math.pi - 1e-3)
    return torch.cat([aa, tiny, near_pi, torch.zeros(1, 3, dtype=torch.float64)])


def test_axis_angle_to_matrix_copies_agree():
    aa = _axis_angles()
    ref = body.axis_angle_to_matrix(aa)
    assert torch.allclose(ref @ ref.transpose(-1, -2), torch.eye(3, dtype=ref.dtype).expand_as(ref), atol=1e-12)
    for copy in (fastmetro.axis_angle_to_matrix, featup_hmr.axis_angle_to_matrix):
        torch.testing.assert_close(copy(aa), ref, atol=1e-10, rtol=0)
    numpy_copy = np.stack([data._aa_to_mat(a) for a in aa.numpy()])       # data.py's augmentation
    torch.testing.assert_close(torch.from_numpy(numpy_copy), ref, atol=1e-10, rtol=0)
    # float32 and a leading batch shape, as the models call them
    aa32 = aa[:48].float().reshape(2, 24, 3)
    for copy in (fastmetro.axis_angle_to_matrix, featup_hmr.axis_angle_to_matrix):
        torch.testing.assert_close(copy(aa32), body.axis_angle_to_matrix(aa32), atol=1e-6, rtol=0)


def test_rot6d_copies_agree():
    x = torch.randn(50, 6, dtype=torch.float64)
    torch.testing.assert_close(featup_hmr.rot6d_to_matrix(x), body.rot6d_to_matrix(x, layout="hmr2"))
    R = body.axis_angle_to_matrix(_axis_angles())
    torch.testing.assert_close(featup_hmr.matrix_to_rot6d(R), body.matrix_to_rot6d(R, layout="hmr2"))


def test_weak_perspective_copies_agree():
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(3, 17, 3, generator=g)
    cam = torch.randn(3, 3, generator=g)
    ref = cam[:, None, :1] * (pts[..., :2] + cam[:, None, 1:])           # x2d = s * (X[:2] + t)
    for copy in (body.weak_perspective_project, fastmetro.weak_perspective_project,
                 featup_hmr.weak_perspective_project, deformer.project):
        torch.testing.assert_close(copy(pts, cam), ref)
    torch.testing.assert_close(deformer.reference_points(pts, cam, (64, 64)), (ref + 1) / 2)   # square


@pytest.mark.parametrize("self_loops", [True, False])
def test_mesh_adjacency_copies_agree(icosphere_topology, self_loops):
    for faces, V in zip(icosphere_topology["faces"], icosphere_topology["num_vertices"]):
        ref = mesh.adjacency_dense(faces.numpy(), V, self_loops=self_loops)
        assert ref.sum() == 2 * len(mesh.edges(faces.numpy())) + (V if self_loops else 0)
        for copy in (fastmetro.mesh_adjacency, sparse_attention.mesh_adjacency):
            assert torch.equal(copy(faces, V, self_loops=self_loops), ref)
        dense_sp = torch.from_numpy(mesh.adjacency(faces.numpy(), V, self_loops=self_loops).toarray() > 0)
        assert torch.equal(dense_sp, ref)


def test_sine_position_copies_agree():
    for h, w, d in ((7, 7, 64), (16, 12, 32), (3, 5, 128)):
        ref = fastmetro.PositionEmbeddingSine(d // 2)(h, w)
        torch.testing.assert_close(featup_hmr.sine_pos_2d(h, w, d), ref)


def _int_lists(path, length):
    """Every literal list of `length` ints in a source file (ast)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.List) and len(node.elts) == length and all(
                isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts):
            yield [e.value for e in node.elts], node.lineno


def test_h36m_to_lsp_copies_agree():
    # LSP-14 from H36M-17 (the METRO family's map, facts.md)
    expected = [3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10]
    for copy in (body.H36M_TO_LSP, evaluate.H36M_TO_LSP, featup_hmr.H36M_TO_LSP):
        assert list(copy) == expected
    # and every literal copy in the sources (e.g. fastmetro.py's smoke topology, the test fixture):
    # a 14-long list starting like the map must be the map
    found = 0
    for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        for lst, line in _int_lists(path, 14):
            if lst[:3] == [3, 2, 1]:
                assert lst == expected, f"{path.name}:{line}: {lst}"
                found += 1
    assert found >= 5                                           # body, evaluate, featup_hmr, fastmetro, conftest
