#!/bin/bash
# Issue 14's fewer-step sampling measured on the issue-12 CPU run: after jobs/cpu_fidelity_run.sh (run
# first here; its finished steps are skipped), the same generator, guide and judge sample 1,500 tiles
# with 50-step DDIM and with SDE-DPM-Solver++ at 20, 25 and 30 steps, each at seeds 0 and 1, and one
# `histodiff fidelity` report compares the eight sets (the oracle reused); then 20 and 15 steps on Karras
# noise levels at both seeds. ~1 h on an idle 2-core machine after the chain; resumable the same way:
#
#     nohup bash jobs/cpu_sampler_run.sh ~/hd > ~/hd/samplers.log 2>&1 &
set -euo pipefail
WORK=${1:?usage: cpu_sampler_run.sh WORK_DIR}
# The chain in this shell: it leaves us in WORK with its `step` (skip what WORK/done marks) and `H`.
source "$(dirname "$0")/cpu_fidelity_run.sh" "$WORK"
sets=(--synthetic ddim50_seed0=synthetic/cg)
for seed in 0 1; do
  for sampler in ddim50 sde20 sde25 sde30; do
    name=${sampler}_seed$seed
    [ "$name" = ddim50_seed0 ] && continue  # the chain's own set, synthetic/cg
    args=(seed=$seed)
    [ "$sampler" != ddim50 ] && args+=(sampling.sampler=sde-dpmsolver++ sampling.ddim_steps=${sampler#sde})
    step "$name" "$H" generate --ldm runs/finetune --classifier runs/guide --judge runs/judge --tiles tiles/crc5 \
        --output "synthetic/$name" --per-class 300 "${args[@]}"
    sets+=(--synthetic "$name=synthetic/$name")
  done
done
step fidelity_samplers "$H" fidelity --tiles tiles/crc5 "${sets[@]}" --oracle runs/oracle \
    --output fidelity/samplers downstream.epochs=10 downstream.patience=10
# Then SDE-DPM-Solver++ on Karras et al.'s noise levels at 20 and 15 steps, both seeds, in reports of their
# own (the same oracle, so their numbers compare with the table above).
for steps in 20 15; do
  karras=()
  for seed in 0 1; do
    name=sde${steps}karras_seed$seed
    step "$name" "$H" generate --ldm runs/finetune --classifier runs/guide --judge runs/judge --tiles tiles/crc5 \
        --output "synthetic/$name" --per-class 300 seed=$seed sampling.sampler=sde-dpmsolver++ \
        sampling.ddim_steps=$steps sampling.karras_sigmas=true
    karras+=(--synthetic "$name=synthetic/$name")
  done
  report=fidelity_karras; [ "$steps" = 20 ] || report=fidelity_karras$steps
  step "$report" "$H" fidelity --tiles tiles/crc5 "${karras[@]}" --oracle runs/oracle \
      --output "fidelity/${report#fidelity_}" downstream.epochs=10 downstream.patience=10
done
echo "done ($(date +%T)); the tables: $WORK/fidelity/{samplers,karras,karras15}/fidelity.md"
