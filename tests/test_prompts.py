import prompts


def test_finetune_formats_are_the_original_ones():
    assert (
        prompts.TRAINING_CLASSIFIER_PROMPT.format(sentence="hello", label="sci.space")
        == "### Sentence:hello ### Class:sci.space"
    )
    assert prompts.INFERENCE_CLASSIFIER_PROMPT.format(sentence="hello") == "### Sentence:hello ### Class:"
    assert (
        prompts.TRAINING_SUMMARIZATION_PROMPT.format(dialogue="A: hi", summary="A greets.")
        == "### Dialogue:A: hi ### Summary:A greets."
    )
    assert prompts.INFERENCE_SUMMARIZATION_PROMPT.format(dialogue="A: hi") == "### Dialogue:A: hi ### Summary:"


def test_training_prompt_is_inference_prompt_plus_answer():
    # Training and inference must agree token for token up to the answer.
    for text, answer in [("x y", "rec.autos"), ("", "a")]:
        assert (
            prompts.TRAINING_CLASSIFIER_PROMPT.format(sentence=text, label=answer)
            == prompts.INFERENCE_CLASSIFIER_PROMPT.format(sentence=text) + answer
        )
        assert (
            prompts.TRAINING_SUMMARIZATION_PROMPT.format(dialogue=text, summary=answer)
            == prompts.INFERENCE_SUMMARIZATION_PROMPT.format(dialogue=text) + answer
        )


def test_zero_shot_prompts_exact():
    assert prompts.ZERO_SHOT_SUMMARIZATION_PROMPT.format(dialogue="A: hi\nB: yo") == (
        "Summarize the following dialogue that is delimited with triple backticks.\n\n"
        "Dialogue: ```A: hi\nB: yo```\n\nSummary:\n"
    )
    text = prompts.ZERO_SHOT_CLASSIFIER_PROMPT.format(newsgroup_classes="a, b", sentence="msg")
    assert text.startswith(
        "Classify the sentence into one of 20 classes. The list of classes is provided below, "
        "where the classes are separated by commas: \n\na, b\n\n"
    )
    assert text.endswith("### Sentence: ```msg```\n### Class:\n")


def test_few_shot_samples_exact():
    assert prompts.FEW_SHOT_CLASSIFIER_SAMPLE.format(sentence="s", label="l") == "Sentence: s \n Class: l \n\n"
    assert prompts.FEW_SHOT_SUMMARIZATION_SAMPLE.format(dialogue="d", summary="s") == "Dialogue: d \n Summary: s \n\n"
    text = prompts.FEW_SHOT_SUMMARIZATION_PROMPT.format(few_shot_samples="EX", dialogue="D")
    assert text == (
        "Summarize the following dialogue that is delimited with triple backticks. To help you, examples "
        "of summarization are provided.\n\nEX\n\nDialogue: ```D```\n\nSummary:\n"
    )


def test_every_task_purpose_style_has_a_template():
    from qlora_kit.tasks import PURPOSES, TASKS

    for task in TASKS.values():
        for purpose in PURPOSES:
            for style in prompts.PROMPT_STYLES:
                assert task.template(purpose, style)
    # a chat-style baseline sends the original instruction as one user turn
    assert TASKS["classification"].template("zero-shot", "chat") is prompts.ZERO_SHOT_CLASSIFIER_PROMPT
    assert TASKS["summarization"].template("finetune", "chat") is prompts.CHAT_SUMMARIZATION_INSTRUCTION
