#!/usr/bin/env bash
# SmolLM2's tokenizer alone (about 3.5 MB, the model's GGUF is not needed) for the stages that build real prompts
# for the 7B-shaped model (bench_prefix): run here, from the project root; makes the git-ignored .device/tokenizer.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
python3 - <<'PY'
from qlora_kit import modeling

tokenizer = modeling.load_tokenizer(modeling.resolve_model_source("embedded:smollm2-135m-instruct"))
tokenizer.save_pretrained(".device/tokenizer")
print("wrote .device/tokenizer:", type(tokenizer).__name__, len(tokenizer), "tokens")
PY
du -sh .device/tokenizer
