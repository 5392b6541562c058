"""Pose-estimation HRNet and HRFormer backbones (issue 17 points 4, 5): official / MMPose checkpoint
layouts load strictly (state dicts built from the module, renamed into those layouts, with their
heads), key names as in the official code, published parameter counts, window attention maths."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbones import (HRFormer, LocalWindowSelfAttention, WindowMultiheadAttention, build_backbone,
                       count_parameters, load_pretrained)


def _meta(name, **kw):
    with torch.device("meta"):
        return build_backbone(name, **kw)


def _randomise(model, seed=0):
    """Non-trivial weights and BN statistics so a wrong mapping changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.8 if k.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


# ----------------------------------------------------------------------------- HRNet (pose)
def test_parameter_counts_with_and_without_the_classification_head():
    assert count_parameters(_meta("hrnet_w48")) == 75_420_864                    # head built, unused by DeFormer
    assert count_parameters(_meta("hrnet_w48", classification_head=False)) == 65_325_120  # 10.1M less
    # pose net (deep-high-resolution-net README: W48 63.6M incl. the 17-joint 1x1 head)
    assert count_parameters(_meta("hrnet_w48_pose")) + 48 * 17 + 17 == pytest.approx(63.6e6, rel=1e-3)


def test_pose_hrnet_keys_follow_the_official_layout():
    keys = set(_meta("hrnet_w48_pose").state_dict())
    # stem, stage 1 (4 Bottlenecks), transitions, stage modules 1 / 4 / 3 (pose_hrnet.py, MMPose hrnet.py)
    for k in ("conv1.weight", "bn1.running_mean", "conv2.weight", "bn2.weight", "layer1.3.conv3.weight",
              "layer1.0.downsample.1.weight", "transition1.0.0.weight", "transition1.1.0.0.weight",
              "transition3.3.0.1.running_var", "stage2.0.branches.1.3.bn2.weight",
              "stage3.3.fuse_layers.2.0.1.0.weight", "stage4.2.branches.3.3.conv2.weight",
              "stage4.1.fuse_layers.3.2.0.1.weight", "stage4.2.fuse_layers.0.3.1.weight"):
        assert k in keys, k
    # last stage-4 module: multi_scale_output=False -> only fuse row 0
    assert not any(k.startswith(("stage4.2.fuse_layers.1", "stage4.2.fuse_layers.2", "stage4.3.")) for k in keys)
    # no classification head, no pose head
    assert not any(k.startswith(("incre_modules", "downsamp_modules", "final_layer", "classifier")) for k in keys)


@pytest.mark.parametrize("layout", ["official", "mmpose", "mmpose1"])
def test_pose_hrnet_checkpoint_loads_strictly_and_reports_the_head(tmp_path, capsys, layout):
    src = _randomise(build_backbone("hrnet_tiny_pose"))
    sd = dict(src.state_dict())
    head = {"final_layer.weight": torch.randn(17, 8, 1, 1), "final_layer.bias": torch.randn(17)}
    if layout == "official":                    # deep-high-resolution-net: plain state dict
        ckpt = {**sd, **head}
    else:                                       # MMPose 0.x `keypoint_head.`, 1.x `head.`
        hp = "keypoint_head." if layout == "mmpose" else "head."
        meta = {"epoch": 210, "dataset_meta": {"sigmas": np.full(17, 0.05, np.float32)}}  # mmengine keeps numpy
        ckpt = {"meta": meta, "state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                                                       **{hp + k: v for k, v in head.items()}}}
    torch.save(ckpt, tmp_path / "pose.pth")
    dst = build_backbone("hrnet_tiny_pose").eval()
    info = load_pretrained(dst, tmp_path / "pose.pth")
    msg = capsys.readouterr().out
    assert len(info["ignored"]) == 2 and all(k.endswith(("final_layer.weight", "final_layer.bias"))
                                             for k in info["ignored"])
    assert "ignored 2" in msg and "final_layer.weight" in msg
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        for a, b in zip(src.forward_features(x), dst.forward_features(x)):
            assert torch.equal(a, b)


def test_pickled_objects_other_than_numpy_arrays_are_refused(tmp_path):
    sd = build_backbone("hrnet_tiny_pose").state_dict()
    torch.save({"meta": {"x": np.array([1, "a"], dtype=object)}, "state_dict": sd}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_pretrained(build_backbone("hrnet_tiny_pose"), tmp_path / "obj.pth")


def test_pose_checkpoint_into_the_classification_layout_fails_naming_keys(tmp_path):
    torch.save(build_backbone("hrnet_tiny_pose").state_dict(), tmp_path / "pose.pth")
    with pytest.raises(ValueError, match=r"missing keys.*\n.*stage4\.0\.fuse_layers\.1"):
        load_pretrained(build_backbone("hrnet_tiny", classification_head=False), tmp_path / "pose.pth")


def test_pose_hrnet_maps_are_the_fused_top_branch_and_unfused_others():
    m = _randomise(build_backbone("hrnet_tiny_pose"))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        feats = m.forward_features(x)
        out, feats2 = m.forward_with_features(x)
        # re-run stage 4's last module by hand from its input
        xs = [m.conv1, m.bn1, m.relu, m.conv2, m.bn2, m.relu]
        y = x
        for f in xs:
            y = f(y)
        ys = [m.layer1(y)]
        for s in range(3):
            ys = m._apply_transition(getattr(m, f"transition{s + 1}"), ys)
            ys = getattr(m, f"stage{s + 2}")(ys) if s < 2 else ys
        for mod in list(m.stage4)[:-1]:
            ys = mod(ys)
        last = m.stage4[-1]
        branches = [b(t) for b, t in zip(last.branches, ys)]
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 16, 12), (16, 8, 6), (32, 4, 3), (64, 2, 2)]
    for i in (1, 2, 3):
        assert torch.equal(feats[i], branches[i])
    assert torch.equal(out, feats[-1]) and all(torch.equal(a, b) for a, b in zip(feats, feats2))


def test_forward_features_never_runs_the_classification_head():
    m = build_backbone("hrnet_tiny")
    called = []
    m.final_layer.register_forward_hook(lambda *a: called.append(1))
    m.forward_features(torch.randn(1, 3, 64, 64))
    assert not called
    m(torch.randn(1, 3, 64, 64))
    assert called


# ----------------------------------------------------------------------------- HRFormer
def test_hrformer_parameter_counts_match_the_paper():
    # HRFormer paper (pose, COCO): HRFormer-S 7.8M, HRFormer-B 43.2M (the 1x1 17-joint head is tiny)
    # (S: 7.75M here; the paper's rounding or counting differs by 0.7%, B agrees to 0.01%)
    assert count_parameters(_meta("hrformer_s")) / 1e6 == pytest.approx(7.8, rel=0.01)
    assert count_parameters(_meta("hrformer_b")) / 1e6 == pytest.approx(43.2, abs=0.05)


def test_hrformer_keys_follow_the_official_layout():
    m = _meta("hrformer_s")
    keys = set(m.state_dict())
    for k in ("conv1.weight", "bn2.bias", "layer1.1.conv3.weight", "layer1.0.downsample.0.weight",
              "transition1.0.0.weight", "transition1.1.0.0.weight", "transition3.3.0.1.weight",
              "stage2.0.branches.0.0.norm1.weight", "stage2.0.branches.1.1.attn.attn.q_proj.weight",
              "stage2.0.branches.0.0.attn.attn.k_proj.bias", "stage2.0.branches.0.0.attn.attn.v_proj.weight",
              "stage2.0.branches.0.0.attn.attn.out_proj.weight",
              "stage3.3.branches.2.1.attn.attn.relative_position_bias_table",
              "stage3.3.branches.2.1.attn.attn.relative_position_index",
              "stage4.1.branches.3.1.norm2.weight", "stage2.0.branches.0.0.mlp.fc1.weight",
              "stage2.0.branches.0.0.mlp.norm1.running_var", "stage2.0.branches.0.0.mlp.dw3x3.bias",
              "stage2.0.branches.0.0.mlp.fc2.weight", "stage2.0.branches.0.0.mlp.norm3.weight",
              "stage3.0.fuse_layers.0.2.1.weight", "stage3.0.fuse_layers.2.0.0.3.weight",
              "stage3.0.fuse_layers.2.0.1.2.weight", "stage4.1.fuse_layers.0.3.1.weight"):
        assert k in keys, k
    assert not any(k.startswith("stage4.1.fuse_layers.1") or k.startswith("stage4.2.") or k.startswith("stage3.4.")
                   for k in keys)
    assert "stage3.0.fuse_layers.2.0.1.4" not in str(sorted(keys))  # no ReLU params; last step has 4 layers
    b = m.stage2[0].branches[1][1]
    assert b.attn.attn.num_heads == 2 and b.mlp.fc1.out_channels == 4 * 64
    assert m.stage2[0].branches[0][0].attn.attn.relative_position_bias_table.shape == (13 * 13, 1)
    dp = [blk.drop_path.p for s in (m.stage2, m.stage3, m.stage4) for mod in s for blk in mod.branches[0]]
    assert len(dp) == 14 and dp[0] == 0 and dp[-1] == pytest.approx(0.1)  # linspace(0, 0.1, 14)


def _to_mmpose(sd):
    """Official HRFormer keys -> MMPose's: q/k/v_proj stacked into `qkv`, out_proj -> proj, mlp -> ffn."""
    out = {}
    for k, v in sd.items():
        if ".attn.attn.k_proj." in k or ".attn.attn.v_proj." in k:
            continue
        if ".attn.attn.q_proj." in k:
            v = torch.cat([sd[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            k = k.replace("q_proj", "qkv")
        out[k.replace(".mlp.", ".ffn.").replace(".attn.attn.out_proj.", ".attn.attn.proj.")] = v
    return out


@pytest.mark.parametrize("layout", ["official", "mmpose"])
def test_hrformer_checkpoint_loads_strictly(tmp_path, capsys, layout):
    src = _randomise(build_backbone("hrformer_tiny"))
    sd = dict(src.state_dict())
    if layout == "mmpose":
        sd = _to_mmpose(sd)
        assert any(".attn.attn.qkv.weight" in k for k in sd) and not any(".mlp." in k for k in sd)
    head = {"keypoint_head.final_layer.weight": torch.randn(17, 8, 1, 1),
            "keypoint_head.final_layer.bias": torch.randn(17)}
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()}, **head}}, tmp_path / "hrt.pth")
    dst = build_backbone("hrformer_tiny").eval()
    info = load_pretrained(dst, tmp_path / "hrt.pth")
    assert sorted(info["ignored"]) == sorted(head) and "keypoint_head.final_layer.bias" in capsys.readouterr().out
    x = torch.randn(1, 3, 40, 36)  # stride-4 map 10x9: windows of 3 need padding on one axis
    with torch.no_grad():
        for a, b in zip(src.forward_features(x), dst.forward_features(x)):
            assert torch.equal(a, b)
    # a wrong window index in the checkpoint is refused
    bad = dict(src.state_dict())
    k = next(k for k in bad if k.endswith("relative_position_index"))
    bad[k] = bad[k].flip(0)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="relative_position_index"):
        load_pretrained(build_backbone("hrformer_tiny"), tmp_path / "bad.pth")


def test_window_attention_equals_a_loop_over_padded_windows():
    torch.manual_seed(0)
    ws, C, heads, H, W = 3, 8, 2, 5, 7
    lsa = LocalWindowSelfAttention(C, heads, ws).eval()
    mha = lsa.attn
    x = torch.randn(2, H * W, C)
    out = lsa(x, H, W)
    # reference: centre-pad with zeros to 6 x 9, attend inside each 3x3 block, bias from (dy, dx)
    ph, pw = 1, 2
    xp = F.pad(x.view(2, H, W, C), (0, 0, pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    ref = torch.zeros_like(xp)
    table = mha.relative_position_bias_table
    for wy in range(0, H + ph, ws):
        for wx in range(0, W + pw, ws):
            t = xp[:, wy:wy + ws, wx:wx + ws].reshape(2, ws * ws, C)
            q = mha.q_proj(t).view(2, -1, heads, C // heads).transpose(1, 2)
            k = mha.k_proj(t).view(2, -1, heads, C // heads).transpose(1, 2)
            v = mha.v_proj(t).view(2, -1, heads, C // heads).transpose(1, 2)
            logits = q @ k.transpose(-1, -2) / math.sqrt(C // heads)
            for i in range(ws * ws):
                for j in range(ws * ws):
                    dy, dx = i // ws - j // ws, i % ws - j % ws
                    logits[:, :, i, j] += table[(dy + ws - 1) * (2 * ws - 1) + dx + ws - 1]
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, ws * ws, C)
            ref[:, wy:wy + ws, wx:wx + ws] = mha.out_proj(o).view(2, ws, ws, C)
    ref = ref[:, ph // 2:ph // 2 + H, pw // 2:pw // 2 + W].reshape(2, H * W, C)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_relative_position_index_equals_mmpose_construction():
    ws = 7
    # MMPose WindowMSA: double_step_seq(2ws-1, ws, 1, ws); index = seq + seq.T, flipped along dim 1
    seq = (torch.arange(0, (2 * ws - 1) * ws, 2 * ws - 1)[:, None] + torch.arange(ws)[None]).reshape(1, -1)
    assert torch.equal(WindowMultiheadAttention.position_index(ws), (seq + seq.T).flip(1))


def test_official_pose_reading_ignores_the_bias_table():
    torch.manual_seed(0)
    m = WindowMultiheadAttention(8, 2, 3, relative_position_bias=False)
    assert "relative_position_bias_table" in m.state_dict() and all(
        n != "relative_position_bias_table" for n, _ in m.named_parameters())
    x = torch.randn(4, 9, 8)
    a = m(x)
    m.relative_position_bias_table.normal_()
    assert torch.equal(a, m(x))
    m2 = WindowMultiheadAttention(8, 2, 3)
    m2.load_state_dict(m.state_dict())
    assert not torch.allclose(m2(x), a)  # the default adds it (paper, classification code, MMPose)


def test_every_hrformer_parameter_gets_a_gradient():
    m = build_backbone("hrformer_tiny").train()
    sum(f.square().mean() for f in m.forward_features(torch.randn(2, 3, 32, 32))).backward()
    assert all(p.grad is not None for p in m.parameters())
    assert isinstance(m, HRFormer)
