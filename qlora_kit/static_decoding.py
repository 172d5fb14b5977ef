"""Greedy decoding with a static key/value cache, each decode step replayed as a CUDA graph on a GPU.

Why: on a small model the decode loop is bound by the host, not the GPU. A SmolLM2-135M step is 30 layers of a
dozen small kernels, each launched from Python through transformers' modules, and a growing cache is
re-concatenated every step. Here a batch's cache is allocated once at its final length (prompt + new tokens), the
attention mask is one fixed 4D tensor whose next column is switched on in place, and every value that changes from
step to step (the input token, its position, where the cache is written, which rows have finished, the
constrained-decoding states) is a tensor updated on the device. A step is then the same kernels on the same
memory every time: captured once per batch as a CUDA graph and replayed, so the host launches one graph per step.
Without a GPU, or when a capture fails, the same step runs eagerly.

The answers are those of the growing-cache loop (``generation._generate_batch``): the same prefill, the same greedy
choice; attention runs over the whole preallocated length with the positions not yet written masked out.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Architectures whose attention writes its cache through ``Cache.update`` and takes a ready-made 4D mask, each
# tested against the growing-cache loop (tests/test_generation.py): other models decode with the growing cache.
# Not mixture-of-experts models: their routing may read from the GPU mid-step, which a CUDA graph cannot hold.
MODEL_TYPES = (
    "cohere", "falcon", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "granite", "llama", "mistral", "olmo2",
    "phi", "phi3", "qwen2", "qwen3", "smollm3", "stablelm", "starcoder2",
)  # fmt: skip

# Eager steps before a batch's step is captured: the first calls set up cuBLAS handles and workspaces, which
# cannot happen while a graph is being captured.
WARMUP_STEPS = 2

# Rows a batch must have shed before it is compacted (``compact_below``): fewer, and the copies and the new
# capture cost more than the rows saved.
MIN_COMPACTED_ROWS = 8

_SAID: set[str] = set()  # reasons for falling back already logged by this process


def unsupported_reason(model, length: int) -> str | None:
    """Why this model cannot decode ``length`` tokens (prompt + new) with a static cache; None when it can."""
    config = model.config.get_text_config()
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} (the static cache needs sdpa or eager)"
    window = getattr(config, "sliding_window", None)
    if window and length > window:
        return f"{length} tokens are longer than the sliding window ({window})"
    return None


def _static_cache(keys: list, values: list, write_at):
    """A transformers ``Cache`` over preallocated tensors: each layer writes its new keys and values at position
    ``write_at`` (a one-element tensor the decode step advances) and attends over the whole length."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class StaticDecodeLayer(CacheLayerMixin):
        is_compileable = True
        is_sliding = False

        def __init__(self, layer_keys, layer_values):
            super().__init__()
            self.keys, self.values, self.is_initialized = layer_keys, layer_values, True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, write_at, key_states)
            self.values.index_copy_(2, write_at, value_states)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[2], 0

        def get_seq_length(self):
            return write_at

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    return Cache(layers=[StaticDecodeLayer(k, v) for k, v in zip(keys, values)])


def generate_batch(
    model,
    tokenizer,
    batch: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    trie,
    prefill_tokens: int,
    stop_check_every: int = 1,
    use_graphs: bool | None = None,
    compact_below: float | None = None,
    margins: list | None = None,
):
    """Greedy answers for one left-padded batch, as ``generation._generate_batch`` gives them.

    ``use_graphs``: replay the decode step as a CUDA graph (default: on a GPU).
    ``compact_below``: at a stop check, when at most this share of the rows still decodes (and at least
    ``MIN_COMPACTED_ROWS`` have finished), the finished rows are dropped from the cache and every per-row tensor,
    and the step is captured again for the rows left: a step's cost grows with its rows (each reads its whole
    cache), and a batch of answers of mixed lengths runs until its longest ends. None: never.
    ``margins``: each row's ``generation.closest_margin`` appended to it.
    """
    import torch

    from .generation import (
        LabelAutomaton,
        _generate_batch,
        _prefill_groups,
        closest_margin,
        cut_at_stop,
        left_padded,
        shared_prefix_length,
    )

    width = max(len(ids) for ids in batch)
    length = width + max_new_tokens
    reason = unsupported_reason(model, length)
    if reason is not None:
        if reason not in _SAID:
            _SAID.add(reason)
            log.info("decoding with the growing cache: %s", reason)
        return _generate_batch(
            model, tokenizer, batch, max_new_tokens, stop_ids, trie, prefill_tokens, stop_check_every, margins
        )
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
    rows = len(batch)
    prefix = shared_prefix_length(batch, model)
    input_ids, prompt_mask, position_ids = left_padded(batch, pad_id, device, prefix)

    with torch.inference_mode():
        # prefill group by group (as the growing-cache loop does), each group's cache copied into its rows and
        # columns of the preallocated one and freed
        keys = values = None
        logits = None
        with torch.profiler.record_function("prefill"):  # a named range in a profile, as the other loop's
            for group, cache, group_logits in _prefill_groups(
                model, input_ids, prompt_mask, position_ids, prefill_tokens, prefix
            ):
                if keys is None:
                    first = cache.layers[0].keys
                    shape = (rows, first.shape[1], length, first.shape[3])
                    keys = [torch.zeros(shape, dtype=first.dtype, device=device) for _ in cache.layers]
                    values = [torch.zeros(shape, dtype=first.dtype, device=device) for _ in cache.layers]
                    logits = torch.empty((rows, group_logits.shape[-1]), dtype=torch.float32, device=device)
                # the group's columns: the shared prefix's, then the batch's last, as many as its longest prompt's
                start = width - (cache.layers[0].keys.shape[2] - prefix)
                for layer, part in enumerate(cache.layers):
                    for whole, states in ((keys[layer], part.keys), (values[layer], part.values)):
                        whole[group, :, :prefix] = states[:, :, :prefix]
                        whole[group, :, start:width] = states[:, :, prefix:]
                    part.keys = part.values = None
                logits[group] = group_logits
        # the mask of every step: the prompt's real tokens, then each new token's column once it is written.
        # sdpa takes True = attend; eager attention adds the mask to its scores
        dtype = keys[0].dtype
        eager = model.config.get_text_config()._attn_implementation == "eager"
        visible = 0.0 if eager else True
        hidden = torch.finfo(dtype).min if eager else False
        mask = torch.full((rows, 1, 1, length), hidden, dtype=dtype if eager else torch.bool, device=device)
        mask[:, 0, 0, :width] = torch.where(prompt_mask.bool(), visible, hidden)

        # every value a step changes, as tensors the step updates in place
        write_at = torch.tensor([width], device=device)
        step_index = torch.tensor([0], device=device)
        positions = position_ids[:, -1:] + 1
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        answers = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        stops = torch.tensor(stop_ids, device=device)
        labels = LabelAutomaton(trie, pad_id, device) if trie is not None else None
        states = labels.start(rows, device) if labels else None
        closest = torch.full((rows,), float("inf"), device=device) if margins is not None else None
        cache = _static_cache(keys, values, write_at)

        token = torch.empty(rows, dtype=torch.long, device=device)  # the token chosen last: the next input

        def choose():
            """The next token of every row from the logits (a finished row pads), recorded."""
            scores = labels.restrict(logits, states) if labels is not None else logits
            if closest is not None:
                closest_margin(scores, closest, finished)
            token.copy_(torch.where(finished, torch.full_like(token, pad_id), scores.argmax(-1)))
            answers.index_copy_(1, step_index, token[:, None])
            if labels is not None:
                states.copy_(labels.advance(states, token))
            finished.logical_or_((token[:, None] == stops).any(-1))
            step_index.add_(1)

        def step():
            """The token chosen last through the model (its keys and values written at ``write_at``), then the
            next one chosen from its logits: no forward runs for a token after which the batch stops."""
            mask.index_fill_(3, write_at, visible)
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            logits.copy_(out.logits[:, -1])
            positions.add_(1)
            write_at.add_(1)
            choose()

        every_answer, every_closest = answers, closest  # each row's, once its row is compacted away
        row_ids = torch.arange(rows, device=device)  # the row of the batch each decoded row is

        def keep_answers():
            """The decoding rows' answers (and margins) so far, written at their batch rows (after a compaction)."""
            if answers is not every_answer:
                every_answer.index_copy_(0, row_ids, answers)
                if closest is not None:
                    every_closest.index_copy_(0, row_ids, closest)

        def compact(alive):
            """Only the rows in ``alive`` decode from here: every per-row tensor cut to them (the step's closures
            read these names, so they see the new tensors; a captured graph does not)."""
            nonlocal mask, positions, finished, answers, token, logits, states, row_ids, closest
            keep_answers()  # the rows of an earlier compaction
            # layer by layer, each layer's whole cache released once its kept rows are copied: one layer is held
            # twice, not all (copying every layer first, SAMSum at 0.25 peaked at 15.2 GB against 12.9 without)
            for layer, part in enumerate(cache.layers):
                part.keys = keys[layer] = keys[layer].index_select(0, alive)
                part.values = values[layer] = values[layer].index_select(0, alive)
            mask, positions, finished, answers, token, logits, row_ids = (
                tensor.index_select(0, alive) for tensor in (mask, positions, finished, answers, token, logits, row_ids)
            )
            if states is not None:
                states = states.index_select(0, alive)
            if closest is not None:
                closest = closest.index_select(0, alive)

        graph = None
        side = torch.cuda.Stream() if use_graphs else None
        warm = 0  # eager steps since the batch (or its compacted rows) began: captured after WARMUP_STEPS
        with torch.profiler.record_function("decode"):
            choose()  # the first new token, from the prefill's logits
            done = 1
            while done < max_new_tokens:
                if done % stop_check_every == 0:
                    decoding = int((~finished).sum())  # waits for the GPU
                    if decoding == 0:
                        break
                    current = len(row_ids)
                    if (
                        compact_below is not None
                        and current - decoding >= MIN_COMPACTED_ROWS
                        and decoding <= compact_below * current
                        and max_new_tokens - done > WARMUP_STEPS + 1
                    ):
                        graph = None  # captured for the rows dropped now
                        compact((~finished).nonzero().squeeze(1))
                        warm = 0
                if use_graphs and graph is None and warm >= WARMUP_STEPS:
                    graph = _capture(step, side)
                    use_graphs = graph is not None
                if graph is not None:
                    graph.replay()
                elif side is not None:  # warm-up steps run on a side stream, as capture requires
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        step()
                    torch.cuda.current_stream().wait_stream(side)
                    warm += 1
                else:
                    step()
                    warm += 1
                done += 1
        keep_answers()
        generated = every_answer[:, :done].tolist()
        if margins is not None:
            margins.extend(every_closest.tolist())
        del graph
    return [cut_at_stop(row, stop_ids) for row in generated]


def _capture(step, side):
    """``step`` captured as a CUDA graph (not run); None, with a warning, when it cannot be captured."""
    import torch

    from .generation import _is_out_of_memory

    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as error:
        if _is_out_of_memory(error):
            raise
        log.warning("decode step not captured as a CUDA graph (%s): running it step by step", str(error)[:200])
        return None
    return graph
