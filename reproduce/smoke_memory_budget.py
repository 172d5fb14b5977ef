"""--max_memory_gb's probe on a GPU, in seconds: the tests' tiny model in 4-bit, the default recipe, 2 steps;
prints what the probe chose. Usage (GPU machine, after source .device/bin/setup.sh):

    PYTHONPATH=$PWD/tests:$PYTHONPATH python3 reproduce/smoke_memory_budget.py
"""

import json
from pathlib import Path

from conftest import newsgroup_rows, write_jsonl
from tiny_model import build_tiny_model

from qlora_kit import settings, training

rows = newsgroup_rows(64, seed=1)
write_jsonl(Path("/tmp/smoke_news.jsonl"), rows)
model = build_tiny_model(Path("/tmp/smoke_model"), [row["text"] for row in rows])
for budget in (22.0, 1.001):  # the default; one no micro-batch fits (the headroom alone is 1 GB)
    resolved, _ = settings.resolve(
        "classification",
        {
            "pretrained_ckpt": str(model),
            "train_file": "/tmp/smoke_news.jsonl",
            "max_steps": 2,
            "max_memory_gb": budget,
            "experiment_dir": f"/tmp/smoke_run_{budget}",
        },
    )
    metrics = training.train("classification", resolved)
    print(json.dumps({"budget": budget, **metrics["memory_budget"], "steps": metrics["global_steps"]}))
