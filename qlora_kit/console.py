"""What the console shows: our own log lines, the progress of the long steps (training, generation) and the
warnings a user can act on. Library messages known to be harmless are silenced here, in one list each, with the
reason; ``--verbose`` shows everything.
"""

from __future__ import annotations

import logging
import re
import warnings

# (warning category, message pattern, why a user can ignore it)
HARMLESS_WARNINGS = [
    (
        FutureWarning,
        r"`gradient_checkpointing` is deprecated",
        "transformers' own argument rename, raised from inside TrainingArguments; the setting applies",
    ),
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        "raised inside transformers when peft or the trainer asks whether checkpointing is on",
    ),
    (
        FutureWarning,
        r"`use_liger_kernel=True` is deprecated",
        "trl announces a future rename; the kernels are used as asked",
    ),
    (
        UserWarning,
        r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
        "only lm_head's LoRA matrices train, and merging unties lm_head first (modeling.merge_adapter)",
    ),
]

# (logger name prefix, message pattern, why a user can ignore it)
HARMLESS_LOG_MESSAGES = [
    (
        "bitsandbytes",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "on the CPU bitsandbytes falls back to its PyTorch 4-bit matmul, with the same results",
    ),
    (
        "transformers",
        r"Loading a GGUF checkpoint with its weights packed is fastest in float32",
        "a .gguf file is dequantized once into a model folder, then loaded as a normal model",
    ),
    (
        "liger_kernel",
        r"Backend impl .* could not be imported",
        "Liger's kernels for other hardware (Ascend NPUs); the CUDA kernels load",
    ),
]


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(
            record.name.startswith(prefix) and re.search(pattern, message)
            for prefix, pattern, _ in HARMLESS_LOG_MESSAGES
        )


def setup(verbose: bool = False) -> None:
    """Log our INFO lines with the time; unless ``verbose``, silence the harmless messages above and the
    libraries' per-file progress bars (loading weights, preprocessing a data set)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("httpx", "urllib3", "datasets", "filelock"):  # chatty at INFO; their warnings stay
        logging.getLogger(name).setLevel(logging.WARNING)
    if verbose:
        return
    for category, pattern, _ in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}", category=category)
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    # transformers logs through its own handler; everything else reaches the root logger's
    handlers = logging.getLogger().handlers + transformers_logging._get_library_root_logger().handlers
    for handler in handlers:
        if not any(isinstance(f, _DropHarmless) for f in handler.filters):
            handler.addFilter(_DropHarmless())
