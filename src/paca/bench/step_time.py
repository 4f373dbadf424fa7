"""fig2: step time split forward | backward | optimizer, FLOPs, tokens/s and memory of every method.

All methods are resident at once and timed interleaved: warm-up, then ``repeats`` rounds of one step per method
in rotating order, so that whatever else loads the device falls on every method alike and no method always
follows the same one. Figures are medians of the rounds, ratios medians of per-round pairs (``ratios``).
"""

from __future__ import annotations

import statistics
import time

import torch

from .measure import Accounting, StepRecord, accounting_step, train_step
from .profile import device_kernels_per_step
from .ratios import add_step_time_ratios, paired, step_time_row
from .results import Results
from .trainees import ResidentTrainees, run_tokens

COMPILED_WARMUP = 2  # --compile: the first step compiles forward and backward, the second may recompile


def graph_breaks() -> int:
    """Graph breaks torch.compile has met in this process so far."""
    return sum(torch._dynamo.utils.counters["graph_break"].values())


class StepTime:
    """One fig2 measurement: build every method, warm each up and account one step, time the rounds, summarise
    into ``results``."""

    def __init__(self, results: Results):
        self.results = results
        s = results.settings
        self.trainees = ResidentTrainees(results)
        self.input_ids = run_tokens(results, s.batch, s.seq)
        self.accounts: dict[str, Accounting] = {}
        self.records: dict[str, list[StepRecord]] = {}  # by method still resident after its warm-up

    def measure(self) -> None:
        s = self.results.settings
        warmup = s.warmup
        if s.compile_backend is not None:
            for trainee in self.trainees.by_method.values():
                trainee.compiled = torch.compile(trainee.model, backend=s.compile_backend)
            warmup = max(warmup, COMPILED_WARMUP)
        for m in list(self.trainees.by_method):
            self.prepare(m, warmup)
        self.records = {m: [] for m in self.trainees.by_method}
        started = time.perf_counter()
        for k in range(s.repeats):
            self.round(k)
            self.results.progress.update(self.round_line(k, started))
        self.results.progress.done()
        self.trainees.release()
        self.summarise()

    def prepare(self, method: str, warmup: int) -> None:
        """``warmup`` untimed steps, then the accounting step (and on CUDA the kernel count) of one method.

        Warm-up comes first so that the accounting step counts a steady step (PaCA copies each layer's
        pretrained columns once, in its first step).
        """
        s, results = self.results.settings, self.results
        results.progress.update(f"fig2 {method}: {warmup} warm-up, then an accounting step (FLOPs, saved bytes)")
        breaks = graph_breaks()
        for _ in range(warmup):
            self.trainees.step(method, train_step, self.input_ids, s.dtype)
        if s.compile_backend is not None and method in results.by_method:
            results.by_method[method]["compile_graph_breaks"] = graph_breaks() - breaks
        account = self.trainees.step(method, accounting_step, self.input_ids, s.dtype)
        if account is None:
            return
        self.accounts[method] = account
        if s.device.type == "cuda":  # a step of its own: the profiler's overhead stays off the timed ones
            account.device_kernels = self.trainees.step(method, device_kernels_per_step, self.input_ids, s.dtype)

    def round(self, k: int) -> None:
        """One timed step of every resident method, starting at the ``k``-th (rotating the order)."""
        s = self.results.settings
        resident = list(self.trainees.by_method)
        shift = k % max(len(resident), 1)
        for m in resident[shift:] + resident[:shift]:
            if m in self.trainees.by_method:
                record = self.trainees.step(m, train_step, self.input_ids, s.dtype)
                if record is not None:
                    self.records[m].append(record)

    def round_line(self, k: int, started: float) -> str:
        s, records = self.results.settings, self.records
        latest = " ".join(f"{m} {r[-1].step_s:.3f}s" for m, r in records.items() if r)
        line = f"fig2 round {k + 1}/{s.repeats} | {latest}"
        if records.get("paca") and records.get("lora"):
            line += f" | paca/lora {statistics.median(paired(records, 'paca', 'lora', 'step_s')):.3f}"
        elapsed = time.perf_counter() - started
        eta = elapsed / (k + 1) * (s.repeats - k - 1)
        return line + f" | eta {int(eta // 60)}m{int(eta % 60):02d}s"

    def summarise(self) -> None:
        """Each timed method's row, then its ratios to every reference method that was timed too."""
        s = self.results.settings
        records = {m: r for m, r in self.records.items() if r and m in self.accounts}
        for m, recs in records.items():
            self.results.by_method[m].update(step_time_row(recs, self.accounts[m], s.batch * s.seq, s.device))
        add_step_time_ratios(self.results.by_method, records)


def measure_step_time(results: Results) -> None:
    """fig2 into ``results``."""
    StepTime(results).measure()
