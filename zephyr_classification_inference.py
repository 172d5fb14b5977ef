"""Evaluate a fine-tuned 20 Newsgroups run: accuracy, macro/micro F1, invalid rate.

Usage:
    python zephyr_classification_inference.py --experiment_dir experiments/<run>
    python zephyr_classification_inference.py --experiment_dir RUN --test_file news_test.jsonl --limit 200

Writes RUN/metrics/metrics.json and predictions.jsonl.
"""

from qlora_kit.eval_cli import finetuned_entry_point

if __name__ == "__main__":
    finetuned_entry_point("classification", __doc__)
