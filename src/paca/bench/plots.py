"""PNG plots of a run like the paper's: Fig. 2 (step time by phase) and Fig. 3 (throughput against batch)."""

from __future__ import annotations

import os
import re

from .report import memory_cap_text

PHASE_COLOURS = (("forward_s", "#4C72B0"), ("backward_s", "#DD8452"), ("optimizer_s", "#55A868"))


def plot_slug(doc: dict) -> str:
    """File-name stem of a run's plots: model and dtype, e.g. ``cpu-float32``."""
    name = os.path.basename(os.path.normpath(doc["model"]["name"]))
    return re.sub(r"[^A-Za-z0-9.-]+", "-", f"{name}-{doc['model']['dtype']}")


def write_plots(doc: dict, folder: str) -> list[str]:
    """The PNG plots of the parts a run measured, written into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window

    os.makedirs(folder, exist_ok=True)
    written = []
    slug = plot_slug(doc)
    timed = [r for r in doc["results"] if "step_time_s" in r]
    if timed:
        path = os.path.join(folder, f"{slug}-fig2-step-time.png")
        written.append(plot_step_time(timed, doc["settings"], slug, path))
    curves = [r for r in doc["results"] if any(p["fits"] for p in r.get("throughput", []))]
    if curves:
        path = os.path.join(folder, f"{slug}-fig3-throughput.png")
        written.append(plot_throughput(curves, doc["settings"], slug, path))
    return written


def plot_step_time(timed: list[dict], s: dict, slug: str, path: str) -> str:
    """Fig. 2: each method's median step stacked by phase, labelled with its time and its ratio to LoRA."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(timed) + 2.5, 4))
    names = [r["method"] for r in timed]
    bottom = [0.0] * len(timed)
    for phase, colour in PHASE_COLOURS:
        values = [r[phase] for r in timed]
        ax.bar(names, values, bottom=bottom, color=colour, label=phase.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, r in enumerate(timed):
        label = f"{r['step_time_s']:.3g}s"
        if r.get("ratio_to_lora", {}).get("step_time_s"):
            label += f"\n{r['ratio_to_lora']['step_time_s']:.2f}x LoRA"
        ax.annotate(label, (x, bottom[x]), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(bottom) * 1.25)
    ax.set_ylabel("seconds per step (median of each phase)")
    ax.set_title(f"{slug}: batch {s['batch']} x {s['seq']}, r={s['r']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_throughput(curves: list[dict], s: dict, slug: str, path: str) -> str:
    """Fig. 3: sentences/s against batch (log 2) per method; an x at the first batch that did not fit."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = set()
    for r in curves:
        fits = [p for p in r["throughput"] if p["fits"]]
        (line,) = ax.plot(
            [p["size"] for p in fits], [p["sentences_per_s"] for p in fits], marker="o", label=r["method"]
        )
        failed = [p for p in r["throughput"] if not p["fits"]]
        if failed:
            ax.plot(
                [failed[0]["size"]],
                [fits[-1]["sentences_per_s"]],
                marker="x",
                color=line.get_color(),
                linestyle="none",
            )
        sizes |= {p["size"] for p in r["throughput"]}
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)])
    ax.minorticks_off()
    ax.set_xlabel("batch size (x: out of memory)")
    ax.set_ylabel("sentences / s")
    ax.set_title(f"{slug}: throughput at seq {s['fig3_seq']}, {memory_cap_text(s)}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
