"""Copy run and evaluation results for committing: JSON as is, predictions gzipped, adapters left out.

A predictions file still larger than --max_mb once compressed (few-shot prompts repeat thousands of
tokens of examples) is stored with each prompt replaced by the first 16 hex digits of its SHA-256
(`prompt_sha256_16`); the command in
the run's config rebuilds the prompts, and the hash checks them. A note beside it says so.

Usage: python reproduce/pack_results.py SRC DEST [--max_mb 8]
"""

import argparse
import gzip
import hashlib
import json
import shutil
from pathlib import Path


def pack_predictions(path: Path, target: Path, max_bytes: int) -> None:
    packed = Path(str(target) + ".gz")
    with open(path, "rb") as raw, gzip.open(packed, "wb", compresslevel=9) as out:
        shutil.copyfileobj(raw, out)
    if packed.stat().st_size <= max_bytes:
        return
    with open(path, encoding="utf-8") as lines, gzip.open(packed, "wt", encoding="utf-8", compresslevel=9) as out:
        for line in lines:
            record = json.loads(line)
            prompt = record.pop("prompt", None)
            if prompt is not None:
                record = {
                    "id": record.get("id"),
                    "prompt_sha256_16": hashlib.sha256(prompt.encode()).hexdigest()[:16],
                    **{k: v for k, v in record.items() if k != "id"},
                }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    note = packed.with_name(packed.name.replace(".jsonl.gz", ".PROMPTS_HASHED.txt"))
    note.write_text(
        f"{path.name}: over {max_bytes / 1e6:.0f} MB compressed with its prompts; each prompt is stored "
        "as the first 16 hex digits of its SHA-256 (prompt_sha256_16). Re-run the command in the run's config to rebuild them.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dest")
    parser.add_argument("--max_mb", type=float, default=8.0)
    args = parser.parse_args()
    src, dest = Path(args.src), Path(args.dest)
    for path in sorted(src.rglob("*")):
        if not path.is_file() or {"adapter", "checkpoints", "logs"} & set(path.parts) or path.suffix == ".tgz":
            continue
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".jsonl":
            pack_predictions(path, target, int(args.max_mb * 1e6))
        else:
            shutil.copy2(path, target)
    print(f"packed {src} into {dest}")


if __name__ == "__main__":
    main()
