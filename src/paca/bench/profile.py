"""Where a step's time goes, per operator and method (torch.profiler), to explain a ratio; and on CUDA how many
kernels a step launches. ``report.profile_table`` puts the methods side by side.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from .measure import train_step
from .methods import Trainee
from .results import Results
from .trainees import ResidentTrainees, run_tokens

PROFILED_STEPS = 3


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


def measure_profiles(results: Results) -> None:
    """The profile part into ``results.profiles``: every method resident, one warm-up step, then its profiled steps;
    each method's 40 most expensive operators kept."""
    s = results.settings
    trainees = ResidentTrainees(results)
    input_ids = run_tokens(results, s.batch, s.seq)
    for m in list(trainees.by_method):
        results.progress.update(f"profile {m}: 1 warm-up step, {PROFILED_STEPS} profiled")
        if trainees.step(m, train_step, input_ids, s.dtype) is None:
            continue
        table = trainees.step(m, profile_steps, input_ids, s.dtype)
        if table is not None:
            results.profiles[m] = dict(sorted(table.items(), key=lambda kv: -kv[1]["self_s"])[:40])
    results.progress.done()
    trainees.release()
