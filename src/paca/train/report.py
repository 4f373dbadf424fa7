"""What a run tells its user besides the progress line: the header, metrics.jsonl read back, the summary
(summary.json) and the end-of-run block; the units they are written in."""

from __future__ import annotations

import json
import os
import resource
import warnings

import torch


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


def header_lines(
    cfg,
    *,
    model_path: str,
    data,
    parameters: tuple[int, int],
    args,
    resume_from: str | None,
    scored: int,
    intro: str | None = None,
) -> list[str]:
    """The lines a run prints before training: the model and method, the data, the batch and schedule.

    Args:
        cfg: the run's config.
        model_path: where the base came from, shown beside ``cfg.model`` when it differs.
        data: the run's data (its ``report`` line).
        parameters: ``(trainable, total)`` parameter counts.
        args: the Trainer's arguments (processes, device).
        resume_from: the checkpoint the run resumes from, if any.
        scored: global batches selection=gradient scored (0: none).
        intro: a line printed first (a built-in model's account of itself).
    """
    trainable, total = parameters
    processes = args.world_size
    global_batch = cfg.batch_size * cfg.grad_accum * processes
    chosen = ""
    if cfg.method in ("paca", "qpaca"):
        chosen = f" {cfg.selection} columns" + (f" (scored on {scored} global batches)" if scored else "")
    method = f"method {cfg.method}"
    if cfg.method != "full":
        method += f" r={cfg.r}{chosen} alpha={cfg.paca_alpha:g} on {cfg.target_modules}"
    lines = [
        f"model: {cfg.model}" + (f" ({model_path})" if model_path != cfg.model else "") + f" | {method} | trainable "
        f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)",
        data.report(cfg.max_length),
        f"training: global batch {global_batch} ({cfg.batch_size} x {cfg.grad_accum} accumulation x "
        f"{processes} process{'es' if processes > 1 else ''}{', FSDP2' if cfg.fsdp else ''}) | lr "
        f"{cfg.learning_rate:g} {cfg.lr_scheduler} | {args.device.type}"
        + (" | bf16" if cfg.bf16 else "")
        + f" | output {cfg.output_dir}",
    ]
    if intro:
        lines.insert(0, intro)
    if resume_from:
        lines.append(f"resuming from {resume_from}")
    return lines


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
                warnings.warn(f"{path}:{number}: not a metrics row (cut short by a kill?); skipped.", stacklevel=2)
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


def run_summary(
    cfg,
    trainer,
    progress,
    data,
    *,
    train_seconds: float,
    evaluations: tuple[dict | None, dict | None],
    saved: list[str],
    parameters: tuple[int, int],
) -> dict:
    """What summary.json holds: the run's length, speed, memory, parameters, losses and held-out evaluations.

    Args:
        cfg: the run's config.
        trainer: the Trainer, after training.
        progress: the run's :class:`paca.train.progress.ProgressReport` (metrics.jsonl, the tokens at the start).
        data: the run's data.
        train_seconds: training time, evaluations left out.
        evaluations: the held-out metrics ``(before, after)`` training, each None when not measured.
        saved: the names of the files saved into output_dir.
        parameters: ``(trainable, total)`` parameter counts.
    """
    losses = [row["loss"] for row in read_metrics(progress.metrics_path) if "loss" in row]
    state = trainer.state
    trainable, total = parameters
    before, after = evaluations
    return {
        "model": cfg.model,
        "method": cfg.method,
        "data": cfg.data,
        "output_dir": cfg.output_dir,
        "steps": state.global_step,
        "train_seconds": train_seconds,
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_s": (state.num_input_tokens_seen - progress.start_tokens) / max(train_seconds, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_kind": memory_kind(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "optimizer_state_bytes": _optimizer_state_bytes(trainer.optimizer),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "truncated": data.truncated,
        "dropped": len(data.dropped),
        "eval_before": _eval_fields(before),
        "eval_after": _eval_fields(after),
        "saved": ", ".join(name for name in saved if name.startswith(("adapter_", "model"))) or "nothing",
        "processes": trainer.args.world_size,
    }


def _optimizer_state_bytes(optimizer) -> int:
    """Bytes of this process's optimizer state (AdamW: two moments per trained value), as allocated."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


def _eval_fields(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    return {
        k: float(v)
        for k, v in metrics.items()
        if k in ("eval_loss", "eval_exact_match", "eval_rewards/accuracies", "eval_rewards/margins")
    }


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
        lines.append(
            f"held-out eval ({summary['eval_examples']} examples): before {_describe_evaluation(before)} -> after "
            f"{_describe_evaluation(after)}"
        )
    lines.append(f"saved: {summary['saved']} in {summary['output_dir']}")
    return "\n".join(lines)


def _describe_evaluation(metrics: dict | None) -> str:
    if not metrics:
        return "not measured"
    text = f"loss {metrics['eval_loss']:.4f}"
    if "eval_exact_match" in metrics:
        text += f", exact match {100 * metrics['eval_exact_match']:.1f}%"
    if "eval_rewards/accuracies" in metrics:
        text += f", reward accuracy {100 * metrics['eval_rewards/accuracies']:.1f}%"
    return text
