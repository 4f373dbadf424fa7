"""What a run prints and writes: the console table, a markdown table, the JSON document, PNG plots."""

from __future__ import annotations

import json
import os
import re

GIB, MIB = 2**30, 2**20


def _num(value, fmt: str = ".3f", scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value if scale == 1.0 else value / scale, fmt)


def _ratio(result: dict, key: str, reference: str = "lora") -> str:
    value = result.get(f"ratio_to_{reference}", {}).get(key)
    return "-" if value is None else f"{value:.2f}x"


def headline(doc: dict) -> str:
    d, m, s = doc["device"], doc["model"], doc["settings"]
    layers = f", {m['num_hidden_layers']} layers" if m.get("num_hidden_layers") else ""
    where = d["name"]
    if d["type"] == "cpu":
        load = d.get("load_average_1m") or []
        where += f" ({d['threads']} of {d['cores']} cores, load {' -> '.join(map(str, load))})"
    return (
        f"{m['name']}{layers} ({_num(m.get('parameters'), '.1f', 1e6)}M params, {m['dtype']}) on {where} | "
        f"r={s['r']} alpha={s['alpha']:g}, all linear layers but the head | torch {d['torch']}"
    )


def tables(doc: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each measured part; the console and markdown render the same tables."""
    s, results = doc["settings"], doc["results"]
    out = []
    timed = [r for r in results if "step_time_s" in r]
    if timed:
        header = [
            "method",
            "step s",
            "fwd s",
            "bwd s",
            "opt s",
            "step xLoRA",
            "step xfloor",
            "f+b xfloor",
            "tok/s",
            "TFLOP/s",
            "peak mem GiB",
            "mem xLoRA",
            "activations MiB",
            "act xLoRA",
            "ops/step",
            "trainable",
        ]
        rows = [
            [
                r["method"],
                _num(r["step_time_s"], ".4f"),
                _num(r["forward_s"], ".4f"),
                _num(r["backward_s"], ".4f"),
                _num(r["optimizer_s"], ".4f"),
                _ratio(r, "step_time_s"),
                _ratio(r, "step_time_s", "floor"),
                _ratio(r, "forward_backward_s", "floor"),
                _num(r["tokens_per_s"], ".0f"),
                _num(r["tflops_per_s"], ".3f"),
                _num(r["peak_memory_bytes"], ".3f", GIB),
                _ratio(r, "peak_memory_bytes"),
                _num(r["activation_bytes"], ".1f", MIB),
                _ratio(r, "activation_bytes"),
                _num(r.get("dispatched_ops_per_step"), ".0f"),
                f"{r['trainable_params']:,}",
            ]
            for r in timed
        ]
        if any(r["method"] == "peft-paca" for r in timed):  # PEFT's own PaCA beside paca's
            column = header.index("step xfloor") + 1
            header.insert(column, "step xPEFT-PaCA")
            for r, row in zip(timed, rows):
                row.insert(column, _ratio(r, "step_time_s", "peft-paca"))
        if any(r.get("device_kernels_per_step") is not None for r in timed):  # CUDA
            column = header.index("ops/step") + 1
            header.insert(column, "kernels f+b")
            for r, row in zip(timed, rows):
                row.insert(column, _num(r.get("device_kernels_per_step"), ".0f"))
        spread = [
            f"{r['method']}/{ref} {q1:.2f}-{q3:.2f}"
            for r in timed
            for ref, (q1, q3) in r.get("step_time_ratio_quartiles", {}).items()
            if ref != r["method"]
        ]
        compiled = s.get("compile_backend")
        broken = [f"{r['method']} {r['compile_graph_breaks']}" for r in timed if r.get("compile_graph_breaks")]
        title = (
            f"Step time (Fig. 2): batch {s['batch']} x {s['seq']} tokens, median of {s['repeats']} interleaved "
            + (
                f"rounds of torch.compile'd models ({compiled}; ops/step and memory of an eager step)"
                if compiled
                else "rounds"
            )
            + (
                f"; graph breaks: {', '.join(broken)} (a method that breaks the graph recompiles functions "
                "the others share and slows them: time it apart)"
                if broken
                else ""
            )
            + "; ratios are medians of per-round pairs"
            + (f" (their quartiles: {', '.join(spread)})" if spread else "")
        )
        out.append((title, header, rows))
    searched = [r for r in results if "max_seq_probes" in r]
    if searched:
        header = ["method", "max seq", "xLoRA", "memory at max GiB", "probes"]
        rows = []
        for r in searched:
            at_max = [p for p in r["max_seq_probes"] if p["size"] == r["max_seq_len"]]
            best = r["max_seq_len"]
            label = "none fits" if best is None else f"{'>=' if r['max_seq_len_reached_limit'] else ''}{best}"
            rows.append(
                [
                    r["method"],
                    label,
                    _ratio(r, "max_seq_len"),
                    _num(at_max[0].get("memory_bytes") if at_max else None, ".2f", GIB),
                    str(len(r["max_seq_probes"])),
                ]
            )
        out.append((f"Max sequence length (Table 4): batch 1, {_cap(s)}", header, rows))
    curves = [r for r in results if "throughput" in r]
    if curves:
        header = ["method", "best sentences/s", "at batch", "xLoRA", "max batch", "sentences/s by batch"]
        rows = []
        for r in curves:
            trail = " ".join(
                f"{p['size']}:{p['sentences_per_s']:.2f}" if p["fits"] else f"{p['size']}:OOM" for p in r["throughput"]
            )
            largest = (
                "none fits"
                if r["max_batch"] is None
                else f"{'>=' if r['max_batch_reached_limit'] else ''}{r['max_batch']}"
            )
            rows.append(
                [
                    r["method"],
                    _num(r["best_sentences_per_s"], ".2f"),
                    _num(r["best_batch"], "d"),
                    _ratio(r, "best_sentences_per_s"),
                    largest,
                    trail,
                ]
            )
        out.append(
            (
                f"Throughput (Fig. 3): seq {s['fig3_seq']}, batch doubled until out of memory then bisected, "
                f"{_cap(s)}",
                header,
                rows,
            )
        )
    if doc.get("profile"):
        from .profile import comparison_rows

        header, rows = comparison_rows(doc["profile"]["self_time_by_method"])
        device = "device" if s["device"].startswith("cuda") else "CPU"
        out.append(
            (
                f"Profile: self {device} time per step by operator (torch.profiler, mean of "
                f"{doc['profile']['steps']} steps, batch {s['batch']} x {s['seq']})",
                header,
                rows,
            )
        )
    return out


def _cap(settings: dict) -> str:
    cap = settings.get("memory_cap_bytes")
    if cap is None:
        return "no memory cap"
    how = "allocator capped" if settings["device"].startswith("cuda") else "accounted bytes capped"
    return f"{how} at {cap / GIB:g} GiB"


def errors(doc: dict) -> list[str]:
    return [f"{r['method']}: {e}" for r in doc["results"] for e in r.get("errors", [])]


def console(doc: dict) -> str:
    lines = [headline(doc)]
    for title, header, rows in tables(doc):
        widths = [max(len(c) for c in column) for column in zip(header, *rows)]
        lines += ["", title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    if errors(doc):
        lines += ["", "Errors:"] + [f"  {e}" for e in errors(doc)]
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    lines = [headline(doc)]
    for title, header, rows in tables(doc):
        lines += ["", f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    if errors(doc):
        lines += ["", "Errors:", ""] + [f"- {e}" for e in errors(doc)]
    return "\n".join(lines) + "\n"


def write_json(doc: dict, path: str) -> None:
    _parent(path)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")


def write_text(text: str, path: str) -> None:
    _parent(path)
    with open(path, "w") as f:
        f.write(text)


def _parent(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def plot_slug(doc: dict) -> str:
    """File-name stem of a run's plots: model and dtype, e.g. ``cpu-float32``."""
    name = os.path.basename(os.path.normpath(doc["model"]["name"]))
    return re.sub(r"[^A-Za-z0-9.-]+", "-", f"{name}-{doc['model']['dtype']}")


def write_plots(doc: dict, folder: str) -> list[str]:
    """PNG plots like the paper's Fig. 2 (step time by phase) and Fig. 3 (throughput vs batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    slug, s = plot_slug(doc), doc["settings"]
    timed = [r for r in doc["results"] if "step_time_s" in r]
    if timed:
        fig, ax = plt.subplots(figsize=(1.4 * len(timed) + 2.5, 4))
        names = [r["method"] for r in timed]
        bottom = [0.0] * len(timed)
        for phase, colour in (("forward_s", "#4C72B0"), ("backward_s", "#DD8452"), ("optimizer_s", "#55A868")):
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
        written.append(_save(fig, os.path.join(folder, f"{slug}-fig2-step-time.png")))
    curves = [r for r in doc["results"] if any(p["fits"] for p in r.get("throughput", []))]
    if curves:
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
        ax.set_title(f"{slug}: throughput at seq {s['fig3_seq']}, {_cap(s)}", fontsize=10)
        ax.legend(fontsize=8)
        written.append(_save(fig, os.path.join(folder, f"{slug}-fig3-throughput.png")))
    return written


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
