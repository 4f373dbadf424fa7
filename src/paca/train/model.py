"""The model to train: load the base (hub, local directory, built-in) and apply the method (PaCA, QPaCA, LoRA, DoRA,
full), choosing PaCA's columns by gradient where asked."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .builtin import BuiltinModel
from .config import TrainConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def load_tokenizer(name_or_path: str):
    """The tokenizer of ``name_or_path`` with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    if os.path.isdir(name_or_path) and not any(os.path.isfile(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model '{name_or_path}' has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer beside the weights (tokenizer.save_pretrained(DIR))."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load the tokenizer of model '{name_or_path}': {err}") from None
    if len(tokenizer) == 0:  # transformers may hand back an empty tokenizer: it would train on nothing
        raise ValueError(f"the tokenizer of model '{name_or_path}' has an empty vocabulary.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def use_chat_template(tokenizer, source: str):
    """``tokenizer`` rendering chats with the template of ``source`` (key chat_template): a Jinja file, or a model or
    tokenizer directory; ``tokenizer`` as it is for an empty ``source``."""
    if not source:
        return tokenizer
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            template = f.read()
    elif os.path.isdir(source):
        template = load_tokenizer(source).chat_template
        if not template:
            raise ValueError(f"chat_template '{source}': that tokenizer has no chat template.")
    else:
        raise FileNotFoundError(f"chat_template '{source}' not found: give a Jinja file or a tokenizer directory.")
    if not template.strip():
        raise ValueError(f"chat_template '{source}' is empty.")
    tokenizer.chat_template = template
    return tokenizer


def run_tokenizer(cfg: TrainConfig, builtin_models: Mapping[str, BuiltinModel]):
    """The tokenizer a run of ``cfg`` uses, with its chat_template choice; a built-in model's made without the
    model."""
    builtin = builtin_models.get(cfg.model)
    tokenizer = builtin.tokenizer() if builtin else load_tokenizer(cfg.model)
    return use_chat_template(tokenizer, cfg.chat_template)


def _check_model_exists(name: str) -> None:
    if os.path.isdir(name):
        return
    if name.startswith((".", os.sep, "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model '{name}' not found: no such directory (and not a hub id).")


def load_base(cfg: TrainConfig, builtin_models: Mapping[str, BuiltinModel]):
    """``(model, tokenizer, model_path)`` for ``cfg.model``; 4-bit NF4 weights for method=qpaca.

    ``model_path`` is where the weights came from: an absolute directory, a hub id, or the name of a built-in
    model made in memory.
    """
    builtin = builtin_models.get(cfg.model)
    if builtin is not None and builtin.build is not None:
        model = builtin.build(cfg.seed)
        return model, use_chat_template(builtin.tokenizer(), cfg.chat_template), cfg.model
    path = builtin.directory() if builtin is not None else cfg.model
    _check_model_exists(path)
    if os.path.isdir(path):
        # The adapter records where its base came from: an absolute path still finds it from another directory
        # (`paca export`, PeftModel.from_pretrained); a relative one only from where the run started.
        path = os.path.abspath(path)
    tokenizer = use_chat_template(load_tokenizer(path), cfg.chat_template)
    from ..modeling import load_model

    # Frozen weights may live in bf16; trained ones (full fine-tuning) stay fp32 under mixed precision.
    dtype = torch.bfloat16 if cfg.bf16 and cfg.method != "full" else torch.float32
    return load_model(path, "CAUSAL_LM", dtype=dtype, **_quantization_arguments(cfg)), tokenizer, path


def _quantization_arguments(cfg: TrainConfig) -> dict:
    """What ``load_model`` takes for 4-bit NF4 weights (method=qpaca): nothing for the other methods."""
    if cfg.method != "qpaca":
        return {}
    from transformers import BitsAndBytesConfig

    from ..tuner.quantized import import_bitsandbytes

    import_bitsandbytes(f"method=qpaca (model '{cfg.model}')")
    compute = torch.bfloat16 if cfg.bf16 else torch.float32
    kwargs = {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    }
    if not torch.cuda.is_available():
        kwargs["device_map"] = "cpu"
    return kwargs


def apply_method(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap ``model`` for ``cfg.method``: a PEFT model with the adapter, or the model itself for full FT."""
    import peft

    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    if cfg.method in ("paca", "qpaca"):
        import paca

        if cfg.method == "qpaca":
            # Gradient checkpointing is left to the Trainer (non-reentrant, from gradient_checkpointing=true): on
            # here it would also be on during selection=gradient's scoring pass.
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = paca.PacaConfig(
            r=cfg.r,
            paca_alpha=cfg.paca_alpha,
            target_modules=cfg.target_modules,
            random_seed=cfg.seed,
            selection=cfg.selection,
            task_type="CAUSAL_LM",
        )
    else:
        config = peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.paca_alpha,
            target_modules=cfg.target_modules,
            lora_dropout=0.0,
            use_dora=cfg.method == "dora",
            task_type="CAUSAL_LM",
        )
    with warnings.catch_warnings():
        # peft 0.21 still calls transformers' deprecated is_gradient_checkpointing: noise, not our concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (4-bit packed weights counted as stored)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def select_columns_by_gradient(model: nn.Module, examples: list[dict], collate, cfg: TrainConfig) -> int:
    """selection=gradient: score the first ``selection_steps`` global batches and set each layer's columns.

    A scoring step is one optimizer step's worth of examples (``batch_size x grad_accum x processes``, the
    first of the training set in file order), run as micro-batches of ``batch_size`` whose weight gradients
    add up before squaring, so the columns do not depend on how the global batch is split across
    processes or accumulation. Rank 0 scores and broadcasts the columns; the other processes wait.
    Returns the number of steps scored.
    """
    import torch.distributed as dist

    import paca

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    processes = dist.get_world_size() if distributed else 1
    per_step = cfg.grad_accum * processes
    micro = [
        examples[i : i + cfg.batch_size]
        for i in range(0, min(len(examples), cfg.selection_steps * per_step * cfg.batch_size), cfg.batch_size)
    ]
    steps = -(-len(micro) // per_step)
    if not distributed or dist.get_rank() == 0:
        paca.select_by_gradient(
            model, (collate(batch) for batch in micro), steps=cfg.selection_steps, accumulate=per_step
        )
    if distributed:
        from paca.tuner.layer import SingleWeightLayer  # experts keep their seeded columns: nothing to share

        # NCCL moves only CUDA tensors; gloo CPU ones.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        for layer in (m for m in model.modules() if isinstance(m, SingleWeightLayer)):
            for adapter, idx in list(layer.paca_indices.items()):
                shared = idx.to(device)
                dist.broadcast(shared, src=0)
                layer.set_indices(adapter, shared)
    return steps
