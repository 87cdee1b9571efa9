#!/bin/bash
# The issue-12 CPU run of docs/fidelity.md as one resumable script: tile sets, autoencoder, latents,
# pre-training on the pool, a fine-tune long enough to see the fidelity curve flatten, judge, guide,
# generation, fidelity. ~4 h on an otherwise idle 2-core machine (the autoencoder ~1.6 h, the fine-tune's
# 6,000 steps ~1.1 h, the guide's 9,000 ~0.5 h): more than a working session, so run it first thing, in the
# background, with its folders outside the checkout, and re-run the same command in the next session:
#
#     nohup bash jobs/cpu_fidelity_run.sh ~/hd > ~/hd/run.log 2>&1 &
#
# Re-running the same command resumes: finished steps are skipped (markers in WORK/done/), training
# stages continue from their last checkpoint. Wall times go to WORK/times.log. To keep later edits
# of the checkout out of a running chain, run it from a worktree (git worktree add --detach ~/hd/src)
# with PYTHONPATH=~/hd/src.
set -euo pipefail
WORK=${1:?usage: cpu_fidelity_run.sh WORK_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
H=${HISTODIFF:-$REPO/.venv/bin/histodiff}
DATA=$(cd "$REPO/../shared/data" && pwd)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
mkdir -p "$WORK/done" && cd "$WORK"
step() {
  local name=$1; shift
  [ -e "done/$name" ] && return 0
  local t0; t0=$(date +%s); echo "== $name ($(date +%T)): $*"
  "$@"
  echo "$name $(( $(date +%s) - t0 )) s" >> times.log; touch "done/$name"
}
step ingest_crc5 "$H" ingest --config cpu --input "$DATA/crc5/train" --labeled --output tiles/crc5 data.label_fraction=0.05
step ingest_pool "$H" ingest --config cpu --input "$DATA/unlabeled" --output tiles/pool
step autoencoder "$H" train-autoencoder --tiles tiles/pool --tiles tiles/crc5 --run runs/ae data.batch_size=16
step latents_pool "$H" encode-latents --tiles tiles/pool --autoencoder runs/ae --output latents/pool
step latents_crc5 "$H" encode-latents --tiles tiles/crc5 --autoencoder runs/ae --output latents/crc5
step pretrain "$H" pretrain --latents latents/pool --run runs/pretrain data.batch_size=32 ray.keep_checkpoints=10
step finetune "$H" finetune --pretrained runs/pretrain --latents latents/crc5 --run runs/finetune data.batch_size=32 \
    ray.keep_checkpoints=30
step curve "$H" fidelity-curve --run runs/pretrain --run runs/finetune --tiles tiles/crc5 --oracle runs/oracle \
    --output fidelity/curve downstream.epochs=10 downstream.patience=10
step judge "$H" train-judge --tiles tiles/crc5 --output runs/judge
step guide "$H" train-classifier --latents latents/crc5 --ldm runs/finetune --run runs/guide --pseudo-labels runs/judge \
    data.batch_size=32
step generate "$H" generate --ldm runs/finetune --classifier runs/guide --judge runs/judge --tiles tiles/crc5 \
    --output synthetic/cg --per-class 300
step fidelity "$H" fidelity --tiles tiles/crc5 --synthetic classifier=synthetic/cg --oracle runs/oracle \
    --autoencoder runs/ae --judge runs/judge --output fidelity/sets downstream.epochs=10 downstream.patience=10
step samples "$H" sample --run runs/finetune --n 64 --steps 50 --output fidelity/finetune_samples.png
echo "done ($(date +%T)); wall times in $WORK/times.log"
