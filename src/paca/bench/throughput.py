"""fig3: sentences/s at a fixed length as the batch doubles until out of memory, then bisected to the largest
batch that fits, one method on the device at a time."""

from __future__ import annotations

import statistics

from .fitting import fits, search_each_alone
from .measure import train_step
from .methods import Trainee
from .ratios import add_ratio_to_lora
from .results import Results
from .search import MaxFit, Probe, largest_fitting
from .trainees import run_tokens

THROUGHPUT_STEPS = 3  # timed steps per batch size, after the untimed probe step


def measure_throughput(results: Results) -> None:
    """fig3 into ``results``: each available method's curve, its largest batch and best rate, the ratio to LoRA's."""
    for m, search in search_each_alone(results, "fig3", batch_search):
        curve = sorted(search.probes, key=lambda p: p.size)
        fitting = [p for p in curve if p.fits]
        best = max(fitting, key=lambda p: p.sentences_per_s) if fitting else None
        results.by_method[m].update(
            throughput=[p.as_dict() for p in curve],
            max_batch=search.largest,
            max_batch_reached_limit=search.reached_limit,
            best_sentences_per_s=best.sentences_per_s if best else None,
            best_batch=best.size if best else None,
        )
    add_ratio_to_lora(results.by_method, "best_sentences_per_s")


def batch_search(results: Results, method: str, trainee: Trainee) -> MaxFit | None:
    """The batch search of ``method``'s trainee, each batch that fits timed; None (recorded) when it could not
    run."""
    s = results.settings

    def measure(batch: int) -> Probe:
        probe = fits(results, trainee, batch, s.fig3_seq, size=batch)
        if probe.fits:
            ids = run_tokens(results, batch, s.fig3_seq)
            step = statistics.median(train_step(trainee, ids, s.dtype).step_s for _ in range(THROUGHPUT_STEPS))
            probe.sentences_per_s = batch / step
        return probe

    def show(p: Probe) -> None:
        rate = f"{p.sentences_per_s:.2f} sentences/s" if p.sentences_per_s else p.note
        results.progress.update(f"fig3 {method} | batch {p.size} x {s.fig3_seq}: {rate}")

    return results.attempt(
        method, "during fig3", largest_fitting, measure, start=1, limit=s.max_batch, granularity=1, on_probe=show
    )
