"""Export a fine-tuned run as a standalone model folder: the adapter merged into a 16-bit copy of the base.

The folder loads with ``AutoModelForCausalLM.from_pretrained`` alone (no peft), as transformers, vLLM or TGI
load any model; it holds the tokenizer with its chat template and a README that says what it was made from.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from . import modeling, results
from .errors import UsageError
from .run_folder import RunFolder

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UsageError(f"--output_dir {out_dir} is not empty; pass --overwrite to replace it")
    results.check_writable_dir(out_dir, "--output_dir")


def export_run(
    experiment_dir: str,
    output_dir: str,
    *,
    checkpoint: int | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    final_adapter: bool = False,
) -> Path:
    """Merge the run's adapter (the checkpoint at step ``checkpoint``, else the one chosen on validation while
    training unless ``final_adapter``, else the final one) into the base in ``dtype``; save the model, its
    tokenizer and a README to ``output_dir``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = RunFolder(experiment_dir)
    config = run.config()
    checkpoint = run.default_checkpoint(checkpoint, final_adapter)
    adapter = run.adapter(checkpoint)
    out_dir = Path(output_dir)
    check_output_dir(out_dir, overwrite)
    source = config["model_source"]
    if not Path(source).exists():  # a Hub id, or a run folder copied from another machine: resolve again
        source = modeling.resolve_model_source(config["pretrained_ckpt"])
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else run.adapter_dir

    log.info("merging %s into %s (%s)", adapter, source, dtype)
    base = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    merged = modeling.merge_adapter(PeftModel.from_pretrained(base, adapter))
    tokenizer = modeling.load_tokenizer(str(tokenizer_dir))

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    info = {
        "base_model": config["pretrained_ckpt"],
        "adapter": str(adapter),
        "checkpoint": checkpoint,
        "task": config["task"],
        "dtype": dtype,
        "trained_in_4bit": bool(config["load_in_4bit"]),
        "lora_target_modules": config["lora_target_modules"],
        "prompt_style": config["prompt_style"],
        "end_token": config.get("end_token"),
        "label_names": config["label_names"],
        "versions": modeling.library_versions(),
    }
    results.write_json_atomic(staging / "export_info.json", info)
    (staging / "README.md").write_text(_readme(info), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    log.info("exported to %s", out_dir)
    return out_dir


def _readme(info: dict) -> str:
    trained = (
        "trained in 4-bit (QLoRA) and merged here into the 16-bit base, so its outputs can differ "
        "slightly from the 4-bit model's"
        if info["trained_in_4bit"]
        else "trained on the 16-bit base"
    )
    labels = f"\nLabels: {', '.join(info['label_names'])}\n" if info["label_names"] else ""
    return f"""# Fine-tuned {info["base_model"]} ({info["task"]})

The LoRA adapter `{info["adapter"]}` merged into `{info["base_model"]}`, saved in {info["dtype"]}. The adapter was
{trained}. LoRA modules: {", ".join(info["lora_target_modules"])}. Prompt style: {info["prompt_style"]}; answers
end with {info["end_token"]!r}.
{labels}
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")
```

`export_info.json` holds these facts and the library versions.
""".replace("\n\n\n", "\n\n")
