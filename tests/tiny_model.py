"""A tiny random Mistral-shaped model with a tokenizer built from scratch: the model of the CPU tests."""

from __future__ import annotations

from pathlib import Path

ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=special[3:],
    )
    fast.chat_template = ZEPHYR_CHAT_TEMPLATE
    return fast


def build_tiny_model(folder: Path, corpus: list[str], seed: int = 0) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(arch: str, vocab: int, bos: int, eos: int, tie: bool = False, hidden_size: int = 64):
    """A tiny random config of one architecture (hidden size 64 unless given, 2 layers)."""
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=bos,
        eos_token_id=eos,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
    )
    if arch == "falcon":  # Falcon-7B's layout: multi-query attention, parallel attention and MLP
        return transformers.FalconConfig(
            **{k: v for k, v in common.items() if k != "max_position_embeddings"},
            multi_query=True,
            parallel_attn=True,
            bias=False,
        )
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, intermediate_size=128)
    if arch == "t5":
        return transformers.T5Config(
            vocab_size=vocab,
            d_model=64,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            d_kv=16,
            eos_token_id=eos,
            decoder_start_token_id=0,
        )
    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "phi": transformers.PhiConfig,
        "gemma": transformers.GemmaConfig,
    }[arch]
    extra = {"num_key_value_heads": 2} if arch != "phi" else {}
    if arch == "gemma":
        extra["head_dim"] = 16
    return config_class(**common, intermediate_size=128, **extra)


def build_tiny_architecture(
    folder: Path,
    corpus: list[str],
    arch: str,
    *,
    chat_template: bool = True,
    eos: str = "</s>",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
) -> Path:
    """A tiny random model of ``arch`` with a BPE tokenizer. ``chat_template=False`` and another ``eos`` give a
    base model as Falcon-7B or RedPajama ship it: no chat template, no pad token, its own end-of-text token.
    ``hidden_size`` other than a multiple of 64 gives layers bitsandbytes' CPU kernels cannot run in 4-bit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    tokenizer = build_tokenizer(corpus + [eos])
    if eos != "</s>":
        tokenizer.add_special_tokens({"eos_token": eos})
    if not chat_template:
        tokenizer.chat_template = None
    torch.manual_seed(seed)
    # room for tokens an architecture's tokenizer class adds when it loads (Qwen2's adds <|endoftext|>), as real
    # models keep embedding rows beyond their tokenizer
    config = _config(
        arch, len(tokenizer) + 8, tokenizer.bos_token_id, tokenizer.eos_token_id, tie_word_embeddings, hidden_size
    )
    model_class = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    model_class.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
