"""The checks a config passes before a run: values each valid but not meaningful, or not together."""

from __future__ import annotations

import difflib

from .schema import DEMO_DATA, TrainConfig


def check(cfg: TrainConfig) -> None:
    """Raise ValueError for values that are each valid but not meaningful (or not together).

    The checks run in a fixed order, so a config with several problems always names the same one first.
    """
    _check_values(cfg)
    _check_stage(cfg)
    _check_transformers_names(cfg)
    _check_schedule_and_output(cfg)


def _check_values(cfg: TrainConfig) -> None:
    positive = ("r", "batch_size", "grad_accum", "max_length", "logging_steps", "selection_steps")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"key '{name}' must be positive, got {getattr(cfg, name)}.")
    for name in ("model", "data"):
        if not getattr(cfg, name).strip():
            raise ValueError(f"key '{name}' is empty; `paca train --help` says what it takes.")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"key 'warmup_ratio' is a fraction of the steps in [0, 1), got {cfg.warmup_ratio}.")


def _check_stage(cfg: TrainConfig) -> None:
    if cfg.stage == "dpo" and cfg.selection == "gradient":
        raise ValueError(
            "selection=gradient scores supervised batches; with stage=dpo use selection=random, "
            "weight_norm or structured."
        )
    if cfg.stage == "dpo" and cfg.data in DEMO_DATA and not cfg.resume:  # a resume takes data from the run
        raise ValueError(
            "stage=dpo needs preference pairs: set data to a file or dataset of prompt / chosen / "
            "rejected records (the demo task has none)."
        )
    if cfg.stage == "dpo" and (cfg.packing or cfg.padding_free or cfg.train_on_prompt):
        key_name = "packing" if cfg.packing else "padding_free" if cfg.padding_free else "train_on_prompt"
        raise ValueError(
            f"key '{key_name}' shapes supervised batches (stage=sft); TRL's DPOTrainer batches the "
            "preference pairs itself."
        )
    if cfg.router_aux_loss_coef is not None and cfg.router_aux_loss_coef < 0:
        raise ValueError(f"key 'router_aux_loss_coef' must be 0 or more, got {cfg.router_aux_loss_coef}.")
    if cfg.bf16 and cfg.fp16:
        raise ValueError("keys 'bf16' and 'fp16' are both true; choose one mixed precision.")


def _check_transformers_names(cfg: TrainConfig) -> None:
    """``optim`` and ``report_to`` name what transformers offers: checked against its own lists."""
    from transformers.training_args import OptimizerNames

    optimizers = [o.value for o in OptimizerNames]
    if cfg.optim not in optimizers:
        close = difflib.get_close_matches(cfg.optim, optimizers, n=1)
        raise ValueError(
            f"key 'optim': unknown optimizer '{cfg.optim}'"
            + (f"; did you mean '{close[0]}'?" if close else f"; transformers offers {', '.join(optimizers)}.")
        )
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    reporters = ("none", "all", *sorted(INTEGRATION_TO_CALLBACK))
    unknown = [r for r in (r.strip() for r in cfg.report_to.split(",")) if r and r not in reporters]
    if unknown:
        raise ValueError(f"key 'report_to': '{unknown[0]}' is not one of {', '.join(reporters)}.")


def _check_schedule_and_output(cfg: TrainConfig) -> None:
    if cfg.warmup_steps < 0:
        raise ValueError(f"key 'warmup_steps' must be 0 or more, got {cfg.warmup_steps}.")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise ValueError("nothing to train: set max_steps > 0 or epochs > 0.")
    if cfg.learning_rate <= 0:
        raise ValueError(f"key 'lr' must be positive, got {cfg.lr}.")
    if cfg.resume and not cfg.output_dir:
        raise ValueError("resume=true needs output_dir: the directory of the run to continue.")
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume=true and overwrite=true contradict each other: continue the run or replace it.")
    if cfg.selection != "random" and cfg.method not in ("paca", "qpaca"):
        raise ValueError(
            f"key 'selection' chooses PaCA's columns; method={cfg.method} has none (set method=paca or "
            "drop selection)."
        )
    if cfg.fsdp and cfg.deepspeed:
        raise ValueError("fsdp=true and deepspeed are alternatives; set one of them.")
