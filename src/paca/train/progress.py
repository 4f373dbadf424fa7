"""The progress line of a run: one dense line per logging step (and per evaluation), each also a row of
metrics.jsonl."""

from __future__ import annotations

import json
import sys
import time

from transformers import TrainerCallback

from .report import human_bytes, human_count, human_duration, peak_memory_bytes


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
