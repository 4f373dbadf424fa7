"""Methods side by side on `paca train`'s built-in demo: held-out score, time, memory (docs/TRAINING.md).

Each run is a fresh `python -m paca train` process with the demo defaults plus its own keys, so peak memory
is per run. Seeds are interleaved (seed 0 of every run, then seed 1, ...) so that load on a shared machine
falls on all runs alike; time is reported as a median over seeds and as the median of per-seed ratios to
the first run. Results go to a JSON file (every run's summary) and a markdown table on stdout.

    python benchmarks/train_methods.py --seeds 0 1 2                       # the methods table
    python benchmarks/train_methods.py --runs selection --seeds 0 1 2      # PaCA's column choices
    python benchmarks/train_methods.py --runs lr --seeds 0                 # the learning-rate sweep
    python benchmarks/train_methods.py --table docs/data/train-methods.json  # a saved result's table
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from paca.train.config import DEMO_LR

RUNS = {
    "methods": {
        "PaCA": [],
        "LoRA": ["method=lora"],
        "DoRA": ["method=dora"],
        "full fine-tuning": ["method=full"],
        "QPaCA (NF4 base)": ["method=qpaca"],
        "PaCA, random-init model": ["model=paca-demo-random"],
        "full, random-init model": ["model=paca-demo-random", "method=full"],
    },
    "selection": {f"selection={s}": [f"selection={s}"] for s in ("random", "weight_norm", "gradient", "structured")},
    "lr": {
        f"{m} lr={DEMO_LR[m] * f:g}": [f"method={m}", f"lr={DEMO_LR[m] * f:g}"]
        for m in ("paca", "lora", "full")
        for f in (0.5, 1, 2)
    },
}


def run_once(keys: list[str], seed: int, workdir: str) -> dict:
    out = tempfile.mkdtemp(dir=workdir)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "paca",
            "train",
            *keys,
            f"seed={seed}",
            f"output_dir={out}",
            "overwrite=true",
            "save_steps=0",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"run {keys} seed {seed} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def spread(values: list[float], fmt: str, unit: str = "") -> str:
    """Median, then the range over seeds: ``92.6% (91.8-95.7)``."""
    text = format(statistics.median(values), fmt) + unit
    return text if len(values) == 1 else f"{text} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(results: dict[str, list[dict]]) -> str:
    first = next(iter(results.values()))
    rows = [
        "| run | exact match before | held-out exact match | held-out loss | train time, s | time / first run "
        "| trainable | optimizer state | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summaries in results.items():
        exact = [100 * s["eval_after"]["eval_exact_match"] for s in summaries]
        before = [100 * s["eval_before"]["eval_exact_match"] for s in summaries]
        loss = [s["eval_after"]["eval_loss"] for s in summaries]
        seconds = [s["train_seconds"] for s in summaries]
        ratio = [s["train_seconds"] / f["train_seconds"] for s, f in zip(summaries, first)]
        rows.append(
            f"| {name} | {statistics.median(before):.1f}% | {spread(exact, '.1f', '%')} | {spread(loss, '.3f')} | "
            f"{spread(seconds, '.1f')} | "
            f"{statistics.median(ratio):.2f}x | {summaries[0]['trainable_parameters']:,} | "
            f"{summaries[0]['optimizer_state_bytes'] / 1024:.0f} KiB | "
            f"{statistics.median(s['peak_memory_bytes'] for s in summaries) / 2**20:.0f} MiB |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", choices=sorted(RUNS), default="methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", default=None, help="where to write every run's summary (default: none)")
    parser.add_argument("--table", default=None, help="only print the table of a JSON file written by --json")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)["results"]))
        return
    results: dict[str, list[dict]] = {name: [] for name in RUNS[args.runs]}
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            for name, keys in RUNS[args.runs].items():
                summary = run_once(keys, seed, workdir)
                results[name].append(summary)
                print(
                    f"seed {seed} | {name} | exact match {100 * summary['eval_after']['eval_exact_match']:.1f}% | "
                    f"{summary['train_seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "seeds": args.seeds, "results": results}, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
