#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone:
#   install -> toy body -> synthetic dataset -> train a tiny model on CPU -> evaluate against the
#   mean-pose baseline -> demo overlays of test predictions.
# Knobs (environment): MODEL (fastmetro|tore|deformer|featup_hmr), STEPS, MINUTES (time cap),
# N_TRAIN, N_TEST, OUT; BODY=hand runs hand_quickstart.py (MODEL fastmetro|tore). Everything it writes goes under data/, runs/ and outputs/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -r requirements.txt
export HMR_CACHE="${HMR_CACHE:-$PWD/.cache}"
if [ "${BODY:-}" = hand ]; then  # hand mesh recovery instead: synthetic FreiHAND-layout hands (hand_quickstart.py)
    exec python3 hand_quickstart.py --model "${MODEL:-fastmetro}" --steps "${STEPS:-400}" --max-minutes "${MINUTES:-10}" \
        --n-train "${N_TRAIN:-256}" --n-eval "${N_TEST:-64}" --out "${OUT:-runs/quickstart-hand-${MODEL:-fastmetro}}"
fi
MODEL="${MODEL:-fastmetro}"
STEPS="${STEPS:-1600}"
MINUTES="${MINUTES:-10}"
N_TRAIN="${N_TRAIN:-3000}"
N_TEST="${N_TEST:-300}"
OUT="${OUT:-runs/quickstart-$MODEL}"

python3 body.py                                   # writes the procedural body (SMPL format) to the cache
[ -f data/synth/train.npz ] || python3 data.py synth --out data/synth --split train --n "$N_TRAIN" --seed 0
[ -f data/synth/test.npz ]  || python3 data.py synth --out data/synth --split test  --n "$N_TEST"  --seed 1
# No flip and no rotation augmentation here: the toy body's colours mark left (warm) and right
# (cool) parts, so a mirrored image contradicts its labels' colour cue, and in-plane rotation
# slows a from-scratch CPU run past its 10 minutes. Real-data runs keep FastMETRO's defaults.
python3 train.py --model "$MODEL" --preset tiny --train data/synth/train.npz --val data/synth/test.npz \
    --out "$OUT" --steps "$STEPS" --max-minutes "$MINUTES" --batch-size 16 --lr 1e-3 --workers 1 \
    --flip-prob 0 --rot-factor 0 --eval-every 0 --ckpt-every 500
python3 evaluate.py --ckpt "$OUT/last.pt" --data data/synth/test.npz --baseline-data data/synth/train.npz \
    --out "$OUT/eval_test.json"
python3 demo.py --ckpt "$OUT/last.pt" --images data/synth/images/test --limit 4 --out "outputs/demo-$MODEL"
