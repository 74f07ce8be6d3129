#!/usr/bin/env bash
# Rebuild the checkpoints that ship in fastdiff/assets/ (CPU; the exact commands behind the bundled models).
# Each run writes runs/<name>/ (resumable checkpoints, train_log.jsonl) and exports a small fp16 copy with
# its log to fastdiff/assets/<name>/. The two diffusion models train side by side with one thread each.
#   bash scripts/train_bundled.sh            all four
#   bash scripts/train_bundled.sh scorers    only the causal LM and the classifier
set -euo pipefail
cd "$(dirname "$0")/.."
FD=${FASTDIFF:-.venv/bin/fastdiff}
STEPS=${STEPS:-1500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

diffusion() {
  $FD train --overwrite --family discrete --task attribute --seq-len 64 --steps "$STEPS" --batch-size 32 \
    --width 128 --layers 4 --heads 4 --lr 1e-3 --warmup 150 --ema-decay 0.995 --timestep-sampler loss-aware \
    --log-every 25 --ckpt-every 250 --seed 0 --out runs/discrete --export fastdiff/assets/discrete --no-progress &
  $FD train --overwrite --family continuous --task attribute --seq-len 64 --steps "$STEPS" --batch-size 32 \
    --width 128 --layers 4 --heads 4 --embed-dim 32 --schedule sqrt \
    --set embedding_layernorm=true --lam-anchor 1 --lr 1e-3 --warmup 150 --ema-decay 0.995 \
    --log-every 25 --ckpt-every 250 --seed 0 --out runs/continuous --export fastdiff/assets/continuous --no-progress &
  wait
}

scorers() {
  $FD train --overwrite --scorer causal_lm --seq-len 64 --steps 1500 --batch-size 32 --width 128 --layers 2 --heads 4 \
    --lr 1e-3 --warmup 100 --seed 0 --out runs/causal_lm --export fastdiff/assets/causal_lm --no-progress &
  $FD train --overwrite --scorer classifier --seq-len 64 --steps 400 --batch-size 32 --width 64 --layers 1 --heads 4 \
    --lr 1e-3 --warmup 50 --seed 0 --out runs/classifier --export fastdiff/assets/classifier --no-progress &
  wait
}

case "${1:-all}" in
  all) diffusion; scorers ;;
  diffusion) diffusion ;;
  scorers) scorers ;;
  *) echo "usage: $0 [all|diffusion|scorers]" >&2; exit 2 ;;
esac
