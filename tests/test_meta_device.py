"""GPU-safe code, checked on the CPU (issue 13): every model's forward, loss and backward with the
model and its inputs on the `meta` device. Like CUDA, meta refuses to mix with CPU tensors, so a
tensor kept as a plain attribute instead of a buffer (not moved by `.to()`), or created in forward
without `device=`, fails here as it would on a GPU. Meta tensors have shapes but no values.

What cannot run on meta, and how the test handles it (precisely):
- Reading a value back to the host (`.item()`, `float(t)`, `bool(t)`) has no answer on meta. The
  forward passes read nothing (no host synchronisation; checked: reads raise in `forward`). The
  losses read values in two places by design: the float logs they return (train.py prints them)
  and fastmetro/tore's "any sample with labels?" branch (`if not bool(sel.any())`, the official
  `if len(gt) > 0`), followed by boolean-mask indexing `pred[sel]`, whose output shape depends on
  the values (also a host sync on CUDA). For `loss` only, the test answers the reads with True /
  NaN and lets the mask select every sample (torch's `meta_nonzero_assume_all_nonzero`; the
  targets have every label, so that is the true answer) (`_values_read_as_placeholders`), so
  everything else in the loss and the whole backward run on meta; the returned logs are then NaN
  and are not checked.
"""
import contextlib
import dataclasses

import pytest
import torch

import deformer
import fastmetro
import featup_hmr
import tore

META = torch.device("meta")


@contextlib.contextmanager
def _values_read_as_placeholders():
    """bool(meta) -> True, float(meta) / meta.item() -> NaN, meta nonzero() -> all; CPU unchanged."""
    import torch.fx.experimental._config as fx_config
    orig_nonzero = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True
    orig_bool, orig_float, orig_item = torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.item

    def _bool(t):
        return True if t.is_meta else orig_bool(t)

    def _float(t):
        return float("nan") if t.is_meta else orig_float(t)

    def _item(t):
        return (True if t.dtype == torch.bool else float("nan")) if t.is_meta else orig_item(t)

    torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.item = _bool, _float, _item
    try:
        yield
    finally:
        torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.item = orig_bool, orig_float, orig_item
        fx_config.meta_nonzero_assume_all_nonzero = orig_nonzero


def _targets(B, J, V, device):
    g = torch.Generator().manual_seed(0)
    t = {"joints3d": torch.randn(B, J, 4, generator=g), "joints2d": torch.randn(B, J, 3, generator=g),
         "vertices": torch.randn(B, V, 3, generator=g), "has_smpl": torch.ones(B), "has_3d": torch.ones(B),
         "pose": torch.randn(B, 72, generator=g) * 0.2, "betas": torch.randn(B, 10, generator=g)}
    t = {k: v.to(device) for k, v in t.items()}
    t["epoch"] = 5.0                                   # a Python number (TORE's ITP weight schedule)
    return t


def _linear_body(topology):
    from test_featup_hmr import LinearBody
    return LinearBody(topology)


def _tore(gtr, itp):
    cfg = dataclasses.replace(tore.PRESETS["tiny"], use_gtr=gtr, use_itp=itp)
    return lambda topo: (tore.TORE(cfg, fastmetro._StandInBackbone(64), topo), (2, 3, 224, 224))


def _featup_hmr(**over):
    cfg = dataclasses.replace(featup_hmr.PRESETS["tiny"], **over)
    return lambda topo: (featup_hmr.FeatUpHMR(cfg, featup_hmr._StandInViT(64, 4, out_indices=cfg.out_indices),
                                              topo, _linear_body(topo)), (2, 3, 256, 192))


# name -> topology -> (model on the CPU, input shape). featup_hmr takes a linear stand-in body:
# body.BodyModel runs smplx.lbs, whose kinematic chain indexes a list with `parents[i]`, a tensor
# (one host read per joint; smplx's code), which has no value on meta.
CASES = {
    "fastmetro": lambda topo: (fastmetro.FastMETRO(fastmetro.PRESETS["tiny"], fastmetro._StandInBackbone(64), topo),
                               (2, 3, 224, 224)),
    "tore_gtr_itp": _tore(True, True),
    "tore_plain": _tore(False, False),
    "deformer": lambda topo: (deformer.DeFormer(deformer.PRESETS["tiny"], deformer._StandInBackbone(), topo),
                              (2, 3, 256, 256)),
    "featup_hmr_jbu": _featup_hmr(),
    "featup_hmr_bilinear": _featup_hmr(upsampler="bilinear"),
    "featup_hmr_dense": _featup_hmr(upsampler="none", decoder="dense"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_loss_backward_on_meta(name, icosphere_topology):
    model, shape = CASES[name](icosphere_topology)
    V = icosphere_topology["num_vertices"][0]
    model = model.train().to(META)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.is_meta, f"{name}: {n} stayed on {t.device}"
    out = model(torch.empty(shape, device=META))           # forward: no value is read (reads raise)
    assert all(v.is_meta for v in out.values() if torch.is_tensor(v)), name
    J = out["joints"].shape[1]
    with _values_read_as_placeholders():
        loss, logs = model.loss(out, _targets(shape[0], J, V, META))
    assert loss.is_meta and loss.dim() == 0, name
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g.is_meta for g in grads if g is not None), name
    assert sum(g is not None for g in grads) > 0.9 * len(grads), name


def test_a_cpu_tensor_created_in_forward_fails_on_meta():
    """The check itself: a module that builds a tensor without `device=` fails on meta."""
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.offset = torch.ones(3)                    # plain attribute: `.to()` does not move it

        def forward(self, x):
            return self.lin(x) + self.offset

    bad = Bad().to(META)
    with pytest.raises(RuntimeError, match="meta|device"):
        bad(torch.empty(2, 3, device=META))


def test_placeholder_reads_only_inside_the_context():
    t = torch.empty(3, device=META)
    with pytest.raises(RuntimeError):
        bool(t.any())
    with _values_read_as_placeholders():
        assert bool(t.any()) and float(t.sum()) != float(t.sum())
        assert float(torch.ones(())) == 1.0
    with pytest.raises(RuntimeError):
        float(t.sum())
