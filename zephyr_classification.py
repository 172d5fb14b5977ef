r"""Fine-tune a causal LM with QLoRA to classify 20 Newsgroups messages by generating the group name.

Usage (Zephyr-7B-beta on one 24 GB GPU, the default recipe `fast`; --recipe original for the published one;
--print_config shows every setting and where it came from):
    python zephyr_classification.py --train_sample_fraction 0.1

Offline, on local files and the small embedded model:
    python zephyr_classification.py --pretrained_ckpt embedded:smollm2-135m-instruct \
        --train_file data/sample/newsgroups_train.jsonl --max_steps 20

For a small model, the recipe chosen on validation for SmolLM2-135M (docs/results.md; choose the epoch on
validation with scripts/choose_checkpoint.py):
    python zephyr_classification.py --recipe small-model --pretrained_ckpt embedded:smollm2-135m-instruct \
        --train_file .../newsgroups/train.jsonl.gz --save_steps epoch --keep_checkpoints 3

The run folder (adapter, run_config.json, train_metrics.json) is what
zephyr_classification_inference.py evaluates.
"""

from qlora_kit.train_cli import entry_point

if __name__ == "__main__":
    entry_point("classification", __doc__)
