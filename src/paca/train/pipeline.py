"""One `paca train` run, stage by stage: check the output directory (and take a resumed run's config), load the
base, read the data, apply the method, choose columns, train, evaluate, save, report.

The run knows no model or data set by name: a caller that has built-in ones (the demo) hands them over as
:class:`~paca.train.builtin.BuiltinSources`.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from . import checkpoints, report
from .arguments import training_arguments
from .builtin import NO_BUILTINS, BuiltinSources
from .config import TrainConfig, resumed_config
from .data import PreferenceData, TokenizedData, load_data, load_preferences, render_with_labels
from .libraries import check_training_libraries
from .model import apply_method, count_parameters, load_base, run_tokenizer, select_columns_by_gradient
from .plot import plot_loss
from .progress import ProgressReport
from .trainers import NotFinite, exact_match, preference_trainer_class, sft_collator, sft_trainer_class


class TrainingStopped(RuntimeError):
    """Training stopped before the end (the loss turned NaN/Inf); nothing saved earlier was touched."""


@dataclass
class _Loaded:
    """What the loading stages hand to training: the model with its method applied, and its data."""

    model: torch.nn.Module
    tokenizer: object
    model_path: str
    data: TokenizedData | PreferenceData
    parameters: tuple[int, int]  # (trainable, total)


def run(
    cfg: TrainConfig,
    callbacks: Iterable[TrainerCallback] = (),
    evaluate_before: bool = True,
    stream=None,
    *,
    builtins: BuiltinSources = NO_BUILTINS,
) -> dict:
    """Train as ``cfg`` says; return the summary (also written to ``output_dir/summary.json``).

    Args:
        cfg: the run's configuration; an empty ``output_dir`` is filled in with the dated default.
        callbacks: extra Trainer callbacks.
        evaluate_before: measure the held-out loss (and exact match) before training too.
        stream: where the progress lines go (stdout).
        builtins: the models and record sets known by name.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad input, with what, where and what to do.
        TrainingStopped: the loss turned NaN or Inf; the last good checkpoint is kept.
    """
    check_training_libraries()
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    dataset_bars = datasets_logging.is_progress_bar_enabled()
    builtin = builtins.models.get(cfg.model)
    if builtin is not None and builtin.threads:
        torch.set_num_threads(builtin.threads)
    hf_logging.disable_progress_bar()  # weight loading/saving bars would break the one-line-per-step output
    datasets_logging.disable_progress_bar()  # and so would TRL's dataset preparation bars
    try:
        return _run(cfg, callbacks, evaluate_before, stream or sys.stdout, builtins)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
        if dataset_bars:
            datasets_logging.enable_progress_bar()


def dry_run(cfg: TrainConfig, stream, builtins: BuiltinSources = NO_BUILTINS) -> dict:
    """Read and tokenise the data as a run would; print the data line and the first training example with its
    learned tokens marked. Loads the tokenizer only and writes nothing."""
    tokenizer = run_tokenizer(cfg, builtins.models)
    if cfg.stage == "dpo":  # TRL tokenises the pairs: show the first one as it is handed over
        data = _preference_data(cfg, builtins)
        print(data.report(cfg.max_length), file=stream)
        print(
            f"first training pair (prompt, chosen, rejected):\n{json.dumps(data.train[0], ensure_ascii=False)}",
            file=stream,
            flush=True,
        )
    else:
        data = _supervised_data(cfg, tokenizer, builtins)
        first = data.train[0]
        print(data.report(cfg.max_length), file=stream)
        print(f"first training example ({len(first['input_ids'])} tokens, learned in [[...]]):", file=stream)
        print(render_with_labels(first["input_ids"], first["labels"], tokenizer), file=stream, flush=True)
    return {"dry_run": True, "train_examples": len(data.train), "eval_examples": len(data.eval)}


def _run(cfg: TrainConfig, callbacks, evaluate_before: bool, stream, builtins: BuiltinSources) -> dict:
    if cfg.dry_run:
        return dry_run(cfg, stream, builtins)
    cfg, resume_from = _prepare_output(cfg)
    set_seed(cfg.seed)
    loaded = _load(cfg, builtins)
    evaluate = bool(loaded.data.eval)
    # A resumed run measured "before" at its start (kept in metrics.jsonl); evaluating again would measure the
    # checkpoint instead.
    args = training_arguments(cfg, loaded.model, evaluate, evaluate_before and not resume_from)  # starts the group
    scored = 0
    if cfg.selection == "gradient" and not resume_from:  # on resume, the checkpoint holds the chosen columns
        scored = _select_columns(cfg, loaded, args)
    progress = ProgressReport(os.path.join(cfg.output_dir, "metrics.jsonl"), is_main=False, stream=stream)
    trainer = _build_trainer(cfg, loaded, args, evaluate, [progress, *callbacks])
    is_main = progress.is_main = trainer.is_world_process_zero()
    if is_main:
        _start_output_dir(cfg, progress, resume_from)
        _print_header(cfg, loaded, trainer.args, resume_from, scored, builtins, stream)
    trainer.accelerator.wait_for_everyone()

    train_seconds = _train(cfg, trainer, progress, resume_from)
    evaluations = _evaluations(trainer, progress, resume_from, evaluate, evaluate_before)
    saved = _save_final(trainer, cfg.output_dir)
    summary = None
    if is_main:
        checkpoints.discard_previous_run(cfg.output_dir)
        summary = report.run_summary(
            cfg,
            trainer,
            progress,
            loaded.data,
            train_seconds=train_seconds,
            evaluations=evaluations,
            saved=saved,
            parameters=loaded.parameters,
        )
        _write_results(cfg, summary, progress, stream)
    trainer.accelerator.wait_for_everyone()
    return summary


def default_output_dir(cfg: TrainConfig) -> str:
    model = os.path.basename(cfg.model.rstrip("/")) or "model"
    return os.path.join("runs", f"{model}-{cfg.method}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def _prepare_output(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """Check the launch and ``output_dir`` before anything is loaded; ``(config, checkpoint to resume from)``.

    An empty ``cfg.output_dir`` is filled in (in ``cfg`` itself, so the caller can name it); a resume returns the
    resumed run's config instead of ``cfg``, read before anything is cut or rewritten.
    """
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.fsdp and processes == 1:
        raise ValueError(
            "fsdp=true shards across processes and this is one: launch with `torchrun "
            "--nproc_per_node N -m paca train ...` (or accelerate launch), or drop fsdp."
        )
    if not cfg.output_dir:
        if processes > 1:
            raise ValueError("set output_dir when launching several processes (each must write to the same one).")
        cfg.output_dir = default_output_dir(cfg)
    resume_from = checkpoints.prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite, cfg.model)
    saved_config = os.path.join(cfg.output_dir, checkpoints.CONFIG_FILE)
    if resume_from and os.path.isfile(saved_config):
        cfg = resumed_config(cfg, saved_config)
    return cfg, resume_from


def _load(cfg: TrainConfig, builtins: BuiltinSources) -> _Loaded:
    """The base (its tokenizer and where it came from), the data, then the method applied to the base."""
    model, tokenizer, model_path = load_base(cfg, builtins.models)
    if cfg.stage == "dpo":
        data = _preference_data(cfg, builtins)
    else:
        data = _supervised_data(cfg, tokenizer, builtins)
    model = apply_method(model, cfg)
    return _Loaded(model, tokenizer, model_path, data, count_parameters(model))


def _preference_data(cfg: TrainConfig, builtins: BuiltinSources) -> PreferenceData:
    return load_preferences(cfg.data, cfg.data_split, cfg.eval_split, cfg.seed, cfg.eval_data, builtins.records)


def _supervised_data(cfg: TrainConfig, tokenizer, builtins: BuiltinSources) -> TokenizedData:
    return load_data(
        cfg.data,
        cfg.data_split,
        tokenizer,
        cfg.max_length,
        cfg.eval_split,
        cfg.seed,
        cfg.eval_data,
        cfg.train_on_prompt,
        builtins.records,
    )


def _select_columns(cfg: TrainConfig, loaded: _Loaded, args: TrainingArguments) -> int:
    """selection=gradient: score the first training batches where the run trains; the global batches scored."""
    if args.device.type != "cpu":
        if cfg.fsdp or bool(cfg.deepspeed):
            raise ValueError(
                "selection=gradient scores the whole model on one device before training, which "
                "fsdp / deepspeed runs do not hold; use selection=random, weight_norm or "
                "structured with them (the paper finds them as good), or train without sharding."
            )
        if next(loaded.model.parameters()).device.type == "cpu":  # a 4-bit base already sits (and must stay) there
            loaded.model.to(args.device)  # the Trainer would move it there next; scoring on the CPU would crawl
    return select_columns_by_gradient(loaded.model, loaded.data.train, sft_collator(loaded.tokenizer), cfg)


def _build_trainer(cfg: TrainConfig, loaded: _Loaded, args: TrainingArguments, evaluate: bool, callbacks) -> Trainer:
    """paca's SFT or DPO trainer over the data, printing through ``callbacks`` only (no bars, no log dicts)."""
    import datasets

    splits = dict(
        train_dataset=datasets.Dataset.from_list(loaded.data.train),
        eval_dataset=datasets.Dataset.from_list(loaded.data.eval) if evaluate else None,
    )
    common = dict(model=loaded.model, args=args, processing_class=loaded.tokenizer, callbacks=callbacks, **splits)
    if cfg.stage == "dpo":  # TRL tokenises the pairs; the reference is the model with its adapter disabled
        trainer = preference_trainer_class()(**common)
    else:
        trainer = sft_trainer_class()(compute_metrics=exact_match, **common)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _start_output_dir(cfg: TrainConfig, progress: ProgressReport, resume_from: str | None) -> None:
    """On the main process, once model and data have loaded: clear leftovers, set a replaced run aside, cut the
    metrics of a resumed run back to its checkpoint, and record the run's config."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    checkpoints.remove_staging(cfg.output_dir)
    if cfg.overwrite:
        checkpoints.set_aside_previous_run(cfg.output_dir, checkpoints.MODEL_FILES)
    if resume_from:
        report.truncate_metrics(progress.metrics_path, _checkpoint_step(resume_from))
    with open(os.path.join(cfg.output_dir, checkpoints.CONFIG_FILE), "w") as f:
        f.write(cfg.to_yaml())


def _print_header(
    cfg: TrainConfig,
    loaded: _Loaded,
    args: TrainingArguments,
    resume_from: str | None,
    scored: int,
    builtins: BuiltinSources,
    stream,
) -> None:
    builtin = builtins.models.get(cfg.model)
    lines = report.header_lines(
        cfg,
        model_path=loaded.model_path,
        data=loaded.data,
        parameters=loaded.parameters,
        args=args,
        resume_from=resume_from,
        scored=scored,
        intro=builtin.header() if builtin is not None and builtin.header is not None else None,
    )
    print("\n".join(lines), file=stream, flush=True)


def _train(cfg: TrainConfig, trainer: Trainer, progress: ProgressReport, resume_from: str | None) -> float:
    """Run the training loop; the seconds it trained (the evaluations inside the loop left out)."""
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except NotFinite as err:
        kept = checkpoints.newest_checkpoint(cfg.output_dir)
        raise TrainingStopped(
            f"the {err.what} became {err.value} at step {err.step}: training stopped before that step's update, and "
            f"nothing more was saved. Last good checkpoint: {kept or 'none (no checkpoint was written yet)'}. "
            "Continue from it in full precision (resume=true bf16=false fp16=false), or start again with a lower "
            "lr (overwrite=true lr=...): a resume keeps the run's lr and schedule."
        ) from None
    return time.perf_counter() - started - sum(e.get("eval_runtime", 0.0) for e in progress.evaluations)


def _evaluations(
    trainer: Trainer, progress: ProgressReport, resume_from: str | None, evaluate: bool, evaluate_before: bool
) -> tuple[dict | None, dict | None]:
    """The held-out metrics ``(before, after)`` training, each None when not measured."""
    before = None
    if evaluate and evaluate_before:
        if resume_from:  # the interrupted run's step-0 evaluation, if it logged one
            before = next(
                (row for row in report.read_metrics(progress.metrics_path) if row["step"] == 0 and "eval_loss" in row),
                None,
            )
        elif progress.evaluations:
            before = progress.evaluations[0]
    # With eval_steps dividing the run, the loop has just evaluated the final weights: not again.
    steps = trainer.state.global_step
    evaluated_last = steps > 0 and progress.evaluation_steps[-1:] == [steps]
    after = (progress.evaluations[-1] if evaluated_last else trainer.evaluate()) if evaluate else None
    return before, after


def _save_final(trainer: Trainer, output_dir: str) -> list[str]:
    """Save the adapter (or full model) and tokenizer into output_dir, each file by an atomic rename."""
    staging = os.path.join(output_dir, checkpoints.STAGING, "final")
    trainer.save_model(staging)  # every process takes part (FSDP gathers the full state dict)
    trainer.accelerator.wait_for_everyone()
    names = []
    if trainer.is_world_process_zero():
        names = checkpoints.publish_files(staging, output_dir)
        checkpoints.remove_staging(output_dir)
    return names


def _write_results(cfg: TrainConfig, summary: dict, progress: ProgressReport, stream) -> None:
    """summary.json, loss.png and the end-of-run block."""
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_loss(
        report.read_metrics(progress.metrics_path),
        os.path.join(cfg.output_dir, "loss.png"),
        f"{cfg.model} | {cfg.method} | {cfg.data}",
    )
    print(report.format_summary(summary), file=stream, flush=True)


def _checkpoint_step(path: str) -> int:
    return int(checkpoints.CHECKPOINT.match(os.path.basename(path)).group(1))
