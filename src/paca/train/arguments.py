"""The Trainer's arguments for a `paca train` config: TRL's SFTConfig / DPOConfig, with the FSDP2, DeepSpeed and
accelerate settings a run's keys ask for."""

from __future__ import annotations

import os

import torch
from transformers import TrainingArguments

from .config import TrainConfig


def _deepspeed_config(choice: str):
    if not choice:
        return None
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ValueError(
            f"deepspeed={choice} needs the deepspeed package: pip install deepspeed "
            "(-c constraints.txt to keep torch)."
        ) from None
    if choice in ("zero2", "zero3"):
        return {
            "zero_optimization": {
                "stage": int(choice[-1]),
                "overlap_comm": True,
                "stage3_gather_16bit_weights_on_model_save": True,
            },
            "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
        }
    if not os.path.isfile(choice):
        raise FileNotFoundError(f"deepspeed config '{choice}' not found (give zero2, zero3 or a JSON file).")
    return choice


def _fsdp_config(model) -> dict:
    # FSDP2 shards each decoder block (its frozen weights and its PaCA deltas alike) and the root module.
    block_classes = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")})
    config = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
    if block_classes:
        config.update(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_layer_cls_to_wrap=block_classes)
    return config


def _cpu_only() -> bool:
    # accelerate runs several CPU processes (gloo) only when told the run is CPU-only.
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def _checkpointing_arguments(enabled: bool) -> dict:
    # transformers 5.23 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs), keeping the
    # old names as deprecated aliases; earlier releases know only the old names.
    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {
        f"{prefix}_checkpointing": enabled,
        f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None,
    }


def training_arguments(cfg: TrainConfig, model, evaluate: bool, evaluate_before: bool) -> TrainingArguments:
    """TRL's SFTConfig for ``cfg`` (TrainingArguments with TRL's batching keys); its DPOConfig for ``stage=dpo``."""
    kwargs = _training_kwargs(cfg, model, evaluate, evaluate_before)
    if cfg.stage != "dpo":
        from trl import SFTConfig

        # The examples arrive tokenised, learned tokens labelled (for any chat template, with or without
        # {% generation %} markers); TRL packs, pads and computes the loss through its fused LM head (no
        # (batch, length, vocab) logits).
        # Padding-free rows without packing are never cut by TRL (it refuses a max_length then): the examples
        # already are.
        max_length = None if cfg.padding_free and not cfg.packing else cfg.max_length
        # Evaluation stays one example per row: each process then scores the same count of examples (packed rows
        # differ per process, which breaks the gather under DDP) and exact match reads one example per row.
        return SFTConfig(
            **kwargs,
            max_length=max_length,
            packing=cfg.packing,
            padding_free=cfg.padding_free,
            eval_packing=False,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
        )
    from trl import DPOConfig

    # DPO batches hold prompt / chosen / rejected ids, not input_ids and labels: TRL tokenises, pads and counts.
    kwargs.update(include_num_input_tokens_seen="no", remove_unused_columns=False, label_names=None)
    return DPOConfig(
        **kwargs, beta=cfg.dpo_beta, max_length=cfg.max_length, router_aux_loss_coef=cfg.router_aux_loss_coef
    )


def _training_kwargs(cfg: TrainConfig, model, evaluate: bool, evaluate_before: bool) -> dict:
    return dict(
        output_dir=cfg.output_dir,
        seed=cfg.seed,
        data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps or cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        **_checkpointing_arguments(cfg.gradient_checkpointing),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,
        eval_strategy="steps" if evaluate and cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps or None,
        # Inside the training loop, once the model is wrapped: an evaluate() before train() would prepare the
        # model for evaluation only, and DDP would then train without synchronising gradients.
        eval_on_start=evaluate and evaluate_before,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit or None,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=[r.strip() for r in cfg.report_to.split(",") if r.strip()] or "none",  # tensorboard: output_dir/runs
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=_cpu_only(),
        fsdp=cfg.fsdp,
        fsdp_config=_fsdp_config(model) if cfg.fsdp else None,
        deepspeed=_deepspeed_config(cfg.deepspeed),
    )
