#!/usr/bin/env bash
# The main job, end to end on 2 CPU cores in a few minutes, with no download: set up a virtual environment,
# train a CNN teacher on MNIST (../shared/data), distil a TITN student from it (hard distillation, the paper's
# hybrid loss), evaluate both on the full MNIST test split (the paper's table layout) and plot the curves.
# A short budget: the accuracies are far from converged (see docs/reproduction.md for full runs).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"
OUT="${OUT:-output/quickstart}"
if [ ! -d .venv ]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet -e .
TITN=.venv/bin/titn
$TITN train --recipe recipes/quickstart_mnist_teacher.yaml --data-dir "$DATA" --output "$OUT/teacher" --no-progress
$TITN train --recipe recipes/quickstart_mnist_titn.yaml --data-dir "$DATA" --output "$OUT/student" \
    --teacher-checkpoint "$OUT/teacher/best.pth" --no-progress
$TITN eval "$OUT/teacher/best.pth" "$OUT/student/best.pth" --dataset mnist --data-dir "$DATA" \
    --json "$OUT/eval.json"
echo "curves: $OUT/teacher/curves.png $OUT/student/curves.png; table: $OUT/eval.json"
