import collections
import types

import pytest
import torch

from qlora_kit import generation, static_decoding
from qlora_kit.formatting import PromptFormat, answer_ids


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    from transformers import AutoModelForCausalLM

    from qlora_kit.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, tokenizer


def _prompts(tokenizer, count=11):
    fmt = PromptFormat("classification", "finetune", "seed", tokenizer)
    texts = ["orbit launch " * (i % 5 + 1) + f"moon {i}" for i in range(count)]
    return [fmt.prompt_ids(text, 200) for text in texts]


def _one_at_a_time(model, prompt, max_new_tokens, stop_ids, num_beams=1):
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=stop_ids[0],
    )[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(out) if t in stop_ids), len(out))
    return out[:cut]


def test_batched_equals_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer)
    stop = [tokenizer.eos_token_id]
    batched = generation.generate(
        model, tokenizer, prompts, max_new_tokens=8, stop_ids=stop, batch_size=4, progress=False
    )
    assert not batched.failures
    for prompt, answer in zip(prompts, batched.outputs):
        assert answer == _one_at_a_time(model, prompt, 8, stop)


def test_out_of_memory_halves_the_batch_and_loses_nothing(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer, 9)
    real = generation._generate_batch
    calls = []

    def flaky(model, tokenizer, batch, *args):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(model, tokenizer, batch, *args)

    monkeypatch.setattr(generation, "_generate_batch", flaky)
    result = generation.generate(
        model, tokenizer, prompts, max_new_tokens=4, stop_ids=[tokenizer.eos_token_id], batch_size=8, progress=False
    )
    assert calls[:3] == [8, 4, 2] and result.final_batch_size == 2
    assert all(output is not None for output in result.outputs) and not result.failures
    monkeypatch.setattr(generation, "_generate_batch", real)
    expected = generation.generate(
        model, tokenizer, prompts, max_new_tokens=4, stop_ids=[tokenizer.eos_token_id], batch_size=3, progress=False
    )
    assert result.outputs == expected.outputs


def test_example_that_never_fits_is_reported_not_emptied(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer, 3)
    longest = max(range(3), key=lambda i: len(prompts[i]))
    real = generation._generate_batch

    def fails_on_longest(model, tokenizer, batch, *args):
        if prompts[longest] in batch:
            raise RuntimeError("CUDA error: out of memory")
        return real(model, tokenizer, batch, *args)

    monkeypatch.setattr(generation, "_generate_batch", fails_on_longest)
    result = generation.generate(
        model, tokenizer, prompts, max_new_tokens=3, stop_ids=[tokenizer.eos_token_id], batch_size=2, progress=False
    )
    assert result.outputs[longest] is None and longest in result.failures
    assert sum(output is not None for output in result.outputs) == 2


def test_other_errors_are_not_swallowed(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer

    def broken(*args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(generation, "_generate_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        generation.generate(model, tokenizer, _prompts(tokenizer, 2), max_new_tokens=2, stop_ids=[0], progress=False)


def test_constrained_decoding_only_yields_labels(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    labels = ["comp.graphics", "rec.autos", "sci.space"]
    sequences = [answer_ids(tokenizer, label, "</s>") for label in labels]
    result = generation.generate(
        model,
        tokenizer,
        _prompts(tokenizer, 6),
        max_new_tokens=20,
        stop_ids=[tokenizer.eos_token_id],
        batch_size=4,
        label_sequences=sequences,
        progress=False,
    )
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in result.outputs]
    assert set(decoded) <= set(labels) and len(decoded) == 6


def _eval_args(run, data_dir, out):
    from argparse import Namespace

    return Namespace(
        experiment_dir=str(run),
        split="test",
        test_file=str(data_dir / "news_test.jsonl"),
        validation_file=None,
        dataset="",
        limit=None,
        batch_size=3,
        max_new_tokens=6,
        max_prompt_tokens=None,
        output_dir=str(out),
        overwrite=False,
        merge_adapter=False,
        use_flash_attention=False,
        decoding="greedy",
    )


def test_interrupted_evaluation_continues_with_the_same_result(trained_run_for_resume, data_dir, tmp_path, monkeypatch):
    """A crash after some batches keeps them; the re-run generates only the rest and scores the same."""
    from qlora_kit import evaluation

    def args(out):
        return _eval_args(trained_run_for_resume, data_dir, out)

    whole = evaluation.evaluate_run("classification", args(tmp_path / "whole"))
    real = generation._generate_batch
    calls = []

    def crash_on_third_batch(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(generation, "_generate_batch", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate_run("classification", args(tmp_path / "resumed"))
    partial = tmp_path / "resumed" / "predictions.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 6 and not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr(generation, "_generate_batch", real)
    resumed = evaluation.evaluate_run("classification", args(tmp_path / "resumed"))
    assert resumed["resumed_examples"] == 6 and not partial.exists()
    for key in ("accuracy", "macro_f1", "invalid", "n"):
        assert resumed[key] == whole[key]
    assert (tmp_path / "resumed" / "predictions.jsonl").read_text() == (
        tmp_path / "whole" / "predictions.jsonl"
    ).read_text()


def test_token_budget_makes_batches_by_length(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = [[1] + [5] * n for n in (40, 10, 10, 10, 10, 10, 10)]
    real = generation._generate_batch
    sizes = []

    def spy(model, tokenizer, batch, *args):
        sizes.append([len(p) for p in batch])
        return real(model, tokenizer, batch, *args)

    monkeypatch.setattr(generation, "_generate_batch", spy)
    result = generation.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=4,
        stop_ids=[tokenizer.eos_token_id],
        batch_size=5,
        max_batch_tokens=50,
        progress=False,
    )
    assert sizes == [[41], [11, 11, 11], [11, 11, 11]]  # 45 tokens alone; then 3 x 15 fit in 50
    monkeypatch.setattr(generation, "_generate_batch", real)
    assert (
        result.outputs
        == generation.generate(
            model, tokenizer, prompts, max_new_tokens=4, stop_ids=[tokenizer.eos_token_id], batch_size=1, progress=False
        ).outputs
    )


def test_kv_cache_size_of_a_mistral_layout(model_and_tokenizer):
    model, _ = model_and_tokenizer
    # 2 layers x 2 kv heads x head_dim 16 x (key + value) x 4 bytes (fp32)
    assert generation.kv_cache_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4


def test_generation_memory_per_token_for_zephyr_7b_shape():
    from types import SimpleNamespace

    from transformers import MistralConfig

    config = MistralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    )
    parameter = torch.zeros(1, dtype=torch.bfloat16)
    model = SimpleNamespace(config=config, parameters=lambda: iter([parameter]))
    assert generation.kv_cache_bytes_per_token(model) == 131072  # 128 KiB
    # KV cache + prefill activations: within 5% of the 242 KB per token measured on the GPU (whole-batch prefill)
    total = generation.kv_cache_bytes_per_token(model) + generation.prefill_bytes_per_token(model)
    assert total == pytest.approx(242_000, rel=0.05)


def test_prefill_in_row_groups_gives_the_same_answers(model_and_tokenizer, monkeypatch):
    """Prompts prefilled in groups of rows, each without the padding its rows share, answer as one whole-batch
    prefill does."""
    model, tokenizer = model_and_tokenizer
    prompts = [[1] + [5 + (i * 7 + j) % 50 for j in range(n)] for i, n in enumerate((12, 3, 9, 30, 7, 18, 5))]
    forwards = []
    real_forward = model.forward

    def counting_forward(*args, **kwargs):
        forwards.append(kwargs["input_ids"].shape)
        return real_forward(*args, **kwargs)

    whole = generation.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=6,
        stop_ids=[tokenizer.eos_token_id],
        batch_size=7,
        prefill_tokens=10_000,
        progress=False,
    )
    monkeypatch.setattr(model, "forward", counting_forward)
    grouped = generation.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=6,
        stop_ids=[tokenizer.eos_token_id],
        batch_size=7,
        prefill_tokens=70,
        progress=False,
    )
    # longest first (31, 19 | 13, 10, 8, 6, 4 tokens): each group cut to its own longest prompt, as many rows as fit
    # 70 tokens so cut: two groups, then decode steps of 7
    assert forwards[:2] == [(2, 31), (5, 13)]
    assert all(shape == (7, 1) for shape in forwards[2:]) and len(forwards) > 2
    assert grouped.outputs == whole.outputs


def _prompts_sharing_a_prefix(count=7, prefix=20):
    """Prompts that begin with the same ``prefix`` tokens (as a chat template's system turn and an instruction
    make them), then go on with tokens of their own, of different lengths."""
    shared = [1] + [40 + j % 30 for j in range(prefix - 1)]
    return [shared + [5 + (i * 7 + j) % 50 for j in range(n)] for i, n in enumerate((12, 3, 9, 30, 7, 18, 5)[:count])]


@pytest.mark.parametrize("loop", ["dynamic", "static"])
def test_a_prefix_every_prompt_shares_is_prefilled_once(model_and_tokenizer, monkeypatch, loop):
    """The tokens every prompt of a batch begins with run through the model once (one row), the rows' own tokens
    after them in groups; the answers are one prompt at a time's."""
    model, tokenizer = model_and_tokenizer
    prompts, stop = _prompts_sharing_a_prefix(), [tokenizer.eos_token_id]
    assert generation.shared_prefix_length(prompts, model) == 20
    assert generation.shared_prefix_length(prompts[:1], model) == 0  # one prompt: nothing to share
    assert generation.shared_prefix_length([p[:16] for p in prompts], model) == 0  # each keeps a token of its own
    with pytest.MonkeyPatch.context() as patch:  # a cache that keeps only a window cannot hold a shared prefix
        patch.setattr(model.config, "sliding_window", 32)
        assert generation.shared_prefix_length(prompts, model) == 0
    with pytest.MonkeyPatch.context() as patch:  # attention whose padded masks are not tested with it
        patch.setattr(model.config, "_attn_implementation", "flash_attention_2")
        assert generation.shared_prefix_length(prompts, model) == 0
    forwards = []
    real_forward = model.forward

    def counting_forward(*args, **kwargs):
        forwards.append(kwargs["input_ids"].shape)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    kwargs = dict(max_new_tokens=6, stop_ids=stop, batch_size=7, prefill_tokens=70, progress=False, loop=loop)
    shared = generation.generate(model, tokenizer, prompts, **kwargs).outputs
    # the prefix once; then, longest first (30, 18 | 12, 9, 7, 5, 3 own tokens), groups of at most 70 own tokens
    assert forwards[:3] == [(1, 20), (2, 30), (5, 12)]
    assert all(shape == (7, 1) for shape in forwards[3:]) and len(forwards) > 3
    monkeypatch.setattr(generation, "MIN_SHARED_PREFIX", 10_000)
    assert generation.generate(model, tokenizer, prompts, **kwargs).outputs == shared
    monkeypatch.undo()
    assert shared == [_one_at_a_time(model, prompt, 6, stop) for prompt in prompts]
    assert any(len(answer) > 1 for answer in shared)


def test_processes_share_one_batch_plan(model_and_tokenizer, monkeypatch):
    """Each process runs whole batches of the single-process plan: together they cover every prompt once,
    with the same padding and so the same numbers as one process."""
    model, tokenizer = model_and_tokenizer
    prompts = [[1] + [5 + (i * 3 + j) % 40 for j in range(n)] for i, n in enumerate((3, 25, 9, 14, 9, 30, 5, 18))]
    real = generation._generate_batch
    batches = []

    def spy(model, tokenizer, batch, *args):
        batches.append(tuple(map(tuple, batch)))
        return real(model, tokenizer, batch, *args)

    monkeypatch.setattr(generation, "_generate_batch", spy)
    kwargs = dict(
        max_new_tokens=4, stop_ids=[tokenizer.eos_token_id], batch_size=3, max_batch_tokens=60, progress=False
    )
    one = generation.generate(model, tokenizer, prompts, **kwargs)
    single_batches, batches[:] = list(batches), []
    parts = [generation.generate(model, tokenizer, prompts, shard=(rank, 2), **kwargs) for rank in (0, 1)]
    assert sorted(batches) == sorted(single_batches) and len(single_batches) > 2
    merged = [a if a is not None else b for a, b in zip(parts[0].outputs, parts[1].outputs)]
    assert all((a is None) != (b is None) for a, b in zip(parts[0].outputs, parts[1].outputs))
    assert merged == one.outputs and not parts[0].failures and not parts[1].failures


def test_plan_batches_by_token_budget():
    plan = generation.plan_batches([10, 40, 10, 10, 10], max_new_tokens=5, batch_size=3, max_batch_tokens=50)
    assert plan == [[1], [0, 2, 3], [4]]  # 45 tokens alone; then 3 x 15 (the batch size caps it at 3)


def test_partial_files_of_other_processes_are_resumed(trained_run_for_resume, data_dir, tmp_path):
    """An evaluation cut off while running as several processes continues in one (or any number)."""
    from qlora_kit import evaluation

    def args(out):
        return _eval_args(trained_run_for_resume, data_dir, out)

    whole = evaluation.evaluate_run("classification", args(tmp_path / "whole"))
    lines = (tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "predictions.partial.rank0.jsonl").write_text("\n".join(lines[0:6:2]) + "\n")
    (tmp_path / "cut" / "predictions.partial.rank1.jsonl").write_text("\n".join(lines[1:6:2]) + "\n")
    resumed = evaluation.evaluate_run("classification", args(tmp_path / "cut"))
    assert resumed["resumed_examples"] == 6 and resumed["accuracy"] == whole["accuracy"]
    assert (tmp_path / "cut" / "predictions.jsonl").read_text() == "\n".join(lines) + "\n"
    assert not list((tmp_path / "cut").glob("*.partial*"))


def test_batches_are_shared_by_padded_tokens_not_by_count():
    from qlora_kit.generation import plan_batches, share_batches

    lengths = [500] * 8 + [20] * 200  # a few long prompts, many short ones
    plan = plan_batches(lengths, max_new_tokens=20, batch_size=64, max_batch_tokens=4096)
    shares = share_batches(plan, lengths, 20, 2)
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(len(lengths)))
    assert sorted(map(tuple, plan)) == sorted(tuple(b) for share in shares for b in share)  # the same batches

    def tokens(share):
        return sum(len(b) * (max(lengths[i] for i in b) + 20) for b in share)

    assert abs(tokens(shares[0]) - tokens(shares[1])) <= max(tokens([b]) for b in plan)
    assert share_batches(plan, lengths, 20, 2) == shares  # every process computes the same split
    # every other batch (a split by count) would give one process both long batches
    lengths = [1000, 10, 1000, 10]
    shares = share_batches([[0], [1], [2], [3]], lengths, 20, 2)
    assert shares == [[[0], [1]], [[2], [3]]] and tokens(shares[0]) == tokens(shares[1])


def test_the_batch_budget_is_the_same_for_every_process_and_every_call_of_one_evaluation():
    from qlora_kit.generation import usable_gpu_memory

    gib = 2**30
    # two processes of one evaluation: the second's collective buffers take 0.4 GiB more; same usable memory
    first = usable_gpu_memory(130 * gib, 141 * gib, 5 * gib, 5 * gib)
    assert first == usable_gpu_memory(129.6 * gib, 141 * gib, 5 * gib, 5 * gib) == 136 * gib
    # a second evaluation in the same process: the first left 40 GiB cached in the allocator, free to reuse
    assert usable_gpu_memory(90 * gib, 141 * gib, 5 * gib, 45 * gib) == first
    # another program holds most of the card: what is free to this process counts
    assert usable_gpu_memory(30 * gib, 141 * gib, 5 * gib, 5 * gib) == 30 * gib
    assert usable_gpu_memory(30 * gib, 141 * gib, 5 * gib, 15 * gib) == 40 * gib


def test_failures_that_mean_out_of_memory():
    from qlora_kit.generation import _is_out_of_memory

    assert _is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert _is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    # cuDNN attention without room for its workspace (seen with several processes on one GPU)
    assert _is_out_of_memory(
        RuntimeError("Expected mha_graph.execute(handle, variant_pack, workspace_ptr.get()).is_good() to be true")
    )
    assert not _is_out_of_memory(RuntimeError("shape '[32, 0]' is invalid for input of size 16"))


def test_label_automaton_allows_what_the_trie_allows():
    """The device-side automaton chooses exactly as the trie walked over each row's answer so far, for any
    tokens fed to it (the label's own, a padding token, tokens outside every label)."""
    import random

    from qlora_kit.generation import LabelAutomaton, LabelTrie

    rng = random.Random(0)
    pad = 2
    labels = [[5, 9, 2], [5, 7, 11, 2], [6, 2], [13, 9, 9, 2], [5, 9, 8, 2]]
    trie = LabelTrie(labels)
    automaton = LabelAutomaton(trie, pad, "cpu")
    rows = 64
    answers = [[] for _ in range(rows)]
    states = automaton.start(rows, "cpu")
    for _ in range(6):
        logits = torch.randn(rows, 20)
        restricted = automaton.restrict(logits, states)
        for row in range(rows):
            allowed = sorted(trie.allowed(answers[row], pad))
            assert torch.isfinite(restricted[row]).nonzero().flatten().tolist() == allowed
            assert torch.equal(restricted[row, allowed], logits[row, allowed])
        # half the rows follow the constraint, the others take any token (as a finished row's padding does)
        tokens = restricted.argmax(-1)
        for row in range(0, rows, 2):
            tokens[row] = rng.choice([pad, 0, 19, 5, 9, 40])
        for row, token in enumerate(tokens.tolist()):
            answers[row].append(token)
        states = automaton.advance(states, tokens)


def _nine_prompts_three_labels(tokenizer, constrained: bool):
    """Nine prompts, the stop ids, three labels' token sequences, and generate()'s arguments (constrained to the
    labels or not)."""
    prompts = _prompts(tokenizer, count=9)
    stop = [tokenizer.eos_token_id]
    labels = [answer_ids(tokenizer, name, tokenizer.eos_token) for name in ("sci.space", "rec.autos", "sci.med")]
    kwargs = dict(max_new_tokens=8, stop_ids=stop, batch_size=4, progress=False)
    if constrained:
        kwargs["label_sequences"] = labels
    return prompts, stop, labels, kwargs


@pytest.mark.parametrize("constrained", [False, True])
def test_the_plain_path_gives_the_same_answers(model_and_tokenizer, monkeypatch, constrained):
    """QLORA_KIT_GENERATION=plain (transformers' generate, for debugging) answers as the project's loop does,
    with and without the label constraint."""
    model, tokenizer = model_and_tokenizer
    prompts, stop, labels, kwargs = _nine_prompts_three_labels(tokenizer, constrained)
    ours = generation.generate(model, tokenizer, prompts, **kwargs).outputs
    monkeypatch.setenv("QLORA_KIT_GENERATION", "plain")
    plain = generation.generate(model, tokenizer, prompts, **kwargs).outputs
    assert plain == ours
    if constrained:
        assert all(answer + stop in labels for answer in ours)
    monkeypatch.setenv("QLORA_KIT_GENERATION", "fast")
    with pytest.raises(generation.UsageError, match="QLORA_KIT_GENERATION=fast"):
        generation.generate(model, tokenizer, prompts, **kwargs)


@pytest.mark.parametrize("loop", ["dynamic", "static"])
def test_prefill_leaves_cudnn_attention_out_unless_asked(model_and_tokenizer, monkeypatch, loop):
    """By default every prefill forward runs with cuDNN's attention switched off (the decode steps as PyTorch chooses);
    QLORA_KIT_PREFILL_ATTENTION=pytorch leaves prefill to PyTorch's choice too, with the same answers; a value it does
    not know stops with the variable named."""
    import torch

    model, tokenizer = model_and_tokenizer
    prompts, stop, labels, kwargs = _nine_prompts_three_labels(tokenizer, constrained=True)
    kwargs["loop"] = loop
    seen = []  # (query length, cuDNN attention allowed) of every forward
    forward = model.forward

    def spied(*args, **kw):
        seen.append((kw["input_ids"].shape[1], torch.backends.cuda.cudnn_sdp_enabled()))
        return forward(*args, **kw)

    def cudnn_allowed():  # in prefill's forwards, in the decode steps'
        prefill = [allowed for length, allowed in seen if length > 1]
        decode = [allowed for length, allowed in seen if length == 1]
        assert prefill and decode
        seen.clear()
        return set(prefill), set(decode)

    monkeypatch.setattr(model, "forward", spied)
    monkeypatch.delenv("QLORA_KIT_PREFILL_ATTENTION", raising=False)
    default = generation.generate(model, tokenizer, prompts, **kwargs).outputs
    assert cudnn_allowed() == ({False}, {True})
    monkeypatch.setenv("QLORA_KIT_PREFILL_ATTENTION", "pytorch")
    assert generation.generate(model, tokenizer, prompts, **kwargs).outputs == default
    assert cudnn_allowed() == ({True}, {True})
    monkeypatch.setenv("QLORA_KIT_PREFILL_ATTENTION", "flash")
    with pytest.raises(generation.UsageError, match="QLORA_KIT_PREFILL_ATTENTION=flash"):
        generation.generate(model, tokenizer, prompts, **kwargs)


def test_the_decode_loop_is_chosen_by_the_models_device(monkeypatch):
    """Unless a loop is named: the static loop for a model on a GPU, the growing cache on the CPU (and on a device
    the table does not name); a loop named by generate(loop=...) or QLORA_KIT_GENERATION wins over both."""

    class On:  # a model whose parameters live on ``device`` (no GPU is needed to ask where they are)
        def __init__(self, device):
            self.device = device

        def parameters(self):
            return iter([types.SimpleNamespace(device=torch.device(self.device))])

    monkeypatch.delenv("QLORA_KIT_GENERATION", raising=False)
    assert generation._batch_generator(None, On("cuda")) is static_decoding.generate_batch
    assert generation._batch_generator(None, On("cpu")) is generation._generate_batch
    assert generation._batch_generator(None, On("meta")) is generation._generate_batch
    assert generation._batch_generator("dynamic", On("cuda")) is generation._generate_batch
    monkeypatch.setenv("QLORA_KIT_GENERATION", "dynamic")
    assert generation._batch_generator(None, On("cuda")) is generation._generate_batch
    monkeypatch.setenv("QLORA_KIT_GENERATION", "static")
    assert generation._batch_generator(None, On("cpu")) is static_decoding.generate_batch


@pytest.mark.parametrize("constrained", [False, True])
def test_checking_for_the_end_less_often_gives_the_same_answers(model_and_tokenizer, monkeypatch, constrained):
    """stop_check_every: steps run past a batch's end are discarded; the answers do not change, only the number of
    decode steps (counted here) may grow."""
    model, tokenizer = model_and_tokenizer
    prompts, _, _, kwargs = _nine_prompts_three_labels(tokenizer, constrained)
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    answers = {}
    try:
        for every in (1, 3):
            forwards.clear()
            outputs = generation.generate(model, tokenizer, prompts, stop_check_every=every, **kwargs).outputs
            answers[every] = (outputs, len(forwards))
    finally:
        hook.remove()
    assert answers[3][0] == answers[1][0]
    assert answers[3][1] >= answers[1][1]


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_static_cache_loop_gives_the_same_answers(model_and_tokenizer, monkeypatch, constrained, attention):
    """loop="static" (a cache allocated once per batch, a fixed 4D mask, every per-step value a tensor: the loop a
    GPU replays as CUDA graphs; eager here) answers as the growing-cache loop does, and its decode step really ran:
    prompts of different lengths (left padding), two prefill groups, stop checks every 3 steps."""
    model, tokenizer = model_and_tokenizer
    prompts, stop, labels, kwargs = _nine_prompts_three_labels(tokenizer, constrained)
    kwargs.update(prefill_tokens=2 * max(len(p) for p in prompts), stop_check_every=3)
    monkeypatch.setattr(model.config, "_attn_implementation", attention)
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        dynamic = generation.generate(model, tokenizer, prompts, loop="dynamic", **kwargs).outputs
        dynamic_forwards = len(forwards)
        called = []
        real = static_decoding._static_cache
        monkeypatch.setattr(static_decoding, "_static_cache", lambda *a: called.append(1) or real(*a))
        static = generation.generate(model, tokenizer, prompts, loop="static", **kwargs).outputs
    finally:
        hook.remove()
    assert called and static == dynamic
    assert len(forwards) - dynamic_forwards == dynamic_forwards  # not one forward more than the growing cache's
    assert any(len(answer) > 1 for answer in static)
    if constrained:
        assert all(answer + stop in labels for answer in static)


@pytest.mark.parametrize("constrained", [False, True])
def test_the_static_loop_drops_finished_rows_and_gives_the_same_answers(model_and_tokenizer, monkeypatch, constrained):
    """compact_below: once few enough rows still decode, the finished ones leave the cache and the step runs on the
    rest (here at every stop check where one row in ten has finished); the answers are those of the whole batch
    decoding to its end, in the prompts' order."""
    model, tokenizer = model_and_tokenizer
    _, _, _, kwargs = _nine_prompts_three_labels(tokenizer, constrained)
    prompts = [[1] + [5 + (i * 7 + j * 3) % 50 for j in range(5 + i % 9)] for i in range(24)]
    kwargs.update(batch_size=len(prompts), max_new_tokens=10)
    # stop at the token the rows generate most after their first: rows end at different steps
    endless = generation.generate(model, tokenizer, prompts, loop="static", **{**kwargs, "stop_ids": [-1]}).outputs
    counts = collections.Counter(token for answer in endless for token in answer[1:])
    kwargs["stop_ids"] = [counts.most_common(1)[0][0]]
    monkeypatch.setattr(static_decoding, "MIN_COMPACTED_ROWS", 1)
    rows = []  # the rows of every decode step (one new token a row)
    hook = model.register_forward_pre_hook(
        lambda module, args, named: rows.append(len(named["input_ids"])) if named["input_ids"].shape[1] == 1 else None,
        with_kwargs=True,
    )
    try:
        whole = generation.generate(model, tokenizer, prompts, loop="static", **kwargs).outputs
        whole_rows = list(rows)
        rows.clear()
        compacted = generation.generate(model, tokenizer, prompts, loop="static", compact_below=0.9, **kwargs).outputs
    finally:
        hook.remove()
    assert compacted == whole
    assert len({len(answer) for answer in whole}) > 1  # rows ended at different steps
    assert set(whole_rows) == {len(prompts)}  # without compact_below every step decodes every row
    assert rows == sorted(rows, reverse=True) and rows[-1] < len(prompts)  # with it, fewer and fewer
    assert len(rows) == len(whole_rows)  # as many steps


@pytest.mark.parametrize("loop", ["dynamic", "static"])
def test_decode_steps_read_the_cache_without_a_copy_per_query_head(model_and_tokenizer, monkeypatch, loop):
    """The tiny model has 4 query heads on 2 key/value heads. Decode steps attend with the cache as it is; copying
    it once per query head (transformers' repeat_kv) at every step read the whole cache three times over for
    SmolLM2 (3 query heads a key/value head; transformers 5.17 did so wherever a mask was given). Only prefill
    copies: as many copies for 8 new tokens as for 2."""
    import transformers.integrations.sdpa_attention as sdpa

    model, tokenizer = model_and_tokenizer
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    prompts = _prompts(tokenizer, count=6)
    copies = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda states, n: copies.append(n) or real(states, n))
    counted = {}
    for new_tokens in (2, 8):
        copies.clear()
        out = generation.generate(
            model, tokenizer, prompts, max_new_tokens=new_tokens, stop_ids=[-1], batch_size=3, progress=False,
            loop=loop,
        )  # fmt: skip
        assert all(len(answer) == new_tokens for answer in out.outputs)  # no stop: every step ran
        counted[new_tokens] = len(copies)
    assert counted[2] == counted[8]


def test_the_static_loop_falls_back_where_it_cannot_run(model_and_tokenizer, monkeypatch, caplog):
    """A model whose attention the static cache cannot drive (here: an architecture not tested with it) decodes
    with the growing cache, saying why, and gives the same answers."""

    model, tokenizer = model_and_tokenizer
    prompts, _, _, kwargs = _nine_prompts_three_labels(tokenizer, False)
    dynamic = generation.generate(model, tokenizer, prompts, loop="dynamic", **kwargs).outputs
    monkeypatch.setattr(static_decoding, "MODEL_TYPES", ("llama",))
    with caplog.at_level("INFO", logger="qlora_kit.static_decoding"):
        static = generation.generate(model, tokenizer, prompts, loop="static", **kwargs).outputs
    assert static == dynamic
    assert caplog.text.count("model type 'mistral' is not one of llama") == 1  # said once, not per batch
    monkeypatch.undo()
    monkeypatch.setattr(model.config, "sliding_window", 64)
    assert static_decoding.unsupported_reason(model, 64) is None
    assert static_decoding.unsupported_reason(model, 65) == "65 tokens are longer than the sliding window (64)"


def _tiny_config(model_type: str, vocab_size: int):
    """A tiny random config of an architecture the static loop runs (static_decoding.MODEL_TYPES)."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
    )  # fmt: skip
    plain = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0)
    if model_type == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4)
    if model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(**plain, intermediate_size=128)
    if model_type == "phi":
        return transformers.PhiConfig(**plain, intermediate_size=128)
    if model_type == "falcon":
        return transformers.FalconConfig(**plain, new_decoder_architecture=True, num_kv_heads=2)
    if model_type in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        common["head_dim"] = 16
    return transformers.AutoConfig.for_model(model_type, **common)


@pytest.mark.parametrize("model_type", sorted(set(static_decoding.MODEL_TYPES) - {"mistral"}))
def test_the_static_cache_loop_on_every_architecture_it_runs(model_and_tokenizer, model_type):
    """The same answers as the growing-cache loop on a tiny random model of each architecture the static loop
    accepts (the tiny Mistral model is the tests above)."""
    from transformers import AutoModelForCausalLM

    _, tokenizer = model_and_tokenizer
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type, len(tokenizer))).eval()
    assert model.config.model_type == model_type
    prompts, _, _, kwargs = _nine_prompts_three_labels(tokenizer, False)
    dynamic = generation.generate(model, tokenizer, prompts, loop="dynamic", **kwargs).outputs

    assert static_decoding.unsupported_reason(model, 100) is None and any(len(answer) > 2 for answer in dynamic)
    assert generation.generate(model, tokenizer, prompts, loop="static", **kwargs).outputs == dynamic
    # the prompts' common first tokens prefilled once, their keys and values shared by every row: the same answers
    assert generation.shared_prefix_length(prompts, model) == 0  # fewer than MIN_SHARED_PREFIX tokens
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "MIN_SHARED_PREFIX", 1)
        assert generation.shared_prefix_length(prompts, model) > 1
        for loop in ("dynamic", "static"):
            assert generation.generate(model, tokenizer, prompts, loop=loop, **kwargs).outputs == dynamic


def test_out_of_memory_in_the_static_loop_halves_the_batch_too(model_and_tokenizer, monkeypatch):
    """An out-of-memory error while the static loop allocates its cache is handled as the growing-cache loop's
    (halve and retry the same prompts): the answers are those of the whole batch."""

    model, tokenizer = model_and_tokenizer
    prompts, _, _, kwargs = _nine_prompts_three_labels(tokenizer, False)
    kwargs["batch_size"] = 8
    expected = generation.generate(model, tokenizer, prompts, loop="static", **kwargs).outputs
    real = static_decoding._static_cache
    rows = []

    def allocating(keys, values, write_at):
        rows.append(keys[0].shape[0])
        if rows[-1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(keys, values, write_at)

    monkeypatch.setattr(static_decoding, "_static_cache", allocating)
    result = generation.generate(model, tokenizer, prompts, loop="static", **kwargs)
    assert rows[:3] == [8, 4, 2] and result.final_batch_size == 2 and not result.failures
    assert result.outputs == expected


def test_beam_search_answers_as_one_prompt_at_a_time_does(model_and_tokenizer, monkeypatch):
    """num_beams: transformers' beam search over the engine's batches, each with num_beams times fewer prompts;
    every answer that of the prompt searched alone, and not greedy's."""
    model, tokenizer = model_and_tokenizer
    prompts, stop = _prompts(tokenizer, count=7), [tokenizer.eos_token_id]
    sizes = []
    plain = generation._generate_batch_plain
    monkeypatch.setattr(
        generation,
        "_generate_batch_plain",
        lambda model, tok, batch, *a, **k: sizes.append(len(batch)) or plain(model, tok, batch, *a, **k),
    )
    beams = generation.generate(
        model, tokenizer, prompts, max_new_tokens=8, stop_ids=stop, batch_size=6, num_beams=3, progress=False
    ).outputs
    assert sizes == [2, 2, 2, 1]
    assert beams == [_one_at_a_time(model, prompt, 8, stop, num_beams=3) for prompt in prompts]
    greedy = generation.generate(model, tokenizer, prompts, max_new_tokens=8, stop_ids=stop, progress=False).outputs
    assert beams != greedy


def test_constrained_beam_search_only_yields_labels(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts, stop, labels, kwargs = _nine_prompts_three_labels(tokenizer, constrained=True)
    answers = generation.generate(model, tokenizer, prompts, **kwargs, num_beams=3).outputs
    assert all(answer + stop in labels for answer in answers)


def test_a_beam_search_evaluation_goes_beside_the_greedy_one(trained_run_for_resume, data_dir):
    from qlora_kit import evaluation

    args = _eval_args(trained_run_for_resume, data_dir, None)
    args.output_dir, args.limit, args.num_beams = None, 4, 2
    metrics = evaluation.evaluate_run("classification", args)
    assert metrics["config"]["num_beams"] == 2 and metrics["n"] == 4
    assert metrics["output_dir"].endswith("metrics_beams-2")


def _whole_answer_log_likelihood(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(log_probs[len(prompt) - 1 + i, token].item() for i, token in enumerate(answer))


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["own prompts", "a shared prefix"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one chunk", "a chunk per prompt"])
def test_likelihood_chooses_the_label_whose_whole_answer_is_most_probable(
    model_and_tokenizer, monkeypatch, chunked, shared_prefix
):
    """--decoding likelihood: each label's answer (its tokens and the end token) scored after the prompt, as one
    example's forward alone scores it; the answer is the best label's tokens. Also when the prompts share a
    prefix, prefilled once."""
    from qlora_kit import label_likelihood

    model, tokenizer = model_and_tokenizer
    if chunked:
        monkeypatch.setattr(label_likelihood, "CHUNK_BYTES", 1)
    prompts = _prompts_sharing_a_prefix(count=5) if shared_prefix else _prompts(tokenizer, count=5)
    assert (generation.shared_prefix_length(prompts, model) > 0) == shared_prefix
    stop = [tokenizer.eos_token_id]
    names = ("sci.space", "sci.med", "rec.autos", "comp.graphics", "comp.os.ms-windows.misc")
    labels = [answer_ids(tokenizer, name, tokenizer.eos_token) for name in names]
    scores = label_likelihood.answer_log_likelihoods(model, tokenizer, prompts, labels, prefill_tokens=64)
    expected = torch.tensor([[_whole_answer_log_likelihood(model, p, label) for label in labels] for p in prompts])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    answers = generation.generate(
        model, tokenizer, prompts, max_new_tokens=8, stop_ids=stop, label_sequences=labels, likelihood=True,
        batch_size=2, progress=False,
    ).outputs  # fmt: skip
    assert answers == [labels[best][:-1] for best in expected.argmax(-1).tolist()]


def test_a_likelihood_evaluation_answers_only_labels_in_its_own_folder(trained_run_for_resume, data_dir):
    from qlora_kit import evaluation

    args = _eval_args(trained_run_for_resume, data_dir, None)
    args.output_dir, args.limit, args.decoding = None, 6, "likelihood"
    metrics = evaluation.evaluate_run("classification", args)
    assert metrics["config"]["decoding"] == "likelihood" and metrics["n"] == 6 and metrics["invalid"] == 0
    assert metrics["output_dir"].endswith("metrics_likelihood")
    args.num_beams = 2
    with pytest.raises(generation.UsageError, match="--num_beams does not apply to --decoding likelihood"):
        evaluation.evaluate_run("classification", args)


def _closest_margin_alone(model, prompt, answer, stop, max_new_tokens, trie, pad_id):
    """How near the greedy choices of ``answer`` (then its stop token, if it stopped) came to a tie, from the
    prompt alone run through the model with the answer's tokens so far: the least gap between the best two
    allowed tokens' logits."""
    chosen = answer + stop[:1] if len(answer) < max_new_tokens else answer
    gaps = []
    for k in range(len(chosen)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + chosen[:k]])).logits[0, -1].float()
        allowed = trie.allowed(chosen[:k], pad_id) if trie is not None else range(len(logits))
        top = logits[list(allowed)].topk(min(2, len(allowed))).values
        gaps.append(float(top[0] - top[1]) if len(top) == 2 else float("inf"))
    return min(gaps)


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("loop", ["dynamic", "static", "static-compacted"])
def test_each_answer_records_how_near_its_choices_came_to_a_tie(model_and_tokenizer, monkeypatch, loop, constrained):
    """track_margins: each answer's least gap between the best two allowed tokens over the steps it decoded
    (a token constrained decoding forces counts as no tie at all), as the prompt alone gives it, in batches of
    mixed lengths; the answers are unchanged."""
    model, tokenizer = model_and_tokenizer
    prompts, stop, labels, kwargs = _nine_prompts_three_labels(tokenizer, constrained)
    kwargs["max_new_tokens"] = 6
    compact = {}
    if loop == "static-compacted":
        monkeypatch.setattr(static_decoding, "MIN_COMPACTED_ROWS", 1)
        compact = {"compact_below": 0.99}
    chosen = loop.split("-")[0]
    plain = generation.generate(model, tokenizer, prompts, loop=chosen, **compact, **kwargs)
    tracked = generation.generate(model, tokenizer, prompts, loop=chosen, track_margins=True, **compact, **kwargs)
    assert tracked.outputs == plain.outputs and not tracked.rechecked
    assert plain.closest_margins == [None] * len(prompts)
    trie = generation.LabelTrie(labels) if constrained else None
    for prompt, answer, margin in zip(prompts, tracked.outputs, tracked.closest_margins):
        expected = _closest_margin_alone(
            model, prompt, answer, stop, kwargs["max_new_tokens"], trie, tokenizer.pad_token_id
        )
        assert margin == pytest.approx(expected, abs=1e-3)
    if constrained:  # after a label's first tokens the rest is forced; before, three labels compete
        assert all(0 <= margin < float("inf") for margin in tracked.closest_margins)


def test_near_ties_are_decoded_again_alone(model_and_tokenizer, monkeypatch):
    """recheck_margin: exactly the answers whose closest margin is under it are replaced by the prompt's answer
    alone (``decode_alone``, one at a time's: transformers' generate on the prompt alone gives the same);
    QLORA_KIT_RECHECK_MARGIN sets it, a value that is not a number of logits is refused."""
    model, tokenizer = model_and_tokenizer
    prompts, stop, labels, kwargs = _nine_prompts_three_labels(tokenizer, constrained=True)
    kwargs["loop"] = "static"
    margins = generation.generate(model, tokenizer, prompts, track_margins=True, **kwargs).closest_margins
    threshold = sorted(margins)[4] + 1e-6  # five of nine under it
    alone = []
    real = generation.decode_alone

    def marked(model, tokenizer, prompt, *args):
        alone.append(prompt)
        return [-7] + real(model, tokenizer, prompt, *args)

    monkeypatch.setattr(generation, "decode_alone", marked)
    monkeypatch.setenv("QLORA_KIT_RECHECK_MARGIN", str(threshold))
    result = generation.generate(model, tokenizer, prompts, **kwargs)
    under = sorted(i for i, margin in enumerate(margins) if margin < threshold)
    assert sorted(result.rechecked) == under and len(under) == 5
    assert sorted(alone) == sorted(prompts[i] for i in under)
    trie = generation.LabelTrie(labels)
    for i, answer in enumerate(result.outputs):
        if i in under:  # the prompt's answer alone, marked as such here: transformers' generate's on it alone
            plain = generation._generate_batch_plain(
                model, tokenizer, [prompts[i]], kwargs["max_new_tokens"], stop, trie
            )
            assert answer == [-7] + plain[0]
        else:
            assert answer[:1] != [-7] and answer + stop in labels
    monkeypatch.setattr(generation, "decode_alone", real)
    everything = generation.generate(model, tokenizer, prompts, recheck_margin=float("inf"), **kwargs)
    assert sorted(everything.rechecked) == list(range(len(prompts)))
    # in fp32 a prompt alone answers as in its batch
    assert everything.outputs == generation.generate(model, tokenizer, prompts, **kwargs).outputs
    for bad in ("near", "-1", "nan"):
        monkeypatch.setenv("QLORA_KIT_RECHECK_MARGIN", bad)
        with pytest.raises(generation.UsageError, match=f"QLORA_KIT_RECHECK_MARGIN={bad}"):
            generation.generate(model, tokenizer, prompts, **kwargs)
    monkeypatch.delenv("QLORA_KIT_RECHECK_MARGIN")
    assert generation.recheck_margin_setting() == generation.RECHECK_MARGIN


def test_a_prompt_decoded_alone_prefills_on_the_kernels_one_at_a_time_runs_on(model_and_tokenizer, monkeypatch):
    """decode_alone prefills with PyTorch's own choice of attention kernels, as transformers' generate on the prompt
    alone does, whatever QLORA_KIT_PREFILL_ATTENTION gives the batches: another kernel's rounding turns near ties."""
    model, tokenizer = model_and_tokenizer
    prompts, stop, labels, kwargs = _nine_prompts_three_labels(tokenizer, constrained=True)
    chosen = []
    real = generation.prefill_attention

    def recorded(choice=None):
        chosen.append(choice or generation.prefill_attention_choice())
        return real(choice)

    monkeypatch.setattr(generation, "prefill_attention", recorded)
    trie = generation.LabelTrie(labels)
    answer = generation.decode_alone(model, tokenizer, prompts[0], kwargs["max_new_tokens"], stop, trie)
    assert chosen == ["pytorch"] and answer + stop in labels
    generation.generate(model, tokenizer, prompts[:2], loop="dynamic", **kwargs)
    assert chosen[1:] == [generation.PREFILL_ATTENTION[0]]  # the batch: the setting's default


def test_near_ties_are_left_as_generated_by_a_loop_that_does_not_track_them(model_and_tokenizer, monkeypatch, caplog):
    """The plain path has no margins to go by: it says so once and rechecks nothing."""
    model, tokenizer = model_and_tokenizer
    prompts, _, _, kwargs = _nine_prompts_three_labels(tokenizer, constrained=False)
    monkeypatch.setenv("QLORA_KIT_GENERATION", "plain")
    with caplog.at_level("INFO", logger="qlora_kit.generation"):
        result = generation.generate(model, tokenizer, prompts, recheck_margin=float("inf"), **kwargs)
    assert not result.rechecked and result.closest_margins == [None] * len(prompts)
    assert "near ties are rechecked with the static or dynamic loop only" in caplog.text
