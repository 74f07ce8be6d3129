#!/usr/bin/env bash
# Rebuild the checkpoints that ship in fastdiff/assets/ (CPU; the exact commands behind the bundled models).
# Each run writes runs/<name>/ (resumable checkpoints, train_log.jsonl) and exports a small fp16 copy with
# its log to fastdiff/assets/<name>/. The two diffusion models train side by side with one thread each.
#   bash scripts/train_bundled.sh            all five (the block-causal one after the discrete one it starts from)
#   bash scripts/train_bundled.sh scorers    only the causal LM and the classifier
#   bash scripts/train_bundled.sh bd3        only the block-causal (BD3-LM) fine-tune of the discrete model
set -euo pipefail
cd "$(dirname "$0")/.."
FD=${FASTDIFF:-.venv/bin/fastdiff}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

diffusion() {
  # Discrete: absorbing (MDLM-style, no step input), D3PM hybrid loss, cosine learning rate, EMA 0.999,
  # 5000 updates of 32 x 64 tokens (~25 epochs of the training split; 2 h 21 min on one core), held-out loss
  # every 250 updates and the best EMA checkpoint kept and exported, with the recommended temperature 0.9
  # (benchmarks/results/eval-discrete*.json). The shipped run was started with --steps 9000 and resumed at
  # step 1500 with --steps 5000 (fastdiff/assets/discrete/command.txt has the exact commands), so its
  # learning rate differs from this command's before step 1500.
  $FD train --overwrite --family discrete --task attribute --seq-len 64 --steps "${STEPS:-5000}" --batch-size 32 \
    --width 192 --layers 6 --heads 6 --dropout 0.1 --cond-drop 0.25 --lr 3e-3 --warmup 500 --min-lr-ratio 0.1 \
    --ema-decay 0.999 --eval-every 250 --keep-best --log-every 50 --ckpt-every 500 --seed 0 --threads 1 \
    --out runs/discrete --no-progress &
  # Continuous: the shipped model is still this 1500-update run (SED with the step embedding added to the
  # input, a checkpoint of the layout before adaLN). A 5000-update retrain with the adaLN layout
  # (benchmarks/results/eval-continuous-retrain-5000.json) scored worse samples, so it was not shipped.
  $FD train --overwrite --family continuous --task attribute --seq-len 64 --steps "${CONT_STEPS:-1500}" --batch-size 32 \
    --width 128 --layers 4 --heads 4 --embed-dim 32 --schedule sqrt --set embedding_layernorm=true \
    --set model.time_conditioning=\"add\" --set model.embed_scale=false --lam-anchor 1 --lr 1e-3 --warmup 150 --ema-decay 0.995 \
    --log-every 25 --ckpt-every 250 --seed 0 --out runs/continuous --export fastdiff/assets/continuous --no-progress &
  wait
  .venv/bin/python -c "from fastdiff.training.checkpoint import export_checkpoint as e; \
e('runs/discrete/best', 'fastdiff/assets/discrete', generation={'temperature': 0.9})"
  for f in train_log.jsonl command.txt train_config.json; do cp "runs/discrete/$f" fastdiff/assets/discrete/; done
}

bd3() {
  # Block-causal (BD3-LM, Arriola et al. 2025) fine-tune of the bundled discrete model, as BD3-LM fine-tunes
  # from MDLM: the same architecture with block_size 16, the two-stream BD3-LM objective (one step per block,
  # noisy blocks attend to the clean blocks before them), the bundled model's EMA weights as the start
  # (--init-from), constant learning rate 3e-4 after 50 warm-up updates (so a run cut short is the run of
  # that many --steps), EMA 0.99 (a short run: 0.999 would keep most of the bidirectional start), one thread.
  # The shipped copy is the best held-out checkpoint of the run (fastdiff/assets/bd3/command.txt).
  $FD train --overwrite --family discrete --task attribute --seq-len 64 --steps "${BD3_STEPS:-1000}" --batch-size 32 \
    --width 192 --layers 6 --heads 6 --dropout 0.1 --cond-drop 0.25 --set model.block_size=16 \
    --init-from fastdiff/assets/discrete --lr 3e-4 --warmup 50 --ema-decay 0.99 --set lr_schedule=\"constant\" \
    --eval-every 100 --keep-best --log-every 10 --ckpt-every 100 --seed 0 --threads 1 --out runs/bd3 --no-progress
  .venv/bin/python -c "from fastdiff.training.checkpoint import export_checkpoint as e; \
e('runs/bd3/best', 'fastdiff/assets/bd3', generation={'temperature': 0.9})"
  for f in train_log.jsonl command.txt train_config.json; do cp "runs/bd3/$f" fastdiff/assets/bd3/; done
}

scorers() {
  $FD train --overwrite --scorer causal_lm --seq-len 64 --steps 1500 --batch-size 32 --width 128 --layers 2 --heads 4 \
    --lr 1e-3 --warmup 100 --seed 0 --out runs/causal_lm --export fastdiff/assets/causal_lm --no-progress &
  $FD train --overwrite --scorer classifier --seq-len 64 --steps 400 --batch-size 32 --width 64 --layers 1 --heads 4 \
    --lr 1e-3 --warmup 50 --seed 0 --out runs/classifier --export fastdiff/assets/classifier --no-progress &
  wait
}

case "${1:-all}" in
  all) diffusion; bd3; scorers ;;
  diffusion) diffusion ;;
  scorers) scorers ;;
  bd3) bd3 ;;
  *) echo "usage: $0 [all|diffusion|scorers|bd3]" >&2; exit 2 ;;
esac
