r"""Export a fine-tuned run as a standalone model folder (the LoRA adapter merged into a 16-bit copy of the base).

Usage:
    python export_model.py --experiment_dir experiments/RUN --output_dir exported/my-model
    python export_model.py --experiment_dir RUN --checkpoint 620 --output_dir exported/epoch-1 --dtype float16

The folder loads without peft, as any model does:
    model = AutoModelForCausalLM.from_pretrained("exported/my-model")
"""

import argparse

from qlora_kit import console
from qlora_kit.cli import add_adapter_args, add_verbose_arg
from qlora_kit.errors import run_main
from qlora_kit.export import DTYPES, export_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_args(parser, "export")
    parser.add_argument("--output_dir", required=True, help="the model folder to write")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights' type (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder that is not empty")
    add_verbose_arg(parser)
    return parser


def main(args: argparse.Namespace):
    out = export_run(
        args.experiment_dir,
        args.output_dir,
        checkpoint=args.checkpoint,
        dtype=args.dtype,
        overwrite=args.overwrite,
        final_adapter=args.final_adapter,
    )
    print(f"exported model: {out}")
    return out


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    console.setup(arguments.verbose)
    run_main(lambda: main(arguments))
