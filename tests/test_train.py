"""The trainer end to end on a tiny synthetic dataset: every model trains, DDP replicas stay in
sync, resuming reproduces the uninterrupted run, a killed checkpoint write loses nothing, and the
demo writes its three outputs per image."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    data.generate_synthetic(out, 16, split="train", seed=0, size=96)
    data.generate_synthetic(out, 4, split="test", seed=1, size=96)
    return out


def run_train(synth, out, *extra, model="fastmetro", steps=2):
    args = train.parse_args([
        "--model", model, "--preset", "tiny", "--train", str(synth / "train.npz"),
        "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--workers", "0",
        "--log-every", "1", "--no-progress", "--device", "cpu", *extra])
    return train.train(args)


def losses(out):
    recs = [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


@pytest.mark.parametrize("model", train.MODELS)
def test_every_model_trains_two_steps(synth, tmp_path, model):
    run_train(synth, tmp_path, model=model)
    seq = losses(tmp_path)
    assert [s for s, _ in seq] == [1, 2]
    assert all(torch.isfinite(torch.tensor(l)) for _, l in seq)
    ck = train.load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 2 and ck["config"]["model"] == model


def test_lr_drop_at_fractions_of_training(synth, tmp_path):
    run_train(synth, tmp_path, "--lr", "1e-3", "--lr-drop-at", "0.5", steps=4)
    recs = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if "loss" in r]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    for bad, why in (("0.5,x", "comma-separated fractions"), ("1.2", "must lie in")):
        with pytest.raises(ValueError, match=f"--lr-drop-at: .*{why}"):
            run_train(synth, tmp_path / bad, "--lr-drop-at", bad)


def test_resume_reproduces_uninterrupted_run(synth, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # 16 samples at batch 4: 4 steps per epoch, so the resumed part crosses an epoch boundary.
    common = ("--ckpt-every", "3", "--seed", "3", "--batch-size", "4")
    run_train(synth, full, *common, steps=6)
    run_train(synth, part, *common, "--stop-at-step", "3", steps=6)
    assert [s for s, _ in losses(part)] == [1, 2, 3]               # really interrupted
    run_train(synth, part, *common, "--resume", steps=6)
    a, b = losses(full), losses(part)
    assert [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    # Data order, augmentation and dropout all have to line up for the losses to match.
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, rel=1e-6, abs=1e-9), (sa, la, lb)


def test_non_finite_loss_stops_with_a_clear_message_or_is_skipped(synth, tmp_path, capsys, monkeypatch):
    real = train.make_targets
    calls = {"n": 0}

    def poisoned(*a, **k):                      # the second batch's targets are NaN
        calls["n"] += 1
        t = real(*a, **k)
        if calls["n"] == 2:
            t["joints3d"] = t["joints3d"] * float("nan")
        return t

    monkeypatch.setattr(train, "make_targets", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 1"):
        run_train(synth, tmp_path / "stop", steps=3)
    calls["n"] = 0
    run_train(synth, tmp_path / "skip", "--on-nan", "skip", steps=2)
    assert "non-finite loss, batch skipped" in capsys.readouterr().out
    assert [s for s, _ in losses(tmp_path / "skip")] == [1, 2]
    calls["n"] = -10**9                         # every batch from now on is poisoned
    monkeypatch.setattr(train, "make_targets", lambda *a, **k: {**real(*a, **k), "joints3d": real(*a, **k)["joints3d"] * float("nan")})
    with pytest.raises(FloatingPointError, match="in a row"):
        run_train(synth, tmp_path / "give_up", "--on-nan", "skip", "--max-skips", "3", steps=2)


def test_killed_checkpoint_write_leaves_previous_loadable(tmp_path):
    ckpt = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        import train
        train.atomic_save({{"step": 1, "w": torch.zeros(4)}}, {str(ckpt)!r})
        def stalled_save(obj, f):
            f.write(b"partial checkpoint bytes" * 100)
            f.flush()
            print("writing", flush=True)
            time.sleep(120)
        torch.save = stalled_save
        train.atomic_save({{"step": 2, "w": torch.ones(4)}}, {str(ckpt)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"           # killed mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    ck = torch.load(ckpt, weights_only=True)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.zeros(4))
    train.atomic_save({"step": 3}, ckpt)                              # the next save still works
    assert torch.load(ckpt, weights_only=True)["step"] == 3


def test_two_process_gloo_ranks_stay_identical(synth, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", str(ROOT / "train.py"), "--model", "fastmetro", "--preset", "tiny",
           "--train", str(synth / "train.npz"), "--out", str(tmp_path), "--steps", "3",
           "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-progress", "--log-every", "1"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((tmp_path / "replicas.json").read_text())
    assert rep["world_size"] == 2
    assert rep["max_param_spread"] == 0.0
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3]
    # The ranks saw different samples: the first step's gradient differs per rank, so a
    # spread of zero means DDP averaged them (not that both ranks trained on the same data).
    ck = train.load_checkpoint(tmp_path / "last.pt")
    assert ck["config"]["world_size"] == 2 and len(ck["rng"]) == 2


def test_demo_writes_obj_png_npz(synth, tmp_path):
    import demo
    run_train(synth, tmp_path / "run", steps=1)
    n = demo.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--images",
                   str(synth / "images" / "test"), "--out", str(tmp_path / "demo"), "--limit", "2",
                   "--device", "cpu"])
    assert n == 2
    for stem in sorted(p.stem for p in (synth / "images" / "test").iterdir())[:2]:
        for suffix in ("_overlay.png", ".obj", ".npz"):
            assert (tmp_path / "demo" / f"{stem}{suffix}").stat().st_size > 0
        obj = (tmp_path / "demo" / f"{stem}.obj").read_text().splitlines()
        assert sum(l.startswith("v ") for l in obj) == 6890


def test_weighted_mixed_datasets_train(synth, tmp_path):
    spec = f"{synth / 'train.npz'}@0.7,{synth / 'test.npz'}@0.3"
    run_train(synth, tmp_path, "--train", spec, steps=2)
    assert [s for s, _ in losses(tmp_path)] == [1, 2]


def test_evaluate_cli_writes_json_with_baseline(synth, tmp_path):
    import evaluate
    run_train(synth, tmp_path / "run", steps=1)
    out = tmp_path / "eval.json"
    res = evaluate.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--data", str(synth / "test.npz"),
                         "--baseline-data", str(synth / "train.npz"), "--out", str(out),
                         "--device", "cpu", "--workers", "0", "--protocol", "spin"])
    saved = json.loads(out.read_text())
    for key in ("model", "mean_pose_baseline"):
        assert saved[key]["num_samples"] == 4
        assert saved[key]["mpjpe"] > 0 and saved[key]["pa_mpjpe"] <= saved[key]["mpjpe"] + 1e-6
    assert saved["protocol"] == "spin" and res["model"]["mpjpe"] == saved["model"]["mpjpe"]
