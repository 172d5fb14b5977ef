"""Correctness of the batched engine: parsed labels from batched greedy decoding against one example at a time.

Usage:
    python benchmarks/batched_vs_single.py --experiment_dir RUN --test_file news_test.jsonl [--limit N] --out result.json

``--bf16`` computes in bf16 on the CPU too (as a GPU does; the CPU's default is fp32, where batching changes
nothing), ``--every N`` takes every Nth test row, ``--constrained`` decodes with the label constraint, and
``--lm_head_fp32`` computes the vocabulary logits in fp32 (an untied fp32 copy of the output layer): whether the
answers that batching turns come from the logits' bf16 rounding or from the layers below. ``--recheck_margins``:
how near a tie the batched answers that differ came (the least lead of the chosen token over the next allowed one,
in logits), and the batched engine again with the answers under each margin decoded alone (one at a time here is
the engine on a batch of one, which is what a recheck runs): how many answers each decodes again, what it costs,
how many answers then equal one at a time's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from argparse import Namespace
from pathlib import Path


def logits_in_fp32(model) -> None:
    """The output layer's product in fp32: its own fp32 copy of the weight (untied from the embeddings, which stay as
    they are) and its input cast to fp32 (with a LoRA adapter on it, peft's sum is then fp32 too)."""
    import torch

    head = model.get_output_embeddings()
    base = getattr(head, "base_layer", head)
    base.weight = torch.nn.Parameter(base.weight.detach().float(), requires_grad=False)
    head.register_forward_pre_hook(lambda module, inputs: (inputs[0].float(), *inputs[1:]))


def main(args):
    import torch

    from qlora_kit import evaluation, modeling
    from qlora_kit.formatting import PromptFormat, answer_ids
    from qlora_kit.generation import generate
    from qlora_kit.metrics import parse_label
    from qlora_kit.run_folder import RunFolder
    from qlora_kit.tasks import get_task

    run_dir = Path(args.experiment_dir)
    config = RunFolder(run_dir).config()
    adapter = RunFolder(run_dir).adapter()
    label_names = config["label_names"]
    eval_args = Namespace(split="test", test_file=args.test_file, validation_file=None, dataset="", limit=args.limit)
    rows = evaluation.load_eval_rows(get_task("classification"), eval_args, label_names)[:: args.every]
    tokenizer = modeling.load_tokenizer(str(adapter), padding_side="left")
    fmt = PromptFormat("classification", "finetune", config["prompt_style"], tokenizer, label_names=label_names)
    prompts = fmt.prompts_ids([row["input"] for row in rows], config["settings"]["max_seq_length"])
    if args.bf16:  # the GPU's compute dtype on any device
        modeling.compute_dtype = lambda: torch.bfloat16
    model = evaluation._load_finetuned(config, adapter, use_flash_attention=False)
    if args.lm_head_fp32:
        logits_in_fp32(model)
    stop = sorted({tokenizer.convert_tokens_to_ids(config["end_token"]), tokenizer.eos_token_id})
    end = config["end_token"]
    labels = [answer_ids(tokenizer, name, end) for name in label_names] if args.constrained else None

    def run(batch_size, **options):
        started = time.perf_counter()
        out = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=20,
            stop_ids=stop,
            batch_size=batch_size,
            max_batch_tokens=None if batch_size > 1 else 10**9,
            label_sequences=labels,
            progress=False,
            **options,
        )
        seconds = time.perf_counter() - started
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out.outputs]
        return [parse_label(text, label_names) for text in texts], texts, seconds, out

    batched, batched_text, batched_seconds, tracked = run(args.batch_size, track_margins=bool(args.recheck_margins))
    single, single_text, single_seconds, _ = run(1)
    same_label = sum(a == b for a, b in zip(batched, single))
    same_text = sum(a == b for a, b in zip(batched_text, single_text))
    result = {
        "command": " ".join(sys.argv),
        "run": str(run_dir),
        "examples": len(rows),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": modeling.library_versions(),
        "batch_size": args.batch_size,
        "dtype": str(next(p for p in model.parameters() if p.is_floating_point()).dtype),
        "constrained": args.constrained,
        "lm_head_fp32": args.lm_head_fp32,
        "same_parsed_label": same_label,
        "same_parsed_label_rate": same_label / len(rows),
        "same_output_text": same_text,
        "same_output_text_rate": same_text / len(rows),
        "batched_seconds": batched_seconds,
        "one_at_a_time_seconds": single_seconds,
    }
    if args.recheck_margins:
        differ = [i for i, (a, b) in enumerate(zip(batched_text, single_text)) if a != b]
        result["differing_margins"] = sorted(tracked.closest_margins[i] for i in differ)
        result["rechecked"] = {}
        for margin in args.recheck_margins:
            _, text, seconds, rechecked = run(args.batch_size, recheck_margin=margin)
            result["rechecked"][f"{margin:g}"] = {
                "decoded_alone": len(rechecked.rechecked),
                "seconds": seconds,
                "same_output_text": sum(a == b for a, b in zip(text, single_text)),
            }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment_dir", required=True)
    parser.add_argument("--test_file", required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--every", type=int, default=1, help="every Nth test row (after --limit)")
    parser.add_argument("--bf16", action="store_true", help="compute in bf16 on the CPU too")
    parser.add_argument("--constrained", action="store_true", help="decode with the label constraint")
    parser.add_argument("--lm_head_fp32", action="store_true", help="the vocabulary logits in fp32")
    parser.add_argument(
        "--recheck_margins", type=float, nargs="*", default=[], help="the batched engine again at each recheck margin"
    )
    parser.add_argument("--out", default=None)
    main(parser.parse_args())
