"""The flat key schema of `paca train`: every key with its default, type, group and help.

Every key lives in one flat namespace (LLaMA-Factory / axolotl style) and belongs to a group that only
orders the help and the YAML comment headers. The defaults are for real runs; the built-in demo task (``data``
left at 'paca-demo') brings its own settings for the keys not given (:data:`DEMO_SETTINGS`): ``paca train``
with no arguments runs the demo, and ``paca train method=lora`` runs the same demo with LoRA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

METHODS = ("paca", "qpaca", "lora", "dora", "full")
SELECTIONS = ("random", "weight_norm", "gradient", "structured")
GROUPS = ("model", "method", "data", "training", "output")
# The names of the built-in demo's models and tasks (paca.train.demo provides them).
DEMO = "paca-demo"
DEMO_RANDOM = "paca-demo-random"
DEMO_PRETRAIN = "paca-demo-pretrain"

# Learning rates used when `lr` is not set. Real runs: the field's usual LoRA rate, the same for PaCA (whose
# paper trains at rates equal to or above LoRA's), a tenth of it for full fine-tuning; not tuned here (no real
# model runs on this project's machines). PaCA trains r columns whose values start at zero, so like LoRA it takes
# a larger step than full fine-tuning.
DEFAULT_LR = {"paca": 2e-4, "qpaca": 2e-4, "lora": 2e-4, "dora": 2e-4, "full": 2e-5}
# The demo task's, chosen on it (docs/TRAINING.md shows a sweep around them): a tiny model takes large steps.
DEMO_LR = {"paca": 2e-2, "qpaca": 2e-2, "lora": 1e-2, "dora": 1e-2, "full": 3e-3}
DEMO_DATA = (DEMO, DEMO_PRETRAIN)  # the built-in tasks
# What the demo task sets for the keys a run does not give (its YAML, examples/demo.yaml, spells them out).
DEMO_SETTINGS = {"max_length": 64, "eval_split": 256, "batch_size": 32, "grad_accum": 1, "epochs": 1.0}


def key(default: Any, group: str, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"group": group, "help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every option of `paca train`. Build with :func:`load_config`; each field is one YAML key."""

    # -- model
    model: str = key(
        DEMO,
        "model",
        "Hub id or local directory of the base model; 'paca-demo' is the built-in "
        "base (built on first use, cached), 'paca-demo-random' the same model randomly initialised.",
    )
    # -- method
    stage: str = key(
        "sft",
        "method",
        "What is learned: sft (supervised: the responses of the data) or dpo "
        "(preference pairs: chosen over rejected, through TRL's DPOTrainer; the reference is the base "
        "model, i.e. the adapter disabled).",
        ("sft", "dpo"),
    )
    dpo_beta: float = key(
        0.1, "method", "DPO's beta: how far the tuned model may move from the reference (stage=dpo)."
    )
    method: str = key(
        "paca", "method", "How to fine-tune: paca, qpaca (PaCA on a 4-bit NF4 base), lora, dora, full.", METHODS
    )
    r: int = key(8, "method", "Tuned input columns per layer (PaCA), or rank (LoRA/DoRA).")
    paca_alpha: float = key(
        16.0,
        "method",
        "Scale numerator: updates are applied as (paca_alpha / r) * delta; also lora_alpha for method=lora/dora.",
    )
    target_modules: str | list = key(
        "all-linear",
        "method",
        "Layers to tune: 'all-linear', a list of module names (YAML list or comma-separated), or a regex.",
    )
    selection: str = key(
        "random",
        "method",
        "Which columns PaCA tunes: random (seeded), weight_norm (largest "
        "column norms), gradient (largest squared weight gradients summed over the first "
        "selection_steps global batches, before training), structured (whole heads / channels, "
        "S2FT-style).",
        SELECTIONS,
    )
    selection_steps: int = key(
        100,
        "method",
        "Global batches (optimizer steps' worth of training data) scored by selection=gradient (the paper: 100).",
    )
    # -- data
    data: str = key(
        DEMO,
        "data",
        "A JSONL or JSON array file (chat 'messages' with tools, ShareGPT "
        "'conversations', Alpaca, prompt/response, TRL prompt/completion or text), a directory written "
        "by datasets.save_to_disk, a hub dataset name, or 'paca-demo' (the built-in task); several, "
        "comma-separated (or a YAML list), are concatenated.",
    )
    data_split: str = key("train", "data", "Split to read from a hub or saved dataset.")
    max_length: int = key(2048, "data", "Tokens per example; longer examples are truncated (and counted).")
    eval_data: str = key(
        "",
        "data",
        "Evaluation examples: a file or dataset read like data, or a split of data "
        "(e.g. validation); unset: data's 'validation' split if it is a saved DatasetDict with one, "
        "else eval_split of data held out.",
    )
    eval_split: float = key(
        0.05, "data", "Held-out examples for evaluation: a fraction in (0, 1) or a count; 0 disables evaluation."
    )
    train_on_prompt: bool = key(
        False,
        "data",
        "Learn every token, prompts and user turns too (LLaMA-Factory's "
        "train_on_prompt, axolotl's train_on_inputs); false: only the assistant's turns and "
        "completions (TRL's assistant_only_loss / completion_only_loss).",
    )
    chat_template: str = key(
        "",
        "data",
        "Chat template to render the conversations with: a Jinja file, or a model "
        "or tokenizer directory whose template to take; unset: the model's own. Saved with the "
        "tokenizer.",
    )
    packing: bool = key(
        False,
        "data",
        "Pack several examples into each max_length row (TRL's best-fit packing; "
        "each example still attends only to itself): fewer, fuller rows.",
    )
    padding_free: bool = key(
        False,
        "data",
        "Concatenate each batch's examples into one row with no padding "
        "(TRL's padding-free batches; each example attends only to itself).",
    )
    # -- training
    batch_size: int = key(
        8, "training", "Examples per device per micro-step; the global batch is batch_size x grad_accum x processes."
    )
    grad_accum: int = key(1, "training", "Micro-steps accumulated per optimizer step.")
    lr: float | None = key(
        None,
        "training",
        "Peak learning rate; unset: the method's default "
        + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items())
        + " (on the demo task: "
        + ", ".join(f"{m} {v:g}" for m, v in DEMO_LR.items())
        + ").",
    )
    lr_scheduler: str = key(
        "linear", "training", "Learning-rate schedule after warmup.", ("linear", "cosine", "constant")
    )
    warmup_ratio: float = key(0.05, "training", "Fraction of the steps spent warming the learning rate up.")
    warmup_steps: int = key(
        0, "training", "Optimizer steps spent warming the learning rate up (> 0: instead of warmup_ratio)."
    )
    optim: str = key(
        "adamw_torch_fused",
        "training",
        "Optimizer, by transformers' name (its default: "
        "adamw_torch_fused), adamw_torch, adamw_8bit / paged_adamw_8bit (bitsandbytes), sgd, adafactor...",
    )
    weight_decay: float = key(0.0, "training", "AdamW weight decay.")
    max_grad_norm: float = key(1.0, "training", "Gradient clipping norm (0: no clipping).")
    epochs: float = key(1.0, "training", "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = key(-1, "training", "Optimizer steps to run; -1: as many as epochs gives.")
    bf16: bool = key(False, "training", "bfloat16 mixed precision.")
    fp16: bool = key(False, "training", "float16 mixed precision (with loss scaling), for GPUs without bfloat16.")
    gradient_checkpointing: bool = key(False, "training", "Recompute activations in backward to save memory.")
    router_aux_loss_coef: float | None = key(
        None,
        "training",
        "Weight of a mixture-of-experts model's "
        "load-balancing loss (added by TRL's SFTTrainer); unset: the model "
        "config's own, 0: none.",
    )
    seed: int = key(0, "training", "Seed of data order, initialisation and PaCA column choice.")
    logging_steps: int = key(10, "training", "Optimizer steps between progress lines (and metrics.jsonl rows).")
    eval_steps: int = key(0, "training", "Optimizer steps between evaluations; 0: only before and after.")
    fsdp: bool = key(
        False,
        "training",
        "Shard weights, gradients and optimizer state with FSDP2 (under torchrun / accelerate launch).",
    )
    deepspeed: str = key(
        "",
        "training",
        "DeepSpeed ZeRO: 'zero2', 'zero3' or a path to a DeepSpeed JSON config (needs the deepspeed package).",
    )
    # -- output
    output_dir: str = key(
        "", "output", "Where the run writes; empty: runs/<model>-<method>-<date>-<time>, a new directory."
    )
    save_steps: int = key(50, "output", "Optimizer steps between checkpoints (0: none; resume needs them).")
    save_total_limit: int = key(2, "output", "Checkpoints kept (the oldest are deleted; 0: keep all).")
    report_to: str = key(
        "none",
        "output",
        "Where the Trainer also logs: none, tensorboard (output_dir/runs), "
        "wandb, ... (comma-separated; metrics.jsonl and loss.png are always written).",
    )
    resume: bool = key(False, "output", "Continue from the newest complete checkpoint in output_dir.")
    dry_run: bool = key(
        False,
        "output",
        "Read and tokenise the data, print the first training example with its "
        "learned tokens in [[...]], and stop: no model is loaded, nothing is written.",
    )
    overwrite: bool = key(
        False,
        "output",
        "Allow an output_dir that holds another run: its checkpoints, adapter "
        "and metrics are deleted once the new run's model and data have loaded.",
    )

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return (DEMO_LR if self.data in DEMO_DATA else DEFAULT_LR)[self.method]

    def to_yaml(self) -> str:
        """The config as the flat YAML `paca train` reads, keys under their group headers."""
        values = asdict(self)
        lines = []
        for group in GROUPS:
            lines.append(f"# {group}")
            for f in fields(self):
                if f.metadata["group"] == group:
                    lines.append(
                        yaml.safe_dump({f.name: values[f.name]}, default_flow_style=True, width=10_000)
                        .strip()
                        .removeprefix("{")
                        .removesuffix("}")
                    )
            lines.append("")
        return "\n".join(lines)


KEYS = {f.name: f for f in fields(TrainConfig)}

# What a resume may change: how long the run goes on, what it logs and saves, and trades of memory for time. Every
# other key fixes the model, the data or the optimisation path (lr and its schedule live in the checkpoint) and
# comes from the run being resumed.
RESUME_CHANGEABLE = (
    "epochs",
    "max_steps",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "report_to",
    "gradient_checkpointing",
    "padding_free",
    "bf16",
    "fp16",
    "resume",
    "overwrite",
    "output_dir",
)
PATH_KEYS = ("model", "data", "eval_data", "output_dir", "deepspeed", "chat_template")
OPTIONAL_NUMBERS = ("lr", "router_aux_loss_coef")  # unset (None) means "the default of the method / the model"


def usage() -> str:
    """`paca train --help`: every key with its default and help, by group."""
    lines = [
        "usage: paca train [CONFIG.yaml] [key=value ...]",
        "",
        "Without a config file or keys: the built-in demo (a tiny model learns a new string task with PaCA).",
        "Keys set on the command line override the file. Launch with torchrun or accelerate launch for "
        "several processes.",
    ]
    for group in GROUPS:
        lines += ["", f"{group}:"]
        for f in fields(TrainConfig):
            if f.metadata["group"] == group:
                default = "unset" if f.default in (None, "") else repr(f.default)
                lines.append(f"  {f.name:<24}{f.metadata['help']} [default: {default}]")
    return "\n".join(lines)
