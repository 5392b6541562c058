"""Every trainable parameter takes part in one training loss, so train.py wraps these models in DDP
with find_unused_parameters=False (DDP raises on the next step if one does not). Checked on each
model's tiny preset through train.build_model / make_targets, as train.py runs it (DeFormer's tiny
preset is on hrnet_tiny_pose, which builds no classification head)."""
import pytest
import torch

import train
from body import BodyModel


@pytest.fixture(scope="module")
def body():
    return BodyModel().eval()


@pytest.mark.parametrize("name", ["fastmetro", "tore", "featup_hmr", "deformer"])
def test_every_trainable_parameter_gets_a_gradient(body, name):
    torch.manual_seed(0)
    model, cfg = train.build_model(name, "tiny", body)
    model.train()
    B = 2
    batch = {"pose": torch.randn(B, 72) * 0.1, "betas": torch.zeros(B, 10), "has_smpl": torch.ones(B),
             "joints3d": torch.rand(B, 24, 4), "joints2d": torch.rand(B, 24, 3), "has_3d": torch.ones(B)}
    targets = train.make_targets(batch, body, "cpu", 5.0)
    out = model(torch.randn(B, 3, *cfg.input_size))
    loss, _ = model.loss(out, targets)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{name}: {len(unused)} parameters get no gradient: {unused[:8]}"
