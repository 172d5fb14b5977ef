"""Pack the adapters a later sitting needs to score runs again without training them again.

For every training run folder under DIR (a folder with run_config.json and train_metrics.json): its settings,
selection and training metrics, and the adapter it is evaluated with by default (the checkpoint chosen on
validation while it trained, else the final adapter), without optimizer or scheduler state; the tokenizer files
of the final adapter folder too. Unpacked into $R on the GPU machine, the inference scripts and the lab's
scoring stages (e.g. `samsum_beams`) run on those runs as on the originals. Refuses to write more than
--max_mb (what one file brought back from the GPU machine may weigh).

Usage: python reproduce/pack_adapters.py DIR OUT.tgz [--max_mb 16]
"""

import argparse
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_kit.run_folder import RunFolder  # noqa: E402

TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")  # not needed to evaluate


def files_to_pack(root: Path) -> list[Path]:
    files = []
    for config in sorted(root.rglob("run_config.json")):
        run = RunFolder(config.parent)
        if not run.finished:
            continue
        files += [f for f in (run.config_file, run.train_metrics_file, run.selection_file) if f.is_file()]
        chosen = run.chosen_step()
        adapter = run.adapter(chosen)
        files += [f for f in sorted(adapter.iterdir()) if f.is_file() and not f.name.startswith(TRAINING_STATE)]
        if chosen is not None:  # the tokenizer files beside the final adapter
            files += [f for f in sorted(run.adapter_dir.glob("*")) if f.is_file() and "adapter_model" not in f.name]
    return files


def main(args) -> None:
    root = Path(args.dir)
    files = files_to_pack(root)
    size = sum(f.stat().st_size for f in files) / 2**20
    if size > args.max_mb:
        raise SystemExit(f"pack_adapters: {size:.1f} MB of adapters under {root}, over --max_mb {args.max_mb}")
    tmp = Path(str(args.out) + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(root)))
    tmp.rename(args.out)
    print(f"packed {len(files)} files ({size:.1f} MB) of the runs under {root} into {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir")
    parser.add_argument("out")
    parser.add_argument("--max_mb", type=float, default=16.0)
    main(parser.parse_args())
