"""What a run prints and writes: the console tables, the markdown tables, the JSON document (plots: ``plots``)."""

from __future__ import annotations

import json
import os
from collections import defaultdict

GIB, MIB = 2**30, 2**20
Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows)
# The profile table's rows: so that the time one method spends beyond another shows up as rows that differ.
TOP_BY_TIME = 10  # the most expensive operators of any method
TOP_BY_SPREAD = 8  # and those whose time differs most between methods (what one pays and another not)


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


STEP_TIME_HEADER = (
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
)


def tables(doc: dict) -> list[Table]:
    """(title, header, rows) of each measured part; the console and markdown render the same tables."""
    s, results = doc["settings"], doc["results"]
    out = [step_time_table(s, results), max_seq_table(s, results), throughput_table(s, results)]
    if doc.get("profile"):
        out.append(profile_table(doc))
    return [table for table in out if table is not None]


def step_time_table(s: dict, results: list[dict]) -> Table | None:
    """fig2's table, or None when no method was timed; PEFT's-PaCA and kernel columns only where a row has them."""
    timed = [r for r in results if "step_time_s" in r]
    if not timed:
        return None
    header = list(STEP_TIME_HEADER)
    rows = [_step_time_cells(r) for r in timed]
    if any(r["method"] == "peft-paca" for r in timed):  # PEFT's own PaCA beside paca's
        _insert_column(
            header, rows, "step xfloor", "step xPEFT-PaCA", [_ratio(r, "step_time_s", "peft-paca") for r in timed]
        )
    if any(r.get("device_kernels_per_step") is not None for r in timed):  # CUDA
        _insert_column(
            header, rows, "ops/step", "kernels f+b", [_num(r.get("device_kernels_per_step"), ".0f") for r in timed]
        )
    return _step_time_title(s, timed), header, rows


def _step_time_cells(r: dict) -> list[str]:
    return [
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


def _insert_column(header: list[str], rows: list[list[str]], after: str, name: str, cells: list[str]) -> None:
    column = header.index(after) + 1
    header.insert(column, name)
    for row, cell in zip(rows, cells):
        row.insert(column, cell)


def _step_time_title(s: dict, timed: list[dict]) -> str:
    """What fig2 timed and how: the batch, the rounds, compilation and its graph breaks, the ratios' quartiles."""
    spread = [
        f"{r['method']}/{ref} {q1:.2f}-{q3:.2f}"
        for r in timed
        for ref, (q1, q3) in r.get("step_time_ratio_quartiles", {}).items()
        if ref != r["method"]
    ]
    compiled = s.get("compile_backend")
    broken = [f"{r['method']} {r['compile_graph_breaks']}" for r in timed if r.get("compile_graph_breaks")]
    return (
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


def max_seq_table(s: dict, results: list[dict]) -> Table | None:
    """table4's table, or None when no length was searched."""
    searched = [r for r in results if "max_seq_probes" in r]
    if not searched:
        return None
    header = ["method", "max seq", "xLoRA", "memory at max GiB", "probes"]
    rows = []
    for r in searched:
        at_max = [p for p in r["max_seq_probes"] if p["size"] == r["max_seq_len"]]
        rows.append(
            [
                r["method"],
                _largest(r["max_seq_len"], r["max_seq_len_reached_limit"]),
                _ratio(r, "max_seq_len"),
                _num(at_max[0].get("memory_bytes") if at_max else None, ".2f", GIB),
                str(len(r["max_seq_probes"])),
            ]
        )
    return f"Max sequence length (Table 4): batch 1, {memory_cap_text(s)}", header, rows


def throughput_table(s: dict, results: list[dict]) -> Table | None:
    """fig3's table, or None when no batch was searched."""
    curves = [r for r in results if "throughput" in r]
    if not curves:
        return None
    header = ["method", "best sentences/s", "at batch", "xLoRA", "max batch", "sentences/s by batch"]
    rows = []
    for r in curves:
        trail = " ".join(
            f"{p['size']}:{p['sentences_per_s']:.2f}" if p["fits"] else f"{p['size']}:OOM" for p in r["throughput"]
        )
        rows.append(
            [
                r["method"],
                _num(r["best_sentences_per_s"], ".2f"),
                _num(r["best_batch"], "d"),
                _ratio(r, "best_sentences_per_s"),
                _largest(r["max_batch"], r["max_batch_reached_limit"]),
                trail,
            ]
        )
    title = (
        f"Throughput (Fig. 3): seq {s['fig3_seq']}, batch doubled until out of memory then bisected, "
        f"{memory_cap_text(s)}"
    )
    return title, header, rows


def _largest(size: int | None, reached_limit: bool) -> str:
    """A search's largest size: ``none fits``, the size, or ``>=size`` when the search stopped at its limit."""
    return "none fits" if size is None else f"{'>=' if reached_limit else ''}{size}"


def profile_table(doc: dict) -> Table:
    """The profile part's table: operators as rows, each method's self time per step as a column."""
    s = doc["settings"]
    header, rows = comparison_rows(doc["profile"]["self_time_by_method"])
    device = "device" if s["device"].startswith("cuda") else "CPU"
    title = (
        f"Profile: self {device} time per step by operator (torch.profiler, mean of "
        f"{doc['profile']['steps']} steps, batch {s['batch']} x {s['seq']})"
    )
    return title, header, rows


def comparison_rows(profiles: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the most expensive operators, and those that differ most between methods, with
    their self ms per step in each method."""
    times = defaultdict(lambda: [0.0] * len(profiles))
    for i, table in enumerate(profiles.values()):
        for op, entry in table.items():
            times[op][i] = entry["self_s"]
    by_time = sorted(times, key=lambda op: max(times[op]), reverse=True)[:TOP_BY_TIME]
    by_spread = sorted(times, key=lambda op: max(times[op]) - min(times[op]), reverse=True)[:TOP_BY_SPREAD]
    ops = sorted(set(by_time) | set(by_spread), key=lambda op: max(times[op]), reverse=True)
    methods = list(profiles)
    header = ["operator"] + [f"{m} ms (calls)" for m in methods]
    rows = []
    for op in ops:
        cells = []
        for m in methods:
            entry = profiles[m].get(op)
            cells.append("-" if entry is None else f"{entry['self_s'] * 1e3:.1f} ({entry['calls']:g})")
        rows.append([op] + cells)
    totals = [f"{sum(e['self_s'] for e in profiles[m].values()) * 1e3:.1f}" for m in methods]
    rows.append(["total (all operators)"] + totals)
    return header, rows


def memory_cap_text(settings: dict) -> str:
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
