"""FeatUp: joint bilateral upsampling of backbone features and its multi-view consistency training.

Paper: S. Fu, M. Hamilton, L. Brandt, A. Feldman, Z. Zhang, W. T. Freeman, "FeatUp: A
Model-Agnostic Framework for Features at Any Resolution", ICLR 2024, https://arxiv.org/abs/2403.10516
(official code mhamilton723/FeatUp: featup/upsamplers.py JBULearnedRange/JBUStack,
featup/downsamplers.py AttentionDownsampler, featup/train_jbu_upsampler.py,
featup/datasets/JitteredImage.py; read for facts, code not copied). Used by featup_hmr.py.
Needs torch only (the `pretrain` command also backbones.py and pillow).

What this file implements
- `JBULearnedRange` / `JBUStack`: one x2 stage bicubic-upsamples the features to the guidance
  size and filters them with a per-pixel 7x7 kernel = range kernel (softmax over the window of
  exp(temperature) * <key_neighbour, key_centre>, keys from a 1x1-conv MLP on the guidance image,
  temperature init 0) x spatial Gaussian (on a [-1, 1] grid, learned sigma init 1), normalised,
  plus 0.1 x a 1x1-conv "fix-up" of [kernel, guidance]. The stack chains log2(factor) stages; the
  guidance of each stage is the image average-pooled to that size; a final 0.1-scaled 1x1-conv
  residual fix-up. `channel_norm` is FeatUp's ChannelNorm (LayerNorm over channels, no affine).
- Pre-training with the backbone frozen (`FeatUpPretrainer`, `pretrain_upsampler`, command
  `python featup.py pretrain`): jitter the image (reflect pad, zoom, crop, flip: `sample_jitter`,
  `apply_jitter`), apply the same jitter to the high-res features of the ORIGINAL image,
  downsample them with a learned `AttentionDownsampler` (patch x patch blocks), compare with the
  backbone features of the jittered image (random projection to 30 dims), outlier-aware Gaussian
  NLL with a per-pixel scale (`ScaleNet`). One upsampler per feature map (two ViT layers); for
  factors below the patch size the high-res features are bilinearly resized to the image size
  before the jitter, so the downsampler always reduces by `patch`. Images stream through a
  DataLoader (`ImageFolder`, `TensorImages`): never all in memory. Saved as
  `torch.save({"config": ..., "state_dict": ...})` (`save_upsampler_ckpt` / `load_upsampler_ckpt`).

Departures from the official code (and why)
- The adaptive 7x7 filter is a loop of 49 shifted multiply-adds with a hand-written backward in
  plain PyTorch (FeatUp uses a custom CUDA op, AdaptiveConv); sub-modules are a ModuleList
  `stages` instead of up1..up4.
- The attention downsampler's patch dropout (logits x Bernoulli(0.8)) is applied in training mode
  only (the official code applies it always); its blur is a 5x5 Gaussian (sigma 1, reflect
  border) like kornia's.
- The CRF and TV regularisers of FeatUp's trainer are not used (crf_weight 0.001 in FeatUp's
  config; they need a dense CRF sampler and do not change the consistency objective).
- Jitter parameters come from a torch.Generator (reproducible) instead of Python's `random`;
  the pad / zoom / crop / flip arithmetic is FeatUp's, zoom by `F.interpolate(scale_factor=...)`.
- Two maps (two layers of one backbone) are trained together, one upsampler each. FeatUp clips
  the gradient norm to 1e-4 for its first 10 steps: kept (`warmup_clip_steps`).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "channel_norm", "JBULearnedRange", "JBUStack", "AttentionDownsampler", "ScaleNet",
    "sample_jitter", "apply_jitter", "backbone_maps", "FeatUpPretrainer", "save_upsampler_ckpt",
    "load_upsampler_ckpt", "pretrain_upsampler", "ImageFolder", "TensorImages", "open_images",
]


def channel_norm(x):
    """LayerNorm over channels without affine (FeatUp's ChannelNorm at init): (B,C,H,W) -> same."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)




class _WindowFilter(torch.autograd.Function):
    """out[b,c,y,x] = sum_p w[b,p,y,x] * padded[b,c,y+ky,x+kx]; hand-written backward that
    accumulates into one gradient buffer (autograd of the slices would allocate a padded-size
    zero tensor per tap)."""

    @staticmethod
    def forward(ctx, padded, w, radius):
        D = 2 * radius + 1
        H, W = w.shape[-2:]
        out = padded.new_zeros(padded.shape[0], padded.shape[1], H, W)      # (B, C, H, W)
        for p in range(D * D):
            ky, kx = divmod(p, D)
            out.addcmul_(w[:, p:p + 1], padded[:, :, ky:ky + H, kx:kx + W])
        ctx.save_for_backward(padded, w)
        ctx.radius = radius
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        padded, w = ctx.saved_tensors
        D = 2 * ctx.radius + 1
        H, W = w.shape[-2:]
        g_pad = torch.zeros_like(padded) if ctx.needs_input_grad[0] else None
        g_w = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        for p in range(D * D):
            ky, kx = divmod(p, D)
            if g_pad is not None:
                g_pad[:, :, ky:ky + H, kx:kx + W].addcmul_(g, w[:, p:p + 1])
            if g_w is not None:
                g_w[:, p] = (g * padded[:, :, ky:ky + H, kx:kx + W]).sum(1)
        return g_pad, g_w, None


class _WindowDot(torch.autograd.Function):
    """out[b,p,y,x] = sum_k padded[b,k,y+ky,x+kx] * centre[b,k,y,x] (same backward scheme)."""

    @staticmethod
    def forward(ctx, padded, centre, radius):
        D = 2 * radius + 1
        H, W = centre.shape[-2:]
        out = torch.stack([(padded[:, :, ky:ky + H, kx:kx + W] * centre).sum(1)
                           for ky in range(D) for kx in range(D)], 1)       # (B, D*D, H, W)
        ctx.save_for_backward(padded, centre)
        ctx.radius = radius
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        padded, centre = ctx.saved_tensors
        D = 2 * ctx.radius + 1
        H, W = centre.shape[-2:]
        g_pad = torch.zeros_like(padded) if ctx.needs_input_grad[0] else None
        g_c = torch.zeros_like(centre) if ctx.needs_input_grad[1] else None
        for p in range(D * D):
            ky, kx = divmod(p, D)
            gp = g[:, p:p + 1]                                               # (B, 1, H, W)
            if g_pad is not None:
                g_pad[:, :, ky:ky + H, kx:kx + W].addcmul_(centre, gp)
            if g_c is not None:
                g_c.addcmul_(padded[:, :, ky:ky + H, kx:kx + W], gp)
        return g_pad, g_c, None


def _window_sum(padded, weights, radius, mode):
    """Window ops of the JBU over a (2r+1)^2 neighbourhood, p = ky*D + kx (row-major window).

    mode "filter": padded (B, C, H+2r, W+2r), weights (B, D*D, H, W) per-pixel kernel
        -> (B, C, H, W), out[b,c,y,x] = sum_p weights[b,p,y,x] * padded[b,c,y+ky,x+kx].
    mode "dot": padded (B, K, H+2r, W+2r) keys, weights (B, K, H, W) centre keys
        -> (B, D*D, H, W), out[b,p,y,x] = sum_k padded[b,k,y+ky,x+kx] * weights[b,k,y,x].
    Loops over the D*D taps: O(B*C*H*W) memory (an unfolded (B, C, D*D, H, W) tensor would not
    fit for ViT-H x16) and, on CPU, 10-20x faster than unfold + einsum; custom backward.
    """
    if mode == "filter":
        return _WindowFilter.apply(padded, weights, radius)
    if mode == "dot":
        return _WindowDot.apply(padded, weights, radius)
    raise ValueError(f"featup._window_sum: mode must be 'filter' or 'dot', got {mode!r}")


# =========================================================================== FeatUp JBU
class JBULearnedRange(nn.Module):
    """One x`scale` joint bilateral upsampling stage with a learned range kernel (FeatUp).

    Args: guidance_dim (3 for RGB), feat_dim (documentation / checks only: the filter is
        shared by all channels), key_dim (32), scale (2), radius (3 -> 7x7 window), dropout (0.1).
    """

    def __init__(self, guidance_dim=3, feat_dim=None, key_dim=32, scale=2, radius=3, dropout=0.1):
        super().__init__()
        self.guidance_dim, self.feat_dim, self.key_dim = guidance_dim, feat_dim, key_dim
        self.scale, self.radius, self.diameter = scale, radius, 2 * radius + 1
        D2 = self.diameter ** 2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Dropout2d(dropout),
            nn.Conv2d(key_dim, key_dim, 1))
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + D2, D2, 1), nn.GELU(), nn.Dropout2d(dropout),
            nn.Conv2d(D2, D2, 1))
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))

    def range_kernel(self, guidance):
        """(B, G, H, W) guidance -> (B, D*D, H, W): softmax_p(exp(temp) * <k_{x+p}, k_x>)."""
        B, _, H, W = guidance.shape
        keys = self.range_proj(guidance)                                      # (B, K, H, W)
        padded = F.pad(keys, [self.radius] * 4, mode="reflect")               # (B, K, H+2r, W+2r)
        logits = _window_sum(padded, keys, self.radius, "dot")               # (B, D*D, H, W)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        return F.softmax(temp * logits, dim=1)

    def spatial_kernel(self):
        """(1, D*D, 1, 1) Gaussian exp(-(dx^2 + dy^2) / (2 sigma^2)) on a [-1, 1] window grid."""
        t = torch.linspace(-1, 1, self.diameter, device=self.sigma_spatial.device,
                           dtype=self.sigma_spatial.dtype)
        d2 = t[:, None] ** 2 + t[None, :] ** 2                                # (D, D) row-major
        return torch.exp(-d2 / (2 * self.sigma_spatial ** 2)).reshape(1, -1, 1, 1)

    def kernel(self, guidance):
        """The per-pixel filter (B, D*D, H, W) for a guidance map (B, G, H, W)."""
        k = self.range_kernel(guidance) * self.spatial_kernel()
        k = k / k.sum(1, keepdim=True).clamp_min(1e-7)
        return k + 0.1 * self.fixup_proj(torch.cat([k, guidance], 1))

    def forward(self, source, guidance):
        """
        Args:
            source: (B, C, h, w) low-resolution features.
            guidance: (B, G, H, W) guidance image at the output size (normally H = 2h, W = 2w).
        Returns:
            (B, C, H, W) upsampled features (bicubic to (H, W), then the joint bilateral filter).
        """
        if source.shape[0] != guidance.shape[0] or guidance.shape[1] != self.guidance_dim:
            raise ValueError(f"featup.JBULearnedRange: source (B,C,h,w) {tuple(source.shape)} and "
                             f"guidance (B,{self.guidance_dim},H,W) {tuple(guidance.shape)} mismatch")
        H, W = guidance.shape[-2:]
        kernel = self.kernel(guidance)                                        # (B, D*D, H, W)
        hr = F.interpolate(source, (H, W), mode="bicubic", align_corners=False)
        hr = F.pad(hr, [self.radius] * 4, mode="reflect")                     # (B, C, H+2r, W+2r)
        return _window_sum(hr, kernel, self.radius, "filter")


class JBUStack(nn.Module):
    """log2(factor) stacked x2 JBU stages + a 0.1-scaled 1x1-conv residual fix-up (FeatUp)."""

    def __init__(self, feat_dim, factor=16, key_dim=32, radius=3, dropout=0.1, guidance_dim=3):
        super().__init__()
        n = int(round(math.log2(factor)))
        if factor < 2 or 2 ** n != factor:
            raise ValueError(f"featup.JBUStack: factor must be a power of two >= 2, got {factor}")
        self.feat_dim, self.factor = feat_dim, factor
        self.stages = nn.ModuleList(JBULearnedRange(guidance_dim, feat_dim, key_dim, 2, radius, dropout)
                                    for _ in range(n))
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(feat_dim, feat_dim, 1))

    def forward(self, source, image):
        """
        Args:
            source: (B, C, h, w) features (C = feat_dim).
            image: (B, 3, H, W) guidance image (ImageNet-normalised input); average-pooled to
                (2h, 2w), (4h, 4w), ... for the successive stages.
        Returns:
            (B, C, factor*h, factor*w).
        """
        x = source
        for stage in self.stages:
            h, w = x.shape[-2:]
            guide = F.adaptive_avg_pool2d(image, (2 * h, 2 * w))             # (B, 3, 2h, 2w)
            x = stage(x, guide)
        return x + 0.1 * self.fixup_proj(x)



# =========================================================================== FeatUp training
class AttentionDownsampler(nn.Module):
    """FeatUp's learned attention downsampler: each output pixel = softmax-weighted mean of a
    (patch x patch) block of (blurred) high-res features; logits = Linear(C, 1) per pixel, then
    an affine per in-patch position (w init 1, b init 0, both + 0.01 noise)."""

    def __init__(self, dim, patch=16, blur=True):
        super().__init__()
        self.dim, self.patch, self.blur = dim, patch, blur
        self.attention_net = nn.Sequential(nn.Dropout(0.2), nn.Linear(dim, 1))
        self.w = nn.Parameter(torch.ones(patch, patch) + 0.01 * torch.randn(patch, patch))
        self.b = nn.Parameter(torch.zeros(patch, patch) + 0.01 * torch.randn(patch, patch))

    @staticmethod
    def gaussian_blur(x, size=5, sigma=1.0):
        """Depthwise Gaussian blur with reflect border: (B, C, H, W) -> same."""
        t = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
        g = torch.exp(-t ** 2 / (2 * sigma ** 2))
        g = g / g.sum()
        k = (g[:, None] * g[None, :]).expand(x.shape[1], 1, size, size)      # (C, 1, k, k)
        return F.conv2d(F.pad(x, [size // 2] * 4, mode="reflect"), k, groups=x.shape[1])

    def forward(self, hr_feats):
        """(B, C, H, W) with H, W multiples of `patch` -> (B, C, H/patch, W/patch)."""
        B, C, H, W = hr_feats.shape
        p = self.patch
        if H % p or W % p:
            raise ValueError(f"featup.AttentionDownsampler: H, W must be multiples of {p}, "
                             f"got {(H, W)}")
        x = self.gaussian_blur(hr_feats) if self.blur else hr_feats
        # (B, C, H, W) -> (B, C, H/p, p, W/p, p) -> (B, H/p, W/p, p*p, C)
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(B, H // p, W // p, p * p, C)
        logits = self.attention_net(patches).squeeze(-1)                     # (B, h, w, p*p)
        if self.training:
            logits = logits * (torch.rand(logits.shape[:3] + (1,), device=logits.device) > 0.2)
        logits = logits * self.w.flatten() + self.b.flatten()
        attn = F.softmax(logits, dim=-1)                                      # (B, h, w, p*p)
        return torch.einsum("bhwpc,bhwp->bchw", patches, attn)               # (B, C, h, w)


class ScaleNet(nn.Module):
    """Per-pixel predicted scale for FeatUp's outlier-aware loss: exp(conv1x1(x) + 0.1)."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Conv2d(dim, 1, 1)
        with torch.no_grad():
            self.net.weight.mul_(0.1)
            self.net.bias.mul_(0.1)

    def forward(self, x):
        """(B, C, h, w) -> (B, 1, h, w) positive scales."""
        return torch.exp(self.net(x) + 0.1).clamp_min(1e-4)


def sample_jitter(h, w, max_pad=20, max_zoom=2.0, use_flips=True, generator=None):
    """Random FeatUp jitter for an (h, w) image: reflect pad by max_pad, zoom in [1, max_zoom]
    with probability 0.5, crop an (h, w) window at (y, x), optional horizontal flip."""
    r = torch.rand(3, generator=generator).tolist()
    flip = use_flips and r[0] > 0.5
    zoom = 1.0 + r[2] * (max_zoom - 1.0) if r[1] > 0.5 else 1.0
    vh = int((h + 2 * max_pad) * zoom) - h + 1
    vw = int((w + 2 * max_pad) * zoom) - w + 1
    y = int(torch.randint(0, vh, (), generator=generator))
    x = int(torch.randint(0, vw, (), generator=generator))
    return {"y": y, "x": x, "zoom": zoom, "flip": flip, "max_pad": max_pad}


def apply_jitter(img, params):
    """Apply a `sample_jitter` transform to (B, C, H, W) (image or features at image size).

    Reflect pad, then zoom with `F.interpolate(scale_factor=zoom)` as FeatUp does (bilinear,
    align_corners=False): the sampling grid uses the scale factor itself, not (padded size) /
    (zoomed size), which differ by up to 0.35 px at zoom 1.37; then crop (H, W) at (y, x), flip.
    """
    H, W = img.shape[-2:]
    pad = params["max_pad"]
    x = F.pad(img, [pad] * 4, mode="reflect") if pad > 0 else img           # (B, C, H+2p, W+2p)
    if params["zoom"] > 1.0:
        x = F.interpolate(x, scale_factor=params["zoom"], mode="bilinear", align_corners=False)
    x = x[:, :, params["y"]:params["y"] + H, params["x"]:params["x"] + W]     # (B, C, H, W)
    return torch.flip(x, [3]) if params["flip"] else x


def backbone_maps(backbone, images, n_expected=2, where="featup"):
    """Frozen backbone -> list of channel-normed maps [(B, C_i, h, w)] (no grad)."""
    with torch.no_grad():
        feats = backbone.forward_features(images)
    if len(feats) != n_expected:
        raise ValueError(f"{where}: backbone.forward_features must return {n_expected} maps (the "
                         f"two ViT layers; build the backbone with out_indices), got {len(feats)}")
    return [channel_norm(f) for f in feats]


class FeatUpPretrainer(nn.Module):
    """JBU upsamplers (one per backbone layer) + attention downsamplers + scale nets, trained with
    FeatUp's multi-view consistency loss against a frozen backbone.

    Args:
        backbone: module with `forward_features(x) -> [(B, C_i, H/p, W/p)] * 2` and
            `feature_channels` (frozen here).
        factor: upsampling factor of the JBU stack (4, 8, 16).
        patch: backbone stride (16 for ViT); the downsampler reduces image-size maps by `patch`.
        proj_dim: random projection size of the compared features (30 in FeatUp; None = off).
    """

    def __init__(self, backbone, factor=16, patch=16, key_dim=32, radius=3, proj_dim=30,
                 max_pad=20, max_zoom=2.0, n_jitters=5, backbone_name=None):
        super().__init__()
        self.backbone = backbone
        backbone.requires_grad_(False)
        backbone.eval()
        dims = list(backbone.feature_channels)[-2:]
        self.dims, self.factor, self.patch = dims, factor, patch
        self.key_dim, self.radius, self.proj_dim = key_dim, radius, proj_dim
        self.max_pad, self.max_zoom, self.n_jitters = max_pad, max_zoom, n_jitters
        self.backbone_name = backbone_name
        self.upsamplers = nn.ModuleList(JBUStack(c, factor, key_dim, radius) for c in dims)
        self.downsamplers = nn.ModuleList(AttentionDownsampler(c, patch) for c in dims)
        self.scale_nets = nn.ModuleList(ScaleNet(c) for c in dims)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()                      # frozen backbone: always eval
        return self

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def config(self):
        return {"factor": self.factor, "feat_dims": list(self.dims), "key_dim": self.key_dim,
                "radius": self.radius, "patch": self.patch, "backbone": self.backbone_name,
                "channel_norm": True}

    def consistency_loss(self, images, jitters=None, generator=None, projections=None):
        """FeatUp's multi-view reconstruction loss.

        Args:
            images: (B, 3, H, W) ImageNet-normalised, H and W multiples of `patch`.
            jitters: optional list of `sample_jitter` dicts (else n_jitters random ones).
            generator: torch.Generator for the jitters and random projections (reproducible eval).
            projections: optional list (per jitter) of lists (per layer) of (B, C, proj_dim).
        Returns:
            (loss scalar, logs dict with "rec_mse" = mean squared error of the projected features).
        """
        B, _, H, W = images.shape
        lr_feats = backbone_maps(self.backbone, images, where="featup.FeatUpPretrainer")
        hr_feats = []
        for up, f in zip(self.upsamplers, lr_feats):
            hr = up(f, images)                                            # (B, C, r*h, r*w)
            if hr.shape[-2:] != (H, W):                                   # x4/x8: back to image size
                hr = F.interpolate(hr, (H, W), mode="bilinear", align_corners=False)
            hr_feats.append(hr)
        if jitters is None:
            jitters = [sample_jitter(H, W, self.max_pad, self.max_zoom, generator=generator)
                       for _ in range(self.n_jitters)]
        total, mse_sum = 0.0, 0.0
        for j, params in enumerate(jitters):
            lr_jit = backbone_maps(self.backbone, apply_jitter(images, params), where="featup.FeatUpPretrainer")
            for l, (hr, lrj) in enumerate(zip(hr_feats, lr_jit)):
                down = self.downsamplers[l](apply_jitter(hr, params))         # (B, C, h, w)
                if projections is not None:
                    proj = projections[j][l]
                elif self.proj_dim is not None and self.proj_dim < lrj.shape[1]:
                    proj = torch.randn(B, lrj.shape[1], self.proj_dim, generator=generator)
                    proj = (proj / proj.norm(dim=1, keepdim=True)).to(lrj)
                else:
                    proj = None
                if proj is not None:
                    down_p = torch.einsum("bchw,bcd->bdhw", down, proj)
                    lrj_p = torch.einsum("bchw,bcd->bdhw", lrj, proj)
                else:
                    down_p, lrj_p = down, lrj
                mse = (down_p - lrj_p).square()                               # (B, d, h, w)
                s = self.scale_nets[l](lrj)                                   # (B, 1, h, w)
                total = total + (mse / (2 * s ** 2) + s.log()).mean()
                mse_sum += float(mse.detach().mean())
        n = len(jitters) * len(hr_feats)
        return total / n, {"rec_mse": mse_sum / n}


def save_upsampler_ckpt(path, pretrainer):
    """torch.save({"config": ..., "state_dict": upsamplers' state dict}) (loads with weights_only)."""
    torch.save({"config": pretrainer.config(),
                "state_dict": {k: v.detach().cpu() for k, v in pretrainer.upsamplers.state_dict().items()}},
               path)


def load_upsampler_ckpt(path):
    """-> (config dict, state dict of an nn.ModuleList of JBUStack, one per layer)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise ValueError(f"featup: {path} is not an upsampler checkpoint "
                         "(expected keys 'config' and 'state_dict')")
    return ckpt["config"], ckpt["state_dict"]


def pretrain_upsampler(backbone, images, factor=16, steps=100, batch_size=4, lr=1e-3,
                       n_jitters=5, max_pad=20, max_zoom=2.0, proj_dim=30, patch=16,
                       warmup_clip_steps=10, seed=0, log_every=0, backbone_name=None,
                       pretrainer=None, key_dim=32, radius=3, workers=0):
    """Train JBU upsamplers with FeatUp's consistency objective (NAdam, lr 1e-3, batch 4).

    Args:
        backbone: frozen ViT-like module (forward_features -> 2 maps, feature_channels).
        images: a Dataset of (3, H, W) ImageNet-normalised images (`ImageFolder`, `TensorImages`),
            read batch by batch through a DataLoader (random with replacement, seeded), so the
            image set never has to fit in memory; a (N, 3, H, W) tensor is accepted too.
        warmup_clip_steps: FeatUp clips the gradient norm to 1e-4 for its first 10 steps.
        workers: DataLoader worker processes.
    Returns:
        (FeatUpPretrainer, list of per-step losses).
    """
    if torch.is_tensor(images):
        images = TensorImages(images)
    if len(images) == 0:
        raise ValueError("featup.pretrain_upsampler: no images")
    g = torch.Generator().manual_seed(seed)                          # jitters and projections
    sampler = torch.utils.data.RandomSampler(images, replacement=True, num_samples=steps * batch_size,
                                             generator=torch.Generator().manual_seed(seed + 1))
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=sampler,
                                         num_workers=workers, drop_last=True)
    if pretrainer is None:
        pretrainer = FeatUpPretrainer(backbone, factor, patch, key_dim, radius, proj_dim=proj_dim,
                                      max_pad=max_pad, max_zoom=max_zoom, n_jitters=n_jitters,
                                      backbone_name=backbone_name)
    pretrainer.train()
    params = pretrainer.trainable_parameters()
    opt = torch.optim.NAdam(params, lr=lr)
    losses = []
    for step, batch in enumerate(loader):                             # batch (batch_size, 3, H, W)
        loss, logs = pretrainer.consistency_loss(batch, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < warmup_clip_steps:
            torch.nn.utils.clip_grad_norm_(params, 1e-4)
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {losses[-1]:.4f}  rec_mse {logs['rec_mse']:.4f}", flush=True)
    return pretrainer, losses


# =========================================================================== images
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _normalise(img):
    """(3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype).reshape(3, 1, 1)
    return (img - mean) / std


class ImageFolder(torch.utils.data.Dataset):
    """Every .jpg/.jpeg/.png under `root` (recursive, sorted), decoded one at a time with PIL,
    resized to `size` (H, W) bilinearly -> (3, H, W) float32, ImageNet-normalised."""

    def __init__(self, root, size):
        import pathlib
        self.root, self.size = pathlib.Path(root), (int(size[0]), int(size[1]))
        if not self.root.is_dir():
            raise ValueError(f"featup.ImageFolder: {root} is not a folder")
        self.files = sorted(f for f in self.root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"featup.ImageFolder: no .jpg/.jpeg/.png images under {root}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        H, W = self.size
        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB").resize((W, H), Image.BILINEAR)
        except OSError as e:
            raise ValueError(f"featup.ImageFolder: cannot read image {self.files[i]}: {e}") from e
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)    # (H*W*3,)
        t = t.reshape(H, W, 3).permute(2, 0, 1).float() / 255.0              # (H, W, 3) -> (3, H, W)
        return _normalise(t)


class TensorImages(torch.utils.data.Dataset):
    """Images from a (N, 3, H, W) tensor (float in [0, 1] or uint8), or a .pt file holding one,
    memory-mapped (torch.load(mmap=True)) so it is read image by image, not whole. Items are
    resized to `size` (H, W) when given and ImageNet-normalised -> (3, H, W) float32."""

    def __init__(self, images, size=None):
        self.path = None
        if not torch.is_tensor(images):
            self.path = str(images)
            images = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"featup.TensorImages: {self.path or 'images'} must hold a (N, 3, H, W) "
                             f"tensor, got {got}")
        self.images, self.size = images, (tuple(int(s) for s in size) if size is not None else None)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        img = self.images[i]
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()   # (3, H, W)
        if self.size is not None and tuple(img.shape[-2:]) != self.size:
            img = F.interpolate(img[None], self.size, mode="bilinear", align_corners=False)[0]
        return _normalise(img)


def open_images(path, size):
    """A folder of .jpg/.png -> ImageFolder; a .pt tensor file -> TensorImages."""
    import pathlib
    p = pathlib.Path(path)
    if p.is_file() and p.suffix == ".pt":
        return TensorImages(p, size)
    if p.is_dir():
        return ImageFolder(p, size)
    raise ValueError(f"featup: --images {path} is neither a folder of images nor a .pt tensor file")


# =========================================================================== CLI / smoke test
def main(argv=None):
    """`python featup.py pretrain --images DIR --backbone NAME --layers A B --out ckpt.pt ...`."""
    import argparse
    ap = argparse.ArgumentParser(prog="featup.py pretrain",
                                 description="FeatUp JBU pre-training (multi-view consistency, frozen ViT)")
    ap.add_argument("--images", required=True, help="folder of .jpg/.png or a .pt (N,3,H,W) tensor")
    ap.add_argument("--backbone", required=True, help="backbones.build_backbone name (needs backbones.py)")
    ap.add_argument("--backbone-weights", default=None, help="pretrained ViTPose weights")
    ap.add_argument("--layers", type=int, nargs=2, required=True, help="1-based ViT layers")
    ap.add_argument("--factor", type=int, default=16, choices=[2, 4, 8, 16])
    ap.add_argument("--radius", type=int, default=3, help="JBU window radius (FeatUp: 3)")
    ap.add_argument("--key-dim", type=int, default=32, help="JBU range key size (FeatUp: 32)")
    ap.add_argument("--input-size", type=int, nargs=2, default=(256, 192), metavar=("H", "W"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-jitters", type=int, default=5)
    ap.add_argument("--max-pad", type=int, default=20)
    ap.add_argument("--max-zoom", type=float, default=2.0)
    ap.add_argument("--proj-dim", type=int, default=30)
    ap.add_argument("--warmup-clip-steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers reading the images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from backbones import build_backbone
    layers, size = tuple(args.layers), tuple(args.input_size)
    backbone = build_backbone(args.backbone, pretrained=args.backbone_weights, out_indices=layers)
    images = open_images(args.images, size)
    print(f"{len(images)} images -> {size}, backbone {args.backbone} layers {list(layers)}, factor "
          f"{args.factor}, window {2 * args.radius + 1}x{2 * args.radius + 1}", flush=True)
    pre, losses = pretrain_upsampler(backbone, images, args.factor, args.steps, args.batch_size, args.lr,
                                     args.n_jitters, args.max_pad, args.max_zoom, args.proj_dim,
                                     warmup_clip_steps=args.warmup_clip_steps, seed=args.seed,
                                     log_every=max(1, args.steps // 20), backbone_name=args.backbone,
                                     key_dim=args.key_dim, radius=args.radius, workers=args.workers)
    save_upsampler_ckpt(args.out, pre)
    print(f"saved {args.out}  (first loss {losses[0]:.4f}, last {losses[-1]:.4f}); use it with "
          f"upsampler_ckpt={args.out!r}, upsample_factor={args.factor}, jbu_radius={args.radius}, "
          f"jbu_key_dim={args.key_dim}")
    return losses


class _StandInViT(nn.Module):
    """Patch-16 conv + two conv "layers": forward_features -> two (B, dim, H/16, W/16) maps, so
    the smoke test runs without backbones.py."""

    def __init__(self, dim=32, patch=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.block1, self.block2 = nn.Conv2d(dim, dim, 3, padding=1), nn.Conv2d(dim, dim, 3, padding=1)
        self.feature_channels = [dim, dim]

    def forward_features(self, x):
        a = self.block1(F.gelu(self.embed(x)))                        # (B, dim, H/16, W/16)
        return [a, self.block2(F.gelu(a))]


def _smoke():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 48)
    for factor in (2, 4, 16):
        up = JBUStack(32, factor, key_dim=8)
        print(f"JBUStack x{factor}: (2, 32, 4, 3) -> {tuple(up(torch.randn(2, 32, 4, 3), x).shape)}, "
              f"{sum(p.numel() for p in up.parameters())} params")
    images = TensorImages(torch.rand(6, 3, 64, 48))
    pre, losses = pretrain_upsampler(_StandInViT(), images, factor=4, steps=6, batch_size=2, lr=3e-3,
                                     n_jitters=2, max_pad=4, proj_dim=None, key_dim=8, radius=2,
                                     warmup_clip_steps=0)
    print("pre-training with a stand-in ViT, 6 images streamed in batches of 2: losses",
          [round(l, 4) for l in losses])


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1 and sys.argv[1] == "pretrain":
        main(sys.argv[2:])
    elif len(sys.argv) > 1:
        raise SystemExit("usage: python featup.py [pretrain --images DIR --backbone NAME --layers A B "
                         "--out ckpt.pt ...]")
    else:
        _smoke()
