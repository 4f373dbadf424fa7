"""Loading base models by hub id or local directory, with one clear error when that fails."""

from __future__ import annotations

import os

import torch
from torch import nn

_AUTO_CLASS_BY_TASK = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def auto_class(task_type: str | None, config=None):
    """The transformers class for a PEFT task type; without one, the architecture the model was saved with.

    A vision-language model (Qwen2-VL, LLaVA) tuned with ``task_type="CAUSAL_LM"``, as TRL's recipes do, has no
    causal-LM class: it is loaded as the architecture it was saved with (else as an image-text-to-text model),
    whose module names are the ones its adapter was trained on.
    """
    import transformers

    name = _AUTO_CLASS_BY_TASK.get(str(task_type or "").upper())
    saved = getattr(config, "architectures", None) if config is not None else None
    if name == "AutoModelForCausalLM" and config is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if getattr(config, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            name = saved[0] if saved and hasattr(transformers, saved[0]) else "AutoModelForImageTextToText"
    if name is None and saved:
        name = saved[0]
    return getattr(transformers, name or "AutoModel")


def load_model(
    name_or_path: str,
    task_type: str | None = "CAUSAL_LM",
    dtype: torch.dtype | None = None,
    empty: bool = False,
    **kwargs,
) -> nn.Module:
    """Load a pretrained model from a local directory or the hub cache.

    Args:
        name_or_path: local directory or hub id.
        task_type: PEFT task type choosing the Auto class (``CAUSAL_LM`` -> AutoModelForCausalLM); when
            None, the class recorded in the model's config (``architectures``).
        dtype: weights dtype (default: as stored).
        empty: build the architecture on the meta device from the config only (no weights read).

    Raises:
        FileNotFoundError: the model is neither a local directory nor a reachable hub id.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
        cls = auto_class(task_type, config)
        if empty:
            from accelerate import init_empty_weights

            with init_empty_weights():
                return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
        return cls.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except OSError as err:
        where = "local directory" if os.path.isdir(name_or_path) else "hub id (no local directory of that name)"
        raise FileNotFoundError(f"cannot load model '{name_or_path}' as a {where}: {err}") from None
