"""The parts of `paca bench`, run in order over every requested method, and the document they make:

    fig2    step time split forward | backward | optimizer, FLOPs, tokens/s, memory (``step_time``)
    profile self time per operator and method at the fig2 batch (torch.profiler), to explain a ratio (``profile``)
    table4  longest sequence at batch 1 before out-of-memory, one method on the device at a time (``max_seq``)
    fig3    sentences/s at a fixed length as the batch grows to the largest that fits (``throughput``)

The memory cap applies to table4 and fig3 only (``fitting``): fig2 keeps every method resident, uncapped.
"""

from __future__ import annotations

from .fitting import apply_memory_cap
from .max_seq import measure_max_seq_len
from .presets import build_model
from .profile import PROFILED_STEPS, measure_profiles
from .progress import Progress
from .results import Results
from .settings import Settings, describe_device, validate
from .step_time import measure_step_time
from .throughput import measure_throughput
from .trainees import random_tokens

# Also importable from here: the base model and the token batch every part builds (tests and scripts reuse them).
__all__ = ["Progress", "Settings", "build_model", "random_tokens", "run"]


def run(settings: Settings, progress: Progress | None = None) -> dict:
    """Measure every requested part; the document ``--json`` writes."""
    validate(settings)
    device_at_start = describe_device(settings.device)
    results = Results(settings, progress or Progress())
    if "fig2" in settings.parts:
        measure_step_time(results)
    if "profile" in settings.parts:
        measure_profiles(results)
    apply_memory_cap(settings)
    if "table4" in settings.parts:
        measure_max_seq_len(results)
    if "fig3" in settings.parts:
        measure_throughput(results)
    model = settings.model.describe()
    model["dtype"] = str(settings.dtype).removeprefix("torch.")
    device = describe_device(settings.device)
    if "load_average_1m" in device:
        device["load_average_1m"] = [device_at_start["load_average_1m"], device["load_average_1m"]]  # start, end
    doc = {
        "device": device,
        "model": model,
        "settings": settings.as_dict(),
        "results": list(results.by_method.values()),
    }
    if results.profiles:
        doc["profile"] = {"steps": PROFILED_STEPS, "self_time_by_method": results.profiles}
    return doc
