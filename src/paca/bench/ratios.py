"""fig2's summary of the timed rounds (medians, ratios as medians of per-round pairs, their quartiles) and the
ratio to LoRA of the searches' figures.

A ratio is taken round by round, method and reference timed in the same round, so that load drifting over the
run moves both sides of each pair alike; the quartiles of the pairs are the noise behind the median.
"""

from __future__ import annotations

import statistics

import torch

from .measure import Accounting, StepRecord

REFERENCES = ("lora", "floor", "peft-paca", "qlora", "qpeft-paca")  # what fig2's ratios are taken against
PHASES = ("step_s", "forward_s", "backward_s", "forward_backward_s")


def paired(records: dict[str, list[StepRecord]], method: str, reference: str, phase: str) -> list[float]:
    """Per-round ratios method/reference of one phase (rounds in which both ran)."""
    pairs = zip(records[method], records[reference])
    return [getattr(a, phase) / getattr(b, phase) for a, b in pairs if getattr(b, phase) > 0]


def peak_memory(device: torch.device, accounting: Accounting, transient: int | None) -> int:
    """The memory one method needs, though others are resident beside it (fig2).

    CUDA: its parameters and optimizer state plus the allocator's peak during a step on top of what the step
    found allocated (the same as max_memory_allocated with the method alone); CPU: accounted bytes.
    """
    if device.type == "cuda":
        return accounting.param_bytes + accounting.optimizer_state_bytes + transient
    return accounting.accounted_bytes


def step_time_row(records: list[StepRecord], a: Accounting, tokens: int, device: torch.device) -> dict:
    """One method's fig2 figures: medians of its rounds and its accounting step's bytes, FLOPs and operators."""
    step = statistics.median(r.step_s for r in records)
    transients = [r.transient_peak_bytes for r in records if r.transient_peak_bytes is not None]
    return dict(
        step_time_s=step,
        forward_s=statistics.median(r.forward_s for r in records),
        backward_s=statistics.median(r.backward_s for r in records),
        optimizer_s=statistics.median(r.optimizer_s for r in records),
        tokens_per_s=tokens / step,
        flops_per_step=a.flops,
        tflops_per_s=a.flops / step / 1e12,
        peak_memory_bytes=peak_memory(device, a, max(transients) if transients else None),
        activation_bytes=a.activation_bytes,
        param_bytes=a.param_bytes,
        grad_bytes=a.grad_bytes,
        optimizer_state_bytes=a.optimizer_state_bytes,
        trainable_params=a.trainable_params,
        dispatched_ops_per_step=a.dispatched_ops,
        device_kernels_per_step=a.device_kernels,
        process_peak_rss_bytes=a.process_peak_rss_bytes,
        step_times_s=[r.step_s for r in records],
    )


def add_step_time_ratios(rows: dict[str, dict], records: dict[str, list[StepRecord]]) -> None:
    """Into each method's row: ``ratio_to_<reference>`` of every phase for every reference that ran, the quartiles
    of its per-round step ratios, and against LoRA the memory and throughput ratios too."""
    for reference in REFERENCES:
        if reference not in records:
            continue
        for m in records:
            ratios = {
                phase: statistics.median(paired(records, m, reference, phase))
                for phase in PHASES
                if paired(records, m, reference, phase)
            }
            ratios = {("step_time_s" if k == "step_s" else k): v for k, v in ratios.items()}
            steps = paired(records, m, reference, "step_s")
            if len(steps) >= 2:  # how much the per-round ratios scatter: the noise behind the median
                q1, _, q3 = statistics.quantiles(steps, n=4, method="inclusive")
                rows[m].setdefault("step_time_ratio_quartiles", {})[reference] = [q1, q3]
            if reference == "lora":
                for key in ("peak_memory_bytes", "activation_bytes", "tokens_per_s"):
                    if rows["lora"].get(key):
                        ratios[key] = rows[m][key] / rows["lora"][key]
            rows[m].setdefault(f"ratio_to_{reference}", {}).update(ratios)


def add_ratio_to_lora(rows: dict[str, dict], key: str) -> None:
    """``ratio_to_lora[key]`` into every row that has ``key``, when LoRA's row has a non-zero one."""
    reference = rows.get("lora", {}).get(key)
    if not reference:
        return
    for row in rows.values():
        if row.get(key) is not None:
            row.setdefault("ratio_to_lora", {})[key] = row[key] / reference
