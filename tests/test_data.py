"""data.py: synthetic generator round trip, METRO TSV == npz, augmentation consistency, flips,
sampler, DataLoader determinism, bad inputs."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (DataError, MixedDataset, NpzDataset, TsvDataset, WeightedMixedSampler, flip_image,
                  flip_joints2d, flip_joints3d, flip_pose, open_dataset, parse_yaml, write_metro_tsv)

SIZE = 64


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """8 synthetic 64x64 images (toy body) and the renderer batch they came from."""
    out = tmp_path_factory.mktemp("synth")
    npz = data.generate_synthetic(out, 8, split="train", seed=3, size=SIZE, batch_size=8, verbose=False)
    return out, npz


def _dots_dataset(root, n=4, size=(48, 80)):
    """Images with one bright pixel-block per annotated joint, so crops can be checked."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    H, W = size
    names, parts = [], []
    for i in range(n):
        img = np.zeros((H, W, 3), np.uint8)
        part = np.zeros((24, 3))
        for j in range(6):  # R_Ankle..L_Ankle only, well inside the image
            x, y = int(rng.integers(12, W - 12)), int(rng.integers(10, H - 10))
            img[y - 1:y + 2, x - 1:x + 2] = 255
            part[j] = [x + 0.5, y + 0.5, 1.0]  # centre of the 3x3 block
        name = f"img/{i}.png"
        Image.fromarray(img).save(root / name)
        names.append(name)
        parts.append(part)
    S = rng.normal(0, 0.3, (n, 24, 4))
    S[..., 3] = 1
    pose = rng.normal(0, 0.3, (n, 72))
    np.savez(root / "dots.npz", imgname=np.array(names), center=np.tile([W / 2, H / 2], (n, 1)),
             scale=np.full(n, 40 / 200), part=np.array(parts), S=S, pose=pose,
             shape=rng.normal(0, 1, (n, 10)), has_smpl=np.ones(n))
    return root / "dots.npz"


# ----------------------------------------------------------------------------- generator
def test_generator_output_reads_back_exactly(synth):
    out, npz = synth
    z = np.load(npz)
    assert set(z.files) == {"imgname", "center", "scale", "part", "S", "pose", "shape", "has_smpl", "gender"}
    n = len(z["imgname"])
    assert z["part"].shape == (n, 24, 3) and z["S"].shape == (n, 24, 4)
    assert z["pose"].shape == (n, 72) and z["shape"].shape == (n, 10)
    files = sorted(str(p.relative_to(out)) for p in (out / "images" / "train").glob("*.jpg"))
    assert files == sorted(z["imgname"].tolist())
    # The renderer with the same generator reproduces the labels exactly.
    ref = _reference_batch(seed=3, n=8)
    for k in ("S", "part", "pose", "shape", "center"):
        np.testing.assert_array_equal(z[k], ref[k].astype(np.float32), err_msg=k)
    # The loader (eval mode) returns these annotations.
    ds = NpzDataset(npz, train=False, input_size=(SIZE, SIZE))
    assert len(ds) == n
    for i in range(n):
        s = ds[i]
        assert s["imgname"] == z["imgname"][i] and s["index"] == i
        np.testing.assert_allclose(s["pose"].numpy(), z["pose"][i], atol=1e-6)
        np.testing.assert_allclose(s["betas"].numpy(), z["shape"][i], atol=1e-6)
        S = z["S"][i].astype(np.float64)
        np.testing.assert_allclose(s["joints3d"][:, :3].numpy(), S[:, :3] - S[14, :3], atol=1e-5)
        np.testing.assert_array_equal(s["joints3d"][:, 3].numpy(), S[:, 3])
        # evaluation crops are the official integer box: x -> (x - x0) * SIZE / (x1 - x0)
        x0, y0, x1, y1 = data.official_crop_box(z["center"][i], z["scale"][i], SIZE)
        p = z["part"][i, :, :2].astype(np.float64)
        j2 = np.stack([(p[:, 0] - x0) / (x1 - x0), (p[:, 1] - y0) / (y1 - y0)], 1) * 2 - 1
        np.testing.assert_allclose(s["joints2d"][:, :2].numpy(), j2, atol=1e-5)
        assert s["has_smpl"] == 1 and s["has_3d"] == 1 and s["has_2d"] == 1 and s["gender"] == 0
    # The JPEG is the rendered image up to compression (64 px images with fine background
    # patterns lose ~10 grey levels on average), far closer to it than to the next image.
    img = np.asarray(Image.open(out / z["imgname"][0])).astype(float)
    same, other = np.abs(img - ref["images"][0]).mean(), np.abs(img - ref["images"][1]).mean()
    assert same < 15 and same < other / 3, (same, other)


def _reference_batch(seed, n, size=SIZE):
    from body import BodyModel
    synth = data.SyntheticRenderer(BodyModel().eval(), size)
    return synth.batch(np.random.default_rng([seed, data.SPLIT_IDS["train"], 0]), n)


def test_generator_is_deterministic_per_seed(synth, tmp_path):
    out, npz = synth
    again = data.generate_synthetic(tmp_path / "a", 8, split="train", seed=3, size=SIZE, batch_size=8,
                                    verbose=False)
    other = data.generate_synthetic(tmp_path / "b", 8, split="test", seed=3, size=SIZE, batch_size=8,
                                    verbose=False)
    z0, z1, z2 = np.load(npz), np.load(again), np.load(other)
    for k in z0.files:
        np.testing.assert_array_equal(z0[k], z1[k])
    assert (out / z0["imgname"][5]).read_bytes() == (tmp_path / "a" / z1["imgname"][5]).read_bytes()
    assert not np.allclose(z0["pose"], z2["pose"])  # the test split is a different draw


def test_projected_joints_land_on_the_rendered_body():
    ref = _reference_batch(seed=5, n=8)
    hits = total = 0
    for b in range(8):
        m = ref["mask"][b]
        for x, y, vis in ref["part"][b]:
            if vis > 0:
                total += 1
                # pixel containing the joint, or a direct neighbour (joints near the surface)
                i, j = int(y), int(x)
                hits += bool(m[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].any())
    assert total > 50 and hits / total > 0.9
    # Joints are perspective projections of S.
    S, part = ref["S"], ref["part"]
    vis = part[..., 2] > 0
    proj = S[..., :2] / np.where(vis, S[..., 2], 1.0)[..., None] * ref["focal"][:, None, None] + SIZE / 2
    np.testing.assert_allclose(proj[vis], part[..., :2][vis], atol=1e-6)


def test_plain_and_cluttered_scenes_show_the_same_people():
    from body import BodyModel
    body, n = BodyModel().eval(), 32
    plain = data.SyntheticRenderer(body, SIZE).batch(np.random.default_rng(7), n)
    busy = data.SyntheticRenderer(body, SIZE, scenes="cluttered").batch(np.random.default_rng(7), n)
    for k in ("pose", "shape", "focal"):                 # the same draws up to the background
        np.testing.assert_array_equal(plain[k], busy[k])
    # Plain: everyone whole in the frame; cluttered: some people cut by it.
    labelled = plain["S"][..., 3] > 0
    assert (plain["part"][..., 2][labelled] > 0).all()
    assert ((busy["part"][..., 2] == 0) & (busy["S"][..., 3] > 0)).any(axis=1).sum() >= 1
    # Plain backgrounds are smooth; patterned ones (stripes, checkers) have sharp edges. Largest
    # jump between neighbouring 2x2 blocks (pooling halves the fine noise both kinds carry):
    def largest_jump(patterned):
        bg = data.procedural_backgrounds(np.random.default_rng(0), 40, SIZE, patterned=patterned)
        blocks = torch.nn.functional.avg_pool2d(bg.permute(0, 3, 1, 2), 2)  # (40,3,H/2,W/2)
        return (blocks[..., 1:] - blocks[..., :-1]).abs().amax(dim=(1, 2, 3))  # (40,) per image
    assert largest_jump(False).max() < 0.3 and (largest_jump(True) > 0.3).sum() >= 4
    with pytest.raises(ValueError, match="scenes must be one of"):
        data.SyntheticRenderer(body, SIZE, scenes="busy")


# ----------------------------------------------------------------------------- TSV
def test_metro_tsv_loads_the_same_samples_as_npz(synth, tmp_path):
    out, npz = synth
    yaml_path = write_metro_tsv(npz, tmp_path / "tsv", "train")
    for f in ("train.img.tsv", "train.label.tsv", "train.hw.tsv", "train.img.lineidx", "train.linelist.tsv"):
        assert (tmp_path / "tsv" / f).is_file()
    label = json.loads((tmp_path / "tsv" / "train.label.tsv").read_text().splitlines()[0].split("\t")[1])
    assert set(label[0]) >= set(data.TSV_LABEL_KEYS)
    kw = dict(train=True, input_size=(SIZE, SIZE), seed=11)
    a, b = NpzDataset(npz, **kw), TsvDataset(yaml_path, **kw)
    assert len(a) == len(b) == 8
    for i in range(len(a)):
        _assert_same_sample(a[i], b[i])
    # Composite yaml over two copies (block-list and flow-list styles) with a composite linelist.
    (tmp_path / "tsv" / "mix.linelist.tsv").write_text("1\t2\n0\t5\n")
    (tmp_path / "tsv" / "mix.yaml").write_text(
        "composite: true  # mixed\nimg:\n  - train.img.tsv\n  - train.img.tsv\n"
        "label: [train.label.tsv, train.label.tsv]\nhw: [train.hw.tsv, train.hw.tsv]\n"
        "linelist: mix.linelist.tsv\n")
    c = open_dataset(tmp_path / "tsv" / "mix.yaml", train=False, input_size=(SIZE, SIZE))
    a0 = NpzDataset(npz, train=False, input_size=(SIZE, SIZE))
    assert len(c) == 2
    for ci, ai in ((0, 2), (1, 5)):
        s, t = c[ci], a0[ai]
        assert s["imgname"] == t["imgname"] and torch.equal(s["img"], t["img"])
        assert torch.equal(s["joints2d"], t["joints2d"])


def _assert_same_sample(s, t):
    assert s.keys() == t.keys()
    for k in s:
        if k == "index":
            continue
        if torch.is_tensor(s[k]):
            assert torch.allclose(s[k], t[k], atol=1e-5), k
        else:
            assert s[k] == t[k], k


def test_parse_yaml_subset():
    y = parse_yaml("# c\nimg: a.tsv\ncomposite: false\nn: 3\nx: 'q # not a comment'\nl:\n- a\n- b\nm: [1, 2]\n")
    assert y == {"img": "a.tsv", "composite": False, "n": 3, "x": "q # not a comment", "l": ["a", "b"],
                 "m": [1, 2]}


# ----------------------------------------------------------------------------- augmentation
def test_flip_twice_is_identity():
    rng = np.random.default_rng(0)
    j2, j3, pose = rng.normal(size=(24, 3)), rng.normal(size=(24, 4)), rng.normal(size=72)
    img = torch.randn(3, 8, 6)
    assert np.array_equal(flip_joints2d(flip_joints2d(j2)), j2)
    assert np.array_equal(flip_joints3d(flip_joints3d(j3)), j3)
    assert np.array_equal(flip_pose(flip_pose(pose)), pose)
    assert torch.equal(flip_image(flip_image(img)), img)
    assert not np.array_equal(flip_pose(pose), pose)


def test_flipped_sample_equals_mirrored_sample(tmp_path):
    npz = _dots_dataset(tmp_path)
    ds = NpzDataset(npz, train=False, input_size=(40, 40))
    raw = 1
    rec, img = ds._record(raw), ds._image(raw)
    a = ds.process(img, rec, raw, flip=0, rot=20.0, sc=0.9)
    b = ds.process(ds._image(raw), rec, raw, flip=1, rot=20.0, sc=0.9)
    assert torch.allclose(flip_image(b["img"]), a["img"], atol=0.05)
    assert np.allclose(flip_joints2d(b["joints2d"].numpy()), a["joints2d"].numpy(), atol=1e-6)
    assert np.allclose(flip_joints3d(b["joints3d"].numpy()), a["joints3d"].numpy(), atol=1e-6)
    assert np.allclose(flip_pose(b["pose"].numpy()), a["pose"].numpy(), atol=1e-6)


@pytest.mark.parametrize("input_size", [(40, 40), (64, 48)])
def test_augmented_joints_stay_on_their_image_dots(tmp_path, input_size):
    npz = _dots_dataset(tmp_path)
    ds = NpzDataset(npz, train=True, input_size=input_size, seed=0)
    H, W = input_size
    seen_rot = seen_flip = False
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            seen_rot |= bool(s["rot"] != 0)
            seen_flip |= bool(s["flip"] == 1)
            # Undo normalisation and pixel noise enough to find the bright dots.
            img = s["img"] * torch.tensor(data.IMAGENET_STD).view(3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
            lum = img.mean(0)
            for x, y, c in s["joints2d"][:6].tolist():
                u, v = data.pixels_from_normalised([x, y], (H, W))
                if c > 0 and 1 <= u < W - 1 and 1 <= v < H - 1:
                    assert lum[int(v), int(u)] > 0.3, (epoch, i, u, v)
    assert seen_rot and seen_flip


def test_rotation_is_consistent_between_3d_joints_and_global_orientation():
    rng = np.random.default_rng(1)
    pose = rng.normal(0, 0.5, 72)
    j = np.concatenate([rng.normal(size=(24, 3)), np.ones((24, 1))], 1)
    R0 = data._aa_to_mat(pose[:3])
    p = data.rotate_global_orient(pose, 25.0)
    jr = data.rotate_joints3d(j, 25.0)
    # Same rotation: R_new R0^T == the map j -> jr.
    M = data._aa_to_mat(p[:3]) @ R0.T
    np.testing.assert_allclose(j[:, :3] @ M.T, jr[:, :3], atol=1e-9)


@pytest.mark.parametrize("poses", sorted(data.POSE_DISTRIBUTIONS))
def test_pose_distributions_stay_within_limits_and_are_mirror_symmetric(poses):
    ang = data.POSE_DISTRIBUTIONS[poses](np.random.default_rng(0), 4000)
    lo, hi = data._limits()
    assert ang.shape == (4000, 23, 3) and (ang >= lo - 1e-12).all() and (ang <= hi + 1e-12).all()
    # sample_pose turns the same draws (same generator state) into the body's joint rotations.
    from scipy.spatial.transform import Rotation
    pose = data.sample_pose(np.random.default_rng(1), 200, poses=poses).reshape(200, 24, 3)
    a = data.POSE_DISTRIBUTIONS[poses](np.random.default_rng(1), 200).reshape(-1, 3)
    want = Rotation.from_euler("xyz", a).as_matrix()                # extrinsic x, then y, then z
    np.testing.assert_allclose(Rotation.from_rotvec(pose[:, 1:].reshape(-1, 3)).as_matrix(), want, atol=1e-9)
    # Left and right limbs are drawn alike: mirroring (x, -y, -z) gives the same statistics.
    for left, right in ((0, 1), (3, 4), (15, 16), (17, 18)):
        mirrored = ang[:, right] * np.array([1, -1, -1])
        np.testing.assert_allclose(ang[:, left].mean(0), mirrored.mean(0), atol=0.04)
        np.testing.assert_allclose(ang[:, left].std(0), mirrored.std(0), atol=0.04)


def test_natural_poses_are_everyday_activities():
    rng = np.random.default_rng(0)
    nat, uni = data.natural_body_angles(rng, 4000), data.uniform_body_angles(rng, 4000)
    # Arms mostly down (left shoulder z < -0.3: lowered from the T-pose) but raised in reaching.
    assert 0.6 < (nat[:, 15, 2] < -0.3).mean() < 0.95 and (nat[:, 15, 2] > 0.3).mean() > 0.02
    # Walking: thighs swing against each other; sitting: both thighs up together.
    hips = nat[:, [0, 1], 0]
    assert np.corrcoef(hips.T)[0, 1] > 0.2          # sitting dominates: both up together ...
    walking = (np.abs(hips[:, 0] - hips[:, 1]) > 0.6).mean()
    assert walking > 0.1                             # ... and a share of strides
    assert np.corrcoef(uni[:, [0, 1], 0].T)[0, 1] < 0.25   # uniform: only the shared activity scale
    # The shares of ACTIVITIES sum to one; an unknown distribution is refused by name.
    assert abs(sum(data.ACTIVITIES.values()) - 1) < 1e-12
    with pytest.raises(ValueError, match="poses must be one of"):
        data.sample_pose(rng, 2, poses="yoga")


# ----------------------------------------------------------------------------- sampler / loader
def test_weighted_mixed_sampler_weights_ranks_and_epochs(tmp_path):
    sizes = [10, 30]
    mixed = MixedDataset([torch.utils.data.TensorDataset(torch.arange(n)) for n in sizes])
    s = WeightedMixedSampler(mixed, [3.0, 1.0], num_samples=4000, seed=0)
    idx = np.array(list(s))
    assert abs((idx < 10).mean() - 0.75) < 0.03
    assert set(idx[idx < 10]) == set(range(10)) and set(idx[idx >= 10]) == set(range(10, 40))
    s.set_epoch(0)
    assert list(s) == idx.tolist()
    s.set_epoch(1)
    assert list(s) != idx.tolist()
    ranks = [WeightedMixedSampler(mixed, [3.0, 1.0], num_samples=41, num_replicas=3, rank=r, seed=0)
             for r in range(3)]
    parts = [list(r) for r in ranks]
    assert all(len(p) == len(r) == 14 for p, r in zip(parts, ranks))
    full = list(WeightedMixedSampler(mixed, [3.0, 1.0], num_samples=41, seed=0))
    assert sorted(sum(parts, [])) == sorted(full + full[:1])


def test_dataloader_with_workers_is_deterministic(tmp_path):
    npz = _dots_dataset(tmp_path, n=6)
    ds = NpzDataset(npz, train=True, input_size=(32, 32), seed=4)

    def run(epoch):
        loader = data.make_loader(ds, batch_size=3, train=True, num_workers=2, seed=4, epoch=epoch)
        return [b for b in loader]

    a, b, c = run(0), run(0), run(1)
    assert len(a) == 2 and a[0]["img"].shape == (3, 3, 32, 32) and isinstance(a[0]["imgname"], list)
    for x, y in zip(a, b):
        assert torch.equal(x["img"], y["img"]) and torch.equal(x["index"], y["index"])
    assert not all(torch.equal(x["img"], y["img"]) for x, y in zip(a, c))
    # Samples depend only on (seed, epoch, index), not on workers or order.
    ds.set_epoch(0)
    for batch in a:
        for k, i in enumerate(batch["index"].tolist()):
            assert torch.equal(ds[i]["img"], batch["img"][k])


# ----------------------------------------------------------------------------- bad input
def _rewrite(npz, out, **changes):
    d = dict(np.load(npz))
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        elif isinstance(v, tuple):  # rename
            d[v[1]] = d.pop(k)
        else:
            d[k] = v
    np.savez(out, **d)
    return out


def test_bad_annotations_name_file_index_and_key(tmp_path):
    npz = _dots_dataset(tmp_path)
    d = dict(np.load(npz))
    S = d["S"].copy()
    S[2, 5, 1] = np.nan
    bad = _rewrite(npz, tmp_path / "nan.npz", S=S)
    with pytest.raises(DataError, match=r"nan\.npz: index 2, key 'S'.*NaN"):
        NpzDataset(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = NpzDataset(bad, skip_bad=True)
    assert len(ds) == 3 and ds.num_bad == 1 and 2 in ds.bad_report()["samples"]
    short = _rewrite(npz, tmp_path / "short.npz", pose=d["pose"][:3])
    with pytest.raises(DataError, match=r"short\.npz.*key 'pose'.*length 3"):
        NpzDataset(short)
    renamed = _rewrite(npz, tmp_path / "renamed.npz", center=("center", "centre"))
    with pytest.raises(DataError, match=r"renamed\.npz.*key 'center'.*missing"):
        NpzDataset(renamed)
    wrong_shape = _rewrite(npz, tmp_path / "shape.npz", part=d["part"][:, :14])
    with pytest.raises(DataError, match=r"key 'part'.*shape"):
        NpzDataset(wrong_shape)


def test_bad_images_raise_or_are_skipped_with_a_count(tmp_path):
    npz = _dots_dataset(tmp_path)
    (tmp_path / "img" / "1.png").unlink()                       # missing image
    (tmp_path / "img" / "3.png").write_bytes(b"\xff\xd8\xff garbage")  # corrupt image
    ds = NpzDataset(npz)
    ds[0]
    with pytest.raises(DataError, match=r"dots\.npz: index 1, key 'imgname'.*not found"):
        ds[1]
    with pytest.raises(DataError, match=r"dots\.npz: index 3, key 'imgname'.*decode"):
        ds[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = NpzDataset(npz, skip_bad=True)
        assert ds[1]["index"] == 2  # replaced by the next good sample
        assert ds.num_bad == 1
        ds2 = NpzDataset(npz, skip_bad=True)
        assert ds2.check_images() == 2 and len(ds2) == 2 and ds2.num_bad == 2


def test_bad_tsv_labels_name_file_row_and_key(tmp_path):
    npz = _dots_dataset(tmp_path)
    y = write_metro_tsv(npz, tmp_path / "tsv", "dots")
    lab = tmp_path / "tsv" / "dots.label.tsv"
    rows = [r.split("\t") for r in lab.read_text().splitlines()]
    l1 = json.loads(rows[1][1])
    del l1[0]["betas"]
    l2 = json.loads(rows[2][1])
    l2[0]["3d_joints"][0][0] = float("nan")
    rows[1][1], rows[2][1] = json.dumps(l1), json.dumps(l2)
    data.write_tsv(rows, lab)
    ds = TsvDataset(y)
    ds[0]
    with pytest.raises(DataError, match=r"dots\.label\.tsv: index 1, key 'betas'"):
        ds[1]
    with pytest.raises(DataError, match=r"dots\.label\.tsv: index 2, key '3d_joints'.*NaN"):
        ds[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = TsvDataset(y, skip_bad=True)
        assert [ds[i]["index"].item() for i in range(4)] == [0, 3, 3, 3] and ds.num_bad == 2
