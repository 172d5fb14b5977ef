"""One batched greedy generation engine for every evaluation script.

Prompts are sorted by length and left-padded in batches; the answer is what comes
after the prompt's token positions, cut at the first stop token. On CUDA out of
memory the batch is halved and the same prompts are retried; a prompt that fails even
alone is reported as failed, never recorded as an empty answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    outputs: list[list[int] | None]  # new token ids per prompt (stop token removed); None = failed
    failures: dict[int, str] = field(default_factory=dict)  # prompt index -> reason
    final_batch_size: int = 0


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def default_batch_size() -> int:
    import torch

    return 256 if torch.cuda.is_available() else 8


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def kv_cache_bytes_per_token(model) -> int:
    """Bytes of key/value cache one token takes in this model (all layers)."""
    config = _text_config(model)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parameter = next(model.parameters())
    dtype_bytes = parameter.element_size() if parameter.is_floating_point() else 2  # 4-bit weights: 16-bit cache
    return 2 * config.num_hidden_layers * heads * head_dim * max(dtype_bytes, 2)


def generation_bytes_per_token(model) -> int:
    """GPU memory one batch token costs while generating: its KV cache plus the prefill's activations.

    The activations term (4 x hidden + 3 x intermediate values in 16-bit) matches what was measured on a
    Zephyr-7B-shaped model: about 242 KB per token beyond the weights (benchmarks/results/).
    """
    config = _text_config(model)
    intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
    return kv_cache_bytes_per_token(model) + 2 * (4 * config.hidden_size + 3 * intermediate)


def default_max_batch_tokens(model, memory_fraction: float = 0.5) -> int | None:
    """Tokens (prompt + answer, padded) per batch that fit in a share of the free GPU memory; None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return max(1024, int(free * memory_fraction / generation_bytes_per_token(model)))


class LabelTrie:
    """Allowed next tokens when the answer must be one of a fixed set of token sequences (constrained decoding)."""

    def __init__(self, sequences: list[list[int]]):
        self.root: dict = {}
        for sequence in sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(token, {})

    def allowed(self, prefix: list[int], fallback: int) -> list[int]:
        node = self.root
        for token in prefix:
            node = node.get(token)
            if node is None:
                return [fallback]  # the sequence is complete (its stop token was emitted): pad out
        return list(node) or [fallback]


def _generate_batch(model, tokenizer, batch: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                    trie: LabelTrie | None):
    import torch

    pad_id = tokenizer.pad_token_id
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    device = next(model.parameters()).device
    kwargs = {}
    if trie is not None:
        kwargs["prefix_allowed_tokens_fn"] = lambda _, ids: trie.allowed(ids[width:].tolist(), pad_id)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
            temperature=None, top_p=None, top_k=None, **kwargs,
        )
    answers = []
    for row in output[:, width:].tolist():  # the prompt is removed by position, never by string slicing
        cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        answers.append(row[:cut])
    return answers


def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int],
             batch_size: int | None = None, max_batch_tokens: int | None = None,
             label_sequences: list[list[int]] | None = None, progress: bool = True, on_batch=None) -> GenerationResult:
    """Greedy answers for token-id prompts, in the prompts' order.

    A batch holds at most ``batch_size`` prompts and at most ``max_batch_tokens`` padded tokens
    (prompt + new tokens): short prompts travel in large batches, long ones in small ones.
    ``on_batch(indices, answers)`` is called after each finished batch (to save results as they come).
    """
    import torch
    from tqdm.auto import tqdm

    batch_size = batch_size or default_batch_size()
    if max_batch_tokens is None:
        max_batch_tokens = default_max_batch_tokens(model)
    trie = LabelTrie(label_sequences) if label_sequences else None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory trouble shows early
    result = GenerationResult(outputs=[None] * len(prompts))
    bar = tqdm(total=len(prompts), desc="generating", unit="ex", disable=not progress)
    start = 0
    while start < len(order):
        count = batch_size
        if max_batch_tokens:  # the first prompt of a batch is its longest (sorted longest first)
            count = max(1, min(count, max_batch_tokens // (len(prompts[order[start]]) + max_new_tokens)))
        indices = order[start:start + count]
        try:
            answers = _generate_batch(model, tokenizer, [prompts[i] for i in indices], max_new_tokens, stop_ids, trie)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_out_of_memory(error):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(indices) > 1:
                batch_size = max(1, len(indices) // 2)
                max_batch_tokens = max_batch_tokens // 2 if max_batch_tokens else None
                log.warning("out of memory: retrying with batch size %d", batch_size)
                continue
            result.failures[indices[0]] = "out of memory at batch size 1"
            log.error("prompt %d (%d tokens) does not fit in memory even alone", indices[0], len(prompts[indices[0]]))
            start += 1
            bar.update(1)
            continue
        for index, answer in zip(indices, answers):
            result.outputs[index] = answer
        if on_batch is not None:
            on_batch(indices, answers)
        start += len(indices)
        bar.update(len(indices))
    bar.close()
    result.final_batch_size = batch_size
    return result
