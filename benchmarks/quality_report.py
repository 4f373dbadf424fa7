"""The tables and the plot of the quality study, computed from its records (one per task, split and method).

Accuracy spread is the sample standard deviation over splits. The paired difference to LoRA r=8 is taken split by
split (same test examples, same head, same batches), which removes the split-to-split noise the two share.
Times are medians over every training run of a method on a task, grid points included.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

REFERENCE = "lora-r8"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _lr(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


def summarise(records: list[dict]) -> dict[str, list[dict]]:
    """Per task, one row per method (in the order first met): accuracies, paired difference, lr choices, times."""
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_task[record["task"]][record["method"]].append(record)
    summary = {}
    for task, methods in by_task.items():
        reference = {(r["seed"], r["fold"]): r["test_accuracy"] for r in methods.get(REFERENCE, [])}
        reference_step = (
            statistics.median(run["step_seconds"] for r in methods.get(REFERENCE, []) for run in r["runs"])
            if reference
            else None
        )
        rows = []
        for method, rs in methods.items():
            accuracy = [r["test_accuracy"] for r in rs]
            paired = [
                r["test_accuracy"] - reference[(r["seed"], r["fold"])]
                for r in rs
                if (r["seed"], r["fold"]) in reference
            ]
            runs = [run for r in rs for run in r["runs"]]
            step = statistics.median(run["step_seconds"] for run in runs)
            rows.append(
                {
                    "method": method,
                    "splits": len(rs),
                    "trainable": rs[0]["trainable"],
                    "accuracy": _mean_std(accuracy),
                    "paired": _mean_std(paired) if paired and method != REFERENCE else None,
                    "lr_choices": Counter(r["learning_rate"] for r in rs),
                    "on_edge": sum(r["on_edge"] for r in rs),
                    "epoch_seconds": statistics.median(run["epoch_seconds"] for run in runs),
                    "step_ratio": step / reference_step if reference_step else None,
                    "validation_by_lr": _validation_by_lr(runs),
                }
            )
        summary[task] = rows
    return summary


def _validation_by_lr(runs: list[dict]) -> dict[float, float]:
    by_lr = defaultdict(list)
    for run in runs:
        by_lr[run["learning_rate"]].append(run["validation_accuracy"])
    return {lr: statistics.fmean(v) for lr, v in sorted(by_lr.items())}


def _choices(row: dict) -> str:
    median = statistics.median_low(lr for lr, n in row["lr_choices"].items() for _ in range(n))
    low, high = min(row["lr_choices"]), max(row["lr_choices"])
    text = _lr(median) if low == high else f"{_lr(median)} ({_lr(low)}..{_lr(high)})"
    return text + (f", on edge {row['on_edge']}/{row['splits']}" if row["on_edge"] else "")


def markdown(summary: dict[str, list[dict]]) -> str:
    """The results tables a user would quote: one per task, then each method's validation accuracy by lr."""
    out = []
    for task, rows in summary.items():
        out += [
            f"**{task}** (test accuracy over {rows[0]['splits']} splits)",
            "",
            "| method | trainable params | test accuracy | vs LoRA r=8 (paired) | lr chosen (median, range) "
            "| s / epoch | step vs LoRA r=8 |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for row in rows:
            mean, std = row["accuracy"]
            paired = f"{row['paired'][0]:+.3f} ± {row['paired'][1]:.3f}" if row["paired"] else "-"
            ratio = f"{row['step_ratio']:.2f}x" if row["step_ratio"] else "-"
            out.append(
                f"| {row['method']} | {row['trainable']:,} | {mean:.3f} ± {std:.3f} | {paired} | "
                f"{_choices(row)} | {row['epoch_seconds']:.2f} | {ratio} |"
            )
        out.append("")
    for task, rows in summary.items():
        lrs = sorted({lr for row in rows for lr in row["validation_by_lr"]})
        out += [
            f"**{task}**: mean validation accuracy by learning rate (blank: not tried)",
            "",
            "| method | " + " | ".join(_lr(lr) for lr in lrs) + " |",
            "|---|" + "---:|" * len(lrs),
        ]
        for row in rows:
            cells = [f"{row['validation_by_lr'][lr]:.3f}" if lr in row["validation_by_lr"] else "" for lr in lrs]
            out.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(records: list[dict], path: str) -> str:
    """A PNG with one panel per task: each split's test accuracy per method (dots) and the mean ± std (bar)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.6), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for x, method in enumerate(methods):
            accuracy = [r["test_accuracy"] for r in records if r["task"] == task and r["method"] == method]
            if not accuracy:
                continue
            offsets = [(i - (len(accuracy) - 1) / 2) * 0.05 for i in range(len(accuracy))]
            ax.plot([x + o for o in offsets], accuracy, ".", color="tab:gray", alpha=0.6)
            mean, std = _mean_std(accuracy)
            ax.errorbar([x + 0.25], [mean], yerr=[std], fmt="o", color="tab:blue", capsize=3)
        ax.set_xticks(range(len(methods)), methods, rotation=30, fontsize=8)
        ax.set_title(task, fontsize=9)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3, axis="y")
    from paca.train.plot import save_figure

    return save_figure(fig, path)
