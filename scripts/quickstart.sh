#!/usr/bin/env bash
# The main job (a few minutes on 2 CPU cores): set up a virtual environment, then examples/quickstart.py:
# the pretrained CIFAR-10 student and its teacher on the full CIFAR-10 test split (the paper's table layout),
# fine-tuning those weights on MNIST with the paper's loss beside the same steps from scratch, and pictures.
# Data: DATA (default ../shared/data where it exists, else ./data, downloaded by torchvision when online).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT="${OUT:-output/quickstart}"
.venv/bin/python examples/quickstart.py --data-dir "$DATA" --output "$OUT" "$@"
