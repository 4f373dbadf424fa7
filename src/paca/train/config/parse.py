"""Reading a `paca train` config: the YAML file, key=value overrides, each value coerced to its key's type, and the
config of a resumed run.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any

import yaml

from .checks import check
from .schema import DEMO, DEMO_DATA, DEMO_SETTINGS, KEYS, OPTIONAL_NUMBERS, PATH_KEYS, RESUME_CHANGEABLE, TrainConfig

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
    default = KEYS[name].default
    bad = f"{where}: key '{name}' "
    if name == "data" and isinstance(value, list):  # several datasets: kept as one comma-separated key
        if not value or not all(isinstance(v, str) and v.strip() and "," not in v for v in value):
            raise ValueError(f"{bad}expects a name or a list of names, got {value!r}.")
        return ",".join(_coerce(name, v.strip(), where) for v in value)
    if name == "data" and isinstance(value, str) and "," in value:
        return _coerce(name, value.split(","), where)
    if name == "target_modules":
        return _target_modules(value, bad)
    if name == "eval_split":
        number = _number(value, float, bad)
        if number < 0 or (number >= 1 and number != int(number)):
            raise ValueError(f"{bad}expects a fraction in (0, 1) or a whole count, got {value!r}.")
        return int(number) if number >= 1 else number
    if name in OPTIONAL_NUMBERS and value in (None, "", "null", "none", "None"):
        return None
    if isinstance(default, bool):
        return _boolean(value, bad)
    if isinstance(default, int):
        return _number(value, int, bad)
    if isinstance(default, float) or name in OPTIONAL_NUMBERS:
        return _number(value, float, bad)
    return _text(name, value, bad)


def _target_modules(value: Any, bad: str) -> str | list:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        # PEFT reads a string as a regex over the full module name: one plain name means that layer kind.
        if len(items) == 1 and (items[0] == "all-linear" or any(c in items[0] for c in "*+?()[]|^$\\")):
            return items[0]
        return items
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"{bad}expects a string or a list of module names, got {value!r}.")


def _boolean(value: Any, bad: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{bad}expects true or false, got {value!r}.")


def _text(name: str, value: Any, bad: str) -> str:
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
    choices = KEYS[name].metadata["choices"]
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
