#!/usr/bin/env bash
# 20 Newsgroups classification at several training-set fractions, each trained then evaluated.
#   ./sample_ablate.sh                        QLoRA (q,v)
#   NEFTUNE=5 FULL_TUNE=1 ./sample_ablate.sh  + NEFTune + all modules
#   ./sample_ablate.sh --dry-run --pretrained_ckpt MODEL --train_file T --test_file E --max_steps 5 --limit 50
# Finished runs are skipped; logs go to $EXPERIMENTS/logs/; GPUS=0,1 runs one run per GPU.
set -euo pipefail
cd "$(dirname "$0")"
FRACTIONS=${FRACTIONS:-"0.025 0.05 0.1 0.25 0.5 1.0"}
EPOCHS=${EPOCHS:-5}
LORA_R=${LORA_R:-8}
DROPOUT=${DROPOUT:-0.1}
NEFTUNE=${NEFTUNE:-}
FULL_TUNE=${FULL_TUNE:-}
source scripts/sweep_lib.sh

variant=$(variant_suffix)
for fraction in $FRACTIONS; do
  plan "classification_sampleFraction-${fraction}_epochs-${EPOCHS}_rank-${LORA_R}_dropout-${DROPOUT}${variant}" \
    zephyr_classification.py zephyr_classification_inference.py \
    --train_sample_fraction "$fraction" --epochs "$EPOCHS" --lora_r "$LORA_R" --dropout "$DROPOUT" \
    $(variant_flags)
done | run_plan "$@"
