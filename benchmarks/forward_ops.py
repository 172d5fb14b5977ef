"""Operations one forward of an adapted model runs, counted on the CPU: with the adapter as peft loads it, with its
product added in place (``fused_lora.fuse_lora(for_inference=True)``), and merged into the base. A proxy for the
GPU's kernel launches and full-size passes over the activations that a decode step or a prefill group pays for.

Counted as torch dispatches them (``TorchDispatchMode``): every aten operation of one forward, leaving out those that
only make a view. The base in bf16 and the adapter as peft loads it (fp32 on a bf16 base, as on a GPU),
so the casts peft makes there are counted too.

Usage (a trained run folder; its base model is read from the run's settings):
    python benchmarks/forward_ops.py --experiment_dir RUN --out benchmarks/results/forward_ops_smollm2.json
    python benchmarks/forward_ops.py --tiny --out /tmp/ops.json   # the tests' tiny model, a random adapter
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path


def working_ops(model, input_ids) -> collections.Counter:
    """The aten operations one forward dispatches, by name, leaving out views (no work, no kernel on a GPU):
    counted where they reach the backend (``TorchDispatchMode``), so the same on any device."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not (torch.Tag.view_copy in func.tags or func.is_view or func._schema.name == "aten::detach"):
                counts[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Count():
        model(input_ids=input_ids)
    return counts


def load_ways(args):
    """(name, model) for each way, built one after another (each from a fresh copy)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_kit import fused_lora, modeling
    from qlora_kit.run_folder import RunFolder

    if args.tiny:  # the 7B shape's architecture, tiny (zephyr_shaped.py)
        import zephyr_shaped

        source = str(zephyr_shaped.build(Path(args.tiny_dir), tiny=True))

        def adapted(base):
            config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
            return get_peft_model(base, config)

    else:
        run = RunFolder(args.experiment_dir)
        config = run.config()
        adapter = run.adapter(run.default_checkpoint(None))
        source = str(modeling.resolve_model_source(config["pretrained_ckpt"]))

        def adapted(base):
            return PeftModel.from_pretrained(base, adapter)  # the adapter in fp32, as peft loads it on a GPU

    def base():
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()

    yield "peft (as loaded)", adapted(base()).eval()
    model = adapted(base()).eval()
    fused_lora.fuse_lora(model, for_inference=True)
    yield "adapter's product added in place (--fused_lora_inference)", model
    yield "adapter merged (--merge_adapter)", adapted(base()).merge_and_unload().eval()


def main(args) -> dict:
    import torch
    import zephyr_shaped

    results = {"command": " ".join(sys.argv), "tokens": args.tokens, "ways": {}}
    input_ids = torch.randint(3, 100, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    for name, model in load_ways(args):
        layers = model.config.get_text_config().num_hidden_layers
        counts = working_ops(model, input_ids)
        total = sum(counts.values())
        results["ways"][name] = {
            "operations": total,
            "per_decoder_layer": round(total / layers, 1),
            "by_name": dict(counts.most_common()),
        }
        print(f"{name}: {total} operations a forward, {total / layers:.1f} a decoder layer", flush=True)
        del model
    if args.out:
        zephyr_shaped.write_result(Path(args.out), results)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment_dir", help="a trained run folder")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model with a random adapter instead")
    parser.add_argument("--tiny_dir", default="/tmp/forward_ops_tiny")
    parser.add_argument("--tokens", type=int, default=8, help="tokens in the forward (one row)")
    parser.add_argument("--out", default=None)
    arguments = parser.parse_args()
    if not arguments.tiny and not arguments.experiment_dir:
        parser.error("give --experiment_dir RUN, or --tiny")
    main(arguments)
