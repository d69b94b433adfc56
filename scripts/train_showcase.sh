#!/usr/bin/env bash
# A training showcase (about 4 minutes on 2 CPU cores): train a CNN teacher on MNIST, distil a TITN student from it
# (the paper's hybrid loss), evaluate both on the full MNIST test split (the paper's table layout), plot the curves.
# A short budget: the student is far from converged (see docs/reproduction.md for full runs).
# Data: DATA (default ../shared/data where it exists, else ./data, downloaded by torchvision when online).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT="${OUT:-output/train_showcase}"
TITN=.venv/bin/titn
$TITN train --recipe recipes/quickstart_mnist_teacher.yaml --data-dir "$DATA" --output "$OUT/teacher" --download
$TITN train --recipe recipes/quickstart_mnist_titn.yaml --data-dir "$DATA" --output "$OUT/student" \
    --teacher-checkpoint "$OUT/teacher/best.pth"
$TITN eval "$OUT/teacher/best.pth" "$OUT/student/best.pth" --data-dir "$DATA" --json "$OUT/eval.json"
echo "curves: $OUT/teacher/curves.png $OUT/student/curves.png; table: $OUT/eval.json"
