"""table4: the longest sequence at batch 1 that fits under the memory cap, one method on the device at a time."""

from __future__ import annotations

from .fitting import fits, search_each_alone
from .methods import Trainee
from .ratios import add_ratio_to_lora
from .results import Results
from .search import MaxFit, Probe, largest_fitting


def measure_max_seq_len(results: Results) -> None:
    """table4 into ``results``: each available method's longest length, its probes, and the ratio to LoRA's."""
    for m, fit in search_each_alone(results, "table4", longest_sequence):
        results.by_method[m].update(
            max_seq_len=fit.largest,
            max_seq_len_reached_limit=fit.reached_limit,
            max_seq_probes=[p.as_dict() for p in fit.probes],
        )
    add_ratio_to_lora(results.by_method, "max_seq_len")


def longest_sequence(results: Results, method: str, trainee: Trainee) -> MaxFit | None:
    """The length search of ``method``'s trainee; None (recorded) when it could not run.

    The length doubles from 4 x ``--seq-granularity`` until a step does not fit, then is bisected to the
    granularity.
    """
    s = results.settings

    def measure(seq: int) -> Probe:
        return fits(results, trainee, 1, seq, size=seq)

    def show(p: Probe) -> None:
        memory = f", {p.memory_bytes / 2**30:.2f} GiB" if p.memory_bytes else ""
        results.progress.update(f"table4 {method} | seq {p.size}: {'fits' if p.fits else p.note}{memory}")

    return results.attempt(
        method,
        "during table4",
        largest_fitting,
        measure,
        start=s.seq_granularity * 4,
        limit=s.max_seq,
        granularity=s.seq_granularity,
        on_probe=show,
    )
