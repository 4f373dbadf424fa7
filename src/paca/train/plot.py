"""The loss plot written at the end of a run: training loss per logging step, held-out loss when measured."""

from __future__ import annotations

import os


def plot_loss(rows: list[dict], path: str, title: str) -> str | None:
    """Write a PNG of the loss curves in ``rows`` (metrics.jsonl objects) to ``path``; None if nothing to plot."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not held_out:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if held_out:
        ax.plot(*zip(*held_out), "o--", label="held-out loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    staged = path + ".tmp.png"
    fig.savefig(staged)
    plt.close(fig)
    os.replace(staged, path)
    return path
