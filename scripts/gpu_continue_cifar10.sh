#!/usr/bin/env bash
# One call of a lent GPU machine (docs/reproduction.md, "Training on a lent GPU machine"): continue the CIFAR-10
# student with RECIPE (default recipes/cifar10_titn_gpu_cont.yaml), then, unless BENCH=0, time the CUDA rows of
# benchmarks/throughput.py and profile one training step. Needs .stage/ (carried) made here by
#   python scripts/device_stage.py pack --parts 1 --jpeg-quality 95 --out .stage
# plus the published student and teacher weights in float16, written by
#   python -c "import sys; from safetensors.torch import load_file, save_file
#   save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])" \
#     weights/titn_tiny_patch8_32.cifar10/model.safetensors .stage/student_fp16.safetensors
# and the same for weights/aircnn_wide_32.cifar10/model.safetensors -> .stage/teacher_fp16.safetensors.
# Results land in $OUT: train.log, metrics.jsonl, best.pth in parts of at most 15 MiB (cat best.pth.* > best.pth).
# BUDGET (minutes of training) and EXTRA (more train flags, e.g. a CPU dry run) may be set in the environment.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out} BUDGET=${BUDGET:-7.0} RUN=${RUN:-/tmp/run} RECIPE=${RECIPE:-recipes/cifar10_titn_gpu_cont.yaml}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
python3 scripts/device_stage.py unpack .stage/part0 --out /tmp/data || exit 1
timeout $(python3 -c "print(int($BUDGET * 60 + 120))") python3 -m titn_lib.train \
    --recipe "$RECIPE" --data-dir /tmp/data --no-test --output "$RUN" \
    --initial-checkpoint .stage/student_fp16.safetensors --teacher-checkpoint .stage/teacher_fp16.safetensors \
    --time-budget "$BUDGET" ${EXTRA:-} > "$OUT/train.log" 2>&1
echo "train exit $?"; tail -n 4 "$OUT/train.log"
[ -f "$RUN/best.pth" ] || exit 1  # nothing trained: return at once, leaving device time for another try
cp "$RUN/metrics.jsonl" "$OUT/" && split -b 15M -d "$RUN/best.pth" "$OUT/best.pth." && sha256sum "$RUN/best.pth"
[ -n "${EXTRA:-}" ] || [ "${BENCH:-1}" = 0 ] && exit 0  # a dry run stops here, as does BENCH=0
timeout 80 python3 benchmarks/throughput.py --device cuda --batch-sizes 256 1024 --no-compile --reps 3 \
    --scaling-sizes 32 64 --scaling-batch 256 --scaling-reps 2 > "$OUT/throughput.md" 2>&1; echo "throughput exit $?"
timeout 45 python3 scripts/profile_step.py > "$OUT/profile.txt" 2>&1; echo "profile exit $?"
