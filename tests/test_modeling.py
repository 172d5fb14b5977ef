"""Model loading and adapter merging."""

import pytest
import torch


@pytest.mark.parametrize("tied", [True, False], ids=["tied embeddings (SmolLM2)", "untied (Mistral)"])
def test_merging_an_lm_head_adapter_keeps_the_input_embeddings(tied):
    """--merge_adapter gives the same logits as the adapter; with tied embeddings the merge must not be
    written into the input embeddings as well."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_kit.modeling import merge_adapter

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
    )
    embeddings = model.get_input_embeddings().weight.detach().clone()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "lm_head"])
    ).eval()
    input_ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
        merged = merge_adapter(peft_model)
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged.get_input_embeddings().weight, embeddings)


def test_a_4bit_model_trains_the_same_after_an_evaluation_pass_on_the_cpu(tiny_model):
    """A validation pass while training (eval mode, no gradients) must not change the gradients of the steps after
    it: on a CPU with AVX512-BF16, bitsandbytes would otherwise repack the 4-bit weights into a layout whose
    forward has no gradient path (the base layers' share of every gradient dropped)."""
    from peft import LoraConfig, get_peft_model

    from qlora_kit import modeling

    torch.manual_seed(0)
    model = modeling.load_model(str(tiny_model), load_in_4bit=True)
    model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "down_proj"]))
    ids = torch.randint(3, 200, (2, 11))

    def gradients():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = gradients()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)
