"""Training curves of a run as a PNG (PIL only, no plotting library).

No paper: a viewer for train.py's `OUT/log.jsonl` (one JSON record per logged step: `step`,
`loss` and the model's loss terms; evaluation records carry `eval`).

    python curves.py runs/quickstart-fastmetro/log.jsonl --out runs/quickstart-fastmetro/curves.png

One panel per series (total loss first, then every other numeric loss term, then the evaluation
metrics if any), log-scale y for losses, linear for metrics; the x axis is the optimiser step. A
moving average (window 1/50 of the run) is drawn over the raw values.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SKIP = {"step", "epoch", "lr", "img_per_s", "eval"}


def read_log(path):
    """log.jsonl -> ({name: (steps, values)} training series, {name: (steps, values)} eval series)."""
    train, evals = {}, {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not JSON ({e})") from None
        step = rec.get("step")
        if step is None:
            continue
        if isinstance(rec.get("eval"), dict):
            for k, v in rec["eval"].items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    evals.setdefault(k, ([], []))
                    evals[k][0].append(step)
                    evals[k][1].append(float(v))
            continue
        for k, v in rec.items():
            if k in SKIP or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            train.setdefault(k, ([], []))
            train[k][0].append(step)
            train[k][1].append(float(v))
    return train, evals


def _panel(draw, box, title, xs, ys, log_y, colour=(40, 90, 200)):
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(160, 160, 160))
    draw.text((x0 + 6, y0 + 4), title, fill=(0, 0, 0))
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if log_y:
        keep = ys > 0
        xs, ys = xs[keep], ys[keep]
    if len(xs) == 0:
        return
    t = np.log10(ys) if log_y else ys
    lo, hi = float(t.min()), float(t.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    xl, xh = float(xs.min()), float(max(xs.max(), xs.min() + 1))
    px = lambda x: x0 + 40 + (x - xl) / (xh - xl) * (x1 - x0 - 50)
    py = lambda y: y1 - 18 - (y - lo) / (hi - lo) * (y1 - y0 - 40)
    fmt = (lambda y: f"{10 ** y:.3g}") if log_y else (lambda y: f"{y:.3g}")
    draw.text((x0 + 2, py(hi) - 5), fmt(hi), fill=(90, 90, 90))
    draw.text((x0 + 2, py(lo) - 5), fmt(lo), fill=(90, 90, 90))
    draw.text((x1 - 60, y1 - 14), f"step {int(xh)}", fill=(90, 90, 90))
    pts = [(px(a), py(b)) for a, b in zip(xs, t)]
    if len(pts) == 1:
        draw.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=colour)
        return
    light = tuple(int(c + (255 - c) * 0.6) for c in colour)
    draw.line(pts, fill=light, width=1)
    w = max(1, len(t) // 50)
    if w > 1:
        sm = np.convolve(t, np.ones(w) / w, mode="valid")
        sx = xs[w - 1:]
        draw.line([(px(a), py(b)) for a, b in zip(sx, sm)], fill=colour, width=2)


def plot(log_path, out_path, cols=3, panel=(320, 200)):
    """Draw every series of `log_path` into `out_path` (PNG); returns the number of panels."""
    train, evals = read_log(log_path)
    if not train and not evals:
        raise ValueError(f"{log_path}: no training records (expected train.py's log.jsonl)")
    names = (["loss"] if "loss" in train else []) + sorted(k for k in train if k != "loss")
    series = [(k, train[k], True) for k in names] + [(f"eval {k}", evals[k], False) for k in sorted(evals)]
    rows = math.ceil(len(series) / cols)
    W, H = panel
    img = Image.new("RGB", (cols * W, rows * H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (name, (xs, ys), log_y) in enumerate(series):
        r, c = divmod(i, cols)
        box = (c * W + 4, r * H + 4, (c + 1) * W - 4, (r + 1) * H - 4)
        _panel(draw, box, name + (" (log)" if log_y else ""), xs, ys, log_y,
               (40, 90, 200) if log_y else (200, 80, 30))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    img.save(out_path)
    return len(series)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Training curves (PNG) from train.py's log.jsonl.")
    ap.add_argument("log")
    ap.add_argument("--out", default=None, help="PNG path (default: curves.png next to the log)")
    a = ap.parse_args(argv)
    out = a.out or str(Path(a.log).with_name("curves.png"))
    n = plot(a.log, out)
    print(f"wrote {out} ({n} panels)")


if __name__ == "__main__":
    main()
