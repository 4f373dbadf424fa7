"""`paca export --adapter DIR --to merged|lora OUT`: the command line of :mod:`paca.export`."""

from __future__ import annotations

import argparse
import json

import torch

from .lora import export_lora
from .merged import export_merged

DESCRIPTION = "`paca export`: a PaCA adapter as a merged transformers model or as an exact PEFT LoRA adapter."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paca export", description=DESCRIPTION)
    parser.add_argument("--adapter", required=True, help="directory of a saved PaCA adapter")
    parser.add_argument("--to", required=True, choices=["merged", "lora"], help="output format")
    parser.add_argument("out", help="output directory (must not exist or be empty)")
    parser.add_argument("--base", help="base model (default: base_model_name_or_path of the adapter)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="merged weights dtype")
    args = parser.parse_args(argv)
    if args.to == "lora":
        export_lora(args.adapter, args.out, args.base)
    else:
        export_merged(args.adapter, args.out, args.base, getattr(torch, args.dtype) if args.dtype else None)
    print(json.dumps({"exported": args.to, "adapter": args.adapter, "out": args.out}))
    return 0
