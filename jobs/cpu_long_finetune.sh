#!/bin/bash
# Does the cpu recipe's UNet learn more than texture with more fine-tuning? After jobs/cpu_fidelity_run.sh
# (run first here; its finished steps are skipped), a copy of its 1,800-step fine-tune continues on the same
# crc5 latents to 6,000 steps (the LR is constant after warm-up, so this is the same run, longer), then:
# the fidelity curve over the pre-training and all kept fine-tune checkpoints, 64 unconditional samples
# (the same seeds as the chain's), and 1,500 guided tiles from the longer fine-tune (the chain's guide
# and judge) and with a guide trained three times as long, in one fidelity report beside the chain's set
# (with the ceiling the autoencoder sets). ~2.3 h on an idle 2-core machine; resumable:
#
#     nohup bash jobs/cpu_long_finetune.sh ~/hd > ~/hd/long.log 2>&1 &
set -euo pipefail
WORK=${1:?usage: cpu_long_finetune.sh WORK_DIR}
# The chain in this shell: it leaves us in WORK with its `step` (skip what WORK/done marks) and `H`.
source "$(dirname "$0")/cpu_fidelity_run.sh" "$WORK"
step copy_finetune bash -c 'rm -rf runs/finetune_long && cp -r runs/finetune runs/finetune_long'
step finetune_long "$H" finetune --pretrained runs/pretrain --latents latents/crc5 --run runs/finetune_long \
    data.batch_size=32 diffusion.finetune_steps=6000 diffusion.checkpoint_every=1000 ray.keep_checkpoints=20
step curve_long "$H" fidelity-curve --run runs/pretrain --run runs/finetune_long --tiles tiles/crc5 \
    --oracle runs/oracle --output fidelity/curve_long downstream.epochs=10 downstream.patience=10
step samples_long "$H" sample --run runs/finetune_long --n 64 --steps 50 --output fidelity/finetune_long_samples.png
step generate_long "$H" generate --ldm runs/finetune_long --classifier runs/guide --judge runs/judge \
    --tiles tiles/crc5 --output synthetic/long --per-class 300
# A guide three times as long (9,000 steps instead of 3,000; cosine LR over its own budget), and the longer
# fine-tune sampled with it.
step guide9k "$H" train-classifier --latents latents/crc5 --ldm runs/finetune --run runs/guide9k \
    --pseudo-labels runs/judge data.batch_size=32 classifier.max_steps=9000
step generate_long9k "$H" generate --ldm runs/finetune_long --classifier runs/guide9k --judge runs/judge \
    --tiles tiles/crc5 --output synthetic/long9k --per-class 300
step fidelity_long "$H" fidelity --tiles tiles/crc5 --synthetic finetune1800=synthetic/cg \
    --synthetic finetune6000=synthetic/long --synthetic finetune6000_guide9k=synthetic/long9k \
    --oracle runs/oracle --autoencoder runs/ae --judge runs/judge \
    --output fidelity/long downstream.epochs=10 downstream.patience=10
echo "done ($(date +%T)); the curve: $WORK/fidelity/curve_long, the table: $WORK/fidelity/long/fidelity.md"
