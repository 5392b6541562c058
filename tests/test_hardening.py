"""Fault injection (issue 15): each test feeds the input a new user or a broken machine produces
and checks the run stops with an error that names the file, key/index and what to change (or
recovers), never hangs, never runs code from a file and never overwrites good output."""
import datetime
import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import body  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    data.generate_synthetic(out, 16, split="train", seed=0, size=64, verbose=False)
    return out


def run_train(npz, out, *extra, steps=2):
    args = train.parse_args([
        "--model", "fastmetro", "--preset", "tiny", "--train", str(npz), "--out", str(out),
        "--steps", str(steps), "--batch-size", "2", "--workers", "0", "--log-every", "1",
        "--no-progress", "--device", "cpu", *extra])
    return train.train(args)


@contextmanager
def time_limit(seconds):
    """Fail (TimeoutError) instead of hanging."""
    def handler(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: hang")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def npz_variant(synth, tmp_path, name, **changes):
    """A copy of the synthetic npz with some arrays changed (None drops the key)."""
    d = dict(np.load(synth / "train.npz"))
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v(d[k].copy()) if callable(v) else v
    path = tmp_path / f"{name}.npz"
    np.savez(path, **d)
    return path


def setitem(index, value):
    def f(a):
        a[index] = value
        return a
    return f


# ----------------------------------------------------------------------------- 1. hang
def test_fewer_samples_than_one_batch_stops_with_the_numbers(synth, tmp_path):
    with time_limit(120), pytest.raises(ValueError) as e:
        run_train(synth / "train.npz", tmp_path, "--batch-size", "32")
    msg = str(e.value)
    assert "16 samples over 1 rank" in msg and "--batch-size 32" in msg
    assert "--batch-size 16 or less" in msg and "fewer processes" in msg


# ----------------------------------------------------------------------------- 2. pickles
class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def test_body_smoke_test_never_unpickles_the_cache_and_rebuilds_it(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    good = body.toy_body_path()                      # the test cache's clean copy
    cache.mkdir()
    for f in good.parent.glob("mesh_hierarchy_*.npz"):  # keyed by the clean file's hash: reused
        (cache / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    poisoned = dict(body.load_smpl_pickle(good), v_template=_Evil(os.system, f"touch {marker}"))
    (cache / body.TOY_FILE_NAME).write_bytes(pickle.dumps(poisoned, protocol=2))
    body.h36m_sidecar(cache / body.TOY_FILE_NAME).write_bytes(body.h36m_sidecar(good).read_bytes())
    monkeypatch.setenv("HMR_CACHE", str(cache))
    monkeypatch.setattr(sys, "argv", ["body.py"])
    with pytest.warns(UserWarning, match="rebuilding"):
        body._main()                                 # `python body.py`, quickstart's first step
    assert not marker.exists()
    assert (cache / body.TOY_FILE_NAME).read_bytes() == good.read_bytes()   # rebuilt


def test_damaged_toy_cache_is_rebuilt(tmp_path):
    path = body.toy_body_path(tmp_path)
    clean = path.read_bytes()
    path.write_bytes(clean[: len(clean) // 3])       # truncated by a kill or a full disk
    with pytest.warns(UserWarning, match="rebuilding"):
        assert body.toy_body_path(tmp_path) == path
    assert path.read_bytes() == clean


def test_nothing_hands_a_pickle_to_an_unrestricted_unpickler():
    forbidden = [r"pickle\.loads?\(", "allow_pickle=" + "True", r"smplx\.create\(",
                 r"np\.load\([^)]*encoding="]
    hits = []
    for f in sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        text = f.read_text()
        for pat in forbidden:
            hits += [f"{f.name}: {m.group(0)}" for m in re.finditer(pat, text)]
        # every smplx.SMPL(...) call gets the arrays (data_struct=), never just a file to unpickle
        for m in re.finditer(r"smplx\.SMPL\(", text):
            call = text[m.end():m.end() + 300]
            if not call.startswith("model_path=...") and "data_struct=" not in call.split("\n\n")[0]:
                hits.append(f"{f.name}: smplx.SMPL without data_struct")
    assert not [h for h in hits if not h.startswith("test_hardening.py")], hits


# ----------------------------------------------------------------------------- 4. labels
@pytest.mark.parametrize("key,index,value,expect", [
    ("scale", 3, 0.0, r"index 3, key 'scale': box scale must be > 0"),
    ("scale", 5, -1.2, r"index 5, key 'scale': box scale must be > 0"),
    ("S", 7, 1e30, r"index 7, key 'S': value 1e\+30 m is outside the plausible range"),
])
def test_bad_label_values_name_file_index_key(synth, tmp_path, key, index, value, expect):
    path = npz_variant(synth, tmp_path, "bad", **{key: setitem(index, value)})
    with pytest.raises(data.DataError, match=rf"bad.npz: {expect}"):
        data.NpzDataset(path, img_root=synth)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        ds = data.NpzDataset(path, img_root=synth, skip_bad=True)   # --skip-bad catches it
    assert len(ds) == 15 and index not in ds.indices and ds.num_bad == 1


def test_tsv_zero_scale_is_a_data_error(synth, tmp_path):
    yaml_path = data.write_metro_tsv(synth / "train.npz", tmp_path, "t")
    label = tmp_path / "t.label.tsv"
    rows = [l.split("\t") for l in label.read_text().splitlines()]
    ann = json.loads(rows[2][1])
    ann[0]["scale"] = 0.0
    rows[2][1] = json.dumps(ann)
    data.write_tsv(rows, label)
    ds = data.TsvDataset(yaml_path)
    with pytest.raises(data.DataError, match=r"t.label.tsv: index 2, key 'scale': box scale must be > 0"):
        ds[2]


def test_nan_in_body_model_is_refused(tmp_path):
    arrays = body.load_smpl_pickle(body.toy_body_path())
    arrays["v_template"] = arrays["v_template"].copy()
    arrays["v_template"][10, 1] = np.nan
    p = tmp_path / "SMPL_NEUTRAL.pkl"
    p.write_bytes(pickle.dumps(arrays, protocol=2))
    with pytest.raises(ValueError, match=r"SMPL_NEUTRAL.pkl: key 'v_template' has 1 non-finite"):
        body.BodyModel(p)


def test_supervision_is_printed_and_none_is_refused(synth, tmp_path, capsys):
    no_joints = npz_variant(synth, tmp_path, "no_joints", S=None, part=None)
    train.describe_train_data(data.NpzDataset(no_joints, img_root=synth), True)
    assert "no_joints.npz: 16 samples; supervision: 2D joints no, 3D joints no, SMPL yes" in capsys.readouterr().out
    nothing = npz_variant(synth, tmp_path, "nothing", S=None, part=None, pose=None)
    with pytest.raises(data.DataError, match="nothing.npz.*provides no supervision"):
        train.describe_train_data(data.NpzDataset(nothing, img_root=synth), True)


# ----------------------------------------------------------------------------- 5. disk full
def test_disk_full_names_device_and_file_and_removes_the_temp(tmp_path, monkeypatch):
    ckpt = tmp_path / "last.pt"
    train.atomic_save({"step": 1}, ckpt)

    def full_disk_save(obj, f):                       # what the OS does when the disk fills up
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OSError, match=r"no space left on .*device.* while writing .*last.pt"):
        train.atomic_save({"step": 2}, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]     # no temp file left
    monkeypatch.undo()
    assert train.load_checkpoint(ckpt, required=("step",))["step"] == 1  # the previous one intact

    def torch_writer_error(obj, f):                  # torch's own wording for the same failure
        f.write(b"x" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    class Full:
        f_bavail, f_frsize = 0, 4096
    monkeypatch.setattr(torch, "save", torch_writer_error)
    monkeypatch.setattr(os, "statvfs", lambda p: Full())
    with pytest.raises(OSError, match="no space left on"):
        train.atomic_save({"step": 2}, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_stale_temp_files_of_the_run_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.pt.tmp{dead.pid}"
    live = tmp_path / f".last.pt.tmp{os.getppid()}"   # another process still writing: kept
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    assert train.remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


# ----------------------------------------------------------------------------- 7. resume
def test_resume_refuses_changed_arguments_keeps_true_config_and_log(synth, tmp_path, capsys):
    out = tmp_path / "run"
    npz = synth / "train.npz"
    run_train(npz, out, "--stop-at-step", "2", "--ckpt-every", "2", steps=3)
    with open(out / "log.jsonl", "a") as f:           # logged, then killed before its checkpoint
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    stale = out / ".last.pt.tmp999999999"
    stale.write_bytes(b"partial")
    base_lr = train.load_checkpoint(out / "last.pt")["config"]["lr"]
    with pytest.raises(ValueError, match=rf"lr: checkpoint {base_lr!r}, now 0.5.*--allow-config-change lr"):
        run_train(npz, out, "--resume", "--lr", "0.5", steps=3)
    with pytest.raises(ValueError, match=r"batch_size: checkpoint 2, now 4; seed: checkpoint 0, now 5"):
        run_train(npz, out, "--resume", "--seed", "5", "--batch-size", "4", steps=3)
    run_train(npz, out, "--resume", "--lr", "0.5", "--allow-config-change", "lr", steps=3)
    assert "lr " + repr(base_lr) + " -> 0.5" in capsys.readouterr().out
    ck = train.load_checkpoint(out / "last.pt")
    assert ck["step"] == 3 and ck["config"]["lr"] == 0.5 and ck["config"]["seed"] == 0
    assert ck["config"]["resume_history"] == [{"step": 2, "changed": {"lr": [base_lr, 0.5]}}]
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == 0.5      # really applied
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert not stale.exists()
    run_train(npz, tmp_path / "fresh", "--resume", steps=1)
    assert "--resume: no checkpoint at" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 8. messages
def test_checkpoint_messages(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"empty.pt: the file is empty \(0 bytes"):
        train.load_checkpoint(empty)
    no_model = tmp_path / "no_model.pt"
    torch.save({"step": 3}, no_model)
    with pytest.raises(RuntimeError, match=r"no_model.pt lacks key\(s\) \['model'\] \(found \['step'\]\)"):
        train.load_checkpoint(no_model)


def test_npz_messages(synth, tmp_path):
    zero = npz_variant(synth, tmp_path, "zero", **{k: (lambda a: a[:0]) for k in dict(np.load(synth / "train.npz"))})
    with pytest.raises(data.DataError, match="zero.npz.*no samples"):
        data.NpzDataset(zero)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(data.DataError, match=r"empty.npz.*empty \(0 bytes"):
        data.NpzDataset(empty)
    text = tmp_path / "text.npz"
    text.write_text("imgname,scale\n")
    with pytest.raises(data.DataError, match="text.npz.*not an npz file.*not a zip"):
        data.NpzDataset(text)
    with pytest.raises(data.DataError, match=r"missing.npz.*file not found.*python data.py synth"):
        data.NpzDataset(tmp_path / "missing.npz")


def test_stale_lineidx_is_named(synth, tmp_path):
    yaml_path = data.write_metro_tsv(synth / "train.npz", tmp_path, "t")
    label = tmp_path / "t.label.tsv"
    idx = label.with_suffix(".lineidx").read_text()
    rows = label.read_text().splitlines()
    label.write_text("\n".join(rows[:8] + rows) + "\n")   # rewritten with more rows, old index kept
    with pytest.raises(data.DataError, match=r"t.label.lineidx.*stale.*Delete it"):
        data.TsvDataset(yaml_path)
    assert label.with_suffix(".lineidx").read_text() == idx


def test_skip_bad_summary_and_max_bad(synth, tmp_path, capsys):
    yaml_path = data.write_metro_tsv(synth / "train.npz", tmp_path, "t")
    label = tmp_path / "t.label.tsv"
    rows = [l.split("\t") for l in label.read_text().splitlines()]
    for r in rows[:12]:                               # 12 of 16 rows broken
        r[1] = "{not json"
    data.write_tsv(rows, label)
    with time_limit(300), pytest.raises(data.DataError, match=r"sample reads hit bad samples.*above --max-bad 0.1"):
        run_train(yaml_path, tmp_path / "a", "--skip-bad", steps=50)
    run_train(yaml_path, tmp_path / "b", "--skip-bad", "--max-bad", "1", steps=2)
    assert re.search(r"--skip-bad: \d+ of \d+ sample reads skipped a bad sample", capsys.readouterr().out)


def test_process_group_gets_a_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    train.setup_distributed("cpu", 7)
    assert seen["timeout"] == datetime.timedelta(minutes=7) and seen["backend"] == "gloo"
    assert train.parse_args(["--model", "tore"]).dist_timeout == train.DIST_TIMEOUT_MINUTES <= 30


# ----------------------------------------------------------------------------- 9. first contact
def test_no_train_uses_the_embedded_default_made_once(tmp_path, monkeypatch, capsys):
    args = train.parse_args(["--model", "deformer"])
    assert args.train is None and args.val is None
    monkeypatch.setattr(train, "DEFAULT_DATA", tmp_path / "synth")
    tr, te = train.ensure_default_data("4,2")
    assert "making the default synthetic train set (4 images)" in capsys.readouterr().out
    assert len(np.load(tr)["imgname"]) == 4 and len(np.load(te)["imgname"]) == 2
    stamp = Path(tr).stat().st_mtime_ns
    assert train.ensure_default_data("4,2") == (tr, te) and Path(tr).stat().st_mtime_ns == stamp
    assert "making" not in capsys.readouterr().out
    assert train.ensure_default_data("4,2", is_main=False) == (tr, te)   # other ranks: files exist
    with pytest.raises(TimeoutError, match="waited .* for rank 0"):
        train.ensure_default_data("4,2", is_main=False, root=tmp_path / "never", wait_minutes=0.02)


def test_setup_errors_are_printed_once_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(ROOT / "train.py"), "--model", "fastmetro", "--train", str(tmp_path / "nothing.npz"),
           "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert text.count("nothing.npz: index -, key '-': file not found") == 1, text[-3000:]
    assert "python data.py synth" in text


def test_data_py_smoke_test(capsys):
    data.main([])
    out = capsys.readouterr().out
    assert "npz vs METRO TSV of the same 8 samples: max 3D-joint difference 0.00e+00 m" in out
