"""Tests for backbones.py: shapes, published parameter counts, official key layouts, checkpoint
loading (wrapped / prefixed / classifier-carrying files, clear errors) and gradient
checkpointing. Big networks (ResNet-50, HRNet-W32/48/64, ViT-L/H) are built on the meta device
(shapes and counts without memory or compute)."""
import functools

import pytest
import torch

from backbones import (BACKBONES, INPUT_SIZE, build_backbone, count_parameters,
                       load_pretrained)

BIG = ["resnet50", "hrnet_w32", "hrnet_w48", "hrnet_w64", "vit_l", "vit_h"]
TINY = ["resnet_tiny", "hrnet_tiny", "vit_tiny"]
RUN = TINY + ["resnet18", "efficientnet_b0"]  # ViT-B is the vit_tiny code at another size: meta only


@functools.lru_cache(maxsize=None)
def _meta_cached(name, kw):
    with torch.device("meta"):
        return build_backbone(name, **dict(kw))


def _meta(name, **kw):
    """Backbone on the meta device (cached: tests only read shapes and counts)."""
    return _meta_cached(name, tuple(sorted(kw.items())))


def _check_shapes(m, name, out, feats, batch):
    h, w = INPUT_SIZE[name]
    stride = 16 if name.startswith("vit") else 32
    assert tuple(out.shape) == (batch, m.out_channels, h // stride, w // stride)
    assert len(feats) == len(m.feature_channels) == len(m.feature_strides)
    for f, c, s in zip(feats, m.feature_channels, m.feature_strides):
        assert tuple(f.shape) == (batch, c, h // s, w // s)


def test_registry_is_complete():
    expected = {"resnet18", "resnet50", "hrnet_w32", "hrnet_w48", "hrnet_w64", "vit_b", "vit_l",
                "vit_h", "efficientnet_b0", "resnet_tiny", "hrnet_tiny", "vit_tiny"}
    assert expected <= set(BACKBONES)
    with pytest.raises(KeyError, match="unknown backbone"):
        build_backbone("resnet51")


@pytest.mark.parametrize("name", BIG + RUN + ["vit_b"])
def test_shapes_meta(name):
    m = _meta(name).eval()
    x = torch.empty(2, 3, *INPUT_SIZE[name], device="meta")
    out, feats = m.forward_with_features(x)
    _check_shapes(m, name, out, feats, 2)


def test_published_final_maps():
    """The maps the papers use: R50 2048x7x7, HRNet 2048x7x7 + branches C..8C at strides 4..32,
    EfficientNet-B0 1280x7x7 (224 input); ViT-H 1280x16x12 with layers 16 and 32 (256x192)."""
    x = torch.empty(1, 3, 224, 224, device="meta")
    assert tuple(_meta("resnet50")(x).shape) == (1, 2048, 7, 7)
    assert tuple(_meta("efficientnet_b0")(x).shape) == (1, 1280, 7, 7)
    for name, c in [("hrnet_w32", 32), ("hrnet_w48", 48), ("hrnet_w64", 64)]:
        m = _meta(name)
        assert tuple(m(x).shape) == (1, 2048, 7, 7)
        assert m.feature_channels == [c, 2 * c, 4 * c, 8 * c]
        assert m.feature_strides == [4, 8, 16, 32]
    vit_h = _meta("vit_h")
    assert vit_h.out_indices == (16, 32)
    feats = vit_h.forward_features(torch.empty(1, 3, 256, 192, device="meta"))
    assert [tuple(f.shape) for f in feats] == [(1, 1280, 16, 12)] * 2


@pytest.mark.parametrize("name", RUN)
def test_forward_runs(name):
    torch.manual_seed(0)
    m = build_backbone(name).eval()
    x = torch.randn(1, 3, *INPUT_SIZE[name])
    with torch.no_grad():
        out, feats = m.forward_with_features(x)
    _check_shapes(m, name, out, feats, 1)
    assert torch.isfinite(out).all()
    if not name.startswith("hrnet"):  # HRNet: forward = classification head on the 4 branches
        torch.testing.assert_close(feats[-1], out)  # the last feature map is the final map
    if name in TINY:
        with torch.no_grad():
            torch.testing.assert_close(m(x), out)
            torch.testing.assert_close(m.forward_features(x)[0], feats[0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.randn(1, 4, 32, 32))


def test_tiny_backbones_train_backward():
    # small images keep this cheap on a shared CPU (shapes at full size are tested above)
    for name, size in [("resnet_tiny", (64, 64)), ("hrnet_tiny", (64, 64)), ("vit_tiny", (128, 96))]:
        m = build_backbone(name).train()
        out = m(torch.randn(2, 3, *size))
        out.square().mean().backward()
        grads = [p.grad for p in m.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name


def test_parameter_counts_match_published():
    """Published counts (rounded as published):
    - ResNet-50 without fc: 23.5M (FastMETRO table 'R50'); with fc 25.6M (torchvision).
    - HRNet-W64: FastMETRO's 'H64 128.1M' is the whole HRNet-W64-C classification net INCLUDING
      its unused 1000-way classifier Linear(2048, 1000) (FastMETRO builds it with get_cls_net,
      whose module keeps `classifier`), = HRNet-W64-C in the HRNet-Image-Classification README.
      Without the classifier (what runs in the forward) it is 126.0M. W32-C 41.2M, W48-C 77.5M.
    - ViT-B 86M class (85.8M incl. 193-slot pos_embed), ViT-H 630M class (ViTPose-H 632M).
    - EfficientNet-B0 without _fc 4.0M; with _fc 5.3M (published)."""
    def millions(name, **kw):
        return round(count_parameters(_meta(name, **kw)) / 1e6, 1)

    assert millions("resnet50") == 23.5
    assert millions("resnet50", with_classifier=True) == 25.6
    assert millions("hrnet_w64", with_classifier=True) == 128.1
    assert millions("hrnet_w64") == 126.0
    assert millions("hrnet_w48", with_classifier=True) == 77.5
    assert millions("hrnet_w32", with_classifier=True) == 41.2
    assert millions("efficientnet_b0") == 4.0
    assert millions("efficientnet_b0", with_classifier=True) == 5.3
    assert 85.0 < millions("vit_b") < 87.0
    assert 300.0 < millions("vit_l") < 307.0
    assert 625.0 < millions("vit_h") < 635.0


# Literal key names (and shapes) from the official code / checkpoints:
# torchvision resnet50, HRNet-Image-Classification cls_hrnet (W64), ViTPose/HMR 2.0 vit (ViT-H),
# efficientnet_pytorch efficientnet-b0.
OFFICIAL_KEYS = {
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.weight": (256,),
        "layer3.5.conv2.weight": (256, 256, 3, 3),
        "layer4.2.bn3.running_var": (2048,),
    },
    "hrnet_w64": {
        "conv2.weight": (64, 64, 3, 3),
        "layer1.3.conv3.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (64, 256, 3, 3),
        "transition1.1.0.0.weight": (128, 256, 3, 3),
        "transition3.3.0.0.weight": (512, 256, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (64, 128, 1, 1),
        "stage3.3.branches.2.3.conv2.weight": (256, 256, 3, 3),
        "stage4.2.fuse_layers.3.0.0.0.weight": (64, 64, 3, 3),
        "stage4.2.fuse_layers.3.0.2.0.weight": (512, 64, 3, 3),
        "stage4.2.fuse_layers.3.0.2.1.running_var": (512,),
        "incre_modules.0.0.downsample.0.weight": (128, 64, 1, 1),
        "incre_modules.3.0.conv3.weight": (1024, 256, 1, 1),
        "downsamp_modules.2.0.weight": (1024, 512, 3, 3),
        "downsamp_modules.2.0.bias": (1024,),
        "final_layer.0.weight": (2048, 1024, 1, 1),
        "final_layer.0.bias": (2048,),
        "final_layer.1.running_mean": (2048,),
    },
    "vit_h": {
        "patch_embed.proj.weight": (1280, 3, 16, 16),
        "patch_embed.proj.bias": (1280,),
        "pos_embed": (1, 193, 1280),
        "blocks.0.norm1.weight": (1280,),
        "blocks.0.attn.qkv.weight": (3840, 1280),
        "blocks.0.attn.qkv.bias": (3840,),
        "blocks.0.attn.proj.weight": (1280, 1280),
        "blocks.31.norm2.bias": (1280,),
        "blocks.31.mlp.fc1.weight": (5120, 1280),
        "blocks.31.mlp.fc2.weight": (1280, 5120),
        "last_norm.weight": (1280,),
    },
    "efficientnet_b0": {
        "_conv_stem.weight": (32, 3, 3, 3),
        "_bn0.running_var": (32,),
        "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
        "_blocks.0._se_reduce.weight": (8, 32, 1, 1),
        "_blocks.0._project_conv.weight": (16, 32, 1, 1),
        "_blocks.1._expand_conv.weight": (96, 16, 1, 1),
        "_blocks.15._se_reduce.weight": (48, 1152, 1, 1),
        "_blocks.15._se_expand.bias": (1152,),
        "_blocks.15._bn2.weight": (320,),
        "_conv_head.weight": (1280, 320, 1, 1),
        "_bn1.bias": (1280,),
    },
}
ABSENT_KEYS = {
    "resnet50": ["fc.weight", "layer1.1.downsample.0.weight"],
    "hrnet_w64": ["classifier.weight", "transition2.0.0.weight", "stage4.3.branches.0.0.conv1.weight"],
    "vit_h": ["cls_token", "blocks.32.norm1.weight", "norm.weight"],
    "efficientnet_b0": ["_blocks.0._expand_conv.weight", "_blocks.16._bn0.weight", "_fc.weight"],
}


CLASSIFIER = {"resnet50": ("fc.weight", 2048), "hrnet_w64": ("classifier.weight", 2048),
              "efficientnet_b0": ("_fc.weight", 1280)}


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_key_layout(name):
    sd = _meta(name).state_dict()
    for k, shape in OFFICIAL_KEYS[name].items():
        assert k in sd, f"{name}: official key {k} missing"
        assert tuple(sd[k].shape) == shape, f"{name}: {k} {tuple(sd[k].shape)} != {shape}"
    for k in ABSENT_KEYS[name]:
        assert k not in sd, f"{name}: {k} should not exist"
    if name in CLASSIFIER:  # the optional ImageNet classifier has the official key and shape
        key, c = CLASSIFIER[name]
        assert tuple(_meta(name, with_classifier=True).state_dict()[key].shape) == (1000, c)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name,classifier", [("resnet18", "fc"), ("efficientnet_b0", "_fc"),
                                             ("hrnet_tiny", "classifier"), ("vit_tiny", None)])
def test_official_checkpoint_loads_strictly(tmp_path, name, classifier):
    """An ImageNet-style checkpoint (official layout incl. the classifier) loads strictly into
    the classifier-less backbone and reproduces its weights; also via build_backbone(pretrained)."""
    torch.manual_seed(1)
    src = build_backbone(name, with_classifier=True) if classifier else build_backbone(name)
    sd = src.state_dict()
    if classifier:
        assert f"{classifier}.weight" in sd
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    torch.manual_seed(2)
    dst = build_backbone(name)
    info = load_pretrained(dst, path)
    if classifier:
        assert set(info["ignored"]) == {f"{classifier}.weight", f"{classifier}.bias"}
    src_sd = {k: v for k, v in sd.items() if not (classifier and k.startswith(classifier + "."))}
    assert all(torch.equal(src_sd[k], v) for k, v in dst.state_dict().items())
    assert _same_weights(build_backbone(name, pretrained=path), dst)
    # and into a model that has the classifier: everything is loaded
    if classifier:
        full = build_backbone(name, with_classifier=True)
        assert load_pretrained(full, path)["ignored"] == []
        assert _same_weights(full, src)


def test_wrapped_and_prefixed_checkpoints(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("vit_tiny")
    sd = src.state_dict()
    variants = {
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "module": {f"module.{k}": v for k, v in sd.items()},
        "lightning_module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        # ViTPose / HMR 2.0: full model with 'backbone.' + head keys
        "vitpose": {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                                   "keypoint_head.final_layer.weight": torch.zeros(17, 64, 1, 1),
                                   "smpl_head.decpose.bias": torch.zeros(138)}},
    }
    for tag, obj in variants.items():
        path = tmp_path / f"{tag}.pth"
        torch.save(obj, path)
        torch.manual_seed(5)
        dst = build_backbone("vit_tiny")
        info = load_pretrained(dst, path)
        assert _same_weights(dst, src), tag
        if tag == "vitpose":
            assert sorted(info["ignored"]) == ["keypoint_head.final_layer.weight", "smpl_head.decpose.bias"]


def test_fastmetro_sequential_resnet_checkpoint(tmp_path):
    """METRO/FastMETRO wrap torchvision's ResNet as nn.Sequential(*children()[:-2]) under
    'backbone.': keys '0.weight' (conv1), '1.*' (bn1), '4.*'..'7.*' (layer1..4)."""
    torch.manual_seed(0)
    src = build_backbone("resnet_tiny")
    seq = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    ckpt = {}
    for k, v in src.state_dict().items():
        head, rest = k.split(".", 1)
        ckpt[f"backbone.{seq[head]}.{rest}"] = v
    ckpt["conv_1x1.weight"] = torch.zeros(512, 128, 1, 1)       # FastMETRO's own layers
    ckpt["transformer_1.encoder.norm.weight"] = torch.zeros(512)
    assert "backbone.4.0.conv1.weight" in ckpt
    torch.save(ckpt, tmp_path / "fastmetro.bin")
    dst = build_backbone("resnet_tiny")
    info = load_pretrained(dst, tmp_path / "fastmetro.bin")
    assert _same_weights(dst, src)
    assert sorted(info["ignored"]) == ["conv_1x1.weight", "transformer_1.encoder.norm.weight"]


def test_load_errors_are_clear(tmp_path):
    m = build_backbone("resnet_tiny")
    sd = m.state_dict()

    bad = dict(sd)
    del bad["layer2.0.conv1.weight"]
    bad["layer9.extra.weight"] = torch.zeros(3)
    bad["conv1.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as e:
        load_pretrained(m, path)
    msg = str(e.value)
    assert "bad.pth" in msg and "resnet_tiny" in msg
    assert "missing keys (1)" in msg and "layer2.0.conv1.weight" in msg
    assert "unexpected keys (1)" in msg and "layer9.extra.weight" in msg
    assert "shape mismatches (1)" in msg and "conv1.weight: checkpoint (16, 3, 3, 3) vs model (16, 3, 7, 7)" in msg

    # not a state dict: a list, a dict of non-tensors, a text file, a missing file
    for fname, obj in [("list.pth", [1, 2, 3]), ("cfg.pth", {"lr": 0.1, "epochs": 3})]:
        torch.save(obj, tmp_path / fname)
        with pytest.raises(ValueError, match=rf"{fname}.*(does not hold a state dict|is not a state dict)"):
            load_pretrained(m, tmp_path / fname)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt"):
        load_pretrained(m, tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        load_pretrained(m, tmp_path / "nope.pth")

    # checkpoints from PyTorch < 0.4.1 have no num_batches_tracked buffers: still loads strictly
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    load_pretrained(build_backbone("resnet_tiny"), tmp_path / "old.pth")


def test_vit_pos_embed_resize(tmp_path):
    """A square-grid checkpoint (e.g. 224x224 MAE, 14x14+1 slots) loads into the 16x12 model, and a
    model run at another input size resizes pos_embed on the fly."""
    src = build_backbone("vit_tiny", img_size=(224, 224))
    assert tuple(src.pos_embed.shape) == (1, 1 + 14 * 14, 64)
    torch.save(src.state_dict(), tmp_path / "mae.pth")
    dst = build_backbone("vit_tiny")
    load_pretrained(dst, tmp_path / "mae.pth")
    assert tuple(dst.pos_embed.shape) == (1, 1 + 16 * 12, 64)
    torch.testing.assert_close(dst.pos_embed[:, 0], src.pos_embed[:, 0])
    with torch.no_grad():
        out = dst(torch.randn(1, 3, 224, 224))
    assert tuple(out.shape) == (1, 64, 14, 14)


def test_vit_out_indices_and_padding():
    m = build_backbone("vit_tiny", out_indices=(1, 3)).eval()
    assert m.patch_embed.proj.padding == (2, 2)
    x = torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        out, feats = m.forward_with_features(x)
    assert len(feats) == 2 and m.feature_channels == [64, 64]
    # feats are raw block outputs (1-based layer numbers): recompute layer 1 by hand
    with torch.no_grad():
        tok, _ = m.patch_embed(x)
        tok = tok + m.pos_embed[:, 1:] + m.pos_embed[:, :1]
        l1 = m.blocks[0](tok).transpose(1, 2).reshape(1, 64, 16, 12)
    torch.testing.assert_close(feats[0], l1)
    with pytest.raises(ValueError, match="1-based"):
        build_backbone("vit_tiny", out_indices=(0, 4))


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    a = build_backbone("vit_tiny")
    b = build_backbone("vit_tiny", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 128, 96)  # small image: pos_embed is resized, which is also covered
    outs, grads = [], []
    for m in (a, b):
        m.train()
        out, feats = m.forward_with_features(x)
        (out.square().mean() + feats[0].mean()).backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    m = build_backbone("vit_tiny", drop_path_rate=0.5)
    x = torch.randn(4, 3, 256, 192)
    m.eval()
    with torch.no_grad():
        e1, e2 = m(x), m(x)
    torch.testing.assert_close(e1, e2)
    m.train()
    with torch.no_grad():
        t1, t2 = m(x), m(x)
    assert not torch.allclose(t1, t2)


def test_efficientnet_same_padding_matches_tf_rule():
    """'SAME' padding: output size ceil(in/stride) for odd and even sizes."""
    m = build_backbone("efficientnet_b0").eval()
    with torch.no_grad():
        for h, w in [(64, 64), (97, 65)]:
            feats = m.forward_features(torch.randn(1, 3, h, w))
            for f, s in zip(feats, m.feature_strides):
                assert f.shape[-2:] == (-(-h // s), -(-w // s))
