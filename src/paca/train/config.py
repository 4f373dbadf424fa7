"""The flat key schema of `paca train`: defaults, types, help; YAML files and key=value overrides.

Every key lives in one flat namespace (LLaMA-Factory / axolotl style) and belongs to a group that only
orders the help and the YAML comment headers. The defaults are for real runs; the built-in demo task (``data``
left at 'paca-demo') brings its own settings for the keys not given (:data:`DEMO_SETTINGS`): ``paca train``
with no arguments runs the demo, and ``paca train method=lora`` runs the same demo with LoRA.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

METHODS = ("paca", "qpaca", "lora", "dora", "full")
SELECTIONS = ("random", "weight_norm", "gradient", "structured")
GROUPS = ("model", "method", "data", "training", "output")
DEMO = "paca-demo"
DEMO_RANDOM = "paca-demo-random"

# Learning rates used when `lr` is not set. Real runs: the field's usual LoRA rate, the same for PaCA (whose
# paper trains at rates equal to or above LoRA's), a tenth of it for full fine-tuning; not tuned here (no real
# model runs on this project's machines). PaCA trains r columns whose values start at zero, so like LoRA it takes
# a larger step than full fine-tuning.
DEFAULT_LR = {"paca": 2e-4, "qpaca": 2e-4, "lora": 2e-4, "dora": 2e-4, "full": 2e-5}
# The demo task's, chosen on it (docs/TRAINING.md shows a sweep around them): a tiny model takes large steps.
DEMO_LR = {"paca": 2e-2, "qpaca": 2e-2, "lora": 1e-2, "dora": 1e-2, "full": 3e-3}
DEMO_DATA = ("paca-demo", "paca-demo-pretrain")  # the built-in tasks (paca.train.demo.TASKS)
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


# Names other tools (transformers, LLaMA-Factory, axolotl) use for our keys, so a hint can point across.
OTHER_NAMES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "lora_alpha": "paca_alpha",
    "lora_r": "r",
    "lora_rank": "r",
    "cutoff_len": "max_length",
    "sequence_len": "max_length",
    "max_seq_length": "max_length",
    "dataset": "data",
    "datasets": "data",
    "model_name_or_path": "model",
    "base_model": "model",
    "finetuning_type": "method",
    "lora_target": "target_modules",
    "val_size": "eval_split",
    "val_set_size": "eval_split",
    "resume_from_checkpoint": "resume",
    "lr_scheduler_type": "lr_scheduler",
    "overwrite_output_dir": "overwrite",
    "output": "output_dir",
}


# Keys of other tools with no counterpart here: what to do instead (a nearest-name guess would mislead).
NO_COUNTERPART = {
    "lora_dropout": "PaCA has no dropout: its delta is not a branch that could be dropped; remove it.",
    "load_in_8bit": "8-bit bases are not supported; method=qpaca trains on a 4-bit NF4 base.",
}


def _nearest_key_hint(name: str) -> str:
    if name in NO_COUNTERPART:
        return NO_COUNTERPART[name]
    close = difflib.get_close_matches(name, list(KEYS) + list(OTHER_NAMES), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{OTHER_NAMES.get(close[0], close[0])}'?"
    return "`paca train --help` lists the keys."


def _coerce(name: str, value: Any, where: str) -> Any:
    """``value`` (from YAML, or a string from the command line) as the type of key ``name``."""
    f = KEYS[name]
    default = f.default
    bad = f"{where}: key '{name}' "
    if name == "data" and isinstance(value, list):  # several datasets: kept as one comma-separated key
        if not value or not all(isinstance(v, str) and v.strip() and "," not in v for v in value):
            raise ValueError(f"{bad}expects a name or a list of names, got {value!r}.")
        return ",".join(_coerce(name, v.strip(), where) for v in value)
    if name == "data" and isinstance(value, str) and "," in value:
        return _coerce(name, value.split(","), where)
    if name == "target_modules":
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
            # PEFT reads a string as a regex over the full module name: one plain name means that layer kind.
            if len(items) == 1 and (items[0] == "all-linear" or any(c in items[0] for c in "*+?()[]|^$\\")):
                return items[0]
            return items
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ValueError(f"{bad}expects a string or a list of module names, got {value!r}.")
    if name == "eval_split":
        number = _number(value, float, bad)
        if number < 0 or (number >= 1 and number != int(number)):
            raise ValueError(f"{bad}expects a fraction in (0, 1) or a whole count, got {value!r}.")
        return int(number) if number >= 1 else number
    if name in OPTIONAL_NUMBERS and value in (None, "", "null", "none", "None"):
        return None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{bad}expects true or false, got {value!r}.")
    if isinstance(default, int):
        return _number(value, int, bad)
    if isinstance(default, float) or name in OPTIONAL_NUMBERS:
        return _number(value, float, bad)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise ValueError(f"{bad}expects a single value, got {value!r}.")
    value = str(value)
    if name in PATH_KEYS and value.startswith("~"):
        value = os.path.expanduser(value)  # as a shell would; transformers expands output_dir on its own copy
    if name in ("model", "data", "eval_data", "chat_template") and value and os.path.exists(value):
        # A local model or data file, recorded absolute (train_config.yaml, the adapter's base): a resume or an
        # export from another directory finds it, and it is the same source however it was named.
        value = os.path.abspath(value)
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ValueError(f"{bad}must be one of {', '.join(choices)}; got '{value}'.")
    return value


def _number(value: Any, kind: type, bad: str):
    if isinstance(value, bool):
        raise ValueError(f"{bad}expects a number, got {value!r}.")
    try:
        number = float(value) if isinstance(value, str) else value
        if not math.isfinite(number):
            raise ValueError
        if kind is int:
            if float(number) != int(float(number)):
                raise ValueError
            return int(float(number))
        return float(number)
    except (TypeError, ValueError):
        kind_name = "an integer" if kind is int else "a number"
        raise ValueError(f"{bad}expects {kind_name}, got {value!r}.") from None


def read_yaml(path: str) -> dict:
    """The keys of a flat YAML config file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file '{path}' not found.")
    with open(path) as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            raise ValueError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}.") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or any(isinstance(v, dict) for v in values.values()):
        raise ValueError(f"{path}: expected a flat mapping of key: value (no nesting); see examples/.")
    return values


def parse_overrides(args: list[str]) -> dict:
    """``key=value`` command-line items as a dict of strings (YAML-parsed lists allowed for target_modules)."""
    values = {}
    for item in args:
        if "=" not in item:
            raise ValueError(f"command line: '{item}' is not key=value (only one CONFIG.yaml may be given, first).")
        name, value = item.split("=", 1)
        name = name.strip().removeprefix("--").replace("-", "_")
        if value.strip().startswith("["):
            value = yaml.safe_load(value)
        values[name] = value
    return values


def dash_options_as_overrides(argv: list[str]) -> list[str]:
    """``--key value`` and ``--key=value`` (how transformers and axolotl users type them) as ``key=value``."""
    items, rest = [], list(argv)
    while rest:
        item = rest.pop(0)
        if item.startswith("--") and "=" not in item:
            if not rest or rest[0].startswith("--"):
                raise ValueError(f"command line: '{item}' needs a value ('{item} VALUE' or '{item[2:]}=VALUE').")
            item = f"{item}={rest.pop(0)}"
        items.append(item)
    return items


def load_config(argv: list[str]) -> TrainConfig:
    """Build the config from ``[CONFIG.yaml] [key=value ...]``: defaults, then the file, then the overrides.

    Raises:
        ValueError: an unknown key (naming the nearest valid one), a value of the wrong type or choice.
        FileNotFoundError: the config file does not exist.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    rest = dash_options_as_overrides(argv)
    if rest and "=" not in rest[0]:
        path = rest.pop(0)
        for name, value in read_yaml(path).items():
            values[name], sources[name] = value, path
    for name, value in parse_overrides(rest).items():
        values[name], sources[name] = value, "command line"
    config = {}
    for name, value in values.items():
        if name not in KEYS:
            raise ValueError(f"{sources[name]}: unknown key '{name}'; {_nearest_key_hint(name)}")
        config[name] = _coerce(name, value, sources[name])
    if config.get("data", DEMO) in DEMO_DATA:
        config = {**DEMO_SETTINGS, **config}
    cfg = TrainConfig(**config)
    check(cfg)
    # What the user set, as against defaults and the demo's settings (a resume takes the rest from the run).
    cfg.given = frozenset(values)
    return cfg


def resumed_config(cfg: TrainConfig, saved_path: str) -> TrainConfig:
    """The config of a resumed run: the saved run's ``train_config.yaml``, with the keys given now that a resume
    may change (:data:`RESUME_CHANGEABLE`).

    Raises:
        ValueError: a key given now differs from the saved run's and a resume cannot change it (all such keys
            named, with both values).
    """
    saved = {name: _coerce(name, value, saved_path) for name, value in read_yaml(saved_path).items() if name in KEYS}
    given = getattr(cfg, "given", frozenset())
    # A key the saved run does not list (it predates the key) had its default there.
    was = {name: saved.get(name, KEYS[name].default) for name in given if name in KEYS}
    differing = [
        name
        for name in sorted(was)
        if name not in RESUME_CHANGEABLE and not _same_value(name, getattr(cfg, name), was[name])
    ]
    if differing:
        changes = "; ".join(f"{name}: {was[name]!r} in the run, {getattr(cfg, name)!r} given" for name in differing)
        raise ValueError(
            f"resume=true continues the run in {os.path.dirname(saved_path)} as it was configured "
            f"({os.path.basename(saved_path)}); {changes}. A resume can change only "
            f"{', '.join(k for k in RESUME_CHANGEABLE if k not in ('resume', 'overwrite', 'output_dir'))}"
            "; start a new run (another output_dir, or "
            "overwrite=true) to change the rest."
        )
    resumed = TrainConfig(**{**saved, **{name: getattr(cfg, name) for name in given}})
    check(resumed)
    resumed.given = given
    return resumed


def _same_value(name: str, a, b) -> bool:
    if a == b:
        return True
    if name in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and a and b:
        return os.path.realpath(a) == os.path.realpath(b)  # the same file named from elsewhere
    return False


def check(cfg: TrainConfig) -> None:
    """Raise ValueError for values that are each valid but not meaningful (or not together)."""
    positive = ("r", "batch_size", "grad_accum", "max_length", "logging_steps", "selection_steps")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"key '{name}' must be positive, got {getattr(cfg, name)}.")
    for name in ("model", "data"):
        if not getattr(cfg, name).strip():
            raise ValueError(f"key '{name}' is empty; `paca train --help` says what it takes.")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"key 'warmup_ratio' is a fraction of the steps in [0, 1), got {cfg.warmup_ratio}.")
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
