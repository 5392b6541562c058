"""Shared test fixtures.

`icosphere_topology` builds a tiny three-level mesh hierarchy (162 -> 42 -> 12 vertices) in the
TOPOLOGY-dict layout that the model files take, without body.py or mesh.py, so model tests stay
small and independent of the body model. Subdividing an icosahedron gives an exact hierarchy:
old vertices keep their index, each new vertex is the midpoint of an old edge.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HMR_CACHE", str(ROOT / ".cache"))
# Tests run many small ops: one thread avoids OpenMP wake-up costs, which on a busy 2-core machine
# made some files 10-50x slower. (Benchmarks and training use the default thread count.)
torch.set_num_threads(1)

SMPL_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
LSP_TO_SMPL = [8, 5, 2, 1, 4, 7, 21, 19, 17, 16, 18, 20, 12, 15]
H36M_TO_LSP = [3, 2, 1, 4, 5, 6, 16, 15, 14, 11, 12, 13, 8, 10]


def _icosahedron():
    t = (1.0 + 5 ** 0.5) / 2
    v = torch.tensor([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                      [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]],
                     dtype=torch.float64)
    f = torch.tensor([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9],
                      [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2],
                      [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10],
                      [8, 6, 7], [9, 8, 1]])
    return v / v.norm(dim=1, keepdim=True), f


def _subdivide(v, f):
    """Loop-style 1->4 split; returns fine vertices, faces and (index, weight) up maps."""
    mid = {}
    verts = [p for p in v]
    up_index = [[i, i, i] for i in range(len(v))]
    up_weight = [[1.0, 0.0, 0.0] for _ in range(len(v))]

    def midpoint(a, b):
        key = (min(a, b), max(a, b))
        if key not in mid:
            p = (v[a] + v[b]) / 2
            verts.append(p / p.norm())
            up_index.append([a, b, a])
            up_weight.append([0.5, 0.5, 0.0])
            mid[key] = len(verts) - 1
        return mid[key]

    faces = []
    for a, b, c in f.tolist():
        ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
        faces += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
    return (torch.stack(verts), torch.tensor(faces), torch.tensor(up_index),
            torch.tensor(up_weight, dtype=torch.float64))


def make_icosphere_topology(num_joints=14, radius=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    v2, f2 = _icosahedron()
    v1, f1, ui1, uw1 = _subdivide(v2, f2)
    v0, f0, ui0, uw0 = _subdivide(v1, f1)
    verts = [v0 * radius, v1 * radius, v2 * radius]
    # 24 "kinematic joints" on the sphere; soft skinning by distance.
    centres = torch.randn(24, 3, generator=g, dtype=torch.float64)
    centres = radius * centres / centres.norm(dim=1, keepdim=True)

    def skin(v):
        w = torch.softmax(-torch.cdist(v, centres) / 0.1, dim=1)
        return w * (w > 0.05)

    skin_weights = [skin(v) / skin(v).sum(1, keepdim=True) for v in verts]
    # h36m regressor: each joint = mean of its 4 nearest fine vertices.
    targets = torch.randn(17, 3, generator=g, dtype=torch.float64)
    targets = radius * targets / targets.norm(dim=1, keepdim=True)
    h36m = torch.zeros(17, len(v0), dtype=torch.float64)
    nn_idx = torch.cdist(targets, verts[0]).topk(4, largest=False).indices
    h36m.scatter_(1, nn_idx, 0.25)

    def up_dense(index, weight, n_coarse):
        u = torch.zeros(len(index), n_coarse, dtype=torch.float64)
        u.scatter_add_(1, index, weight)
        return u

    r0 = h36m[H36M_TO_LSP][:num_joints]
    u0 = up_dense(ui0, uw0, len(v1))
    u1 = up_dense(ui1, uw1, len(v2))
    regs = [r0, r0 @ u0, r0 @ u0 @ u1]
    f32 = lambda x: x.float()
    return {
        "num_vertices": [len(v0), len(v1), len(v2)],
        "faces": [f0, f1, f2],
        "template": [f32(v) for v in verts],
        "up_index": [ui0, ui1],
        "up_weight": [f32(uw0), f32(uw1)],
        "down_index": [torch.arange(len(v1)), torch.arange(len(v2))],
        "skin_weights": [f32(w) for w in skin_weights],
        "joint_regressor": [f32(r) for r in regs],
        "h36m_regressor": f32(h36m),
        "joint_to_smpl": torch.tensor(LSP_TO_SMPL[:num_joints]),
        "parents": torch.tensor(SMPL_PARENTS),
    }


@pytest.fixture
def icosphere_topology():
    return make_icosphere_topology()
