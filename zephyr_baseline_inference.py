r"""Zero-shot and few-shot baselines of the base model (no training), for both tasks.

Usage:
    python zephyr_baseline_inference.py --task_type classification --prompt_type zero-shot
    python zephyr_baseline_inference.py --task_type summarization --prompt_type few-shot --prompt_style chat \
        --pretrained_ckpt embedded:smollm2-135m-instruct --train_file train.jsonl --test_file test.jsonl

Writes baseline_results/<model>/<task>/<prompt_type>[-chat]/metrics.json and predictions.jsonl.
"""

from qlora_kit.eval_cli import baseline_entry_point

if __name__ == "__main__":
    baseline_entry_point(__doc__)
