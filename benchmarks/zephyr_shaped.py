"""Models with the exact configs of Zephyr-7B-beta (and of Falcon-7B, Llama-2-13B) and random weights: same shapes,
same cost, no download."""

from __future__ import annotations

import json
import time
from pathlib import Path

# HuggingFaceH4/zephyr-7b-beta's config.json (a Mistral-7B-v0.1 derivative).
ZEPHYR_7B_BETA_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


# tiiuae/falcon-7b's config.json: multi-query attention, attention and MLP in parallel, no biases.
FALCON_7B_CONFIG = {
    "architectures": ["FalconForCausalLM"],
    "model_type": "falcon",
    "vocab_size": 65024,
    "hidden_size": 4544,
    "num_hidden_layers": 32,
    "num_attention_heads": 71,
    "multi_query": True,
    "parallel_attn": True,
    "new_decoder_architecture": False,
    "alibi": False,
    "bias": False,
    "layer_norm_epsilon": 1e-05,
    "bos_token_id": 11,
    "eos_token_id": 11,
    "initializer_range": 0.02,
}

# meta-llama/Llama-2-13b-hf's config.json.
LLAMA_2_13B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}

SHAPES = {"zephyr-7b": ZEPHYR_7B_BETA_CONFIG, "falcon-7b": FALCON_7B_CONFIG, "llama-2-13b": LLAMA_2_13B_CONFIG}

# The same architecture, tiny: to check a benchmark's code path on a CPU in seconds. A small vocabulary too: at 32,000
# a batch of 32 rows of 512 tokens holds 2.1 GB of fp32 logits, most of a tiny model's CPU time.
TINY_OVERRIDES = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def placeholder_tokenizer():
    """Zephyr's special token ids (<unk> 0, <s> 1, </s> 2), nothing else: the benchmarks feed random ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def build(folder: Path, tiny: bool = False, shape: str = "zephyr-7b", layers: int | None = None) -> Path:
    """Save the random-weight model of ``shape`` once (bf16 safetensors), with ``layers`` decoder layers if given;
    reuse it when already there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    started = time.perf_counter()
    settings = {k: v for k, v in SHAPES[shape].items() if k not in ("architectures", "model_type")}
    # Falcon has no intermediate size or key/value head count to set
    tiny_settings = {k: v for k, v in TINY_OVERRIDES.items() if shape != "falcon-7b" or k in settings}
    depth = {"num_hidden_layers": layers} if layers else {}
    config = AutoConfig.for_model(
        SHAPES[shape]["model_type"], **{**settings, **(tiny_settings if tiny else {}), **depth}
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)  # the same random weights every time: a run can be repeated
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    staging = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(staging)
    placeholder_tokenizer().save_pretrained(staging)
    staging.rename(folder)
    del model
    print(f"built the {shape}-shaped random model at {folder} in {time.perf_counter() - started:.0f}s")
    return folder


def real_prompt_lengths(task: str, data_file: str, tokenizer_source: str, max_tokens: int, limit: int | None = None):
    """Token counts of the task's real fine-tuning prompts (cleaned data, seed format, shortened to max_tokens)."""
    from qlora_kit.formatting import PromptFormat
    from qlora_kit.modeling import load_tokenizer
    from qlora_kit.tasks import get_task

    rows, source = get_task(task).load_rows(file=data_file, dataset="", split="test")
    rows = rows[:limit]
    tokenizer = load_tokenizer(tokenizer_source)
    fmt = PromptFormat(task, "finetune", "seed", tokenizer)
    lengths = [len(ids) for ids in fmt.prompts_ids([row["input"] for row in rows], max_tokens)]
    return lengths, [row["target"] for row in rows], tokenizer


def environment() -> dict:
    import platform

    import torch

    from qlora_kit.modeling import library_versions

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "versions": library_versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
