"""Every prompt the project uses, as plain strings: cheap to import, tested by exact strings.

Two prompt styles:
- ``seed``: the original folder's formats, verbatim. Fine-tuning uses the short
  ``### Sentence:...### Class:`` / ``### Dialogue:...### Summary:`` formats; zero- and
  few-shot baselines use the longer instruction prompts.
- ``chat``: the same instruction rendered through the tokenizer's chat template as one
  user turn (Zephyr's ``<|user|>``/``<|assistant|>`` format, ChatML for SmolLM2). The
  rendering itself lives in ``qlora_kit.formatting``; the words live here.
"""

PROMPT_STYLES = ("seed", "chat")

# --- fine-tuning formats (seed style), as in the original folder -----------------------
TRAINING_CLASSIFIER_PROMPT = "### Sentence:{sentence} ### Class:{label}"
INFERENCE_CLASSIFIER_PROMPT = "### Sentence:{sentence} ### Class:"

TRAINING_SUMMARIZATION_PROMPT = "### Dialogue:{dialogue} ### Summary:{summary}"
INFERENCE_SUMMARIZATION_PROMPT = "### Dialogue:{dialogue} ### Summary:"

# --- fine-tuning formats (chat style): the user turn; the answer is the assistant turn ---
CHAT_CLASSIFIER_INSTRUCTION = (
    "Classify the following newsgroup message into one of these classes: {newsgroup_classes}. "
    "Answer with the class name only.\n\n{sentence}"
)
CHAT_SUMMARIZATION_INSTRUCTION = "Summarize the following dialogue in one or two sentences.\n\n{dialogue}"

# --- zero- and few-shot baselines, as in the original folder ----------------------------
ZERO_SHOT_CLASSIFIER_PROMPT = """Classify the sentence into one of 20 classes. The list of classes is provided below, where the classes are separated by commas: 

{newsgroup_classes}

From the above list of classes, select only one class that the provided sentence can be classified into. The sentence will be delimited with triple backticks. Once again, only predict the class from the given list of classes. Do not predict anything else.

### Sentence: ```{sentence}```
### Class:
"""

FEW_SHOT_CLASSIFIER_PROMPT = """Classify the sentence into one of 20 classes. The list of classes is provided below, where the classes are separated by commas: 

{newsgroup_classes}

From the above list of classes, select only one class that the provided sentence can be classified into. Once again, only predict the class from the given list of classes. Do not predict anything else. The sentence will be delimited with triple backticks. To help you, examples are provided of sentence and the corresponding class they belong to.

{few_shot_samples}

### Sentence: ```{sentence}```
### Class:
"""

ZERO_SHOT_SUMMARIZATION_PROMPT = """Summarize the following dialogue that is delimited with triple backticks.

Dialogue: ```{dialogue}```

Summary:
"""

FEW_SHOT_SUMMARIZATION_PROMPT = """Summarize the following dialogue that is delimited with triple backticks. To help you, examples of summarization are provided.

{few_shot_samples}

Dialogue: ```{dialogue}```

Summary:
"""

# One few-shot example, repeated ``--shots`` times inside {few_shot_samples}.
FEW_SHOT_CLASSIFIER_SAMPLE = "Sentence: {sentence} \n Class: {label} \n\n"
FEW_SHOT_SUMMARIZATION_SAMPLE = "Dialogue: {dialogue} \n Summary: {summary} \n\n"

# Which template each (task, purpose) uses. ``finetune`` templates take the answer as the
# completion; ``zero-shot``/``few-shot`` templates end where the model starts answering.
TEMPLATES = {
    ("classification", "finetune", "seed"): INFERENCE_CLASSIFIER_PROMPT,
    ("classification", "finetune", "chat"): CHAT_CLASSIFIER_INSTRUCTION,
    ("classification", "zero-shot", "seed"): ZERO_SHOT_CLASSIFIER_PROMPT,
    ("classification", "few-shot", "seed"): FEW_SHOT_CLASSIFIER_PROMPT,
    ("summarization", "finetune", "seed"): INFERENCE_SUMMARIZATION_PROMPT,
    ("summarization", "finetune", "chat"): CHAT_SUMMARIZATION_INSTRUCTION,
    ("summarization", "zero-shot", "seed"): ZERO_SHOT_SUMMARIZATION_PROMPT,
    ("summarization", "few-shot", "seed"): FEW_SHOT_SUMMARIZATION_PROMPT,
}
# Chat-style baselines send the same instruction as the seed style, as one user turn.
for (_task, _purpose, _style), _template in list(TEMPLATES.items()):
    if _purpose != "finetune":
        TEMPLATES[(_task, _purpose, "chat")] = _template

FEW_SHOT_SAMPLES = {
    "classification": FEW_SHOT_CLASSIFIER_SAMPLE,
    "summarization": FEW_SHOT_SUMMARIZATION_SAMPLE,
}

# The field each template calls the input; the answer is what follows the prompt.
INPUT_FIELD = {"classification": "sentence", "summarization": "dialogue"}
