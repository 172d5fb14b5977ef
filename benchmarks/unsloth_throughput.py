"""The peer's training speed on our batches: Unsloth's public API (FastLanguageModel.from_pretrained,
get_peft_model) and the plain loop of training_batches.py, on the rows train_throughput.py gives its own
recipes (same lengths, order, batch and LoRA settings).

Unsloth pins other versions of trl and datasets than this project: run it in its own process with its own
packages (train_throughput.py does, given --unsloth_path):

    PYTHONPATH=/tmp/uns python benchmarks/unsloth_throughput.py --model_dir /tmp/z7 --task classification \\
        --targets q_proj k_proj v_proj o_proj gate_proj up_proj down_proj --out /tmp/unsloth.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import unsloth  # noqa: F401  (first: it patches transformers and peft as it is imported)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training_batches as tb  # noqa: E402


def main(args):
    import torch
    from unsloth import FastLanguageModel

    started = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model_dir, max_seq_length=args.max_seq_length, load_in_4bit=True, dtype=torch.bfloat16
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.targets,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=args.seed,
    )
    loaded = time.perf_counter() - started
    matmul = tb.matmul_parameters(model)
    rows_per_step = args.batch_size * args.grad_accum
    warm, timed = tb.synthetic_rows(
        tb.task_lengths(args.task),
        model.config.vocab_size,
        rows_per_step,
        args.warmup_steps,
        args.steps,
        grouped=args.grouped,
        seed=args.seed,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, fused=True)
    tb.reset_gpu_memory_stats()
    warmup_seconds, seconds, profile = tb.plain_loop(
        model,
        optimizer,
        warm,
        timed,
        args.batch_size,
        args.grad_accum,
        args.repeats,
        tokenizer.pad_token_id,
        args.profile_steps,
    )
    result = {
        "which": "Unsloth (the peer), its public API in a plain PyTorch loop",
        "unsloth_version": unsloth.__version__,
        "load_seconds": loaded,
        "targets": args.targets,
        "lora": {"r": args.rank, "alpha": args.alpha, "dropout": args.dropout},
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "optim": "torch AdamW, fused",
        "gradient_checkpointing": "unsloth",
        "group_by_length": args.grouped,
        **tb.timed_record(timed, seconds, args.steps, args.repeats, warmup_seconds=warmup_seconds),
    }
    config = model.config
    result.update(tb.hardware_share(result, matmul, config.num_hidden_layers, config.hidden_size, True))
    if profile:
        result["profile"] = profile
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"Unsloth: {result['tokens_per_second']:.0f} tokens/s, peak {result['peak_gpu_memory_gb']:.1f} GB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--task", required=True, choices=("classification", "summarization"))
    parser.add_argument("--targets", nargs="+", required=True)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--grouped", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--learning_rate", type=float, default=8e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile_steps", type=int, default=0, help="after the timed passes, profile this many more steps (0: none)"
    )
    parser.add_argument("--out", required=True)
    main(parser.parse_args())
