"""`paca train` wiring: TRL's SFTTrainer / DPOTrainer (on transformers' Trainer), with atomic checkpoints, a
NaN/Inf guard and the progress report.

TRL and the Trainer do the batching, the loss, the training loop, mixed precision, gradient accumulation,
DDP / FSDP2 / DeepSpeed (through accelerate), checkpoint contents and resumption; this module only configures
them and adds what they lack.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import rotate_checkpoints

from . import checkpoints, report
from .config import DEMO, DEMO_RANDOM, TrainConfig, resumed_config
from .data import TokenizedData, load_data, load_preferences, render_with_labels
from .methods import apply_method, count_parameters, load_base, select_columns_by_gradient
from .plot import plot_loss

MODEL_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "training_args.bin",
    "README.md",
)


class TrainingStopped(RuntimeError):
    """Training stopped before the end (the loss turned NaN/Inf); nothing saved earlier was touched."""


class _NotFinite(Exception):
    def __init__(self, what: str, step: int, value: float):
        super().__init__(f"{what} {value} at step {step}")
        self.what, self.step, self.value = what, step, value


class _PacaTrainerMixin:
    """What paca adds to a transformers Trainer (or a TRL trainer built on it): checkpoints published atomically,
    a stop on the first non-finite loss or gradient norm, FSDP2 on CPU processes."""

    _staging_root: str | None = None

    def __init__(self, *args, **kwargs):
        model = kwargs["model"] if "model" in kwargs else args[0]
        # TRL casts a 4-bit base's trainable parameters to bfloat16 (QLoRA's recipe), in SFT and DPO alike; paca
        # keeps the dtype its method chose (QPaCA's deltas: float32 in a float32 run), so no optimizer step is
        # rounded away.
        dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, **kwargs)
        for name, p in model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if (
            self.args.fsdp
            and getattr(state, "fsdp_plugin", None) is None
            and state.distributed_type == DistributedType.MULTI_CPU
        ):
            # accelerate switches FSDP on for accelerator back-ends only and silently trains CPU processes
            # (gloo) with DDP instead. FSDP2 itself runs there: enable the same FSDP2 path by hand.
            from accelerate import PartialState
            from accelerate.utils import FullyShardedDataParallelPlugin

            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            # Both shared states: each AcceleratorState() re-reads PartialState's distributed type.
            PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.is_fsdp_enabled and self.args.device.type == "cpu"):
            return super().save_model(output_dir, _internal_call)
        # FSDP2 on CPU: accelerate's full state dict (cpu_offload=True) returns views of the unsharded
        # parameters' storage, freed again at reshard, which the save then reads. Gather into fresh tensors.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        state_dict = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
        self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all().to(torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every process stops at the same micro-step
        if not bool(finite):
            # Raised after backward but before the optimizer step: the weights still hold the last good update.
            raise _NotFinite("loss", self.state.global_step + 1, float(loss.detach().float().mean()))
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # The norm over every process's gradients, before the optimizer step: a finite loss can still give
        # infinite gradients (an overflow in backward), which the step would write into the weights.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise _NotFinite("gradient norm", self.state.global_step + 1, float(grad_norm))
        return grad_norm

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, checkpoints.STAGING)
        if self.args.should_save:
            checkpoints.remove_staging(run_dir)
            os.makedirs(staging)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N (all processes, for FSDP)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.publish_directory(os.path.join(staging, name), os.path.join(run_dir, name))
            checkpoints.remove_staging(run_dir)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


@functools.cache
def sft_trainer_class():
    """TRL's SFTTrainer with paca's additions (``stage=sft``); imported on demand, like TRL's own CLI does."""
    from trl import SFTTrainer

    class PacaSFTTrainer(_PacaTrainerMixin, SFTTrainer):
        """TRL's SFTTrainer with paca's additions, and exact match measured from its fused LM head's outputs."""

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if prediction_loss_only:
                return super().prediction_step(model, inputs, True, ignore_keys)
            # TRL's loss runs the model once with its fused head, which already says per token whether the label
            # is the top prediction: keep that output (asking TRL for outputs would run a second, full-logits
            # forward).
            seen = []
            handle = model.register_forward_hook(lambda module, args, output: seen.append(output))
            try:
                loss, _, _ = super().prediction_step(model, inputs, True, ignore_keys)
            finally:
                handle.remove()
            verdicts = exact_match_verdicts(seen[-1].is_top1, seen[-1].label_mask, inputs.get("position_ids"))
            return loss, verdicts, verdicts

    return PacaSFTTrainer


def exact_match_verdicts(
    is_top1: torch.Tensor, label_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """``(examples, 2)``: whether each example's every learned token is the top prediction, and whether it has one.

    ``is_top1`` and ``label_mask`` are per next-token label, ``(rows, length - 1)``. A padding-free or packed row
    holds several examples, each starting where ``position_ids`` restarts at 0; otherwise a row is one example.
    """
    wrong = (label_mask.bool() & ~is_top1.bool()).long()
    if position_ids is None:
        return torch.stack([1 - wrong.amax(1), label_mask.long().amax(1)], dim=1)
    starts = (position_ids == 0).long()
    starts[:, 0] = 1  # a row always starts an example, whatever its first position id
    example = (starts.flatten().cumsum(0) - 1).view_as(starts)[:, 1:]  # example of each label (token t + 1)
    count = int(starts.sum())
    per_example = torch.zeros(2, count, dtype=torch.long, device=wrong.device)
    per_example[0].scatter_reduce_(0, example.flatten(), wrong.flatten(), "amax")
    per_example[1].scatter_reduce_(0, example.flatten(), label_mask.long().flatten(), "amax")
    return torch.stack([1 - per_example[0], per_example[1]], dim=1)


@functools.cache
def preference_trainer_class():
    """TRL's DPOTrainer with paca's additions (``stage=dpo``); imported on demand, like the SFTTrainer."""
    from trl import DPOTrainer

    class PacaDPOTrainer(_PacaTrainerMixin, DPOTrainer):
        """TRL's DPOTrainer with paca's additions: a PaCA model's reference is the model with its adapter disabled."""

    return PacaDPOTrainer


def exact_match(prediction) -> dict:
    """Fraction of examples whose every response token is the model's top prediction.

    Teacher-forced argmax over the response equals greedy decoding's output exactly (ties aside): greedy
    reproduces the response iff each next-token argmax along the true prefix is the true token. The predictions are
    :func:`exact_match_verdicts` rows.
    """
    verdicts = prediction.predictions
    correct, has_response = verdicts[:, 0] == 1, verdicts[:, 1] == 1
    return {"exact_match": float(correct[has_response].mean()) if has_response.any() else 0.0}


def default_output_dir(cfg: TrainConfig) -> str:
    model = os.path.basename(cfg.model.rstrip("/")) or "model"
    return os.path.join("runs", f"{model}-{cfg.method}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


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


def _collator(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    # The SFTTrainer's own: pads input_ids with the pad token, labels with -100 (ignored), builds the attention mask.
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)


def missing_training_libraries() -> list[str]:
    """What the installed libraries lack against paca's ``train`` extra (TRL, datasets and the floors `paca train`
    was tested at), one entry each (``'trl 1.9.0 (needs >=1.16)'``); when paca is not installed as a
    distribution (no floors recorded), only whether TRL and datasets are there."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requires = metadata.requires("paca") or []
    except metadata.PackageNotFoundError:  # run from a source tree: no floors recorded, but TRL must be there
        import importlib.util

        return [f"{name} (not installed)" for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    problems = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is None or not requirement.marker.evaluate({"extra": "train"}):
            continue  # the core (pip checked it) or another extra
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} (not installed)")
            continue
        if not requirement.specifier.contains(installed.split("+")[0], prereleases=True):
            problems.append(f"{requirement.name} {installed} (needs {requirement.specifier})")
    return problems


def _check_training_libraries() -> None:
    problems = missing_training_libraries()
    if problems:
        raise ImportError(
            f"paca train runs on the libraries of paca's 'train' extra: {', '.join(problems)}; "
            "pip install 'paca[train]' (axolotl 0.19 pins older ones: train there with the axolotl "
            "plugin instead)."
        )


def run(
    cfg: TrainConfig, callbacks: Iterable[TrainerCallback] = (), evaluate_before: bool = True, stream=None
) -> dict:
    """Train as ``cfg`` says; return the summary (also written to ``output_dir/summary.json``).

    Args:
        cfg: the run's configuration.
        callbacks: extra Trainer callbacks.
        evaluate_before: measure the held-out loss (and exact match) before training too.
        stream: where the progress lines go (stdout).

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad input, with what, where and what to do.
        TrainingStopped: the loss turned NaN or Inf; the last good checkpoint is kept.
    """
    _check_training_libraries()
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    dataset_bars = datasets_logging.is_progress_bar_enabled()
    if cfg.model in (DEMO, DEMO_RANDOM):
        # The demo's matmuls are tiny: a second thread gains ~15% when the cores are idle, but its
        # synchronisation costs up to 50x when another process keeps a core busy.
        torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # weight loading/saving bars would break the one-line-per-step output
    datasets_logging.disable_progress_bar()  # and so would TRL's dataset preparation bars
    try:
        return _run(cfg, callbacks, evaluate_before, stream or sys.stdout)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
        if dataset_bars:
            datasets_logging.enable_progress_bar()


def dry_run(cfg: TrainConfig, stream) -> dict:
    """Read and tokenise the data as a run would; print the data line and the first training example with its
    learned tokens marked. Loads the tokenizer only and writes nothing."""
    from .methods import run_tokenizer

    tokenizer = run_tokenizer(cfg, DEMO_RANDOM if cfg.model in (DEMO, DEMO_RANDOM) else cfg.model)
    if cfg.stage == "dpo":  # TRL tokenises the pairs: show the first one as it is handed over
        data = load_preferences(cfg.data, cfg.data_split, cfg.eval_split, cfg.seed, cfg.eval_data)
        print(data.report(cfg.max_length), file=stream)
        print(
            f"first training pair (prompt, chosen, rejected):\n{json.dumps(data.train[0], ensure_ascii=False)}",
            file=stream,
            flush=True,
        )
        return {"dry_run": True, "train_examples": len(data.train), "eval_examples": len(data.eval)}
    data = load_data(
        cfg.data,
        cfg.data_split,
        tokenizer,
        cfg.max_length,
        cfg.eval_split,
        cfg.seed,
        cfg.eval_data,
        cfg.train_on_prompt,
    )
    first = data.train[0]
    print(data.report(cfg.max_length), file=stream)
    print(f"first training example ({len(first['input_ids'])} tokens, learned in [[...]]):", file=stream)
    print(render_with_labels(first["input_ids"], first["labels"], tokenizer), file=stream, flush=True)
    return {"dry_run": True, "train_examples": len(data.train), "eval_examples": len(data.eval)}


def _run(cfg: TrainConfig, callbacks, evaluate_before: bool, stream) -> dict:
    if cfg.dry_run:
        return dry_run(cfg, stream)
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
    if resume_from and os.path.isfile(saved_config):  # before anything is loaded, cut or rewritten
        cfg = resumed_config(cfg, saved_config)

    set_seed(cfg.seed)
    model, tokenizer, model_path = load_base(cfg)
    if cfg.stage == "dpo":
        data = load_preferences(cfg.data, cfg.data_split, cfg.eval_split, cfg.seed, cfg.eval_data)
    else:
        data = load_data(
            cfg.data,
            cfg.data_split,
            tokenizer,
            cfg.max_length,
            cfg.eval_split,
            cfg.seed,
            cfg.eval_data,
            cfg.train_on_prompt,
        )
    model = apply_method(model, cfg)
    trainable, total = count_parameters(model)
    evaluate = bool(data.eval)
    # A resumed run measured "before" at its start (kept in metrics.jsonl); evaluating again would measure the
    # checkpoint instead.
    args = training_arguments(cfg, model, evaluate, evaluate_before and not resume_from)  # starts the process group
    scored = 0
    if cfg.selection == "gradient" and not resume_from:  # on resume, the checkpoint holds the chosen columns
        sharded = cfg.fsdp or bool(cfg.deepspeed)
        if args.device.type != "cpu":
            if sharded:
                raise ValueError(
                    "selection=gradient scores the whole model on one device before training, which "
                    "fsdp / deepspeed runs do not hold; use selection=random, weight_norm or "
                    "structured with them (the paper finds them as good), or train without sharding."
                )
            if next(model.parameters()).device.type == "cpu":  # a 4-bit base already sits (and must stay) there
                model.to(args.device)  # the Trainer would move it there next; scoring on the CPU would crawl
        scored = select_columns_by_gradient(model, data.train, _collator(tokenizer), cfg)

    import datasets

    progress = report.ProgressReport(os.path.join(cfg.output_dir, "metrics.jsonl"), is_main=False, stream=stream)
    splits = dict(
        train_dataset=datasets.Dataset.from_list(data.train),
        eval_dataset=datasets.Dataset.from_list(data.eval) if evaluate else None,
    )
    if cfg.stage == "dpo":  # TRL tokenises the pairs; the reference is the model with its adapter disabled
        trainer = preference_trainer_class()(
            model=model, args=args, processing_class=tokenizer, callbacks=[progress, *callbacks], **splits
        )
    else:
        trainer = sft_trainer_class()(
            model=model,
            args=args,
            processing_class=tokenizer,
            compute_metrics=exact_match,
            callbacks=[progress, *callbacks],
            **splits,
        )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    is_main = progress.is_main = trainer.is_world_process_zero()

    if is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        checkpoints.remove_staging(cfg.output_dir)
        if cfg.overwrite:
            checkpoints.set_aside_previous_run(cfg.output_dir, MODEL_FILES)
        if resume_from:
            report.truncate_metrics(progress.metrics_path, _checkpoint_step(resume_from))
        with open(os.path.join(cfg.output_dir, "train_config.yaml"), "w") as f:
            f.write(cfg.to_yaml())
        _print_header(cfg, model_path, data, trainable, total, trainer, resume_from, scored, stream)
    trainer.accelerator.wait_for_everyone()

    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except _NotFinite as err:
        kept = checkpoints.newest_checkpoint(cfg.output_dir)
        raise TrainingStopped(
            f"the {err.what} became {err.value} at step {err.step}: training stopped before that step's update, and "
            f"nothing more was saved. Last good checkpoint: {kept or 'none (no checkpoint was written yet)'}. "
            "Continue from it in full precision (resume=true bf16=false fp16=false), or start again with a lower "
            "lr (overwrite=true lr=...): a resume keeps the run's lr and schedule."
        ) from None
    # Training time proper: evaluations inside the loop (at start, every eval_steps) are not training.
    train_seconds = time.perf_counter() - started - sum(e.get("eval_runtime", 0.0) for e in progress.evaluations)
    eval_before = None
    if evaluate and evaluate_before:
        if resume_from:  # the interrupted run's step-0 evaluation, if it logged one
            eval_before = next(
                (row for row in report.read_metrics(progress.metrics_path) if row["step"] == 0 and "eval_loss" in row),
                None,
            )
        elif progress.evaluations:
            eval_before = progress.evaluations[0]
    # With eval_steps dividing the run, the loop has just evaluated the final weights: not again.
    steps = trainer.state.global_step
    evaluated_last = steps > 0 and progress.evaluation_steps[-1:] == [steps]
    eval_after = (progress.evaluations[-1] if evaluated_last else trainer.evaluate()) if evaluate else None

    saved = _save_final(trainer, cfg.output_dir)
    summary = None
    if is_main:
        checkpoints.discard_previous_run(cfg.output_dir)
        summary = _summary(
            cfg, trainer, train_seconds, data, eval_before, eval_after, saved, trainable, total, progress
        )
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        plot_loss(
            report.read_metrics(progress.metrics_path),
            os.path.join(cfg.output_dir, "loss.png"),
            f"{cfg.model} | {cfg.method} | {cfg.data}",
        )
        print(report.format_summary(summary), file=stream, flush=True)
    trainer.accelerator.wait_for_everyone()
    return summary


def _checkpoint_step(path: str) -> int:
    return int(checkpoints.CHECKPOINT.match(os.path.basename(path)).group(1))


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


def _print_header(
    cfg, model_path, data: TokenizedData, trainable, total, trainer, resume_from, scored, stream
) -> None:
    args = trainer.args
    processes = args.world_size
    global_batch = cfg.batch_size * cfg.grad_accum * processes
    where = f"{model_path}" if model_path != cfg.model else cfg.model
    chosen = ""
    if cfg.method in ("paca", "qpaca"):
        chosen = f" {cfg.selection} columns" + (f" (scored on {scored} global batches)" if scored else "")
    method = f"method {cfg.method}"
    if cfg.method != "full":
        method += f" r={cfg.r}{chosen} alpha={cfg.paca_alpha:g} on {cfg.target_modules}"
    lines = [
        f"model: {cfg.model}" + (f" ({where})" if where != cfg.model else "") + f" | {method} | trainable "
        f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)",
        data.report(cfg.max_length),
        f"training: global batch {global_batch} ({cfg.batch_size} x {cfg.grad_accum} accumulation x "
        f"{processes} process{'es' if processes > 1 else ''}{', FSDP2' if cfg.fsdp else ''}) | lr "
        f"{cfg.learning_rate:g} {cfg.lr_scheduler} | {args.device.type}"
        + (" | bf16" if cfg.bf16 else "")
        + f" | output {cfg.output_dir}",
    ]
    if cfg.model == DEMO:
        from . import demo

        stage1 = demo.base_summary().get("eval_after") or {}
        lines.insert(
            0,
            f"demo: the base knows {', '.join(demo.PRETRAIN_OPERATIONS)} (held-out exact match "
            f"{100 * stage1.get('eval_exact_match', 0):.1f}%); new task: chains of two, "
            + ", ".join(f"'{' '.join(chain)}'" for chain in demo.NEW_TASK),
        )
    if resume_from:
        lines.append(f"resuming from {resume_from}")
    print("\n".join(lines), file=stream, flush=True)


def _summary(cfg, trainer, train_seconds, data, eval_before, eval_after, saved, trainable, total, progress) -> dict:
    losses = [row["loss"] for row in report.read_metrics(progress.metrics_path) if "loss" in row]
    state = trainer.state
    return {
        "model": cfg.model,
        "method": cfg.method,
        "data": cfg.data,
        "output_dir": cfg.output_dir,
        "steps": state.global_step,
        "train_seconds": train_seconds,
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_s": (state.num_input_tokens_seen - progress.start_tokens) / max(train_seconds, 1e-9),
        "peak_memory_bytes": report.peak_memory_bytes(),
        "peak_memory_kind": report.memory_kind(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "optimizer_state_bytes": _optimizer_state_bytes(trainer.optimizer),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "truncated": data.truncated,
        "dropped": len(data.dropped),
        "eval_before": _eval_fields(eval_before),
        "eval_after": _eval_fields(eval_after),
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
