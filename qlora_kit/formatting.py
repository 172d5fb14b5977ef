"""Turn rows into token ids: prompts from ``prompts.py``, rendered in a style, shortened to fit.

The input text (message or dialogue) is the only part ever shortened: the instruction,
the label list, the answer and EOS are always kept whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import prompts

from .errors import UsageError

log = logging.getLogger(__name__)


def end_of_turn_token(tokenizer) -> str:
    """The token that ends an assistant turn in the chat template (``</s>`` for Zephyr, ``<|im_end|>`` for ChatML).

    Falls back to the tokenizer's EOS when there is no chat template.
    """
    if getattr(tokenizer, "chat_template", None):
        marker = "XQXQ-ANSWER-XQXQ"
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
            )
        except Exception:  # a template that rejects this conversation: keep the EOS we have
            rendered = ""
        after = rendered.split(marker, 1)[1].lstrip() if marker in rendered else ""
        # Match by string against the special tokens, longest first (never by re-tokenizing).
        specials = sorted(
            set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
            key=len,
            reverse=True,
        )
        for token in specials:
            if token and after.startswith(token):
                return token
    return tokenizer.eos_token


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a whole prompt: the tokenizer's BOS unless the text (a rendered template) has it already."""
    return encode_all(tokenizer, [text])[0]


def _fast_backend(tokenizer):
    """A fast tokenizer's own ``tokenizers.Tokenizer`` (its batch calls skip transformers' per-text work), or None."""
    return getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None


def encode_all(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """``encode`` of every text, in one call per kind (with or without a BOS of its own). A fast tokenizer's own
    ``encode_batch`` may spread the texts over the CPU's cores (the 20 Newsgroups test prompts, 13.8 M characters,
    take ~10 s one call each; on two cores the batch was no faster, more cores are not measured yet); transformers'
    batch call around it costs more than it saves (12 s there), so it is skipped where the tokenizer has a backend.
    ``add_special_tokens=False``: no special tokens at all (a text's own tokens, as ``PromptFormat.shorten`` counts
    them)."""
    bos = tokenizer.bos_token
    # no special tokens added: to every text when so asked, else to a rendered template that has its BOS already
    as_is = [not add_special_tokens or (bool(bos) and text.startswith(bos)) for text in texts]
    backend = _fast_backend(tokenizer)
    ids: list = [None] * len(texts)
    for kind in (False, True):
        where = [i for i, flag in enumerate(as_is) if flag is kind]
        if not where:
            continue
        batch = [texts[i] for i in where]
        if backend is not None:
            encoded = [encoding.ids for encoding in backend.encode_batch(batch, add_special_tokens=not kind)]
        else:
            encoded = tokenizer(batch, add_special_tokens=not kind)["input_ids"]
        for i, row in zip(where, encoded):
            ids[i] = row
    return ids


def decode_all(tokenizer, rows: list[list[int]]) -> list[str]:
    """``tokenizer.batch_decode(rows)``, special tokens kept: through a fast tokenizer's own ``decode_batch`` where
    transformers adds nothing to it (no clean-up of spaces), else through transformers."""
    backend = _fast_backend(tokenizer)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.batch_decode(rows)
    return backend.decode_batch(rows, skip_special_tokens=False)


@dataclass
class PromptFormat:
    """How one task's examples become prompts for one purpose (fine-tuning or a baseline) and style."""

    task: object  # a tasks.Task, or its name
    purpose: str
    style: str
    tokenizer: object
    label_names: list[str] = field(default_factory=list)
    few_shot: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.style not in prompts.PROMPT_STYLES:
            raise UsageError(f"--prompt_style must be one of {', '.join(prompts.PROMPT_STYLES)}, got '{self.style}'")
        if self.style == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise UsageError(
                "--prompt_style chat needs a tokenizer with a chat template; this model has none (use seed)"
            )
        from .tasks import get_task

        self.task = get_task(self.task)
        self.template = self.task.template(self.purpose, self.style)
        self.few_shot_text = ""

    def render(self, text: str) -> str:
        body = self.template.format(
            **{self.task.input_field: text},
            newsgroup_classes=", ".join(self.label_names),
            few_shot_samples=self.few_shot_text,
        )
        if self.style == "chat":
            body = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            )
        return body

    def shorten(self, text: str, max_tokens: int) -> str:
        """The text cut to at most ``max_tokens`` tokens (on a token boundary)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[: max(max_tokens, 0)])

    def set_few_shot(self, examples: list[dict], max_prompt_tokens: int) -> None:
        """Fill the few-shot block, each example's text shortened so that the examples use at most half the budget."""
        if self.purpose != "few-shot":
            return
        per_example = max(8, (max_prompt_tokens // 2) // max(len(examples), 1) - 16)
        self.few_shot_text = "".join(
            self.task.few_shot_sample.format(
                **{
                    self.task.input_field: self.shorten(row["input"], per_example),
                    self.task.answer_field: row["target"],
                }
            )
            for row in examples
        )

    def prompts_ids(self, texts: list[str], max_tokens: int | list[int], skip_unfit: bool = False) -> list:
        """``prompt_ids`` of every text (``max_tokens``: one budget, or one per text), tokenized together: every
        prompt in one batch, then the texts too long for theirs shortened together. ``skip_unfit``: None for a
        text whose prompt cannot fit its budget (instead of the error)."""
        budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(texts)
        prompts = encode_all(self.tokenizer, [self.render(text) for text in texts])
        over = [i for i, (ids, budget) in enumerate(zip(prompts, budgets)) if len(ids) > budget]
        if not over:
            return prompts
        overhead = len(encode(self.tokenizer, self.render("")))  # the prompt around an empty text
        for i in over:
            if overhead >= budgets[i]:
                if not skip_unfit:
                    raise UsageError(
                        f"the {self.task.name} prompt without any input text needs {overhead} tokens, more than the "
                        f"{budgets[i]} available; raise --max_seq_length (or --max_prompt_tokens)"
                    )
                prompts[i] = None
        over = [i for i in over if prompts[i] is not None]
        # each text's own tokens (as ``shorten`` counts them), cut to what its budget leaves beside the prompt;
        # re-tokenizing at the cut can add a token or two, so a prompt still too long is cut again that much shorter
        text_ids = dict(zip(over, encode_all(self.tokenizer, [texts[i] for i in over], add_special_tokens=False)))
        keep = {i: budgets[i] - overhead for i in over}
        while over:
            cut = decode_all(self.tokenizer, [text_ids[i][: max(keep[i], 0)] for i in over])
            shortened = [texts[i] if len(text_ids[i]) <= keep[i] else text for i, text in zip(over, cut)]
            encoded = encode_all(self.tokenizer, [self.render(text) for text in shortened])
            for i, ids in zip(over, encoded):
                prompts[i] = ids
                keep[i] -= max(0, len(ids) - budgets[i])
            over = [i for i in over if len(prompts[i]) > budgets[i]]
        return prompts

    def prompt_ids(self, text: str, max_tokens: int) -> list[int]:
        """Token ids of the prompt for ``text``, the text shortened until the whole prompt fits ``max_tokens``."""
        return self.prompts_ids([text], max_tokens)[0]


def answer_ids(tokenizer, answer: str, end_token: str) -> list[int]:
    """Token ids of the completion: the answer, then the end-of-turn token (EOS)."""
    return answers_ids(tokenizer, [answer], end_token)[0]


def answers_ids(tokenizer, answers: list[str], end_token: str) -> list[list[int]]:
    """``answer_ids`` of every answer, tokenized in one batch."""
    end = tokenizer.convert_tokens_to_ids(end_token)
    return [ids + [end] for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]] if answers else []


def build_training_examples(
    rows, fmt: PromptFormat, max_seq_length: int, end_token: str, completion_only_loss: bool
) -> list[dict]:
    """``input_ids``/``labels`` for each row; the prompt is shortened so that the answer and EOS fit whole.

    Rows whose answer alone does not fit are skipped and counted; if none fit, that is an error.
    """
    examples, skipped = [], 0
    completions = answers_ids(fmt.tokenizer, [row["target"] for row in rows], end_token)
    budgets = [max_seq_length - len(completion) for completion in completions]
    prompts = fmt.prompts_ids([row["input"] for row in rows], budgets, skip_unfit=True)
    for prompt, completion in zip(prompts, completions):
        if prompt is None:
            skipped += 1
            continue
        labels = ([-100] * len(prompt) if completion_only_loss else list(prompt)) + completion
        examples.append({"input_ids": prompt + completion, "labels": labels})
    if skipped:
        log.warning(
            "skipped %d of %d training rows whose answer does not fit in --max_seq_length %d",
            skipped,
            len(rows),
            max_seq_length,
        )
    if not examples:
        raise UsageError(f"--max_seq_length {max_seq_length} is too small to hold any training answer with its prompt")
    return examples
