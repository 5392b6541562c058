"""export.py: each model's tiny preset (its tiny repository backbone, the toy body) exports with
torch.export; the program equals eager at batch 1 and 3 (one dynamic batch dimension), and the
saved file runs in a fresh Python process that cannot import any of the repository's files."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import export
import checkpoints

MODELS = ("fastmetro", "tore", "deformer", "featup_hmr")
TOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export every model's tiny preset once (random init); name -> (eager wrapper, program, path)."""
    out, folder = {}, tmp_path_factory.mktemp("export")
    for name in MODELS:
        meta = {"model": name, "preset": "tiny", "set": [], "body": None, "h36m_regressor": None,
                "seed": 0, "source": "test"}
        model, _ = export.build_from_spec(meta)
        meta.update(input_size=list(export.input_size_of(model)), outputs=list(export.OUTPUT_NAMES))
        ep = export.export_program(model, name, max_batch=8)
        path = folder / f"{name}.pt2"
        export.save_program(ep, path, meta)
        out[name] = (export.InferenceOutputs(model).eval(), ep, path)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_exported_equals_eager_at_batch_1_and_3(exported, name):
    eager, ep, _ = exported[name]
    H, W = export.input_size_of(eager.model)
    prog = ep.module()
    g = torch.Generator().manual_seed(1)
    for b in (1, 3):
        x = torch.randn(b, 3, H, W, generator=g)
        with torch.no_grad():
            want, got = eager(x), prog(x)
        assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]
        assert got[0].shape[0] == b
        diff = export.max_difference(want, got)
        assert max(diff.values()) <= TOL, (name, b, diff)
    with pytest.raises(Exception):               # the batch is the only dynamic dimension
        prog(torch.randn(1, 3, H + 32, W))


def test_programs_load_and_run_in_a_fresh_process_without_the_repository(exported, tmp_path):
    """torch.export.load in a subprocess (isolated mode, cwd outside the repo): the repository's
    files are not importable there, yet the programs run and reproduce the eager outputs."""
    cases = {}
    for name, (eager, _, path) in exported.items():
        H, W = export.input_size_of(eager.model)
        x = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            cases[name] = {"path": str(path), "x": x, "want": eager(x)}
    torch.save(cases, tmp_path / "cases.pt")
    code = textwrap.dedent(f"""
        import importlib.util, json, sys, torch
        repo = {json.dumps(str(Path(checkpoints.__file__).resolve().parent))}
        assert all(repo not in p for p in sys.path), sys.path
        for mod in ("fastmetro", "tore", "deformer", "featup_hmr", "sparse_attention",
                    "deformable_attention", "body", "backbones", "export", "train"):
            assert importlib.util.find_spec(mod) is None, mod
        torch.set_num_threads(1)
        cases = torch.load("cases.pt", weights_only=True)
        diff = {{}}
        for name, c in cases.items():
            prog = torch.export.load(c["path"]).module()
            with torch.no_grad():
                got = prog(c["x"])
            diff[name] = max(float((a - b).abs().max()) for a, b in zip(got, c["want"]))
        print(json.dumps(diff))
    """)
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    diff = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(diff) == set(MODELS)
    assert max(diff.values()) <= TOL, diff


def test_check_rebuilds_eager_from_the_file_and_reports(exported, capsys):
    _, _, path = exported["fastmetro"]
    res = export.check(path, batch=2, repeats=1, synthetic=True)
    assert set(res["diff"]) == {"random batch 1", "random batch 2", "synthetic batch 2"}
    assert max(max(d.values()) for d in res["diff"].values()) <= TOL
    assert res["eager_ips"] > 0 and res["exported_ips"] > 0
    assert "images/s" in capsys.readouterr().out


def test_bad_files_get_clear_errors(tmp_path):
    bad = tmp_path / "junk.pt2"
    bad.write_bytes(b"not a program")
    with pytest.raises(RuntimeError, match="junk.pt2"):
        export.load_program(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt2"):
        export.load_program(tmp_path / "missing.pt2")


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "x.pt2"
    out.write_bytes(b"keep")
    with pytest.raises(SystemExit, match="exists"):
        export.main(["--model", "fastmetro", "--preset", "tiny", "--out", str(out), "--no-onnx"])
    assert out.read_bytes() == b"keep"
