import pytest

from qlora_kit.errors import UsageError
from qlora_kit.formatting import (
    PromptFormat,
    answer_ids,
    build_training_examples,
    decode_all,
    encode,
    encode_all,
    end_of_turn_token,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from qlora_kit.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


def test_end_of_turn_is_the_chat_templates(tokenizer):
    assert end_of_turn_token(tokenizer) == "</s>"


def test_seed_prompt_is_the_original_format(tokenizer):
    fmt = PromptFormat("classification", "finetune", "seed", tokenizer)
    assert fmt.render("engine noise") == "### Sentence:engine noise ### Class:"
    ids = fmt.prompt_ids("engine noise", 100)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "### Sentence:engine noise ### Class:"


def test_chat_prompt_uses_the_template(tokenizer):
    fmt = PromptFormat("summarization", "finetune", "chat", tokenizer)
    text = fmt.render("A: hi")
    assert text.startswith("<|user|>\nSummarize the following dialogue in one or two sentences.\n\nA: hi</s>")
    assert text.endswith("<|assistant|>\n")


def test_long_input_is_shortened_but_answer_kept_whole(tokenizer):
    fmt = PromptFormat("classification", "finetune", "seed", tokenizer)
    long_text = "orbit shuttle launch " * 300
    rows = [{"input": long_text, "target": "sci.space"}, {"input": "short", "target": "rec.autos"}]
    examples = build_training_examples(rows, fmt, 64, "</s>", completion_only_loss=True)
    answer = answer_ids(tokenizer, "sci.space", "</s>")
    assert len(examples[0]["input_ids"]) <= 64
    assert examples[0]["input_ids"][-len(answer) :] == answer
    assert tokenizer.decode(examples[0]["input_ids"]).rstrip("</s>").endswith("### Class:sci.space")
    # loss only on the answer and EOS
    assert [t for t in examples[0]["labels"] if t != -100] == answer
    whole = build_training_examples(rows[1:], fmt, 64, "</s>", completion_only_loss=False)
    assert whole[0]["labels"] == whole[0]["input_ids"]


def test_prompt_without_room_for_text_is_an_error(tokenizer):
    fmt = PromptFormat("classification", "zero-shot", "seed", tokenizer, label_names=["a", "b"])
    with pytest.raises(UsageError, match="raise --max_seq_length"):
        fmt.prompt_ids("text", 10)
    with pytest.raises(UsageError, match="too small to hold any training answer"):
        build_training_examples(
            [{"input": "x", "target": "a very long answer " * 20}],
            PromptFormat("classification", "finetune", "seed", tokenizer),
            16,
            "</s>",
            True,
        )


def test_few_shot_block_fits_and_holds_every_example(tokenizer):
    fmt = PromptFormat("summarization", "few-shot", "seed", tokenizer)
    examples = [{"input": "Anna: hi " * 200, "target": "Anna says hi."}, {"input": "Ben: yo", "target": "Ben."}]
    fmt.set_few_shot(examples, 200)
    assert fmt.few_shot_text.count("Dialogue: ") == 2 and "Summary: Ben. \n\n" in fmt.few_shot_text
    assert len(encode(tokenizer, fmt.few_shot_text)) <= 110
    assert len(fmt.prompt_ids("Chloé: long " * 500, 200)) <= 200


def test_chat_style_needs_a_chat_template(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(UsageError, match="chat template"):
        PromptFormat("classification", "finetune", "chat", tokenizer)


def test_a_million_character_text_fits(tokenizer):
    fmt = PromptFormat("classification", "finetune", "seed", tokenizer)
    ids = fmt.prompt_ids("orbit " * 170_000, 64)
    assert len(ids) <= 64 and tokenizer.decode(ids).endswith("### Class:")


def _shortened_one_by_one(fmt, text: str, budget: int) -> list[int]:
    """The prompt for ``text`` as its definition says, one text at a time: the whole prompt if it fits, else the
    text cut (``shorten``) to what the budget leaves beside the prompt around an empty text, and cut shorter by
    as many tokens as the prompt still has too many, until it fits."""
    ids = encode(fmt.tokenizer, fmt.render(text))
    keep = budget - len(encode(fmt.tokenizer, fmt.render("")))
    while len(ids) > budget:
        ids = encode(fmt.tokenizer, fmt.render(fmt.shorten(text, keep)))
        keep -= max(0, len(ids) - budget)
    return ids


@pytest.mark.parametrize("style", ["seed", "chat"])
def test_prompts_tokenized_together_are_the_prompts_tokenized_one_by_one(tokenizer, style):
    """prompts_ids: one batch for every prompt, the texts too long shortened together: the same ids as
    shortening text by text, whatever the budget; with skip_unfit a prompt that cannot fit is None."""
    fmt = PromptFormat("summarization", "finetune", style, tokenizer)
    texts = ["A: hi", "B: " + "very long dialogue " * 80, "", "Chloé: ça va? " * 30, "C: ok"]
    for budget in (60, 200, 1000):
        expected = [_shortened_one_by_one(fmt, text, budget) for text in texts]
        assert fmt.prompts_ids(texts, budget) == expected
        assert [fmt.prompt_ids(text, budget) for text in texts] == expected
    assert len(fmt.prompts_ids(texts, 60)[1]) <= 60 < len(fmt.prompts_ids(texts, 1000)[1])  # shortened
    overhead = len(fmt.prompt_ids("", 1000))  # the prompt around an empty text
    budgets = [overhead + 1, overhead + 30, 300, overhead + 10, 1000]
    expected = [_shortened_one_by_one(fmt, t, b) for t, b in zip(texts, budgets)]
    assert fmt.prompts_ids(texts, budgets) == expected
    unfit = fmt.prompts_ids(texts, [1000, overhead - 1, 0, 1000, 1000], skip_unfit=True)
    assert unfit[1] is None and unfit[2] is None and unfit[0] == fmt.prompt_ids(texts[0], 1000)
    with pytest.raises(UsageError, match="prompt without any input text"):
        fmt.prompts_ids(texts, overhead - 1)


def test_texts_encoded_together_are_the_tokenizers_own_ids(tokenizer):
    """encode_all (the backend's batch call) gives what the tokenizer's own call gives text by text: its BOS added
    unless the text begins with it."""
    bos = tokenizer.bos_token
    texts = ["engine noise", bos + "already has one", "", "Chloé: ça va?\n\n  spaces  ", "x" * 3000]
    expected = [tokenizer(t, add_special_tokens=not t.startswith(bos))["input_ids"] for t in texts]
    assert encode_all(tokenizer, texts) == expected
    assert [encode(tokenizer, t) for t in texts] == expected
    assert expected[0][0] == tokenizer.bos_token_id and expected[1].count(tokenizer.bos_token_id) == 1


def test_ids_decoded_together_are_the_tokenizers_own_texts(tokenizer, monkeypatch):
    """decode_all (the backend's batch call) gives what the tokenizer's batch_decode gives, special tokens and
    spaces before punctuation kept; a tokenizer that cleans up spaces goes through transformers."""
    fmt = PromptFormat("summarization", "finetune", "chat", tokenizer)
    rows = [fmt.prompt_ids(text, 60) for text in ["A: hi , there !", "B: " + "long dialogue " * 80, ""]]
    rows.append([])
    assert decode_all(tokenizer, rows) == tokenizer.batch_decode(rows)
    first = tokenizer.convert_ids_to_tokens(rows[0][0])
    assert first in tokenizer.all_special_tokens and decode_all(tokenizer, rows)[0].startswith(first)  # kept
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    calls = []
    monkeypatch.setattr(tokenizer, "batch_decode", lambda batch: calls.append(batch) or ["x"] * len(batch))
    assert decode_all(tokenizer, rows) == ["x"] * 4 and calls == [rows]
