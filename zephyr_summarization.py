r"""Fine-tune a causal LM with QLoRA to summarize SAMSum dialogues.

Usage (Zephyr-7B-beta on one 24 GB GPU, the default recipe `fast`; --recipe original for the published one;
--print_config shows every setting and where it came from):
    python zephyr_summarization.py --lora_r 64 --epochs 1

Offline, on local files and the small embedded model:
    python zephyr_summarization.py --pretrained_ckpt embedded:smollm2-135m-instruct \
        --train_file data/sample/dialogues_train.jsonl --max_steps 20

For a small model, the recipe chosen on validation for SmolLM2-135M (docs/results.md; choose the epoch on
validation with scripts/choose_checkpoint.py):
    python zephyr_summarization.py --recipe small-model --pretrained_ckpt embedded:smollm2-135m-instruct \
        --train_file .../samsum/train.jsonl.gz \
        --validation_file .../samsum/validation.jsonl.gz --save_steps epoch --keep_checkpoints 3

The run folder (adapter, run_config.json, train_metrics.json) is what
zephyr_summarization_inference.py evaluates.
"""

from qlora_kit.train_cli import entry_point

if __name__ == "__main__":
    entry_point("summarization", __doc__)
