"""The merged export: the base model with the tuned columns merged in, as a plain transformers model directory."""

from __future__ import annotations

import torch

from ..adapter_file import read_adapter_config
from ..modeling import load_model
from .output import atomic_dir


def export_merged(adapter_dir: str, out_dir: str, base: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Write the base model with the tuned columns merged in, as a plain transformers model directory."""
    from peft import PeftModel  # paca's PaCA is registered with it: importing paca.export imported paca

    config = read_adapter_config(adapter_dir)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base model; pass --base.")
    model = load_model(base, config.get("task_type"), dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        _copy_tokenizer(base, tmp)
    return out_dir


def _copy_tokenizer(base: str, out_dir: str) -> None:
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    except (OSError, ValueError, TypeError):
        pass  # a model directory without a tokenizer (e.g. built from a config) exports weights only
