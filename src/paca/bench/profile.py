"""Where a step's time goes, per operator and method (torch.profiler), to explain a missed target; and on CUDA
how many kernels a step launches.

The table puts methods side by side: for each operator among the most expensive, its self time per step
in every method, so the time one method spends beyond another shows up as the rows that differ.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable

import torch

from .measure import train_step
from .methods import Trainee

PROFILED_STEPS = 3
TOP_BY_TIME = 10  # the most expensive operators of any method
TOP_BY_SPREAD = 8  # and those whose time differs most between methods (what one pays and another not)


def profile_steps(trainee: Trainee, input_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, dict]:
    """Self time per step (seconds) and calls per step of each operator, over ``PROFILED_STEPS`` steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = input_ids.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            train_step(trainee, input_ids, dtype)
    table = {}
    for event in prof.key_averages():
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if self_us > 0:
            table[event.key] = {"self_s": self_us / 1e6 / PROFILED_STEPS, "calls": event.count / PROFILED_STEPS}
    return table


def device_kernels_per_step(trainee: Trainee, input_ids: torch.Tensor, dtype: torch.dtype) -> int | None:
    """What a CUDA step's forward + backward launches on the device, as torch.profiler's CUDA activity records it
    (kernels, copies and fills); the same span as the dispatched-operator count. None, with a warning, when the
    profiler cannot trace the device (no CUPTI, say): the count is a column of fig2, not a reason to drop a method
    whose accounting step already ran."""
    from torch.profiler import ProfilerActivity, profile

    tracer = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    try:
        train_step(trainee, input_ids, dtype, during=tracer)
    except torch.OutOfMemoryError:
        raise  # fig2 drops the method, as for any step that does not fit
    except RuntimeError as err:
        warnings.warn(f"paca bench: kernels per step of {trainee.method} not counted: {err}", stacklevel=2)
        return None
    return count_device_events(tracer.events())


def count_device_events(events: Iterable) -> int:
    """How many of a profile's events ran on a CUDA device (each a kernel launch, copy or fill)."""
    from torch.autograd import DeviceType

    return sum(1 for event in events if event.device_type == DeviceType.CUDA)


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
