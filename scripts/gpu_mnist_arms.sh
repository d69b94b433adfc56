#!/usr/bin/env bash
# One call of a lent GPU machine (docs/reproduction.md, "The MNIST augmentation arms on one GPU"): the MNIST recipes
# named in ARMS (default recipes/mnist_titn_gpu_crop.yaml and recipes/mnist_titn_gpu_paper.yaml) train side by side
# on the one GPU, each from the published student, for BUDGET minutes (default 3.5). Needs .stage/mnist/ (carried),
# made here by
#   mkdir -p .stage/mnist && cp ../shared/data/mnist/train.npz weights/aircnn_small_32.mnist/model.safetensors \
#     .stage/mnist/ && mv .stage/mnist/model.safetensors .stage/mnist/teacher.safetensors
# and the published student in float16 as .stage/mnist/student_fp16.safetensors (the conversion is in the header of
# scripts/gpu_continue_cifar10.sh). Results land in $OUT/<arm>/: train.log, metrics.jsonl, best.pth in parts of at
# most 15 MiB (cat best.pth.* > best.pth).
# EXTRA (more train flags, e.g. a CPU dry run) may be set in the environment.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # side by side, not oversubscribed
OUT=${OUT:-/tmp/out} BUDGET=${BUDGET:-3.5} RUN=${RUN:-/tmp/run}
ARMS=${ARMS:-recipes/mnist_titn_gpu_crop.yaml recipes/mnist_titn_gpu_paper.yaml}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
mkdir -p /tmp/data/mnist && cp .stage/mnist/train.npz /tmp/data/mnist/ || exit 1
for recipe in $ARMS; do
    arm=$(basename "$recipe" .yaml)
    mkdir -p "$OUT/$arm"
    timeout $(python3 -c "print(int($BUDGET * 60 + 90))") python3 -m titn_lib.train --recipe "$recipe" \
        --data-dir /tmp/data --no-test --output "$RUN/$arm" --time-budget "$BUDGET" \
        --initial-checkpoint .stage/mnist/student_fp16.safetensors \
        --teacher-checkpoint .stage/mnist/teacher.safetensors ${EXTRA:-} > "$OUT/$arm/train.log" 2>&1 &
done
wait
for recipe in $ARMS; do
    arm=$(basename "$recipe" .yaml)
    echo "$arm:"; tail -n 3 "$OUT/$arm/train.log"
    [ -f "$RUN/$arm/best.pth" ] || continue
    cp "$RUN/$arm/metrics.jsonl" "$OUT/$arm/" && split -b 15M -d "$RUN/$arm/best.pth" "$OUT/$arm/best.pth."
    sha256sum "$RUN/$arm/best.pth"
done
