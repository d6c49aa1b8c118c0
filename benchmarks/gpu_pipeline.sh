#!/usr/bin/env bash
# The pipeline end to end on a GPU, offline: a random Llama of a real shape made on the
# machine, the real PQA-L file, fit a few dozen steps, then test and predict from the best
# checkpoint, with the backend given (unsloth by default).
#
#   [STEPS=30] bash benchmarks/gpu_pipeline.sh [SHAPE] [BACKEND] [extra medqa args...]
#   e.g. source .gpukit/activate.sh && bash benchmarks/gpu_pipeline.sh 1b unsloth
set -euo pipefail
SHAPE=${1:-1b}; BACKEND=${2:-unsloth}; shift 2 || true
DATA=${MEDQA_PQAL:-.gpudata/ori_pqal.json}
MODEL=/tmp/llama-$SHAPE-random
NAME=gpu-$SHAPE-$BACKEND
[ -f "$MODEL/config.json" ] || python benchmarks/make_random_llama.py --shape "$SHAPE" --out "$MODEL" --corpus "$DATA"
ARGS=(--config configs/lora.yaml --model.pretrained "$MODEL" --model.backend "$BACKEND"
      --data.source "$DATA" --trainer.logger.init_args.name "$NAME" "$@")
run() { /usr/bin/time -f "$1: %e s wall, %M KB peak host RSS" python -m medqa "$@" 2>&1 | grep -vE "it/s]|s/it]|Warning"; }
run fit "${ARGS[@]}" --trainer.max_steps "${STEPS:-30}" --trainer.val_check_interval 40 --trainer.limit_val_batches 4
run test "${ARGS[@]}" --ckpt_path best
run predict "${ARGS[@]}" --ckpt_path best
du -h logs/"$NAME"/version_0/checkpoints/*.ckpt
