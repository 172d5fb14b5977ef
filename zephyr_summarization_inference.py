"""Evaluate a fine-tuned SAMSum run: ROUGE-1/2/L/Lsum.

Usage:
    python zephyr_summarization_inference.py --experiment_dir experiments/<run>
    python zephyr_summarization_inference.py --experiment_dir RUN --test_file samsum_test.jsonl --limit 100

Writes RUN/metrics/metrics.json and predictions.jsonl.
"""

from qlora_kit.eval_cli import finetuned_entry_point

if __name__ == "__main__":
    finetuned_entry_point("summarization", __doc__)
