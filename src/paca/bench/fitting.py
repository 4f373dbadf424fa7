"""table4 and fig3's common ground: each method built alone on a fresh base, searched in turn, and the probe of a
search, whether one step of that method fits under the memory cap.

On CUDA ``--memory-cap-gib`` limits the allocator (set_per_process_memory_fraction), so a step over the cap runs
out of memory as it would on the smaller card. The CPU has no allocator to cap and a real out-of-memory kills the
process: there a size is out of memory when its accounted bytes (parameters, gradients, optimizer state,
activations) exceed the cap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .measure import accounting_step
from .methods import Trainee, make_trainee
from .presets import build_model, device_memory_bytes
from .results import Results
from .search import MaxFit, Probe, free_memory
from .settings import Settings
from .trainees import clear_grads, run_tokens

Search = Callable[[Results, str, Trainee], MaxFit | None]  # (results, method, its trainee alone) -> the search


def apply_memory_cap(settings: Settings) -> None:
    """Cap the CUDA allocator at ``--memory-cap-gib`` (nothing to do on CPU or without a cap)."""
    s = settings
    if s.memory_cap_bytes is not None and s.device.type == "cuda":
        fraction = s.memory_cap_bytes / device_memory_bytes(s.device)
        torch.cuda.set_per_process_memory_fraction(fraction, s.device)


def fits(results: Results, trainee: Trainee, batch: int, seq: int, size: int) -> Probe:
    """One step at ``batch x seq`` (``size`` is the one searched); on CPU a step whose accounted bytes exceed the
    cap does not fit."""
    s = results.settings
    try:
        account = accounting_step(trainee, run_tokens(results, batch, seq), s.dtype, count_flops=False)
    finally:
        clear_grads(trainee)
    # Alone on the device, the allocator's peak is the method's whole footprint (CPU: accounted bytes).
    memory = account.peak_allocated_bytes if s.device.type == "cuda" else account.accounted_bytes
    if s.device.type == "cpu" and memory > s.memory_cap_bytes:
        return Probe(size, fits=False, memory_bytes=memory, note="accounted bytes over the cap")
    return Probe(size, fits=True, memory_bytes=memory)


def build_alone(results: Results, method: str, part: str) -> Trainee | None:
    """``method`` built on a fresh base, with nothing else resident; None (recorded) if it cannot be."""
    s = results.settings

    def build() -> Trainee:
        base = build_model(s.model, s.dtype, s.device, s.seed)
        return make_trainee(method, base, s.r, s.alpha, s.seed)

    return results.attempt(method, f"building the model alone for {part}", build)


def search_each_alone(results: Results, part: str, search: Search) -> list[tuple[str, MaxFit]]:
    """``search`` over each method still available, built alone in turn (one on the device at a time); the
    (method, result) of every search that ran, in the run's method order."""
    done = []
    for m in results.settings.methods:
        if m in results.unavailable:
            continue
        results.progress.update(f"{part} {m}: building")
        trainee = build_alone(results, m, part)
        if trainee is None:
            continue
        fit = search(results, m, trainee)
        del trainee  # freed before the next method is built
        if fit is not None:
            done.append((m, fit))
            free_memory()
    results.progress.done()
    return done
