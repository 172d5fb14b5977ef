"""The loss of all-module LoRA training, computed only at the scored positions, is the full loss."""

import pytest
import torch

from qlora_kit.sft_trainer import accepts_scored_positions, logits_where_scored


@pytest.fixture(scope="module", params=["mistral", "llama"])
def adapted_model(request, tiny_model):
    """The tests' tiny Mistral (Zephyr's architecture), and a tiny Llama (SmolLM2's), with LoRA on lm_head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if request.param == "mistral":
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=300,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            )
        )
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj", "v_proj", "lm_head"]
        ),
    )
    peft_model.train()
    return peft_model


def _batch(vocab: int):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, vocab, (3, 14), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 10:] = 0  # right padding, as the collator pads
    labels = torch.full_like(input_ids, -100)
    labels[0, 9:] = input_ids[0, 9:]  # answers of different lengths at different places
    labels[1, 4:7] = input_ids[1, 4:7]
    labels[2, 7:10] = input_ids[2, 7:10]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "use_cache": False}


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_scored_positions_give_the_full_loss_and_gradients(adapted_model, num_items_in_batch):
    batch = _batch(adapted_model.config.vocab_size)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    assert accepts_scored_positions(adapted_model.get_base_model())
    trainable = [p for p in adapted_model.parameters() if p.requires_grad]
    full = adapted_model(**batch, **extra).loss
    full_grads = torch.autograd.grad(full, trainable)
    kept = logits_where_scored(batch["labels"])
    # positions 3..12 predict a scored token in some row; 0-2 and 13 in none
    assert kept["logits_to_keep"].tolist() == list(range(3, 13))
    output = adapted_model(**batch, **kept, **extra)
    assert output.logits.shape[1] == 10  # not the whole 14
    part_grads = torch.autograd.grad(output.loss, trainable)
    torch.testing.assert_close(output.loss, full)
    for part, whole in zip(part_grads, full_grads):
        torch.testing.assert_close(part, whole)


def test_a_model_without_logits_to_keep_is_not_given_it():
    class Old(torch.nn.Module):
        loss_function = staticmethod(lambda logits, labels, vocab_size, **kwargs: None)

        def forward(self, input_ids, labels=None):
            return None

    assert not accepts_scored_positions(Old())


@pytest.mark.parametrize("scored", [False, True], ids=["every position (default)", "--logits_where_scored"])
def test_the_trainer_keeps_only_scored_logits_when_asked(tiny_model, tmp_path, scored):
    """make_trainer's scored_positions_only (the flag --logits_where_scored) decides whether the model gets
    logits_to_keep; the loss is the same either way."""
    import dataclasses

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit import modeling, sft_trainer
    from qlora_kit import settings as settings_lib

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    settings = dataclasses.replace(settings_lib.resolve("classification")[0], max_steps=1, full_tune=True)
    assert settings.logits_where_scored is False  # the default
    peft_config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=modeling.lora_targets(modeling.model_layout(str(tiny_model)), full_tune=True),
    )
    rows = Dataset.from_list([{"prompt": "### Sentence: a ### Class:", "completion": " sci.space"}] * 2)
    trainer = sft_trainer.make_trainer(
        model,
        sft_trainer.sft_config(settings, tmp_path),
        peft_config,
        tokenizer,
        rows,
        None,
        scored_positions_only=scored,
    )
    seen = []
    trainer.model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("logits_to_keep")), with_kwargs=True
    )
    batch = _batch(model.config.vocab_size)
    trainer.model.eval()  # no dropout: the two losses must match
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        reference = trainer.model(**batch).loss
    assert (seen[0] is not None) == scored
    torch.testing.assert_close(loss, reference)
