# Shared by the sweep scripts: `plan` prints one run of the grid; `run_plan` executes the plan.
# plan NAME TRAIN_SCRIPT|- EVAL_SCRIPT ARGS...
plan() { local name=$1 train=$2 evaluate=$3; shift 3; printf '%s\t%s\t%s\t%s\n' "$name" "$train" "$evaluate" "$*"; }
# run_plan [--dry-run] [EXTRA ARGS...]: reads the plan on stdin
run_plan() { "${PYTHON:-python3}" -m qlora_kit.sweep "$@"; }
# The NEFTune / all-module variant chosen by NEFTUNE=ALPHA and FULL_TUNE=1: run-name suffix and flags.
variant_suffix() { echo "${NEFTUNE:+_neftune-$NEFTUNE}${FULL_TUNE:+_full}"; }
variant_flags() { echo "${NEFTUNE:+--neftune $NEFTUNE} ${FULL_TUNE:+--full_tune}"; }
