"""Searches that run until memory runs out: the longest sequence that fits (the paper's Table 4), the
largest batch (Fig. 3's throughput curve). An out-of-memory is a data point, never a crash.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Probe:
    """One size tried: whether it fit, the memory it took, and for throughput its sentences per second."""

    size: int
    fits: bool
    memory_bytes: int | None = None
    sentences_per_s: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def free_memory() -> None:
    """Return what a failed step left behind to the allocator (and the CUDA cache to the device)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def probe_safely(measure: Callable[[int], Probe], size: int) -> Probe:
    """``measure(size)``, with an out-of-memory turned into a probe that did not fit."""
    try:
        return measure(size)
    except torch.OutOfMemoryError as err:
        note = "out of memory: " + str(err).strip().splitlines()[0][:160]
    # Leaving the except block dropped the error and its traceback, which held the failed step's tensors.
    free_memory()
    return Probe(size, fits=False, note=note)


@dataclass
class MaxFit:
    """Result of :func:`largest_fitting`: the largest size that fit (None: not even the smallest tried)."""

    largest: int | None
    probes: list[Probe]
    reached_limit: bool  # every size up to the limit fit: the true maximum may be larger


def largest_fitting(
    measure: Callable[[int], Probe],
    start: int,
    limit: int,
    granularity: int,
    on_probe: Callable[[Probe], None] = lambda p: None,
) -> MaxFit:
    """Largest multiple of ``granularity`` in ``[granularity, limit]`` for which ``measure`` fits.

    Doubles from ``start`` until a size does not fit (or ``limit`` is reached), then bisects between the
    last size that fit and the first that did not, down to ``granularity``. Fitting is assumed monotone.
    """
    if granularity < 1 or start < granularity or limit < start:
        raise ValueError(f"search needs 1 <= granularity <= start <= limit, got {granularity}, {start}, {limit}.")
    probes: list[Probe] = []

    def attempt(size: int) -> bool:
        probe = probe_safely(measure, size)
        probes.append(probe)
        on_probe(probe)
        return probe.fits

    low, high, size = 0, None, start  # low fits (0: nothing yet); high does not
    while high is None:
        if attempt(size):
            low = size
            if size == limit:
                return MaxFit(limit, probes, reached_limit=True)
            size = min(size * 2, limit)
        else:
            high = size
    while high - low > granularity:
        middle = (low + high) // 2 // granularity * granularity
        if middle <= low:
            break
        if attempt(middle):
            low = middle
        else:
            high = middle
    return MaxFit(low or None, probes, reached_limit=False)
