"""Image backbones for human mesh recovery, in plain PyTorch, in the official checkpoint layouts.

Papers:
- ResNet: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
  https://arxiv.org/abs/1512.03385
- HRNet: Wang et al., "Deep High-Resolution Representation Learning for Visual Recognition",
  TPAMI 2020. https://arxiv.org/abs/1908.07919
- Pose HRNet: Sun et al., "Deep High-Resolution Representation Learning for Human Pose
  Estimation", CVPR 2019. https://arxiv.org/abs/1902.09212
- HRFormer: Yuan et al., "HRFormer: High-Resolution Transformer for Dense Prediction", NeurIPS
  2021. https://arxiv.org/abs/2110.09408
- ViTPose: Xu et al., "ViTPose: Simple Vision Transformer Baselines for Human Pose Estimation",
  NeurIPS 2022. https://arxiv.org/abs/2204.12484 (the backbone HMR 2.0 uses, Goel et al. 2023)
- EfficientNet: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
  Networks", ICML 2019. https://arxiv.org/abs/1905.11946

What this file implements
- ResNet-18/50 with torchvision's module and state-dict key layout (conv1, bn1, layer1..4,
  `downsample.0/1`, optional `fc`). forward -> layer4 map (2048x7x7 for R50 at 224).
- HRNet-W32/W48/W64 in the HRNet-Image-Classification layout (conv1/bn1/conv2/bn2, layer1,
  transition1..3, stage2..4 of HighResolutionModules with `branches`/`fuse_layers`, then the
  classification head `incre_modules`, `downsamp_modules`, `final_layer`, optional
  `classifier`). forward -> the classification path's 2048x7x7 map at 224 (what
  METRO/FastMETRO feed their transformer); forward_features -> the 4 branch outputs (without
  running the head). `classification_head=False` does not build the head.
- Pose-estimation HRNet-W32/W48 (`hrnet_w32_pose`, `hrnet_w48_pose`) in the deep-high-resolution-
  net layout (same names; last stage-4 module fuses into the top branch only); MMPose checkpoints
  (`backbone.` prefix, `keypoint_head.` / `head.`) load too; the pose head is dropped and reported.
- HRFormer-S/-B (`hrformer_s`, `hrformer_b`) in the official HRFormer pose-code layout
  (`attn.attn.{q,k,v,out}_proj`, `relative_position_bias_table/index`, `mlp.{fc1,norm1,dw3x3,
  norm2,fc2,norm3}`); MMPose's layout (`qkv`, `proj`, `ffn`) is renamed exactly on load.
- ViT-B/L/H in the ViTPose / HMR 2.0 layout (`patch_embed.proj`, `pos_embed` with a class-token
  slot, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `last_norm`), 256x192
  input -> 16x12 tokens, with intermediate layer maps (`out_indices`, 1-based), drop path and
  optional gradient checkpointing.
- EfficientNet-B0 in the `efficientnet_pytorch` (lukemelas) layout (`_conv_stem`, `_bn0`,
  `_blocks.N.*`, `_conv_head`, `_bn1`, optional `_fc`) with TensorFlow "same" padding and swish.
  forward -> 1280x7x7 at 224.
- Tiny CPU configs for tests and the CPU quickstart: resnet_tiny, hrnet_tiny, hrnet_tiny_pose,
  hrformer_tiny, vit_tiny.
- `build_backbone(name, pretrained=None, **kw)` and `load_pretrained(model, path)` (weights-only
  torch.load; numpy arrays, not object arrays, allowed in metadata as mmengine writes them; numpy
  is imported lazily only for that).

Every backbone has `forward(x) -> (B, out_channels, H/s, W/s)` (s = 32 for CNNs, 16 for ViT),
`forward_features(x) -> list of (B, C_i, H_i, W_i)`, `forward_with_features(x) -> (out, feats)`
(one pass for both), and attributes `out_channels`, `feature_channels`, `feature_strides`.
For ResNet, ViT (when the last layer is in out_indices) and EfficientNet,
`forward_features(x)[-1]` equals `forward(x)`; HRNet's forward is its classification-head map,
computed from the 4 branch maps that forward_features returns.

Parameter counts (measured with `python backbones.py`; "published" in brackets):
- resnet50 without fc 23,508,032 (23.5M, FastMETRO's "R50"); with fc 25,557,032 (25.6M).
- hrnet_w64: the classification net INCLUDING the unused 1000-way `classifier` Linear(2048,
  1000) is 128,059,944 = 128.1M, which is the HRNet-W64-C figure in the HRNet-Image-
  Classification README and the "H64 128.1M" in FastMETRO's table: FastMETRO builds the
  backbone with `get_cls_net` whose module keeps `classifier` although its forward stops at
  `final_layer`. Without the classifier (what actually runs): 126,010,944. W32 with classifier
  41.2M, W48 77.5M (both as in the HRNet README). Without the classification head (only the 4
  maps used, DeFormer): W48 65,325,120 instead of 75,420,864 (the head is 10.1M).
- hrnet_w32_pose 28,535,552, hrnet_w48_pose 63,594,912 (+ the 17-joint 1x1 head: 28.5M / 63.6M
  in the deep-high-resolution-net README).
- hrformer_s 7,746,218 (paper 7.8M), hrformer_b 43,210,434 (paper 43.2M).
- vit_b 85.8M (ViT-B, "86M"), vit_l 303.3M, vit_h 630.9M ("632M" class; ViTPose-H).
- efficientnet_b0 without `_fc` 4,007,548 (4.0M); with `_fc` 5,288,548 (5.3M).

Departures from the papers / official code (and why)
- HRNet upsampling in fuse layers interpolates to the target branch's size instead of a fixed
  `nn.Upsample(scale_factor)`: identical for inputs divisible by 32, and it does not fail for
  other sizes. The parameter-free Upsample module is not stored, so keys are unchanged.
- HRNet transitions take the matching branch for existing branches and the lowest-resolution
  branch for new ones (the official code applies an existing-branch transition to the last
  branch; never exercised by the official configs, so results are identical).
- The HRNet `classifier` (and ResNet `fc`, EfficientNet `_fc`) is only built with
  `with_classifier=True`; `load_pretrained` drops those keys from ImageNet checkpoints when the
  model has no classifier. They are never used in forward.
- ViT attention uses `F.scaled_dot_product_attention` (same maths as the explicit softmax).
  `pos_embed` is bicubically resized at run time (and at load time) when the token grid
  differs from the one it was built for (HMR 2.0's `get_abs_pos` does the same); ViTPose would
  fail instead. ViTPose adds the class-token slot to every token (pos_embed[:,1:] +
  pos_embed[:,:1]); kept.
- ViT `out_indices` are 1-based layer numbers (layer k = output of block k). Intermediate maps
  are the raw block outputs; the map of the last layer (k = depth) has `last_norm` applied, as
  in ViTPose's forward, so `forward_features(x)[-1] == forward(x)` when depth is in out_indices.
- ViT defaults: qkv_bias=True, LayerNorm eps 1e-6, GELU (ViTPose configs); drop_path_rate
  defaults to ViTPose's training values (B 0.3, L 0.5, H 0.55; HMR 2.0 uses 0.55 for H). It
  only acts in train mode.
- EfficientNet pads "same" from the actual input size (efficientnet_pytorch's dynamic variant)
  rather than precomputing it for 224 (its static variant): identical at 224, valid at others.
  Swish is x * sigmoid(x) (the memory-efficient custom autograd version is a speed detail).
- Pose HRNet / HRFormer multi-scale maps: the pose nets' last stage-4 module fuses into the
  stride-4 branch only (that is what their checkpoints hold), so the 4 maps are that fused map
  plus the last module's UNFUSED branch outputs at strides 8/16/32 (all pose-trained weights;
  building fuse rows 1-3 would leave them untrained). Our reading: the papers use one map.
- HRFormer: the official POSE code builds the relative position bias table but never adds it
  (commented out); its classification and segmentation code, the paper and MMPose add it. Default
  `relative_position_bias=True`; False reproduces the official pose code (table kept as a buffer
  so its keys load and DDP sees no unused parameter). Fuse upsampling interpolates bilinearly
  straight to the target size (official: Upsample(2^k) then resize; identical when sizes
  divide). Window attention uses `F.scaled_dot_product_attention` (same maths).
- AggPose (DeFormer's other backbone row) is not implemented.
- Tiny configs are ours (no published counterpart); they exist for fast CPU tests.
"""
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p and scale
    the kept ones by 1/(1-p), so the expectation is unchanged. x: (B, ...)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ..., 1)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        return drop_path(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class _Backbone(nn.Module):
    """Common interface. Subclasses implement `forward_with_features`."""
    out_channels: int
    feature_channels: list
    feature_strides: list
    # state-dict key prefixes of ImageNet classifiers that load_pretrained may drop
    classifier_prefixes: tuple = ()

    def forward_with_features(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) ImageNet-normalised image -> final map (B, out_channels, H/s, W/s)."""
        return self.forward_with_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> list:
        """x: (B, 3, H, W) -> list of maps (B, feature_channels[i], H/feature_strides[i], ...)."""
        return self.forward_with_features(x)[1]


def _check_image(x: torch.Tensor, name: str):
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"backbones.py {name}: expected images (B, 3, H, W), got {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# ResNet (torchvision layout); the blocks are shared with HRNet (same key names there)
# ---------------------------------------------------------------------------------------------

def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        """x: (B, inplanes, H, W) -> (B, planes, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as torchvision and HRNet."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        """x: (B, inplanes, H, W) -> (B, 4*planes, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_layer(block, inplanes, planes, blocks, stride=1):
    """nn.Sequential of `blocks` blocks; the first one gets a 1x1 conv+BN `downsample` when the
    shape changes (keys `N.downsample.0/1`)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _init_conv_bn(module):
    """torchvision / HRNet init: Kaiming-normal (fan_out, relu) convs, BN weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(_Backbone):
    """ResNet with torchvision's keys. Strides of layer1..4: 4, 8, 16, 32."""
    classifier_prefixes = ("fc.",)

    def __init__(self, block=Bottleneck, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512),
                 stem_width=64, with_classifier=False, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = stem_width
        for i, (n, w) in enumerate(zip(layers, widths)):
            setattr(self, f"layer{i + 1}", _make_layer(block, cin, w, n, stride=1 if i == 0 else 2))
            cin = w * block.expansion
        self.feature_channels = [w * block.expansion for w in widths]
        self.feature_strides = [4, 8, 16, 32]
        self.out_channels = self.feature_channels[-1]
        if with_classifier:
            self.fc = nn.Linear(self.out_channels, num_classes)  # unused in forward
        _init_conv_bn(self)

    # METRO / FastMETRO keep torchvision's ResNet as nn.Sequential(*children()[:-2]), so their
    # checkpoints name conv1 '0', bn1 '1', layer1..4 '4'..'7' (under 'backbone.').
    _SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}

    def remap_keys(self, sd: dict) -> dict:
        """Rename nn.Sequential-index keys ('4.0.conv1.weight') to torchvision names."""
        if not any(k.split(".", 1)[0] in self._SEQUENTIAL_NAMES for k in sd):
            return sd
        out = {}
        for k, v in sd.items():
            head, _, rest = k.partition(".")
            out[f"{self._SEQUENTIAL_NAMES.get(head, head)}.{rest}" if rest else k] = v
        return out

    def forward_with_features(self, x):
        """x: (B, 3, H, W) ImageNet-normalised.
        Returns (out, feats): out (B, 4*widths[3], H/32, W/32) = layer4 (2048x7x7 for R50 at
        224); feats = [layer1 (B, C1, H/4, W/4), layer2 (H/8), layer3 (H/16), layer4 (H/32)]."""
        _check_image(x, "ResNet")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return x, feats


# ---------------------------------------------------------------------------------------------
# HRNet (HRNet-Image-Classification layout)
# ---------------------------------------------------------------------------------------------

class HighResolutionModule(nn.Module):
    """Parallel branches of residual blocks followed by all-to-all fusion.

    Keys: `branches.i.k.*` (block k of branch i), `fuse_layers.i.j.*` (branch j -> branch i):
    j > i: `.0` 1x1 conv, `.1` BN (then nearest upsampling, no parameters);
    j < i: (i-j) stride-2 3x3 conv steps `.k.0` conv, `.k.1` BN (ReLU after all but the last);
    the intermediate steps keep branch j's channels, the last one maps to branch i's.
    multi_scale_output=False (last module of the pose nets' stage 4): only row 0 is built; forward
    then returns the fused branch 0 followed by the UNFUSED outputs of branches 1.. (see HRNet).
    """

    def __init__(self, block, num_blocks, in_channels, channels, multi_scale_output=True):
        super().__init__()
        nb = len(channels)
        self.num_branches = nb
        self.branches = nn.ModuleList(
            _make_layer(block, in_channels[i], channels[i], num_blocks[i]) for i in range(nb))
        self.out_channels = [c * block.expansion for c in channels]
        c = self.out_channels
        self.fuse_layers = None
        if nb > 1:
            fuse = []
            for i in range(nb if multi_scale_output else 1):
                row = []
                for j in range(nb):
                    if j > i:
                        row.append(nn.Sequential(nn.Conv2d(c[j], c[i], 1, 1, 0, bias=False),
                                                 nn.BatchNorm2d(c[i])))
                    elif j == i:
                        row.append(None)
                    else:
                        steps = []
                        for k in range(i - j):
                            last = k == i - j - 1
                            cout = c[i] if last else c[j]
                            step = [nn.Conv2d(c[j], cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)]
                            if not last:
                                step.append(nn.ReLU(inplace=False))
                            steps.append(nn.Sequential(*step))
                        row.append(nn.Sequential(*steps))
                fuse.append(nn.ModuleList(row))
            self.fuse_layers = nn.ModuleList(fuse)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs):
        """xs: list of nb maps (B, C_i, H/2^i, W/2^i) -> list of the same shapes (fused)."""
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            y = None
            for j, x in enumerate(xs):
                if j == i:
                    t = x
                elif j > i:  # lower resolution -> 1x1 conv, then nearest upsampling to branch i
                    t = F.interpolate(row[j](x), size=size, mode="nearest")
                else:        # higher resolution -> strided 3x3 convs
                    t = row[j](x)
                y = t if y is None else y + t
            out.append(self.relu(y))
        return out + xs[len(out):]  # unfused branches where no fuse row was built


class HRNet(_Backbone):
    """HRNetV2 classification network. width C: branch channels C, 2C, 4C, 8C.

    forward: classification-head path (incre_modules -> downsamp_modules -> final_layer),
    (B, final_channels, H/32, W/32); without the head (`classification_head=False`) the stride-32
    branch map. forward_features: the 4 stage-4 branch outputs (never runs the head).

    multi_scale_output=False builds the last stage-4 module as the pose nets do (fuse row 0 only,
    deep-high-resolution-net `multi_scale_output=False`, MMPose `multiscale_output=False`), so their
    checkpoints load strictly; the 4 maps are then the fused stride-4 map (what the pose head
    reads) and the last module's unfused branch outputs at strides 8, 16, 32 (all pose-trained).
    """
    classifier_prefixes = ("classifier.",)
    # heads that load_pretrained drops (and reports) when the model does not build them: the
    # ImageNet classification head, and the pose heads of deep-high-resolution-net
    # (`final_layer` = Conv2d(C, joints, 1), no `.0.`) and MMPose (`keypoint_head.`, `head.`)
    head_prefixes = ("incre_modules.", "downsamp_modules.", "final_layer.", "keypoint_head.", "head.")

    def __init__(self, width=32, stem_channels=64, stage1_planes=64, stage1_blocks=4,
                 num_modules=(1, 4, 3), num_blocks=4, head_channels=(32, 64, 128, 256),
                 final_channels=2048, with_classifier=False, num_classes=1000,
                 classification_head=True, multi_scale_output=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.conv2 = nn.Conv2d(stem_channels, stem_channels, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_layer(Bottleneck, stem_channels, stage1_planes, stage1_blocks)
        pre = [stage1_planes * Bottleneck.expansion]
        for s in range(3):  # stages 2, 3, 4 with 2, 3, 4 branches
            cur = [width * 2 ** i for i in range(s + 2)]
            setattr(self, f"transition{s + 1}", self._make_transition(pre, cur))
            modules = []
            for m in range(num_modules[s]):
                multi = multi_scale_output or s < 2 or m < num_modules[s] - 1
                modules.append(HighResolutionModule(BasicBlock, [num_blocks] * len(cur), cur, cur,
                                                    multi_scale_output=multi))
            setattr(self, f"stage{s + 2}", nn.Sequential(*modules))
            pre = cur
        self.feature_channels = list(pre)
        self.feature_strides = [4, 8, 16, 32]
        self.out_channels = pre[-1]
        if with_classifier and not classification_head:
            raise ValueError("backbones.py HRNet: with_classifier=True needs classification_head=True")
        self.classification_head = classification_head
        if classification_head:
            # Bottleneck per branch to 32/64/128/256 *4 channels, then stride-2 3x3 convs (with
            # bias) summing down to the lowest resolution, then 1x1 to 2048.
            self.incre_modules = nn.ModuleList(
                _make_layer(Bottleneck, pre[i], head_channels[i], 1) for i in range(4))
            hc = [h * Bottleneck.expansion for h in head_channels]
            self.downsamp_modules = nn.ModuleList(
                nn.Sequential(nn.Conv2d(hc[i], hc[i + 1], 3, 2, 1), nn.BatchNorm2d(hc[i + 1]),
                              nn.ReLU(inplace=True)) for i in range(3))
            self.final_layer = nn.Sequential(nn.Conv2d(hc[3], final_channels, 1, 1, 0),
                                             nn.BatchNorm2d(final_channels), nn.ReLU(inplace=True))
            self.out_channels = final_channels
        if with_classifier:
            self.classifier = nn.Linear(final_channels, num_classes)  # unused in forward
        _init_conv_bn(self)

    @staticmethod
    def _make_transition(pre, cur):
        """Entry i: None if branch i exists with the right width; a 3x3 conv+BN+ReLU if the width
        changes; for a new branch `.0.{0,1}` = stride-2 3x3 conv+BN(+ReLU) from the lowest branch."""
        layers = []
        for i, c in enumerate(cur):
            if i < len(pre):
                layers.append(None if pre[i] == c else nn.Sequential(
                    nn.Conv2d(pre[i], c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
            else:
                steps = []
                for k in range(i + 1 - len(pre)):
                    cout = c if k == i - len(pre) else pre[-1]
                    steps.append(nn.Sequential(nn.Conv2d(pre[-1], cout, 3, 2, 1, bias=False),
                                               nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
                layers.append(nn.Sequential(*steps))
        return nn.ModuleList(layers)

    @staticmethod
    def _apply_transition(transition, ys):
        out = []
        for i, t in enumerate(transition):
            src = ys[i] if i < len(ys) else ys[-1]
            out.append(src if t is None else t(src))
        return out

    def forward_features(self, x):
        """x: (B, 3, H, W) ImageNet-normalised -> the 4 stage-4 branch maps
        (B, C*2^i, H/4/2^i, W/4/2^i), i = 0..3 (strides 4, 8, 16, 32); the head is not run."""
        _check_image(x, "HRNet")
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = self.relu(self.bn2(self.conv2(x)))  # (B, 64, H/4, W/4)
        ys = [self.layer1(x)]                   # [(B, 256, H/4, W/4)]
        for s in range(3):
            ys = self._apply_transition(getattr(self, f"transition{s + 1}"), ys)
            ys = getattr(self, f"stage{s + 2}")(ys)
        return ys

    def forward_with_features(self, x):
        """x: (B, 3, H, W) ImageNet-normalised (224x224 in METRO/FastMETRO).
        Returns (out, feats): out (B, final_channels, H/32, W/32) (2048x7x7 at 224), or without
        the classification head the stride-32 map feats[-1]; feats = forward_features(x)."""
        feats = ys = self.forward_features(x)
        if not self.classification_head:
            return feats[-1], feats
        y = self.incre_modules[0](ys[0])        # (B, 128, H/4, W/4)
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](ys[i + 1]) + down(y)  # (B, 128*2^(i+1), H/2^(i+3), ..)
        out = self.final_layer(y)               # (B, 1024, H/32, W/32) -> (B, 2048, H/32, W/32)
        return out, feats


# ---------------------------------------------------------------------------------------------
# HRFormer (official HRFormer pose code layout; MMPose's layout is renamed on load)
# ---------------------------------------------------------------------------------------------

class WindowMultiheadAttention(nn.Module):
    """Multi-head self-attention inside one window of ws x ws tokens, with a relative position
    bias table as Swin. Keys as the official HRFormer (`q_proj`, `k_proj`, `v_proj`, `out_proj`,
    `relative_position_bias_table` ((2ws-1)^2, heads), buffer `relative_position_index` (ws^2, ws^2)).
    relative_position_bias=False reproduces the official POSE code, which builds the table but never
    adds it (it is then a buffer, so it gets no gradient and DDP needs no find_unused_parameters)."""

    def __init__(self, dim, num_heads, window_size=7, relative_position_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"backbones.py HRFormer: width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.window_size = num_heads, window_size
        self.relative_position_bias = relative_position_bias
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        table = torch.zeros((2 * window_size - 1) ** 2, num_heads)
        nn.init.trunc_normal_(table, std=0.02)
        if relative_position_bias:
            self.relative_position_bias_table = nn.Parameter(table)
        else:
            self.register_buffer("relative_position_bias_table", table)
        self.register_buffer("relative_position_index", self.position_index(window_size))

    @staticmethod
    def position_index(ws):
        """(ws^2, ws^2) long: (dy + ws - 1) * (2 ws - 1) + (dx + ws - 1) for token pairs (i, j) of a
        window in row-major order, (dy, dx) = position of i minus position of j."""
        yx = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, ws^2)
        d = yx[:, :, None] - yx[:, None, :] + ws - 1                                # (2, ws^2, ws^2)
        return d[0] * (2 * ws - 1) + d[1]

    def forward(self, x):
        """x: (Bw, N, C) tokens of Bw windows, N = ws^2 -> (Bw, N, C)."""
        Bw, N, C = x.shape
        h = self.num_heads
        q, k, v = (p(x).view(Bw, N, h, C // h).transpose(1, 2)             # (Bw, N, C) -> (Bw, h, N, C/h)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        bias = None
        if self.relative_position_bias:
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, h)
            bias = bias.view(N, N, h).permute(2, 0, 1)[None].to(q.dtype)    # (N*N, h) -> (1, h, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)      # (Bw, h, N, C/h)
        return self.out_proj(out.transpose(1, 2).reshape(Bw, N, C))        # (Bw, h, N, C/h) -> (Bw, N, C)


class LocalWindowSelfAttention(nn.Module):
    """Non-overlapping ws x ws windows (the map is zero-padded symmetrically to a multiple of ws,
    padded tokens take part unmasked, as the official code); key `attn` = WindowMultiheadAttention."""

    def __init__(self, dim, num_heads, window_size=7, relative_position_bias=True):
        super().__init__()
        self.window_size = window_size
        self.attn = WindowMultiheadAttention(dim, num_heads, window_size, relative_position_bias)

    def forward(self, x, H, W):
        """x: (B, H*W, C) -> (B, H*W, C)."""
        B, N, C = x.shape
        ws = self.window_size
        ph, pw = -H % ws, -W % ws
        x = F.pad(x.view(B, H, W, C), (0, 0, pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # (B, Hp, Wp, C)
        Hp, Wp = H + ph, W + pw
        x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, nh, nw, ws, ws, C)
        out = self.attn(x.reshape(-1, ws * ws, C))                                 # (B*nh*nw, ws*ws, C)
        out = out.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        return out[:, ph // 2:ph // 2 + H, pw // 2:pw // 2 + W].reshape(B, N, C)


class ConvFFN(nn.Module):
    """HRFormer's FFN with a 3x3 depthwise conv (official `MlpDWBN`, MMPose `CrossFFN`):
    1x1 conv -> BN -> GELU -> depthwise 3x3 -> BN -> GELU -> 1x1 conv -> BN -> GELU."""

    def __init__(self, dim, hidden, out_dim):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.dw3x3 = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.norm2 = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, out_dim, 1)
        self.norm3 = nn.BatchNorm2d(out_dim)
        self.act = nn.GELU()

    def forward(self, x, H, W):
        """x: (B, H*W, C) -> (B, H*W, out_dim)."""
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)                           # (B, N, C) -> (B, C, H, W)
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.norm2(self.dw3x3(x)))
        x = self.act(self.norm3(self.fc2(x)))
        return x.flatten(2).transpose(1, 2)                                  # (B, C', H, W) -> (B, N, C')


class HRFormerBlock(nn.Module):
    """x + DropPath(LSA(LN(x))), then x + DropPath(FFN(LN(x))); LayerNorm eps 1e-6. Keys `norm1`,
    `attn.attn.*`, `norm2`, `mlp.*` (official; MMPose: `ffn.*`, fused `qkv` / `proj`)."""

    def __init__(self, dim, num_heads, window_size=7, mlp_ratio=4.0, drop_path=0.0,
                 relative_position_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LocalWindowSelfAttention(dim, num_heads, window_size, relative_position_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)                                     # (B, C, H, W) -> (B, H*W, C)
        t = t + self.drop_path(self.attn(self.norm1(t), H, W))
        t = t + self.drop_path(self.mlp(self.norm2(t), H, W))
        return t.transpose(1, 2).reshape(B, C, H, W)                         # (B, H*W, C) -> (B, C, H, W)


class HRFormerModule(nn.Module):
    """Parallel branches of HRFormer blocks, then all-to-all fusion as HRNet's module except:
    j > i: 1x1 conv + BN (`.0`, `.1`), then BILINEAR upsampling (align_corners=False);
    j < i: per stride-2 step a depthwise 3x3 conv + BN + 1x1 conv + BN (`.k.0`..`.k.3`), ReLU after
    all but the last step. multi_scale_output=False: fuse row 0 only; forward then returns the
    fused branch 0 followed by the unfused branches 1.. (as HighResolutionModule)."""

    def __init__(self, channels, num_blocks, num_heads, window_size, mlp_ratio, drop_paths,
                 relative_position_bias=True, multi_scale_output=True):
        super().__init__()
        nb = len(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(*(HRFormerBlock(channels[i], num_heads[i], window_size, mlp_ratio, drop_paths[k],
                                          relative_position_bias) for k in range(num_blocks)))
            for i in range(nb))
        c = channels
        self.fuse_layers = None
        if nb > 1:
            fuse = []
            for i in range(nb if multi_scale_output else 1):
                row = []
                for j in range(nb):
                    if j > i:
                        row.append(nn.Sequential(nn.Conv2d(c[j], c[i], 1, bias=False), nn.BatchNorm2d(c[i])))
                    elif j == i:
                        row.append(None)
                    else:
                        steps = []
                        for k in range(i - j):
                            last = k == i - j - 1
                            cout = c[i] if last else c[j]
                            step = [nn.Conv2d(c[j], c[j], 3, 2, 1, groups=c[j], bias=False), nn.BatchNorm2d(c[j]),
                                    nn.Conv2d(c[j], cout, 1, bias=False), nn.BatchNorm2d(cout)]
                            if not last:
                                step.append(nn.ReLU(inplace=False))
                            steps.append(nn.Sequential(*step))
                        row.append(nn.Sequential(*steps))
                fuse.append(nn.ModuleList(row))
            self.fuse_layers = nn.ModuleList(fuse)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs):
        """xs: list of maps (B, C_i, H_i, W_i), H_i = H_0 / 2^i -> list of the same shapes."""
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            y = None
            for j, x in enumerate(xs):
                if j == i:
                    t = x
                elif j > i:  # official: Upsample(2^(j-i), bilinear) then resize to the exact size
                    t = F.interpolate(row[j](x), size=size, mode="bilinear", align_corners=False)
                else:
                    t = row[j](x)
                y = t if y is None else y + t
            out.append(self.relu(y))
        return out + xs[len(out):]


class HRFormer(_Backbone):
    """HRFormer (Yuan et al., NeurIPS 2021): HRNet's multi-resolution design with local-window
    self-attention blocks. Stem (conv1/bn1/conv2/bn2, stride 4), `layer1` = 2 Bottlenecks
    (64 -> 256), `transition1..3` as HRNet, `stage2..4` of HRFormerModules. Returns the 4 branch
    maps (strides 4..32); forward = the stride-32 map. multi_scale_output=False (the official and
    MMPose pose configs) builds the last stage-4 module with fuse row 0 only (see HRNet)."""
    head_prefixes = ("keypoint_head.", "head.")

    def __init__(self, channels=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), num_modules=(1, 4, 2),
                 num_blocks=2, mlp_ratio=4.0, window_size=7, stem_channels=64, stage1_planes=64,
                 stage1_blocks=2, drop_path_rate=0.1, relative_position_bias=True,
                 multi_scale_output=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.conv2 = nn.Conv2d(stem_channels, stem_channels, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_layer(Bottleneck, stem_channels, stage1_planes, stage1_blocks)
        # stochastic depth: linear 0 -> rate over all blocks of stages 2-4 (counted per branch)
        dpr = torch.linspace(0, drop_path_rate, num_blocks * sum(num_modules), device="cpu").tolist()
        pre, n = [stage1_planes * Bottleneck.expansion], 0
        for s in range(3):
            cur = list(channels[:s + 2])
            setattr(self, f"transition{s + 1}", HRNet._make_transition(pre, cur))
            modules = []
            for m in range(num_modules[s]):
                multi = multi_scale_output or s < 2 or m < num_modules[s] - 1
                modules.append(HRFormerModule(cur, num_blocks, num_heads[:s + 2], window_size, mlp_ratio,
                                              dpr[n:n + num_blocks], relative_position_bias, multi))
                n += num_blocks
            setattr(self, f"stage{s + 2}", nn.Sequential(*modules))
            pre = cur
        self.feature_channels = list(channels)
        self.feature_strides = [4, 8, 16, 32]
        self.out_channels = channels[-1]
        # official init_weights (no checkpoint): convs N(0, 0.001), norms weight 1 bias 0
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.normal_(mod.weight, std=0.001)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward_with_features(self, x):
        """x: (B, 3, H, W) ImageNet-normalised (256x192 or 384x288 in the pose configs).
        Returns (out, feats): feats = 4 maps (B, channels[i], H/4/2^i, W/4/2^i); out = feats[-1]."""
        _check_image(x, "HRFormer")
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = self.relu(self.bn2(self.conv2(x)))  # (B, 64, H/4, W/4)
        ys = [self.layer1(x)]                   # [(B, 256, H/4, W/4)]
        for s in range(3):
            ys = HRNet._apply_transition(getattr(self, f"transition{s + 1}"), ys)
            ys = getattr(self, f"stage{s + 2}")(ys)
        return ys[-1], ys

    # MMPose's HRFormer names the attention `qkv` (q, k, v stacked) / `proj` and the FFN `ffn`.
    def remap_keys(self, sd: dict) -> dict:
        """Rename an MMPose-layout HRFormer state dict to the official layout (exact: q/k/v are the
        three row blocks of `qkv`); an official-layout dict is returned unchanged."""
        if not any(".attn.attn.qkv." in k for k in sd):
            return sd
        out = {}
        for k, v in sd.items():
            k2 = k.replace(".ffn.", ".mlp.").replace(".attn.attn.proj.", ".attn.attn.out_proj.")
            if ".attn.attn.qkv." in k2:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[k2.replace(".qkv.", f".{name}.")] = part.clone()
            else:
                out[k2] = v
        return out

    def adapt_state_dict(self, sd: dict) -> dict:
        """Check the stored relative-position indices (deterministic buffers) against ours."""
        for k, v in self.state_dict().items():
            if k.endswith("relative_position_index") and k in sd and not torch.equal(sd[k].long(), v):
                raise ValueError(f"backbones.py HRFormer: checkpoint {k} differs from the window "
                                 f"index this model computes (window size {self.stage2[0].branches[0][0].attn.window_size})")
        return sd


# ---------------------------------------------------------------------------------------------
# ViT (ViTPose / HMR 2.0 layout)
# ---------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """16x16 stride-16 conv with padding 2 (ViTPose: 4 + 2*(ratio//2 - 1), ratio 1).
    256x192 -> 16x12 tokens (floor((256 + 4 - 16)/16) + 1 = 16, floor(180/16) + 1 = 12)."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=768, padding=2):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, padding)

    def forward(self, x):
        """x: (B, 3, H, W) -> tokens (B, Hp*Wp, C), (Hp, Wp)."""
        x = self.proj(x)                                   # (B, C, Hp, Wp)
        hp, wp = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (hp, wp)      # (B, C, Hp*Wp) -> (B, Hp*Wp, C)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        """x: (B, N, C) -> (B, N, C); softmax(q k^T / sqrt(C/heads)) v per head."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)               # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, c)             # (B, h, N, d) -> (B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        """x: (B, N, C) -> (B, N, C)."""
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)), with drop path."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        """x: (B, N, C) -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _resize_pos_embed(grid_pos: torch.Tensor, old_hw, new_hw) -> torch.Tensor:
    """grid_pos: (1, Ho*Wo, C) -> (1, Hn*Wn, C), bicubic over the token grid."""
    if tuple(old_hw) == tuple(new_hw):
        return grid_pos
    c = grid_pos.shape[-1]
    g = grid_pos.reshape(1, old_hw[0], old_hw[1], c).permute(0, 3, 1, 2)  # (1, C, Ho, Wo)
    g = F.interpolate(g, size=tuple(new_hw), mode="bicubic", align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], c)     # (1, Hn*Wn, C)


class ViT(_Backbone):
    """Plain ViT as in ViTPose / HMR 2.0 (no class token; pos_embed keeps a class slot).

    out_indices: 1-based layer numbers whose outputs forward_features returns as maps.
    """

    def __init__(self, img_size=(256, 192), patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, out_indices=None, grad_checkpointing=False, patch_padding=2):
        super().__init__()
        self.patch_size = patch_size
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)  # ViTPose's num_patches
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim, patch_padding)
        # (1, 1 + Hp*Wp, C): slot 0 is the (unused) class token's, added to every token.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear decay rule
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth))
        self.last_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.depth = depth
        out_indices = tuple(out_indices) if out_indices else (depth,)
        for k in out_indices:
            if not 1 <= k <= depth:
                raise ValueError(f"backbones.py ViT: out_indices are 1-based layer numbers in "
                                 f"[1, {depth}], got {out_indices}")
        self.out_indices = tuple(sorted(out_indices))
        self.grad_checkpointing = grad_checkpointing
        self.out_channels = embed_dim
        self.feature_channels = [embed_dim] * len(self.out_indices)
        self.feature_strides = [patch_size] * len(self.out_indices)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def adapt_state_dict(self, sd: dict) -> dict:
        """Resize a checkpoint's pos_embed to this model's grid (e.g. a 224x224 MAE checkpoint
        with (1, 1+14*14, C) into a 256x192 model with (1, 1+16*12, C))."""
        pe = sd.get("pos_embed")
        if pe is None or pe.shape == self.pos_embed.shape or pe.ndim != 3 \
                or pe.shape[-1] != self.pos_embed.shape[-1]:
            return sd
        n = pe.shape[1] - 1
        side = int(round(math.sqrt(n)))
        if side * side != n:  # not a square grid: leave it, the strict check reports it
            return sd
        sd = dict(sd)
        sd["pos_embed"] = torch.cat([pe[:, :1], _resize_pos_embed(pe[:, 1:], (side, side), self.grid)], 1)
        return sd

    def forward_with_features(self, x):
        """x: (B, 3, H, W) ImageNet-normalised (256x192 for ViTPose / HMR 2.0).
        Returns (out, feats): out (B, C, H/16, W/16) = last layer after last_norm (C=1280, 16x12
        for ViT-H); feats = one map (B, C, H/16, W/16) per layer in out_indices (1-based; raw
        block outputs, except the last layer which has last_norm)."""
        _check_image(x, "ViT")
        b = x.shape[0]
        x, (hp, wp) = self.patch_embed(x)                                  # (B, N, C), N = Hp*Wp
        pos = _resize_pos_embed(self.pos_embed[:, 1:], self.grid, (hp, wp))
        x = x + pos + self.pos_embed[:, :1]                                # ViTPose: + cls slot
        feats = []
        want = set(self.out_indices)
        for k, blk in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if k == self.depth:
                x = self.last_norm(x)
            if k in want:
                feats.append(x.transpose(1, 2).reshape(b, -1, hp, wp))     # (B, N, C) -> (B, C, Hp, Wp)
        out = x.transpose(1, 2).reshape(b, -1, hp, wp)                     # (B, N, C) -> (B, C, Hp, Wp)
        return out, feats


# ---------------------------------------------------------------------------------------------
# EfficientNet-B0 (efficientnet_pytorch / lukemelas layout)
# ---------------------------------------------------------------------------------------------

class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size:
    pad = max((ceil(i/s) - 1)*s + (k-1)*d + 1 - i, 0), split floor before / ceil after."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for i, k, s, d in zip((iw, ih), self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            p = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads += [p // 2, p - p // 2]
        if any(pads):
            x = F.pad(x, pads)  # (left, right, top, bottom)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _swish(x):
    return x * torch.sigmoid(x)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand + BN + swish] -> depthwise kxk + BN + swish -> SE ->
    1x1 project + BN (+ identity with drop connect when stride 1 and cin == cout)."""

    def __init__(self, cin, cout, kernel, stride, expand, se_ratio=0.25, bn_eps=1e-3, bn_mom=0.01):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=bn_eps, momentum=bn_mom)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=bn_eps, momentum=bn_mom)
        squeezed = max(1, int(cin * se_ratio))
        self._se_reduce = SameConv2d(mid, squeezed, 1)
        self._se_expand = SameConv2d(squeezed, mid, 1)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=bn_eps, momentum=bn_mom)
        self.skip = stride == 1 and cin == cout
        self.drop_connect = 0.0

    def forward(self, inputs):
        """inputs: (B, cin, H, W) -> (B, cout, H/stride, W/stride)."""
        x = inputs
        if self.expand:
            x = _swish(self._bn0(self._expand_conv(x)))                  # (B, mid, H, W)
        x = _swish(self._bn1(self._depthwise_conv(x)))                   # (B, mid, H/s, W/s)
        s = F.adaptive_avg_pool2d(x, 1)                                  # (B, mid, 1, 1)
        s = self._se_expand(_swish(self._se_reduce(s)))                  # (B, mid, 1, 1)
        x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))                             # (B, cout, H/s, W/s)
        if self.skip:
            x = drop_path(x, self.drop_connect, self.training) + inputs
        return x


# EfficientNet-B0 stages: (repeats, kernel, stride, expand, cin, cout), se_ratio 0.25 everywhere
# (efficientnet_pytorch's 'r1_k3_s11_e1_i32_o16_se0.25', ... strings); 16 blocks in all.
_EFFNET_B0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                     (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                     (1, 3, 1, 6, 192, 320)]


class EfficientNet(_Backbone):
    """EfficientNet-B0 (width 1.0, depth 1.0). BN eps 1e-3, momentum 0.01 (TF's 0.99)."""
    classifier_prefixes = ("_fc.",)

    def __init__(self, stages=_EFFNET_B0_STAGES, stem=32, head=1280, drop_connect_rate=0.2,
                 with_classifier=False, num_classes=1000):
        super().__init__()
        bn = dict(eps=1e-3, momentum=0.01)
        self._conv_stem = SameConv2d(3, stem, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(stem, **bn)
        blocks = []
        for reps, k, s, e, cin, cout in stages:
            for r in range(reps):
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        for i, blk in enumerate(self._blocks):  # official: rate * idx / num_blocks
            blk.drop_connect = drop_connect_rate * i / len(self._blocks)
        self._conv_head = SameConv2d(stages[-1][5], head, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head, **bn)
        if with_classifier:
            self._fc = nn.Linear(head, num_classes)  # unused in forward
        # endpoints: last block before each spatial reduction (strides 4, 8, 16) + the head map
        widths, stride, self._endpoints = [], 2, []
        for i, blk in enumerate(self._blocks):
            nxt = self._blocks[i + 1] if i + 1 < len(self._blocks) else None
            if nxt is not None and nxt._depthwise_conv.stride[0] == 2:
                stride *= 2
                if stride >= 8:  # block i ends the stride-(stride/2) resolution
                    self._endpoints.append(i)
                    widths.append(blk._bn2.num_features)
        self.feature_channels = widths + [head]
        self.feature_strides = [4, 8, 16, 32]
        self.out_channels = head

    def forward_with_features(self, x):
        """x: (B, 3, H, W) ImageNet-normalised.
        Returns (out, feats): out (B, 1280, H/32, W/32) (1280x7x7 at 224) = swish(bn1(conv_head));
        feats = [(B, 24, H/4, W/4), (B, 40, H/8, W/8), (B, 112, H/16, W/16), out]."""
        _check_image(x, "EfficientNet")
        x = _swish(self._bn0(self._conv_stem(x)))   # (B, 32, H/2, W/2)
        feats = []
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i in self._endpoints:
                feats.append(x)
        x = _swish(self._bn1(self._conv_head(x)))   # (B, 320, H/32, W/32) -> (B, 1280, H/32, W/32)
        feats.append(x)
        return x, feats


# ---------------------------------------------------------------------------------------------
# Registry, builder and checkpoint loading
# ---------------------------------------------------------------------------------------------

_HRNET_TINY = dict(width=8, stem_channels=16, stage1_planes=8, stage1_blocks=1, num_modules=(1, 1, 1),
                   num_blocks=1, head_channels=(8, 16, 32, 64), final_channels=256)

BACKBONES = {
    "resnet18": (ResNet, dict(block=BasicBlock, layers=(2, 2, 2, 2))),
    "resnet50": (ResNet, dict(block=Bottleneck, layers=(3, 4, 6, 3))),
    "hrnet_w32": (HRNet, dict(width=32)),
    "hrnet_w48": (HRNet, dict(width=48)),
    "hrnet_w64": (HRNet, dict(width=64)),
    # pose-estimation HRNets (deep-high-resolution-net / MMPose COCO, MPII): no classification head
    "hrnet_w32_pose": (HRNet, dict(width=32, classification_head=False, multi_scale_output=False)),
    "hrnet_w48_pose": (HRNet, dict(width=48, classification_head=False, multi_scale_output=False)),
    # HRFormer-S / -B as the official (and MMPose) COCO pose configs
    "hrformer_s": (HRFormer, dict(channels=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), drop_path_rate=0.1)),
    "hrformer_b": (HRFormer, dict(channels=(78, 156, 312, 624), num_heads=(2, 4, 8, 16), drop_path_rate=0.2)),
    "vit_b": (ViT, dict(embed_dim=768, depth=12, num_heads=12, out_indices=(6, 12), drop_path_rate=0.3)),
    "vit_l": (ViT, dict(embed_dim=1024, depth=24, num_heads=16, out_indices=(12, 24), drop_path_rate=0.5)),
    "vit_h": (ViT, dict(embed_dim=1280, depth=32, num_heads=16, out_indices=(16, 32), drop_path_rate=0.55)),
    "efficientnet_b0": (EfficientNet, dict()),
    # tiny CPU configs (ours)
    "resnet_tiny": (ResNet, dict(block=BasicBlock, layers=(1, 1, 1, 1), widths=(16, 32, 64, 128),
                                 stem_width=16)),
    "hrnet_tiny": (HRNet, _HRNET_TINY),
    "hrnet_tiny_pose": (HRNet, dict(_HRNET_TINY, classification_head=False, multi_scale_output=False)),
    "hrformer_tiny": (HRFormer, dict(channels=(8, 16, 32, 64), num_heads=(1, 1, 2, 2), num_modules=(1, 1, 1),
                                     num_blocks=1, mlp_ratio=2.0, window_size=3, stem_channels=16,
                                     stage1_planes=8, stage1_blocks=1, drop_path_rate=0.0)),
    "vit_tiny": (ViT, dict(embed_dim=64, depth=4, num_heads=4, out_indices=(2, 4))),
}

# input size (H, W) each backbone is used at
INPUT_SIZE = {name: ((256, 192) if name.startswith(("vit", "hrformer")) or name.endswith("_pose")
                     else (224, 224)) for name in BACKBONES}


def build_backbone(name: str, pretrained=None, **kw) -> nn.Module:
    """Build a backbone by name (see BACKBONES); `kw` overrides the config (e.g.
    `with_classifier=True`, `out_indices=(16, 32)`, `grad_checkpointing=True`,
    `drop_path_rate=0.0`). `pretrained`: path of a checkpoint loaded with load_pretrained."""
    if name not in BACKBONES:
        raise KeyError(f"backbones.py: unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    cls, cfg = BACKBONES[name]
    model = cls(**{**cfg, **kw})
    model.name = name
    if pretrained:
        load_pretrained(model, pretrained)
    return model


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def _extract_state_dict(obj, path):
    """Unwrap {'state_dict': ...} / {'model': ...} (possibly nested) down to str -> Tensor."""
    for _ in range(4):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"backbones.py load_pretrained: {path} does not hold a state dict "
                         f"(got {type(obj).__name__}); expected a dict of tensors, possibly "
                         f"wrapped in one of {_WRAPPER_KEYS}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"backbones.py load_pretrained: {path} is not a state dict: entries "
                         f"{bad[:5]} are not str -> Tensor (keys found: {list(obj)[:8]})")
    return dict(obj)


def _match_prefixes(sd, model_keys, remap=lambda d: d):
    """Strip wrapper prefixes ('module.' from DataParallel, 'backbone.' from ViTPose / HMR 2.0 /
    FastMETRO checkpoints, ...) while that increases the overlap with the model's keys (after
    the model's own key renaming `remap`). When a prefix is stripped, keys without it (heads of
    the full model) are dropped and returned."""
    dropped = []
    sd = remap(sd)
    changed = True
    while changed:
        changed = False
        overlap = len(model_keys & sd.keys())
        for p in _STRIP_PREFIXES:
            sub = remap({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})
            if sub and len(model_keys & sub.keys()) > overlap:
                dropped += [k for k in sd if not k.startswith(p)]
                sd, changed = sub, True
                break
    return sd, dropped


def _numpy_array_globals():
    """The globals numpy arrays pickle to (not object arrays), for torch's weights-only loader:
    MMPose / mmengine checkpoints keep numpy arrays in their `meta` (dataset_meta). numpy is
    imported lazily (it is not needed otherwise); [] when it is absent."""
    try:
        import numpy as np
        import numpy.dtypes as dtypes
    except ImportError:
        return []
    core = np._core if hasattr(np, "_core") else np.core
    kinds = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype] + kinds


def load_pretrained(model: nn.Module, path, strict: bool = True, verbose: bool = True) -> dict:
    """Load an official checkpoint file into a backbone of this file.

    Accepts plain state dicts or ones wrapped in 'state_dict' / 'model' (Lightning, mmcv,
    DeiT-style; numpy arrays in their metadata are allowed, nothing else beyond weights_only), strips 'module.' / 'backbone.' prefixes (keeping only the backbone's part of a
    full ViTPose / HMR 2.0 / FastMETRO checkpoint), renames METRO/FastMETRO's
    nn.Sequential-indexed ResNet keys ('backbone.4.0.conv1.weight' -> 'layer1.0.conv1.weight'), drops ImageNet classifier weights
    ('fc.', 'classifier.', '_fc.') when the model has no classifier, resizes a ViT pos_embed to
    the model's token grid, then loads strictly. Raises ValueError naming the file and listing
    missing keys, unexpected keys and shape mismatches. Missing BatchNorm `num_batches_tracked`
    buffers (checkpoints from PyTorch < 0.4.1) are allowed.

    Pose-estimation HRNet / HRFormer checkpoints (deep-high-resolution-net, HRFormer, MMPose with
    `backbone.` + `keypoint_head.` / `head.`) load into the `*_pose` / `hrformer_*` backbones; their
    head keys are dropped. With verbose, a message lists every dropped key.

    Returns {'ignored': [dropped checkpoint keys], 'loaded': number of tensors loaded}.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # not a torch file, or holds non-tensor objects
        raise ValueError(f"backbones.py load_pretrained: cannot read {path} as a weights-only "
                         f"torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                         f"Save the state dict alone (torch.save(ckpt['state_dict'], ...))") from e
    sd = _extract_state_dict(obj, path)
    own = model.state_dict()
    sd, ignored = _match_prefixes(sd, set(own), getattr(model, "remap_keys", lambda d: d))
    for p in getattr(model, "classifier_prefixes", ()) + getattr(model, "head_prefixes", ()):
        if not any(k.startswith(p) for k in own):
            ignored += [k for k in sd if k.startswith(p)]
            sd = {k: v for k, v in sd.items() if not k.startswith(p)}
    if hasattr(model, "adapt_state_dict"):
        sd = model.adapt_state_dict(sd)
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        name = getattr(model, "name", type(model).__name__)

        def fmt(title, items):
            if not items:
                return ""
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]) + more
        raise ValueError(f"backbones.py load_pretrained: {path} does not match backbone {name}"
                         + fmt("missing keys", missing) + fmt("unexpected keys", unexpected)
                         + fmt("shape mismatches", mismatched))
    model.load_state_dict(sd, strict=strict)
    if ignored and verbose:
        name = getattr(model, "name", type(model).__name__)
        more = f" ... and {len(ignored) - 12} more" if len(ignored) > 12 else ""
        print(f"backbones.py load_pretrained: {path}: loaded {len(sd)} tensors into {name}; ignored "
              f"{len(ignored)} checkpoint keys of heads it does not build: "
              + ", ".join(ignored[:12]) + more, flush=True)
    return {"ignored": ignored, "loaded": len(sd)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    # Smoke test: every backbone on the meta device (shapes only, no memory, instant), the tiny
    # ones and ResNet-18 also for real on CPU.
    for name in BACKBONES:
        with torch.device("meta"):
            m = build_backbone(name).eval()
            x = torch.empty(2, 3, *INPUT_SIZE[name])
            out, feats = m.forward_with_features(x)
        n = count_parameters(m)
        extra = ""
        if name.startswith(("resnet", "hrnet", "efficientnet")) and not name.endswith(("tiny", "_pose")):
            with torch.device("meta"):
                n_cls = count_parameters(build_backbone(name, with_classifier=True))
            extra = f" ({n_cls / 1e6:.1f}M = {n_cls:,} with ImageNet classifier)"
            if name.startswith("hrnet"):
                with torch.device("meta"):
                    n_maps = count_parameters(build_backbone(name, classification_head=False))
                extra += f"; {n_maps / 1e6:.2f}M = {n_maps:,} without the classification head"
        print(f"{name:16s} {n / 1e6:8.2f}M = {n:,} params{extra}")
        print(f"{'':16s} input {tuple(x.shape)} -> forward {tuple(out.shape)}; features "
              + ", ".join(f"{tuple(f.shape[1:])}@/{s}" for f, s in zip(feats, m.feature_strides)))
    torch.manual_seed(0)
    for name in ("resnet_tiny", "hrnet_tiny", "hrnet_tiny_pose", "hrformer_tiny", "vit_tiny", "resnet18"):
        m = build_backbone(name).eval()
        with torch.no_grad():
            y = m(torch.randn(1, 3, *INPUT_SIZE[name]))
        print(f"{name}: real CPU forward {tuple(y.shape)}, finite={bool(torch.isfinite(y).all())}")
