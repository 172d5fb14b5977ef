import pytest

from qlora_kit.errors import UsageError
from qlora_kit.formatting import PromptFormat, answer_ids, build_training_examples, encode, end_of_turn_token


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
