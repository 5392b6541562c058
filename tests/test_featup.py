"""featup.py: the JBU upsampler (shapes, reduction to a spatial filter, window ops and their
backward), FeatUp's jitter, and pre-training (loss goes down, images stream from a folder)."""
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featup as fu


class TinyViT(nn.Module):
    """ViT-like: 16x16 patch embedding + two token-mixing blocks; maps after block 1 and 2."""

    def __init__(self, dim=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed = nn.Conv2d(3, dim, 16, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU())
                                    for _ in range(2))
        self.feature_channels = [dim, dim]

    def forward_features(self, x):
        x = self.patch_embed(x)                               # (B, C, H/16, W/16)
        outs = []
        for blk in self.blocks:
            x = x + blk(x)
            outs.append(x)
        return outs


def smooth_images(n, h=64, w=48, seed=0):
    """Piecewise-smooth synthetic images in [0, 1]: blurred random blobs + an edge."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h // 8, w // 8, generator=g)
    x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False)
    return (0.5 * x + 0.5 * (torch.rand(n, 3, 1, 1, generator=g) > 0.5) * (torch.arange(w) > w // 2)).clamp(0, 1)


# ----------------------------------------------------------------------------- JBU
@pytest.mark.parametrize("factor", [4, 8, 16])
def test_jbu_output_shape(factor):
    torch.manual_seed(0)
    up = fu.JBUStack(8, factor, key_dim=8)
    src, img = torch.randn(2, 8, 4, 3), torch.randn(2, 3, 64, 48)
    out = up(src, img)
    assert out.shape == (2, 8, 4 * factor, 3 * factor)
    assert torch.isfinite(out).all()
    assert len(up.stages) == int(math.log2(factor))


def _spatial_only(src, sigma, radius, n_stages):
    """Reference: per x2 stage, bicubic upsample + reflect pad + normalised Gaussian filter."""
    D = 2 * radius + 1
    t = torch.linspace(-1, 1, D)
    k = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).expand(src.shape[1], 1, D, D)
    x = src
    for _ in range(n_stages):
        x = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        x = F.conv2d(F.pad(x, [radius] * 4, mode="reflect"), k, groups=x.shape[1])
    return x


def test_jbu_constant_guidance_reduces_to_spatial_filter():
    torch.manual_seed(0)
    up = fu.JBUStack(6, 4, key_dim=8, radius=3).eval()
    with torch.no_grad():                  # no fix-ups, a non-trivial spatial sigma
        for st in up.stages:
            nn.init.zeros_(st.fixup_proj[3].weight)
            nn.init.zeros_(st.fixup_proj[3].bias)
            st.sigma_spatial.fill_(0.6)
        nn.init.zeros_(up.fixup_proj[1].weight)
        nn.init.zeros_(up.fixup_proj[1].bias)
    src = torch.randn(2, 6, 5, 4)
    ref = _spatial_only(src, 0.6, 3, 2)
    const = torch.tensor([0.3, -1.0, 2.0]).reshape(1, 3, 1, 1).expand(2, 3, 20, 16)
    out = up(src, const)
    assert out.shape == ref.shape == (2, 6, 20, 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # A structured guidance image changes the result (edge-aware) ...
    img = torch.randn(2, 3, 20, 16) * 3
    assert (up(src, img) - ref).abs().max() > 1e-3
    # ... unless the range kernel is made wide (temperature -> its floor 1e-4): spatial-only again.
    with torch.no_grad():
        for st in up.stages:
            st.range_temp.fill_(-20.0)
    torch.testing.assert_close(up(src, img), ref, atol=2e-3, rtol=1e-3)


def test_window_ops_match_unfold_reference():
    """The tap loop equals an unfold-based window (row-major taps p = ky*D + kx)."""
    torch.manual_seed(0)
    r, D = 2, 5
    padded = torch.randn(2, 5, 7 + 2 * r, 6 + 2 * r, dtype=torch.float64)
    cols = F.unfold(padded, D).view(2, 5, D * D, 7, 6)           # (B, C, D*D, H, W)
    kernel = torch.randn(2, D * D, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(fu._window_sum(padded, kernel, r, "filter"),
                               (cols * kernel[:, None]).sum(2))
    centre = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(fu._window_sum(padded, centre, r, "dot"),
                               (cols * centre[:, :, None]).sum(1))
    # hand-written backward passes: gradcheck (float64)
    pad_s = torch.randn(1, 2, 4 + 2 * r, 3 + 2 * r, dtype=torch.float64, requires_grad=True)
    k_s = torch.randn(1, D * D, 4, 3, dtype=torch.float64, requires_grad=True)
    c_s = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fu._window_sum(a, b, r, "filter"), (pad_s, k_s))
    assert torch.autograd.gradcheck(lambda a, b: fu._window_sum(a, b, r, "dot"), (pad_s, c_s))
    # the centre tap of the "dot" op is <k_x, k_x>
    torch.testing.assert_close(fu._window_sum(padded[:, :, :, :], padded[:, :, r:-r, r:-r], r, "dot")[:, D * D // 2],
                               padded[:, :, r:-r, r:-r].square().sum(1))


# ----------------------------------------------------------------------------- jitter
def test_jitter_zoom_samples_at_official_scale_factor_positions():
    """FeatUp zooms with F.interpolate(scale_factor=zoom): output pixel i samples the padded image
    at (i + 0.5) / zoom - 0.5 (not at (i + 0.5) * in / out - 0.5). On a linear ramp bilinear
    interpolation is exact, so the zoomed, cropped ramp is known in closed form."""
    H, W, pad, zoom = 20, 16, 3, 1.37
    ramp_x = torch.arange(W + 2 * pad, dtype=torch.float64)            # value = padded column index
    img = ramp_x.expand(1, 1, H, W + 2 * pad)[..., pad:W + pad].contiguous()  # interior of the ramp
    params = {"y": 2, "x": 3, "zoom": zoom, "flip": False, "max_pad": pad}
    out = fu.apply_jitter(img, params)
    assert out.shape == (1, 1, H, W)
    cols = torch.arange(W, dtype=torch.float64) + params["x"]           # zoomed columns kept
    src = (cols + 0.5) / zoom - 0.5                                     # padded-image column sampled
    inside = (src >= pad) & (src <= W + pad - 1)                        # reflect border not involved
    assert inside.sum() >= W - 4
    torch.testing.assert_close(out[0, 0, 0, inside], src[inside], atol=1e-9, rtol=0)
    # the explicit-size call would sample elsewhere (the 0.35 px shift of issue 13)
    size = (int((H + 2 * pad) * zoom), int((W + 2 * pad) * zoom))
    scale = (W + 2 * pad) / size[1]
    other = (cols + 0.5) * scale - 0.5
    assert (other[inside] - src[inside]).abs().max() > 0.05
    # flip mirrors the crop; zoom 1 is pad + crop only
    flipped = fu.apply_jitter(img, dict(params, flip=True))
    torch.testing.assert_close(flipped, out.flip(-1))
    plain = fu.apply_jitter(img, dict(params, zoom=1.0))
    torch.testing.assert_close(plain, F.pad(img, [pad] * 4, mode="reflect")[..., 2:2 + H, 3:3 + W])


def test_sample_jitter_crops_fit_the_zoomed_image():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = fu.sample_jitter(30, 22, 5, 2.0, generator=g)
        x = fu.apply_jitter(torch.randn(1, 2, 30, 22), p)
        assert x.shape == (1, 2, 30, 22)


# ----------------------------------------------------------------------------- pre-training
def test_upsampler_pretraining_lowers_consistency_loss():
    torch.manual_seed(0)
    vit = TinyViT()
    images = fu.TensorImages(smooth_images(8, seed=1))
    batch = torch.stack([images[i] for i in range(len(images))])
    pre = fu.FeatUpPretrainer(vit, factor=4, key_dim=8, radius=2, proj_dim=None, max_pad=4,
                              n_jitters=2, backbone_name="tiny_test")
    g = torch.Generator().manual_seed(5)
    jitters = [fu.sample_jitter(64, 48, 4, 2.0, generator=g) for _ in range(4)]

    def eval_loss():
        pre.eval()
        with torch.no_grad():
            return pre.consistency_loss(batch, jitters=jitters)

    before, _ = eval_loss()
    pre, losses = fu.pretrain_upsampler(vit, images, factor=4, steps=12, batch_size=4, lr=3e-3,
                                        n_jitters=2, max_pad=4, proj_dim=None, warmup_clip_steps=0,
                                        pretrainer=pre)
    after, _ = eval_loss()
    assert len(losses) == 12
    assert float(after) < float(before) - 0.05 * abs(float(before))
    assert all(p.grad is None for p in vit.parameters())


def _write_pngs(folder, n, h=40, w=30):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    imgs = (smooth_images(n, h, w, seed=2) * 255).round().to(torch.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"img_{i:03d}.png")


class _CountingFolder(fu.ImageFolder):
    """ImageFolder that tracks how many decoded images are alive at once and refuses more than
    `limit` (a stand-in for a memory budget smaller than the folder)."""

    def __init__(self, root, size, limit):
        super().__init__(root, size)
        self.limit, self.alive, self.peak, self.reads = limit, 0, 0, 0

    def _release(self):
        self.alive -= 1

    def __getitem__(self, i):
        if self.alive >= self.limit:
            raise MemoryError(f"more than {self.limit} decoded images alive at once")
        img = super().__getitem__(i)
        self.alive += 1
        self.reads += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(img, self._release)
        return img


def test_pretraining_streams_a_folder_larger_than_the_memory_limit(tmp_path):
    n, batch, steps = 24, 2, 3
    _write_pngs(tmp_path / "imgs" / "sub", n)
    folder = _CountingFolder(tmp_path / "imgs", (64, 48), limit=2 * batch)
    assert len(folder) == n and folder[0].shape == (3, 64, 48)
    pre, losses = fu.pretrain_upsampler(TinyViT(), folder, factor=4, steps=steps, batch_size=batch,
                                        n_jitters=1, max_pad=4, proj_dim=None, key_dim=8, radius=2,
                                        warmup_clip_steps=0)
    assert len(losses) == steps and all(math.isfinite(l) for l in losses)
    assert folder.reads == 1 + steps * batch < n                        # read batch by batch
    assert folder.peak <= 2 * batch < n


def test_image_folder_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no .jpg"):
        fu.ImageFolder(tmp_path, (32, 32))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    folder = fu.ImageFolder(tmp_path, (32, 32))
    with pytest.raises(ValueError, match="broken.jpg"):
        folder[0]
    with pytest.raises(ValueError, match="neither a folder"):
        fu.open_images(tmp_path / "missing.pt", (32, 32))
    torch.save(torch.zeros(2, 4, 8, 8), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        fu.TensorImages(tmp_path / "bad.pt")


def test_pretrain_command_from_a_folder(tmp_path):
    pytest.importorskip("backbones")
    _write_pngs(tmp_path / "imgs", 4)
    out = tmp_path / "jbu.pt"
    losses = fu.main(["--images", str(tmp_path / "imgs"), "--backbone", "vit_tiny", "--layers", "2", "4",
                      "--factor", "2", "--out", str(out), "--steps", "2", "--batch-size", "2",
                      "--n-jitters", "1", "--max-pad", "4", "--input-size", "64", "48", "--workers", "0"])
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    cfg, state = fu.load_upsampler_ckpt(out)
    assert cfg["factor"] == 2 and cfg["feat_dims"] == [64, 64] and state
