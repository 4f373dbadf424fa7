"""Model shapes to benchmark: Llama-shaped and MoE presets built from a config with random weights (no
download), or a local model directory / hub id.

The shapes of the 7B/8B/13B, Mixtral-8x7B and Qwen3-30B-A3B presets are those of the released checkpoints;
weights are random (seeded), which changes nothing about time or memory (an MoE router with random weights spreads
tokens over the experts about evenly, as a trained one is pushed to by its balancing loss).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BenchError

# LlamaConfig fields per preset; every preset is untied (separate embedding and output head) like Llama.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    "cpu": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=8000,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    # Mixture-of-experts shapes (fused experts: transformers 5's MixtralExperts / Qwen3MoeExperts).
    "moe-tiny": dict(
        architecture="mixtral",
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "moe-cpu": dict(
        architecture="mixtral",
        hidden_size=512,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8000,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "mixtral-8x7b": dict(
        architecture="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_theta=1e6,
    ),
    "qwen3-30b-a3b": dict(
        architecture="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        num_experts=128,
        num_experts_per_tok=8,
        rope_theta=1e6,
    ),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a preset name or a model directory / hub id, optionally cut to ``layers`` blocks."""

    name: str
    layers: int | None = None

    @property
    def is_preset(self) -> bool:
        return self.name in PRESETS

    def describe(self) -> dict:
        """The shape as recorded in the results (config fields that set time and memory)."""
        config = self.config()
        fields = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
        shape = {f: getattr(config, f, None) for f in fields}
        if experts_per_layer(config):
            shape.update(
                experts=experts_per_layer(config),
                experts_per_token=config.num_experts_per_tok,
                moe_intermediate_size=getattr(config, "moe_intermediate_size", config.intermediate_size),
            )
        return {
            "name": self.name,
            "source": "preset, random weights" if self.is_preset else "pretrained",
            "parameters": parameter_count(config),
            **shape,
        }

    def config(self):
        """The transformers config of this shape (raises BenchError if it cannot be made)."""
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers < 1):
            raise BenchError(f"--layers must be a positive integer, got {self.layers!r}.")
        overrides = {} if self.layers is None else {"num_hidden_layers": self.layers}
        if self.is_preset:
            import transformers

            fields = {**PRESETS[self.name], **overrides}
            architecture = fields.pop("architecture", "llama")
            check_llama_shape(self.name, fields)
            config_class = {
                "llama": transformers.LlamaConfig,
                "mixtral": transformers.MixtralConfig,
                "qwen3_moe": transformers.Qwen3MoeConfig,
            }[architecture]
            return config_class(max_position_embeddings=131072, tie_word_embeddings=False, use_cache=False, **fields)
        if not os.path.isdir(self.name) and ("/" not in self.name or self.name.startswith((".", "/"))):
            raise BenchError(
                f"unknown preset '{self.name}' and no model directory of that name; presets: "
                f"{', '.join(PRESETS)}; or give a local model directory or a hub id (org/name)."
            )
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.name, **overrides)
        except (OSError, ValueError) as err:
            raise BenchError(f"cannot read the config of model '{self.name}': {err}") from None
        config.use_cache = False
        return config


def check_llama_shape(name: str, fields: dict) -> None:
    """Raise BenchError when a Llama shape cannot be built (heads that do not divide the width...)."""
    hidden, heads, kv = fields["hidden_size"], fields["num_attention_heads"], fields["num_key_value_heads"]
    if hidden % heads:
        raise BenchError(f"preset '{name}': hidden_size {hidden} is not divisible by {heads} attention heads.")
    if heads % kv:
        raise BenchError(f"preset '{name}': {heads} attention heads are not a multiple of {kv} key/value heads.")


def experts_per_layer(config) -> int:
    """Routed experts per MoE layer of ``config`` (0 for a dense model)."""
    return getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0


def parameter_count(config) -> int | None:
    """Parameters of a Llama-like decoder, dense or with every MLP an MoE of experts and a router, from its config
    (None when the config lacks the fields)."""
    try:
        h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        heads, vocab = config.num_attention_heads, config.vocab_size
    except AttributeError:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
    experts = experts_per_layer(config)
    mlp = experts * (3 * h * getattr(config, "moe_intermediate_size", i) + h) if experts else 3 * h * i
    embeddings = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return embeddings + n * (attention + mlp + 2 * h) + h


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """The base causal LM of ``spec`` on ``device`` in ``dtype``, in train mode, every weight trainable.

    Raises:
        BenchError: the shape cannot be built, or its weights alone exceed the device's memory.
    """
    config = spec.config()
    count = parameter_count(config)
    weight_bytes = None if count is None else count * torch.finfo(dtype).bits // 8
    available = device_memory_bytes(device)
    if weight_bytes is not None and weight_bytes > available:
        raise BenchError(
            f"model '{spec.name}' ({config.num_hidden_layers} layers) needs {weight_bytes / 2**30:.1f} "
            f"GiB for its weights alone in {dtype}, more than the {available / 2**30:.1f} GiB of "
            f"{device}; shrink it with --layers N."
        )
    torch.manual_seed(seed)
    try:
        if spec.is_preset:
            from transformers import AutoModelForCausalLM

            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            from ..modeling import load_model

            model = load_model(spec.name, dtype=dtype, config=config).to(device)
    except torch.OutOfMemoryError:
        raise BenchError(
            f"out of memory building model '{spec.name}' on {device}; shrink it with --layers N."
        ) from None
    except (OSError, RuntimeError, ValueError) as err:
        raise BenchError(f"cannot build model '{spec.name}': {err}") from None
    model.config.use_cache = False
    return model.train()
