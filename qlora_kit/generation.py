"""One batched greedy generation engine for every evaluation script.

Prompts are sorted by length and left-padded in batches (the tokens every prompt of a batch begins with are
prefilled once and shared); the answer is what comes after the prompt's token positions, cut at the first stop
token. On CUDA out of memory the batch is halved and the same prompts are retried; a prompt that fails even
alone is reported as failed, never recorded as an empty answer. Beam search (``num_beams``) runs through
transformers' own generate over the same batches; choosing labels by likelihood (``label_likelihood``) too.
An answer whose greedy choice came within ``RECHECK_MARGIN`` logits of a tie may be decoded again on its prompt
alone, where a batch's rounding cannot turn it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from .errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    outputs: list[list[int] | None]  # new token ids per prompt (stop token removed); None = failed
    failures: dict[int, str] = field(default_factory=dict)  # prompt index -> reason
    final_batch_size: int = 0
    # per prompt, how near its greedy choices came to a tie (``closest_margin``); None where not tracked
    closest_margins: list[float | None] = field(default_factory=list)
    rechecked: list[int] = field(default_factory=list)  # prompts decoded again alone (``RECHECK_MARGIN``)


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    message = str(error).lower()
    # cuDNN's attention reports a workspace it could not allocate as a failed graph, not as out of memory
    # (seen with several processes sharing one GPU): a smaller batch needs a smaller workspace
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message or "mha_graph" in message


# Prompt tokens run through the model at once while prefilling (rows are grouped to stay under it).
PREFILL_TOKENS = 16384

# The attention kernels prefill may run on (QLORA_KIT_PREFILL_ATTENTION): ``no-cudnn``, any but cuDNN's (flash,
# memory-efficient, math), or ``pytorch``, PyTorch's choice per call (cuDNN's on an H100 / H200). cuDNN builds an
# execution plan for each new shape, and the row-group prefill makes a shape per group (about 40 ms each): on an H200
# a process's first 20 Newsgroups generation with SmolLM2 took 8.8-11.7 s with cuDNN's and 6.0 s without, its second
# 5.0-5.1 s against 5.1-5.2 s; the inference script generated 1,156 examples a second against 798
# (docs/benchmarks.md, "Prefill's attention without cuDNN's").
PREFILL_ATTENTION = ("no-cudnn", "pytorch")


def prefill_attention_choice() -> str:
    """The ``PREFILL_ATTENTION`` choice QLORA_KIT_PREFILL_ATTENTION names (the first when unset)."""
    import os

    choice = os.environ.get("QLORA_KIT_PREFILL_ATTENTION", "") or PREFILL_ATTENTION[0]
    if choice not in PREFILL_ATTENTION:
        raise UsageError(
            f"QLORA_KIT_PREFILL_ATTENTION={choice}: leave it unset, or set it to one of {', '.join(PREFILL_ATTENTION)}"
        )
    return choice


def prefill_attention(choice: str | None = None):
    """A context in which prefill's attention runs on the kernels ``choice`` names (one of ``PREFILL_ATTENTION``),
    by default those QLORA_KIT_PREFILL_ATTENTION names."""
    import contextlib

    if (choice or prefill_attention_choice()) == "pytorch":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# Prompt tokens every prompt of a batch begins with (a chat template's system turn, an instruction, the classes to
# choose from, few-shot examples) are run through the model once and their keys and values shared by every row,
# when there are at least this many: fewer, and the extra forward costs more than it saves.
MIN_SHARED_PREFIX = 16

# Greedy answers whose choice came down to a near tie, decoded again alone. A batch's numbers are not a single
# prompt's: its matrix products split their sums another way for another number of rows, and padding changes the
# attention kernel, so in bf16 a row's logits move by a rounding error or two. Where the best token led the next by
# less than this (in logits, after constrained decoding's restriction, at any step), the batched answer is replaced
# by the prompt's answer alone (``decode_alone``), the one-at-a-time answer. 0: never. Set by QLORA_KIT_RECHECK_MARGIN.
# Off because it does not pay: on an H100 (SmolLM2, 20 Newsgroups, 300 prompts) the static loop equalled one at a time
# on 96.7%, the rest ties of 0-0.25 logits; a margin of 1/2 would bring 100% but decode 19% of the test set alone,
# ~38x the static loop's time, 1/16 ~11x for 98.7% (docs/benchmarks.md, "Near ties decoded again alone").
RECHECK_MARGIN = 0.0


def recheck_margin_setting() -> float:
    """The ``RECHECK_MARGIN`` QLORA_KIT_RECHECK_MARGIN sets (a number of logits, at least 0), else the default."""
    import os

    given = os.environ.get("QLORA_KIT_RECHECK_MARGIN", "")
    if not given:
        return RECHECK_MARGIN
    try:
        margin = float(given)
    except ValueError:
        margin = -1.0
    if not margin >= 0:
        raise UsageError(
            f"QLORA_KIT_RECHECK_MARGIN={given}: leave it unset, or set it to a number of logits (0 or more; 0: never)"
        )
    return margin


def closest_margin(scores, closest, finished) -> None:
    """``closest`` (per row, in place) lowered to how far each still-decoding row's best score led its second
    (infinite where one token alone was allowed); rows ``finished`` before this choice keep theirs."""
    import torch

    top = scores.topk(2, dim=-1).values
    closest.copy_(torch.where(finished, closest, torch.minimum(closest, top[:, 0] - top[:, 1])))


# Decode steps between checks that every row has stopped. Each check waits for the GPU (a host synchronisation);
# checking less often lets the host queue the next steps meanwhile but may run up to this many - 1 steps past
# the last row's end (their tokens are discarded). 1 until measured otherwise (benchmarks/generation_*.py).
STOP_CHECK_EVERY = 1


def default_batch_size() -> int:
    """Prompts a batch unless given: on a GPU the token budget (``default_max_batch_tokens``) is what limits it; on a
    CPU 32, measured against 8, 16, 64 and 192 on the demo's SmolLM2 adapters (2 cores; docs/benchmarks.md): 1.45x
    8's speed on 20 Newsgroups prompts and 2.2x on SAMSum dialogues (SAMSum's ROUGE the same at every size)."""
    import torch

    return 1024 if torch.cuda.is_available() else 32


def kv_cache_bytes_per_token(model) -> int:
    """Bytes of key/value cache one token takes in this model (all layers)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parameter = next(model.parameters())
    dtype_bytes = parameter.element_size() if parameter.is_floating_point() else 2  # 4-bit weights: 16-bit cache
    return 2 * config.num_hidden_layers * heads * head_dim * max(dtype_bytes, 2)


def prefill_bytes_per_token(model) -> int:
    """Activations one prompt token takes while prefilling (4 x hidden + 3 x intermediate values in 16-bit).

    With the KV cache this matches what was measured on a Zephyr-7B-shaped model when the whole batch was
    prefilled at once: about 242 KB per token beyond the weights (docs/benchmarks.md).
    """
    config = model.config.get_text_config()
    intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
    return 2 * (4 * config.hidden_size + 3 * intermediate)


BUDGET_STEP = 8192  # tokens


def usable_gpu_memory(free: int, total: int, allocated: int, reserved: int) -> int:
    """The GPU memory an evaluation plans with: the card's, less what this process's tensors hold.

    Not simply what is free: the free memory of two processes of one evaluation differs by a few hundred MB
    (the collective library's buffers), and a different budget means different batches, padding and bf16
    rounding than one process would have. Blocks this process's allocator keeps cached (``reserved`` beyond
    ``allocated``, e.g. after an earlier evaluation) are ours too: without them a second evaluation in one
    process would plan smaller batches than the first and give different answers. Only when something else
    holds over a fifth of the card does the free memory count instead.
    """
    ours = total - allocated
    free_to_us = free + max(0, reserved - allocated)
    return free_to_us if free_to_us < 0.8 * ours else ours


def default_max_batch_tokens(model, memory_fraction: float = 0.5, prefill_tokens: int = PREFILL_TOKENS) -> int | None:
    """Padded tokens (prompt + answer) per batch whose KV cache fits in a share of the usable GPU memory
    (``usable_gpu_memory``), after room for one prefill group's activations; None on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    usable = usable_gpu_memory(free, total, torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
    room = usable * memory_fraction - prefill_tokens * prefill_bytes_per_token(model)
    # whole multiples of 8,192 tokens: processes whose own allocations differ by a few MB (measured: 12 tokens
    # of 541,979 apart) still get one budget
    return max(1024, int(room / kv_cache_bytes_per_token(model)) // BUDGET_STEP * BUDGET_STEP)


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


class LabelAutomaton:
    """``LabelTrie`` as tensors, so that constrained decoding stays on the device: each row carries a state
    (a trie node, or "done" once its answer left the trie), the allowed tokens of every state are one row of
    a table, and the next state is looked up from the token chosen. Same choices as ``LabelTrie.allowed``
    over the row's answer so far, without a Python loop over rows or a device-to-host copy per step."""

    def __init__(self, trie: LabelTrie, fallback: int, device):
        import torch

        nodes = [trie.root]
        edges = []  # (state, token, next state)
        for state, node in enumerate(nodes):  # grows while walked: breadth-first numbering
            for token, child in node.items():
                edges.append((state, token, len(nodes)))
                nodes.append(child)
        self.done = len(nodes)  # the state of a row whose answer is complete
        allowed = [list(node) or [fallback] for node in nodes] + [[fallback]]
        width = max(len(tokens) for tokens in allowed)
        # padded with repeats of the state's first token: scattering a value twice to one place is harmless
        self.allowed = torch.tensor([t + [t[0]] * (width - len(t)) for t in allowed], device=device)
        self.vocab = 1 + max([fallback] + [token for _, token, _ in edges])
        keys = sorted((state * self.vocab + token, target) for state, token, target in edges)
        self.keys = torch.tensor([key for key, _ in keys] or [-1], device=device)
        self.targets = torch.tensor([target for _, target in keys] or [self.done], device=device)

    def start(self, rows: int, device):
        import torch

        return torch.zeros(rows, dtype=torch.long, device=device)

    def restrict(self, logits, states):
        """Logits with every token a row's state does not allow at -inf."""
        import torch

        allowed = self.allowed[states]
        restricted = torch.full_like(logits, float("-inf"))
        return restricted.scatter_(1, allowed, logits.gather(1, allowed))

    def advance(self, states, tokens):
        import torch

        query = states * self.vocab + tokens.clamp(max=self.vocab - 1)
        found = torch.searchsorted(self.keys, query).clamp(max=len(self.keys) - 1)
        known = (self.keys[found] == query) & (tokens < self.vocab) & (states != self.done)
        return torch.where(known, self.targets[found], torch.full_like(states, self.done))


def prefill_row_groups(lengths: list[int], prefill_tokens: int) -> list[tuple[int, int, int]]:
    """Consecutive rows of a batch (prompt ``lengths``, longest first) grouped for prefill: (start, end, longest)
    of each group, as many rows as fit ``prefill_tokens`` when each is cut to the group's longest prompt."""
    groups, start = [], 0
    while start < len(lengths):
        end, longest = start + 1, max(1, lengths[start])
        while end < len(lengths) and (end + 1 - start) * max(longest, lengths[end]) <= prefill_tokens:
            longest = max(longest, lengths[end])
            end += 1
        groups.append((start, end, longest))
        start = end
    return groups


def _prefill_groups(
    model, input_ids, attention_mask, position_ids, prefill_tokens: int, prefix: int = 0, attention: str | None = None
):
    """Run padded prompts (``left_padded``) through the model in groups of consecutive rows, each group cut to its
    own longest prompt and holding at most ``prefill_tokens`` tokens so cut: yields each group's rows (a slice),
    its KV cache and the logits of its rows' last position. The padding a group's rows share is not computed (a
    batch of mixed lengths pads most rows far more than any group's). The cache holds the ``prefix`` columns the
    rows share, then the group's own columns: the batch's last ones, as many as its longest prompt has after the
    prefix. The shared prefix runs through the model once, its keys and values repeated for every group's rows."""
    import torch
    from transformers import DynamicCache

    shared = None
    if prefix:
        columns = slice(0, prefix)
        with prefill_attention(attention):
            out = model(
                input_ids=input_ids[:1, columns],
                attention_mask=attention_mask[:1, columns],
                position_ids=position_ids[:1, columns],
                use_cache=True,
                logits_to_keep=1,
            )
        shared = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        del out
    width = input_ids.shape[1]
    own_lengths = attention_mask[:, prefix:].sum(-1).tolist()  # each row's tokens after the shared prefix
    for start, end, longest in prefill_row_groups(own_lengths, prefill_tokens):
        rows, columns = slice(start, end), slice(width - longest, width)
        mask, cache = attention_mask[rows, columns], None
        if shared is not None:  # the group's rows attend to the shared prefix's columns, then to their own
            mask = torch.cat([attention_mask[rows, :prefix], mask], dim=1)
            count = end - start
            cache = DynamicCache([(k.expand(count, -1, -1, -1), v.expand(count, -1, -1, -1)) for k, v in shared])
        with prefill_attention(attention):
            out = model(
                input_ids=input_ids[rows, columns],
                attention_mask=mask,
                position_ids=position_ids[rows, columns],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        yield rows, out.past_key_values, out.logits[:, -1].float()
        del out


def _prefill(
    model, input_ids, attention_mask, position_ids, prefill_tokens: int, prefix: int = 0, attention: str | None = None
):
    """Prefill in row groups (``_prefill_groups``), the groups' KV caches joined into one as wide as the batch (a
    group's columns between the shared prefix and its longest prompt are zeros, masked), so that the whole batch
    decodes together: a decode step costs about as much for 500 rows as for 50, while prefill activations would
    not fit for 500 rows at once. Returns (cache, logits of each row's last position)."""
    import torch
    from transformers import DynamicCache

    width = input_ids.shape[1]
    caches, last_logits = [], []
    groups = _prefill_groups(model, input_ids, attention_mask, position_ids, prefill_tokens, prefix, attention)
    for _, cache, logits in groups:
        caches.append(cache)
        last_logits.append(logits)
    if len(caches) == 1:  # the group holds the batch's longest prompt: already as wide as the batch
        return caches[0], last_logits[0]

    def widened(states):
        missing = width - states.shape[2]
        if not missing:
            return states
        gap = states.new_zeros((*states.shape[:2], missing, states.shape[3]))
        return torch.cat([states[:, :, :prefix], gap, states[:, :, prefix:]], dim=2)

    joined = []
    for layer in range(len(caches[0].layers)):  # one layer at a time: little memory beyond the cache itself
        parts = [cache.layers[layer] for cache in caches]
        joined.append(
            (torch.cat([widened(part.keys) for part in parts]), torch.cat([widened(part.values) for part in parts]))
        )
        for part in parts:
            part.keys = part.values = None
    return DynamicCache(joined), torch.cat(last_logits)


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """An answer cut at its first stop token; tokens after it were never real."""
    cut = next((i for i, token in enumerate(tokens) if token in stop_ids), len(tokens))
    return tokens[:cut]


def shared_prefix_length(batch: list[list[int]], model=None) -> int:
    """How many leading tokens every prompt of ``batch`` shares, to prefill once (``MIN_SHARED_PREFIX``); 0 when
    there are fewer or only one prompt. Each prompt keeps at least one token of its own (its last position's
    logits choose its first answer token). 0 past ``model``'s sliding attention window (its cache keeps only the
    window), and with attention other than sdpa or eager (the masks with padding after the prefix are tested with
    those two only)."""
    if len(batch) < 2:
        return 0
    if model is not None:
        config = model.config.get_text_config()
        window = getattr(config, "sliding_window", None)
        if (window and max(len(ids) for ids in batch) > window) or config._attn_implementation not in ("sdpa", "eager"):
            return 0
    shortest, first, length = min(len(ids) for ids in batch), batch[0], 0
    while length < shortest - 1 and all(ids[length] == first[length] for ids in batch):
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0


def left_padded(batch: list[list[int]], pad_id: int, device, prefix: int = 0):
    """A batch's prompts padded to its longest: (input ids, attention mask, position ids), on ``device``.
    The padding goes on the left; with a shared ``prefix`` (``shared_prefix_length``) it goes right after those
    first tokens, which then stand in the same columns for every row. Either way every row ends at the last
    column and the mask hides the padding."""
    import torch

    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :prefix] = torch.tensor(ids[:prefix], dtype=torch.long)
        input_ids[row, width - len(ids) + prefix :] = torch.tensor(ids[prefix:])
        attention_mask[row, :prefix] = 1
        attention_mask[row, width - len(ids) + prefix :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
    return input_ids, attention_mask, position_ids


def _generate_batch(
    model,
    tokenizer,
    batch: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    trie: LabelTrie | None,
    prefill_tokens: int = PREFILL_TOKENS,
    stop_check_every: int = 1,
    margins: list | None = None,
    prefill_kernels: str | None = None,
):
    """Greedy answers for one left-padded batch: prefill in row groups, then decode all rows together, checking
    every ``stop_check_every`` steps whether all rows have stopped. ``margins``: each row's ``closest_margin``
    appended to it. ``prefill_kernels``: prefill's attention kernels (``prefill_attention``)."""
    import torch

    pad_id = tokenizer.pad_token_id
    width = max(len(ids) for ids in batch)
    device = next(model.parameters()).device
    prefix = shared_prefix_length(batch, model)
    input_ids, attention_mask, position_ids = left_padded(batch, pad_id, device, prefix)
    stops = torch.tensor(stop_ids, device=device)
    labels = LabelAutomaton(trie, pad_id, device) if trie is not None else None
    # the mask of every step, allocated once: step k attends to the prompt and the k tokens before it
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(batch), max_new_tokens))], dim=1)
    # the named ranges show in a profile (benchmarks/profiling.py): prefill against decode
    with torch.inference_mode():
        with torch.profiler.record_function("prefill"):
            cache, logits = _prefill(
                model, input_ids, attention_mask[:, :width], position_ids, prefill_tokens, prefix, prefill_kernels
            )
        with torch.profiler.record_function("decode"):
            finished = torch.zeros(len(batch), dtype=torch.bool, device=device)
            states = labels.start(len(batch), device) if labels else None
            closest = torch.full((len(batch),), float("inf"), device=device) if margins is not None else None
            tokens = []
            for step in range(max_new_tokens):
                if labels is not None:
                    logits = labels.restrict(logits, states)
                if closest is not None:
                    closest_margin(logits, closest, finished)
                next_token = logits.argmax(-1)
                next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
                tokens.append(next_token)
                if labels is not None:
                    states = labels.advance(states, next_token)
                finished |= torch.isin(next_token, stops)
                if step == max_new_tokens - 1 or ((step + 1) % stop_check_every == 0 and bool(finished.all())):
                    break
                position_ids = position_ids[:, -1:] + 1
                out = model(
                    input_ids=next_token[:, None],
                    attention_mask=attention_mask[:, : width + step + 1],
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
                cache, logits = out.past_key_values, out.logits[:, -1].float()
                del out
            generated = torch.stack(tokens, dim=1).tolist()
            if closest is not None:
                margins.extend(closest.tolist())
    return [cut_at_stop(row, stop_ids) for row in generated]


def decode_alone(model, tokenizer, prompt: list[int], max_new_tokens: int, stop_ids: list[int], trie):
    """One prompt's greedy answer as one at a time gives it: a batch of one (no padding, no other rows to change
    the kernels' sums) through the growing-cache loop, the same forwards as transformers' generate on the prompt
    alone (one prompt's logits in prefill, a dynamic cache, PyTorch's own choice of attention kernels: another
    kernel's rounding turns near ties too), without its per-step overhead."""
    return _generate_batch(model, tokenizer, [prompt], max_new_tokens, stop_ids, trie, prefill_kernels="pytorch")[0]


def _generate_batch_plain(
    model,
    tokenizer,
    batch: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    trie: LabelTrie | None,
    prefill_tokens: int = PREFILL_TOKENS,  # unused: transformers prefills the batch its own way
    stop_check_every: int = 1,  # unused: transformers checks every step
    num_beams: int = 1,
):
    """The same answers through transformers' own ``model.generate`` (left padding, greedy): the path to fall
    back on when debugging the loop above (``QLORA_KIT_GENERATION=plain``); slower. With ``num_beams`` > 1,
    transformers' beam search (the best beam's answer)."""
    import torch

    pad_id = tokenizer.pad_token_id
    width = max(len(ids) for ids in batch)
    input_ids, attention_mask, _ = left_padded(batch, pad_id, next(model.parameters()).device)

    def allowed(row, ids):
        return trie.allowed(ids[width:].tolist(), pad_id)

    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            prefix_allowed_tokens_fn=allowed if trie is not None else None,
        )
    return [cut_at_stop(row, stop_ids) for row in out[:, width:].tolist()]


# The decode loops, by name: ``dynamic`` (a cache grown by concatenation, the loop above), ``static`` (a cache allocated
# once per batch, each step replayed as a CUDA graph on a GPU: qlora_kit/static_decoding.py) and ``plain``
# (transformers' own generate, for debugging). All give the same answers.
LOOPS = ("dynamic", "static", "plain")
# The loop used when neither ``generate(loop=...)`` nor QLORA_KIT_GENERATION names one, by where the model runs.
# On a GPU ``static``: on an H100 its answers equalled the growing cache's on all 7,317 20 Newsgroups test prompts
# of a trained SmolLM2 adapter (and equal one-at-a-time greedy exactly as often, 97.75% of 400), at 1.2x (warm) to
# 2.4x (first call) its speed and half its peak memory; on the 7B shape 1.35-2.1x at 27-28% less memory
# (docs/benchmarks.md). On the CPU ``dynamic``: there are no CUDA graphs to replay, and it is the loop the CPU was
# measured with.
DEFAULT_LOOP = {"cuda": "static", "cpu": "dynamic"}


def loop_setting() -> str | None:
    """The ``LOOPS`` entry QLORA_KIT_GENERATION names, or None when it is unset."""
    import os

    choice = os.environ.get("QLORA_KIT_GENERATION", "")
    if choice and choice not in LOOPS:
        raise UsageError(f"QLORA_KIT_GENERATION={choice}: leave it unset, or set it to one of {', '.join(LOOPS)}")
    return choice or None


def _batch_generator(loop: str | None, model, compact_below: float | None = None):
    """The decode loop to use: ``loop`` if given, else QLORA_KIT_GENERATION if set, else ``DEFAULT_LOOP`` for the
    model's device (the CPU's for any device it does not name). ``compact_below`` goes to the static loop, the one
    that drops finished rows; the others ignore it."""
    from . import static_decoding

    device = next(model.parameters()).device.type
    choice = loop or loop_setting() or DEFAULT_LOOP.get(device, DEFAULT_LOOP["cpu"])
    if choice not in LOOPS:
        raise UsageError(f"loop={choice!r}: use one of {', '.join(LOOPS)}")
    if choice == "plain":
        log.info("generating with transformers' model.generate (the plain path)")
        return _generate_batch_plain
    if choice != "static":
        return _generate_batch
    if compact_below is None:
        return static_decoding.generate_batch
    return functools.partial(static_decoding.generate_batch, compact_below=compact_below)


def plan_batches(
    lengths: list[int], *, max_new_tokens: int, batch_size: int, max_batch_tokens: int | None
) -> list[list[int]]:
    """Batches of prompt indices, longest prompts first: each at most ``batch_size`` prompts and at most
    ``max_batch_tokens`` padded tokens (prompt + new tokens). Deterministic: every process that plans the
    same prompts gets the same batches."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their index order
    batches, start = [], 0
    while start < len(order):
        count = batch_size
        if max_batch_tokens:  # the first prompt of a batch is its longest
            count = max(1, min(count, max_batch_tokens // (lengths[order[start]] + max_new_tokens)))
        batches.append(order[start : start + count])
        start += count
    return batches


def share_batches(plan: list[list[int]], lengths: list[int], max_new_tokens: int, processes: int) -> list[list]:
    """The batches of ``plan`` shared out among ``processes`` so that each gets about the same number of padded
    tokens (a batch costs rows x (its longest prompt + new tokens)): the costliest first, each to the process
    with the least so far (ties: the lowest rank). Deterministic; every process computes the same split."""
    shares: list[list] = [[] for _ in range(processes)]
    load = [0] * processes
    cost = {id(batch): len(batch) * (max(lengths[i] for i in batch) + max_new_tokens) for batch in plan}
    for batch in sorted(plan, key=lambda b: -cost[id(b)]):  # stable: equal costs keep the plan's order
        target = min(range(processes), key=lambda rank: (load[rank], rank))
        shares[target].append(batch)
        load[target] += cost[id(batch)]
    return shares


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    label_sequences: list[list[int]] | None = None,
    progress: bool = True,
    on_batch=None,
    prefill_tokens: int = PREFILL_TOKENS,
    shard: tuple[int, int] = (0, 1),
    loop: str | None = None,
    stop_check_every: int = STOP_CHECK_EVERY,
    num_beams: int = 1,
    likelihood: bool = False,
    compact_below: float | None = None,
    recheck_margin: float | None = None,
    track_margins: bool = False,
) -> GenerationResult:
    """Greedy answers for token-id prompts, in the prompts' order (with ``num_beams`` > 1, beam search's).

    A batch holds at most ``batch_size`` prompts and at most ``max_batch_tokens`` padded tokens
    (prompt + new tokens): short prompts travel in large batches, long ones in small ones. Prompts are
    prefilled ``prefill_tokens`` at a time, then the whole batch decodes together.
    ``shard=(rank, processes)``: every process plans the same batches and runs its share of them, shared by
    padded tokens (``share_batches``), so each batch is exactly the one a single process would run (same
    padding, same numbers); the other prompts' outputs stay None and are not failures.
    ``on_batch(indices, answers)`` is called after each finished batch (to save results as they come).
    ``loop``: which decode loop runs the batches (``LOOPS``; default: QLORA_KIT_GENERATION, else ``DEFAULT_LOOP`` for the
    model's device: static on a GPU).
    ``stop_check_every``: decode steps between checks that a batch has finished (``STOP_CHECK_EVERY``); the
    answers are the same whatever it is.
    ``num_beams`` > 1: transformers' beam search over the same batches, each holding ``num_beams`` times fewer
    prompts (every prompt keeps ``num_beams`` rows of cache).
    ``likelihood``: not generated but chosen: each prompt's answer is the one of ``label_sequences`` the model
    gives the highest probability (``label_likelihood``).
    ``compact_below``: the static loop drops a batch's finished rows once at most this share still decodes
    (``static_decoding.generate_batch``); None (the default): never.
    ``recheck_margin``: answers whose greedy choice came within this many logits of a tie are decoded again alone
    (``RECHECK_MARGIN``; default: QLORA_KIT_RECHECK_MARGIN, else ``RECHECK_MARGIN``); the static and dynamic loops
    only. ``track_margins``: record each answer's ``closest_margin`` (in ``closest_margins``) even when not
    rechecking.
    """
    import collections

    import torch
    from tqdm.auto import tqdm

    from . import static_decoding

    batch_size = batch_size or default_batch_size()
    if max_batch_tokens is None:
        max_batch_tokens = default_max_batch_tokens(model)
    if num_beams > 1:  # a prompt takes num_beams rows of cache
        batch_size = max(1, batch_size // num_beams)
        max_batch_tokens = max_batch_tokens // num_beams if max_batch_tokens else None
    trie = LabelTrie(label_sequences) if label_sequences else None
    rank, processes = shard
    plan = plan_batches(
        [len(p) for p in prompts],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
    )
    queue = collections.deque(share_batches(plan, [len(p) for p in prompts], max_new_tokens, processes)[rank])
    result = GenerationResult(outputs=[None] * len(prompts), closest_margins=[None] * len(prompts))
    bar = tqdm(total=sum(len(batch) for batch in queue), desc="generating", unit="ex", disable=not progress)
    rows_that_fit = None  # learned from an out-of-memory error: later batches are split to this many rows
    if likelihood:
        from .label_likelihood import rank_labels_batch

        if not label_sequences or num_beams > 1:
            raise UsageError("choosing answers by likelihood needs the label sequences, and no beams")
        generate_batch = functools.partial(rank_labels_batch, sequences=label_sequences)
    elif num_beams > 1:
        log.info("beam search with %d beams (transformers' generate)", num_beams)
        generate_batch = functools.partial(_generate_batch_plain, num_beams=num_beams)
    else:
        generate_batch = _batch_generator(loop, model, compact_below)
    recheck_margin = recheck_margin_setting() if recheck_margin is None else recheck_margin
    tracks = getattr(generate_batch, "func", generate_batch) in (_generate_batch, static_decoding.generate_batch)
    if recheck_margin > 0 and not tracks:
        log.info("near ties are rechecked with the static or dynamic loop only: answers kept as generated")
    track_margins = tracks and (track_margins or recheck_margin > 0)
    while queue:
        indices = queue.popleft()
        if rows_that_fit and len(indices) > rows_that_fit:
            queue.appendleft(indices[rows_that_fit:])
            indices = indices[:rows_that_fit]
        margins = [] if track_margins else None
        try:
            answers = generate_batch(
                model,
                tokenizer,
                [prompts[i] for i in indices],
                max_new_tokens,
                stop_ids,
                trie,
                prefill_tokens,
                stop_check_every,
                **({"margins": margins} if track_margins else {}),
            )
            near_ties = [row for row, margin in enumerate(margins or []) if margin < recheck_margin]
            for row in near_ties:
                answers[row] = decode_alone(model, tokenizer, prompts[indices[row]], max_new_tokens, stop_ids, trie)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_out_of_memory(error):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(indices) > 1:  # the same prompts again, in two halves
                rows_that_fit = max(1, len(indices) // 2)
                queue.appendleft(indices[rows_that_fit:])
                queue.appendleft(indices[:rows_that_fit])
                log.warning("out of memory: retrying with batch size %d", rows_that_fit)
                continue
            result.failures[indices[0]] = "out of memory at batch size 1"
            log.error("prompt %d (%d tokens) does not fit in memory even alone", indices[0], len(prompts[indices[0]]))
            bar.update(1)
            continue
        for index, answer in zip(indices, answers):
            result.outputs[index] = answer
        for index, margin in zip(indices, margins or []):
            result.closest_margins[index] = margin
        result.rechecked.extend(indices[row] for row in near_ties)
        if on_batch is not None:
            on_batch(indices, answers)
        bar.update(len(indices))
    bar.close()
    result.final_batch_size = rows_that_fit or batch_size
    return result
