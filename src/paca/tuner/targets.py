"""What the tuner can tune: the PaCA layer class for each module type, and how targets are resolved.

``all-linear`` resolves as PEFT resolves it (every linear layer but the output head), plus every transformers
experts module and MoE router (PEFT's LoRA reaches those through ``target_parameters``).
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from .config import PacaConfig
from .conv import Conv
from .experts import Experts, expert_projections
from .layer import PacaLayer
from .linear import Linear, is_conv1d
from .quantized import Linear4bit, is_bnb_4bit
from .router import Router, is_router

SUPPORTED_TYPES = (
    "nn.Linear, transformers Conv1D, nn.Conv1d / Conv2d / Conv3d (grouped too), bitsandbytes "
    "Linear4bit (NF4/FP4), transformers fused MoE experts and routers"
)

# Mamba's mixer hands these weights to its fused CUDA kernel (mamba_inner_fn) rather than calling the modules.
MAMBA_DIRECT_WEIGHTS = frozenset({"x_proj", "dt_proj", "out_proj"})


def layer_class(base: nn.Module) -> type[PacaLayer] | None:
    """The PaCA layer type that tunes ``base``, or None when PaCA cannot tune it."""
    if is_bnb_4bit(base):  # before nn.Linear: bitsandbytes' linear layers subclass it
        return Linear4bit
    if type(base).__module__.startswith("bitsandbytes"):
        return None  # 8-bit and other bitsandbytes layers: not supported
    if isinstance(base, nn.Linear) or is_conv1d(base):
        return Linear
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Conv
    if expert_projections(base):
        return Experts
    if is_router(base):
        return Router
    return None


def input_dim(module: nn.Module) -> int | None:
    """d_in of a layer PaCA can tune (None for other modules: they are refused by type later)."""
    if isinstance(module, PacaLayer) or is_bnb_4bit(module):
        return module.in_features
    if is_router(module):
        return module.weight.shape[1]
    if expert_projections(module):
        return min(getattr(module, p).shape[1 if module.is_transposed else 2] for p in expert_projections(module))
    if is_conv1d(module):
        return module.weight.shape[0]
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.weight.shape[1]  # a grouped convolution: channels per group
    return None


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module, wrapped by PaCA or not."""
    return isinstance(module, Experts) or bool(expert_projections(module))


def fused_expert_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s own 3-D parameters: the fused experts of transformers 5's MoE blocks (one
    ``(num_experts, out, in)`` tensor per projection, e.g. gate_up_proj and down_proj)."""
    if type(module).__module__.startswith("torch.nn"):  # a Conv1d's weight is 3-D too
        return []
    return [name for name, p in module._parameters.items() if p is not None and p.dim() == 3]


def frozen_experts(model: nn.Module) -> list[str]:
    """Modules holding fused experts that no PaCA experts layer wraps."""
    wrapped = {id(m.get_base_layer()) for m in model.modules() if isinstance(m, Experts)}
    return [name for name, m in model.named_modules() if fused_expert_parameters(m) and id(m) not in wrapped]


def unsupported_error(target: nn.Module, layer_name: str) -> TypeError:
    """Why PaCA cannot tune ``target``, named, with what to do."""
    if fused_expert_parameters(target):
        return TypeError(
            f"PaCA cannot tune module '{layer_name}' ({type(target).__name__}): its experts are fused "
            f"3-D parameters ({', '.join(fused_expert_parameters(target))}) outside transformers' "
            "experts interface (@use_experts_implementation), whose forward PaCA replaces; remove it "
            "from target_modules (its attention and dense layers can be tuned)."
        )
    return TypeError(
        f"Target module '{layer_name}' of type {type(target).__module__}."
        f"{type(target).__qualname__} is not supported by PaCA; supported types: {SUPPORTED_TYPES}. "
        "Remove it from target_modules or add it to exclude_modules."
    )


def resolve_all_linear(config: PacaConfig, model: nn.Module) -> bool:
    """Resolve ``target_modules="all-linear"`` in ``config`` (see the module's docstring); whether it was."""
    target = config.target_modules
    if not (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return False
    _maybe_include_all_linear_layers(config, model)
    config.target_modules = set(config.target_modules) | {
        name for name, m in model.named_modules() if expert_projections(m) or is_router(m)
    }
    return True


def given_columns(config: PacaConfig, module_key: str) -> torch.Tensor | None:
    """The sorted columns ``config.paca_indices_pattern`` gives the module ``module_key`` (as PEFT matches the
    pattern: its keys are names or regexes), or None."""
    from peft.utils.other import get_pattern_key

    pattern = config.paca_indices_pattern or {}
    if not pattern:
        return None
    key = get_pattern_key(pattern.keys(), module_key)
    if key not in pattern:
        return None
    return torch.tensor(sorted(pattern[key]), dtype=torch.int64)
