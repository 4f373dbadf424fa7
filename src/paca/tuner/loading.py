"""Checks that an adapter's saved tensors fit the model before they are loaded: shapes, dtypes, columns, values.

Each failure is a ValueError naming the module and what to do; the tuner undoes the injection before raising.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import selection
from .experts import Experts
from .layer import SingleWeightLayer


def check_state_dict_fits(model: nn.Module, adapter_name: str, state_dict: dict) -> None:
    """Raise ValueError, naming the module, if a PaCA entry of ``state_dict`` does not fit ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Experts) and adapter_name in module.paca_delta:
            _check_experts_state_dict_fits(name, module, adapter_name, state_dict)
        if not isinstance(module, SingleWeightLayer) or adapter_name not in module.paca_delta:
            continue
        layer = module.layer_name
        delta = state_dict.get(f"{name}.paca_delta.{adapter_name}")
        idx = state_dict.get(f"{name}.paca_indices.{adapter_name}")
        if delta is None and idx is None:
            continue
        if delta is None or idx is None:
            missing = "paca_delta" if delta is None else "paca_indices"
            raise ValueError(f"module '{layer}': the adapter has no {missing} for this layer.")
        expected = module.delta_shape(module.r[adapter_name])
        if tuple(delta.shape) != expected:
            raise ValueError(
                f"module '{layer}': paca_delta has shape {tuple(delta.shape)} but this model needs "
                f"{expected} (r={module.r[adapter_name]}); was the adapter trained on another model?"
            )
        if not delta.dtype.is_floating_point:
            raise ValueError(f"module '{layer}': paca_delta has dtype {delta.dtype}, expected a float dtype.")
        selection.check_indices(idx, module.in_features, module.r[adapter_name], f"module '{layer}'")
        if not torch.isfinite(delta).all():
            raise ValueError(f"module '{layer}': paca_delta holds NaN or Inf values.")


def _check_experts_state_dict_fits(name: str, module: Experts, adapter_name: str, state_dict: dict) -> None:
    for projection, own in module.paca_delta[adapter_name].items():
        where = f"module '{module.layer_name}' ({projection})"
        delta = state_dict.get(f"{name}.paca_delta.{adapter_name}.{projection}")
        idx = state_dict.get(f"{name}.paca_indices.{adapter_name}.{projection}")
        if delta is None and idx is None:
            continue
        if delta is None or idx is None:
            raise ValueError(f"{where}: the adapter has no {'paca_delta' if delta is None else 'paca_indices'} here.")
        if tuple(delta.shape) != tuple(own.shape):
            raise ValueError(
                f"{where}: paca_delta has shape {tuple(delta.shape)} but this model needs "
                f"{tuple(own.shape)}; was the adapter trained on another model?"
            )
        selection.check_expert_indices(idx, own.shape[0], module.input_dim(projection), own.shape[2], where)
        if not torch.isfinite(delta).all():
            raise ValueError(f"{where}: paca_delta holds NaN or Inf values.")
