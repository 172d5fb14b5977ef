"""Classification by likelihood (``--decoding likelihood``): the label whose whole answer is most probable.

Constrained decoding picks an answer token by token, each time the most probable token the labels allow: a
first token shared by several labels (``comp`` of five ``comp.*`` groups) wins on their summed probability even
when a single other label is more probable than any one of them. Here every label's answer (its tokens, then the
end-of-turn token) is scored whole, log P(answer | prompt) summed over its tokens, and the highest wins, as
multiple-choice tasks are scored by likelihood. The prompt is prefilled once; its key/value cache is repeated for
every label and all labels' tokens go through the model in one forward, in chunks of prompts whose vocabulary
logits (prompts x labels x answer tokens x vocabulary, fp32) and repeated caches stay under ``CHUNK_BYTES``.
"""

from __future__ import annotations

from .generation import (
    PREFILL_TOKENS,
    _prefill,
    cut_at_stop,
    kv_cache_bytes_per_token,
    left_padded,
    shared_prefix_length,
)

CHUNK_BYTES = 2**30  # one chunk of prompts' answer logits (fp32) and repeated key/value caches


def answer_log_likelihoods(model, tokenizer, batch: list[list[int]], sequences: list[list[int]], prefill_tokens: int):
    """log P(sequence | prompt) for every prompt of ``batch`` (rows) and every sequence (columns), as a tensor."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    prefix = shared_prefix_length(batch, model)
    input_ids, attention_mask, position_ids = left_padded(batch, tokenizer.pad_token_id, device, prefix)
    count, longest = len(sequences), max(len(sequence) for sequence in sequences)
    answers = torch.full((count, longest), tokenizer.pad_token_id, dtype=torch.long)
    answer_mask = torch.zeros((count, longest), dtype=torch.long)
    for column, sequence in enumerate(sequences):
        answers[column, : len(sequence)] = torch.tensor(sequence)
        answer_mask[column, : len(sequence)] = 1
    answers, answer_mask = answers.to(device), answer_mask.to(device)
    with torch.inference_mode():
        cache, last_logits = _prefill(model, input_ids, attention_mask, position_ids, prefill_tokens, prefix)
        scores = last_logits.log_softmax(-1)[:, answers[:, 0]]  # every answer's first token, from the prompt's end
        if longest == 1:
            return scores
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        vocabulary = last_logits.shape[-1]
        # per prompt of a chunk: its answers' fp32 logits, and its key/value cache repeated once per answer
        per_prompt = count * ((longest - 1) * vocabulary * 4 + input_ids.shape[1] * kv_cache_bytes_per_token(model))
        chunk = max(1, CHUNK_BYTES // per_prompt)
        steps = torch.arange(1, longest, device=device)  # the answer tokens' positions after the prompt's last
        for start in range(0, len(batch), chunk):
            rows = slice(start, start + chunk)
            size = len(batch[rows])
            # each prompt's cache once per answer: rows (prompt 0, answer 0), (prompt 0, answer 1), ...
            repeated = DynamicCache(
                [
                    (keys[rows].repeat_interleave(count, 0), values[rows].repeat_interleave(count, 0))
                    for keys, values in layers
                ]
            )
            out = model(
                input_ids=answers[:, :-1].repeat(size, 1),
                attention_mask=torch.cat(
                    [attention_mask[rows].repeat_interleave(count, 0), answer_mask[:, :-1].repeat(size, 1)], dim=1
                ),
                position_ids=position_ids[rows, -1:].repeat_interleave(count, 0) + steps,
                past_key_values=repeated,
                use_cache=True,
            )
            log_probs = out.logits.float().log_softmax(-1)
            del out, repeated
            targets = answers[:, 1:].repeat(size, 1)
            picked = log_probs.gather(-1, targets[..., None]).squeeze(-1) * answer_mask[:, 1:].repeat(size, 1)
            scores[rows] += picked.sum(-1).view(size, count)
    return scores


def rank_labels_batch(
    model,
    tokenizer,
    batch: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    trie,
    prefill_tokens: int = PREFILL_TOKENS,
    stop_check_every: int = 1,
    *,
    sequences: list[list[int]],
):
    """The engine's batch interface (``generation.generate``): each prompt's most likely label sequence, as the
    answer tokens a decode loop would have produced (cut at the end token)."""
    best = answer_log_likelihoods(model, tokenizer, batch, sequences, prefill_tokens).argmax(-1).tolist()
    return [cut_at_stop(sequences[choice], stop_ids) for choice in best]
