#!/usr/bin/env bash
# The pipeline end to end on a GPU, offline: a random Llama of a real shape made on the
# machine, the real PQA-L file, fit a few dozen steps, then test and predict from the best
# checkpoint, with the backend given (unsloth by default).
#
#   [STEPS=25] [STAGES="fit test predict"] [NAME=...] bash benchmarks/gpu_pipeline.sh [SHAPE] [BACKEND] [extra medqa args...]
#   e.g. source .gpukit/activate.sh && bash benchmarks/gpu_pipeline.sh 1b unsloth
set -euo pipefail
SHAPE=${1:-1b}; BACKEND=${2:-unsloth}; shift 2 || true
DATA=${MEDQA_PQAL:-.gpudata/ori_pqal.json}
MODEL=/tmp/llama-$SHAPE-random
NAME=${NAME:-gpu-$SHAPE-$BACKEND}
[ -f "$MODEL/config.json" ] || python benchmarks/make_random_llama.py --shape "$SHAPE" --out "$MODEL" --corpus "$DATA"
ARGS=(--config configs/lora.yaml --model.pretrained "$MODEL" --model.backend "$BACKEND"
      --data.source "$DATA" --trainer.logger.init_args.name "$NAME" "$@")
run() { /usr/bin/time -f "$1: %e s wall, %M KB peak host RSS" python -m medqa "$@" 2>&1 | grep -vE "it/s]|s/it]|Warning"; }
STEPS=${STEPS:-25}  # optimizer steps of 4 batches of 4: validate once, at the end (an epoch is 112 batches)
STAGES=${STAGES:-fit test predict}
run fit "${ARGS[@]}" --trainer.max_steps "$STEPS" --data.batch_size 4 --trainer.accumulate_grad_batches 4 \
    --trainer.val_check_interval $((STEPS * 4)) --trainer.limit_val_batches 4
for stage in $STAGES; do [ "$stage" = fit ] || run "$stage" "${ARGS[@]}" --ckpt_path best; done
du -h logs/"$NAME"/fit-*/checkpoints/*.ckpt
