"""What a run tells its user: one dense progress line per logging step, metrics.jsonl, the final summary."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings

import torch
from transformers import TrainerCallback


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated by this process (CUDA), else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_kind() -> str:
    return "CUDA allocated" if torch.cuda.is_available() else "process RSS"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def human_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def human_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressReport(TrainerCallback):
    """Prints the progress line and appends one JSON object per logging step (and per evaluation).

    ``step 120/1000 (12%) | loss 1.234 | lr 2.0e-04 | 41.2k tok/s | peak 3.1 GiB | eta 4m12s``
    """

    def __init__(self, metrics_path: str, is_main: bool, stream=None):
        self.metrics_path = metrics_path
        self.is_main = is_main
        self.stream = stream or sys.stdout
        self.rows: list[dict] = []
        self.evaluations: list[dict] = []  # metrics of each evaluation, in order
        self.evaluation_steps: list[int] = []  # the optimizer step each was made at
        self._start_time = self._last_time = 0.0
        self._start_step = 0
        self._last_tokens = self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = self._last_time = time.perf_counter()
        self._start_step = state.global_step  # > 0 when resuming
        self._last_tokens = self.start_tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            control.should_log = True  # the last step always gets a line, whatever logging_steps says

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append(dict(metrics or {}))
        self.evaluation_steps.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or not logs:
            return
        now = time.perf_counter()
        if "eval_loss" in logs:
            row = {"step": state.global_step, "eval_loss": logs["eval_loss"]}
            for name in ("eval_exact_match", "eval_rewards/accuracies", "eval_rewards/margins"):  # SFT; DPO
                if name in logs:
                    row[name] = logs[name]
            self._write(row)
            match = (
                f" | exact match {100 * row['eval_exact_match']:.1f}%"
                if "eval_exact_match" in row
                else f" | reward accuracy {100 * row['eval_rewards/accuracies']:.1f}%"
                if "eval_rewards/accuracies" in row
                else ""
            )
            self._print(f"eval step {state.global_step} | loss {row['eval_loss']:.4f}{match}")
            return
        if "loss" not in logs:
            return  # the end-of-training record; the summary covers it
        elapsed = now - self._start_time
        tokens = state.num_input_tokens_seen
        tokens_per_s = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        done = state.global_step - self._start_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done else 0.0
        row = {
            "step": state.global_step,
            "loss": logs["loss"],
            "lr": logs.get("learning_rate", 0.0),
            "grad_norm": logs.get("grad_norm"),
            "epoch": logs.get("epoch"),
            "tokens_per_s": tokens_per_s,
            "tokens_seen": tokens,
            "peak_memory_bytes": peak_memory_bytes(),
            "elapsed_s": elapsed,
        }
        self._write(row)
        self._last_time, self._last_tokens = now, tokens
        total = state.max_steps
        self._print(
            f"step {state.global_step}/{total} ({100 * state.global_step / total:.0f}%) | "
            f"loss {row['loss']:.4f} | lr {row['lr']:.1e} | "
            + (f"{human_count(tokens_per_s)} tok/s | " if tokens else "")  # DPO: TRL counts no tokens
            + f"peak {human_bytes(row['peak_memory_bytes'])} | eta {human_duration(eta)}"
        )

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def read_metrics(path: str) -> list[dict]:
    """The rows of ``metrics.jsonl``; a line a kill left half-written is skipped with a warning."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                warnings.warn(f"{path}:{number}: not a metrics row (cut short by a kill?); skipped.")
                continue
            rows.append(row)
    return rows


def truncate_metrics(path: str, step: int) -> None:
    """Keep the rows up to ``step`` (resuming from that checkpoint replays what came after it)."""
    rows = [row for row in read_metrics(path) if row["step"] <= step]
    staged = path + ".tmp"
    with open(staged, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(staged, path)


def format_summary(summary: dict) -> str:
    """The end-of-run block: steps, time, throughput, memory, first/last loss, eval before and after."""
    lines = [
        f"done: {summary['steps']} steps in {human_duration(summary['train_seconds'])} | "
        + (f"{human_count(summary['tokens_per_s'])} tok/s | " if summary["tokens_seen"] else "")
        + f"peak {human_bytes(summary['peak_memory_bytes'])} "
        f"({summary['peak_memory_kind']}) | trainable {human_count(summary['trainable_parameters'])} of "
        f"{human_count(summary['total_parameters'])} parameters ({summary['method']}), optimizer state "
        f"{human_bytes(summary['optimizer_state_bytes'])}"
    ]
    if summary.get("first_loss") is not None:
        lines.append(f"train loss {summary['first_loss']:.4f} (first logged) -> {summary['last_loss']:.4f} (last)")
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if after:

        def fmt(ev):
            if not ev:
                return "not measured"
            text = f"loss {ev['eval_loss']:.4f}"
            if "eval_exact_match" in ev:
                text += f", exact match {100 * ev['eval_exact_match']:.1f}%"
            if "eval_rewards/accuracies" in ev:
                text += f", reward accuracy {100 * ev['eval_rewards/accuracies']:.1f}%"
            return text

        lines.append(
            f"held-out eval ({summary['eval_examples']} examples): before {fmt(before)} -> after {fmt(after)}"
        )
    lines.append(f"saved: {summary['saved']} in {summary['output_dir']}")
    return "\n".join(lines)
