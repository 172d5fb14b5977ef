"""Copy run and evaluation results for committing: JSON as is, predictions gzipped, adapters left out.

Usage: python scripts/pack_results.py SRC DEST
"""

import gzip
import shutil
import sys
from pathlib import Path

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(src.rglob("*")):
    if not path.is_file() or "adapter" in path.parts or "checkpoints" in path.parts:
        continue
    target = dest / path.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with open(path, "rb") as raw, gzip.open(str(target) + ".gz", "wb", compresslevel=9) as packed:
            shutil.copyfileobj(raw, packed)
    else:
        shutil.copy2(path, target)
print(f"packed {src} into {dest}")
