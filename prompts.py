"""Every prompt the project uses, as plain strings: cheap to import, tested by exact strings.

Two prompt styles:
- ``seed``: the original folder's formats, verbatim. Fine-tuning uses the short
  ``### Sentence:...### Class:`` / ``### Dialogue:...### Summary:`` formats; zero- and
  few-shot baselines use the longer instruction prompts.
- ``chat``: the same instruction rendered through the tokenizer's chat template as one
  user turn (Zephyr's ``<|user|>``/``<|assistant|>`` format, ChatML for SmolLM2). The
  rendering itself lives in ``qlora_kit.formatting``; the words live here, and which
  template a task uses for what is part of its definition in ``qlora_kit.tasks``.
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
