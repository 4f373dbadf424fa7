"""`paca bench`: step time, memory, max sequence length and throughput of PaCA vs LoRA, DoRA, full FT.

    paca bench --quick                      smoke test, tiny model, every part (< 2 min on 2 CPU cores)
    paca bench --suite cpu                  the CPU suite of docs/BENCHMARKS.md
    paca bench --suite gpu                  the GPU suite: llama3-8b shape, bf16, Fig. 2, Table 4, Fig. 3
    paca bench --suite moe                  an MoE step (fused experts): PaCA vs LoRA's target_parameters
    paca bench --preset cpu --methods floor,paca,lora,full --repeats 7
    paca bench --preset cpu --methods floor,paca,lora --parts profile      where each method's time goes

A suite sets defaults; any flag given beside it wins.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import BenchError
from .methods import METHODS, parse_methods
from .presets import DTYPES, PRESETS, ModelSpec

SUITES = {
    # One thread: a model this small gains nothing from two, and threads stall on a busy shared runner.
    "quick": dict(
        preset="tiny",
        methods="full,lora,dora,paca,floor,qlora",
        batch=2,
        seq=64,
        repeats=3,
        warmup=1,
        threads=1,
        parts="fig2,table4,fig3,profile",
        memory_cap_gib=0.01,
        max_seq=2048,
        seq_granularity=64,
        fig3_seq=64,
        max_batch=8,
    ),
    # One thread: on a shared 2-core machine two threads wait on each other at every operator, which
    # penalises methods with many small operators (LoRA, DoRA) by whatever else runs; see BENCHMARKS.md.
    # The cap keeps the searches to minutes on such a machine; full FT, whose weights, gradients and AdamW state
    # alone exceed it, fits no length at all under it (docs/BENCHMARKS.md).
    "cpu": dict(
        preset="cpu",
        methods="floor,paca,lora,dora,full",
        batch=4,
        seq=256,
        repeats=11,
        threads=1,
        parts="fig2,table4,fig3",
        memory_cap_gib=0.5,
        max_seq=16384,
        seq_granularity=128,
        fig3_seq=512,
        max_batch=16,
    ),
    # The launch-bound regime: a model so small that per-operator overhead, not FLOPs, sets the step time, as
    # kernel launches do on a GPU at small batches. One thread, many rounds: each step takes milliseconds.
    "launch": dict(
        preset="tiny", methods="floor,paca,lora,dora", batch=1, seq=32, repeats=41, threads=1, parts="fig2"
    ),
    # A mixture-of-experts step: PaCA on the fused experts against LoRA's target_parameters (same targets).
    "moe": dict(preset="moe-cpu", methods="floor,paca,lora", batch=4, seq=256, repeats=7, threads=1, parts="fig2"),
    "gpu": dict(
        preset="llama3-8b",
        device="cuda",
        dtype="bf16",
        methods="full,lora,dora,paca,floor",
        batch=2,
        seq=512,
        repeats=10,
        warmup=2,
        parts="fig2,table4,fig3",
        memory_cap_gib=80.0,
        max_seq=65536,
        seq_granularity=128,
        fig3_seq=512,
        max_batch=256,
    ),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paca bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--suite", choices=SUITES, help="a set of defaults: quick, cpu, launch, moe or gpu (see docs/BENCHMARKS.md)"
    )
    p.add_argument("--quick", action="store_true", help="same as --suite quick: the CI smoke test")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", help=f"model shape with random weights: {', '.join(PRESETS)} (default cpu)")
    which.add_argument("--model", help="a local model directory or a hub id instead of a preset")
    p.add_argument("--layers", type=int, help="keep only the first N transformer blocks of the shape")
    p.add_argument("--methods", default="full,lora,dora,paca,floor", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights dtype; 16-bit runs under autocast (default: bf16 on cuda, fp32 on cpu)",
    )
    p.add_argument("--batch", type=int, default=4, help="fig2 batch size")
    p.add_argument("--seq", type=int, default=256, help="fig2 sequence length")
    p.add_argument("--r", type=int, default=8, help="rank of LoRA/DoRA, columns per layer of PaCA")
    p.add_argument("--alpha", type=float, default=16.0, help="lora_alpha and paca_alpha")
    p.add_argument("--repeats", type=int, default=7, help="fig2 interleaved rounds (one step per method each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method before the rounds")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="fig2 times each method's model under torch.compile (default backend inductor; at least 2 "
        "warm-up steps, which compile); its ops/step and memory columns stay eager counts",
    )
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's, one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, adapters and tokens")
    p.add_argument(
        "--parts",
        default="fig2",
        help="comma list of fig2 (step time, memory), table4 (max sequence "
        "length), fig3 (throughput vs batch), profile (time per "
        "operator and method)",
    )
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        help="memory cap of table4 and fig3 (CUDA: allocator limit; CPU: accounted bytes), e.g. 80 for an A100-80GB",
    )
    p.add_argument("--max-seq", type=int, default=65536, help="table4 stops searching at this length")
    p.add_argument("--seq-granularity", type=int, default=128, help="table4 resolution in tokens")
    p.add_argument("--fig3-seq", type=int, default=512, help="fig3 sequence length")
    p.add_argument("--max-batch", type=int, default=64, help="fig3 searches batch sizes up to this one")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots like the paper's Fig. 2 and Fig. 3")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser()
    first, _ = p.parse_known_args(argv)
    suite = "quick" if first.quick else first.suite
    if suite:
        p.set_defaults(**SUITES[suite])
    args = p.parse_args(argv)
    args.suite = suite
    return args


def settings_from(args: argparse.Namespace):
    from .settings import Settings

    if args.preset is not None and args.preset not in PRESETS:
        raise BenchError(f"unknown preset '{args.preset}'; choose from {', '.join(PRESETS)}, or give --model DIR.")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # memory calls need an index
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cap = None if args.memory_cap_gib is None else int(args.memory_cap_gib * 2**30)
    return Settings(
        model=ModelSpec(args.model or args.preset or "cpu", args.layers),
        methods=parse_methods(args.methods),
        device=device,
        dtype=dtype,
        batch=args.batch,
        seq=args.seq,
        r=args.r,
        alpha=args.alpha,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
        memory_cap_bytes=cap,
        max_seq=args.max_seq,
        seq_granularity=args.seq_granularity,
        fig3_seq=args.fig3_seq,
        max_batch=args.max_batch,
        compile_backend=args.compile,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every method ran, 1 when one failed (its error is in the table)."""
    from . import report
    from .plots import write_plots
    from .suite import run

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except RuntimeError as err:  # torch.device("nonsense")
        raise BenchError(f"--device {args.device!r}: {err}") from None
    threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise BenchError(f"--threads must be at least 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    try:
        doc = run(settings)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) keeps its setting
    doc["command"] = "paca bench " + " ".join(argv)
    print(report.console(doc))
    if args.json:
        report.write_json(doc, args.json)
    if args.markdown:
        report.write_text(report.markdown(doc), args.markdown)
    if args.plots:
        for path in write_plots(doc, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if report.errors(doc) else 0
