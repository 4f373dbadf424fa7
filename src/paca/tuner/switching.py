"""Several PaCA adapters on one base: switching the merged one in place, and weighted combinations.

A PaCA adapter changes ``r`` columns per layer, so switching which one is merged costs ``O(d_out * r)``
per layer, with no arithmetic on the rest of the weight:

    unmerge old:  W[:, idx_old] = saved                           (the exact originals, kept at merge)
    merge new:    saved = W[:, idx_new];  W[:, idx_new] += s * D_new

LoRA's merge and unmerge each form the dense ``B A`` (``O(d_out * d_in * r)``) and rewrite the whole
weight. Without merging, ``set_adapter`` switches in ``O(1)``: every PaCA forward writes the active
adapter's columns anyway (the next one gives the previous adapter's columns back first, see
:mod:`paca.ops.columns`). On a 4-bit base the weight is never rewritten (see
:mod:`paca.tuner.quantized`), so both ways cost ``O(1)``.

A weighted combination of adapters is exact, overlapping columns or not:

    W - W0 = sum_a w_a s_a D_a E_a^T = D_new E_new^T,   idx_new = union_a idx_a,  s_new = 1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .experts import Experts
from .layer import PacaLayer, SingleWeightLayer


def _configs(model: nn.Module) -> dict:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError(f"expected a PeftModel or PacaModel with PaCA adapters, got {type(model).__name__}.")
    return configs


def switch_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter, merged into the base weights, in ``O(d_out * r)`` per layer.

    Every merged adapter is unmerged first (its columns restored bit for bit), then ``adapter_name``'s
    columns are written. Forwards afterwards run the plain base layers: no per-forward adapter cost.

    Args:
        model: a ``PeftModel`` (or its ``PacaModel``) with ``adapter_name`` loaded, e.g. by
            ``PeftModel.from_pretrained(base, dir_a, adapter_name="a")`` then ``model.load_adapter(dir_b, "b")``.
        adapter_name: the adapter to switch to.

    Raises:
        ValueError: ``adapter_name`` is not loaded.
    """
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"switch_adapter: adapter '{adapter_name}' is not loaded; loaded: {sorted(configs)}.")
    layers = [m for m in model.modules() if isinstance(m, PacaLayer)]
    for layer in layers:
        layer.unmerge()
    model.set_adapter(adapter_name)
    for layer in layers:
        if adapter_name in layer.paca_delta:
            layer.merge(adapter_names=[adapter_name])


def add_weighted_adapter(
    model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
) -> None:
    """Add adapter ``adapter_name`` equal to ``sum_a weights[a] * adapters[a]``, exactly.

    In each layer the new adapter tunes the union of the adapters' columns; columns several adapters
    tune receive the sum of their weighted, scaled deltas. Every layer gets the same ``r`` (the largest
    union; smaller unions are padded with the lowest free columns and a zero delta) and the scale is 1
    (``paca_alpha = r``), so the new adapter saves, loads and exports like any other. Biases and
    ``modules_to_save`` are not combined. The new adapter is not made active.

    Raises:
        ValueError: unknown or repeated adapters, a name already in use, weights of another length, a
            layer narrower than the union size, or adapters that tune fused experts.
    """
    configs = _configs(model)
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    _check_combination(model, configs, adapters, weights, adapter_name)
    layers = [
        m for m in model.modules() if isinstance(m, SingleWeightLayer) and any(a in m.paca_delta for a in adapters)
    ]
    unions = [
        torch.unique(torch.cat([m.paca_indices[a].cpu() for a in adapters if a in m.paca_delta])) for m in layers
    ]  # sorted
    r = max(u.numel() for u in unions)
    for layer in layers:
        if r > layer.in_features:
            raise ValueError(
                f"add_weighted_adapter: module '{layer.layer_name}' has {layer.in_features} input columns, "
                f"fewer than the combined adapter's r={r}."
            )
    for layer, union in zip(layers, unions):
        _add_combined(layer, union, r, adapters, weights, adapter_name)
    configs[adapter_name] = dataclasses.replace(
        configs[adapters[0]],
        r=r,
        paca_alpha=float(r),
        selection="random",
        target_modules={m.layer_name for m in layers},
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
    )


def _check_combination(model: nn.Module, configs: dict, adapters: list, weights: list, adapter_name: str) -> None:
    if not adapters or len(adapters) != len(weights):
        raise ValueError(
            f"add_weighted_adapter: {len(adapters)} adapters and {len(weights)} weights; pass one weight per adapter."
        )
    missing = [a for a in adapters if a not in configs]
    if missing or len(set(adapters)) != len(adapters):
        raise ValueError(
            f"add_weighted_adapter: adapters {adapters} must be distinct and loaded; loaded: {sorted(configs)}."
        )
    if adapter_name in configs:
        raise ValueError(f"add_weighted_adapter: an adapter named '{adapter_name}' already exists.")
    experts = next(
        (m.layer_name for m in model.modules() if isinstance(m, Experts) and any(a in m.paca_delta for a in adapters)),
        None,
    )
    if experts is not None:
        raise ValueError(
            f"add_weighted_adapter: the adapters tune fused experts ('{experts}'), whose per-expert "
            "column unions differ in size; weighted combinations cover linear and convolution layers "
            "only."
        )


def _add_combined(
    layer: SingleWeightLayer, union: torch.Tensor, r: int, adapters: list, weights: list, adapter_name: str
) -> None:
    """Add ``adapter_name`` to ``layer``: columns ``union`` padded to ``r``, delta the weighted scaled sum."""
    free = torch.ones(layer.in_features, dtype=torch.bool)
    free[union] = False
    idx = torch.cat([union, free.nonzero().flatten()[: r - union.numel()]]).sort().values  # (r,)
    combined = None
    for a, w in zip(adapters, weights):
        if a not in layer.paca_delta:
            continue
        delta = layer.paca_delta[a].detach().float()  # (d_out, r_a, ...)
        if combined is None:
            combined = delta.new_zeros(delta.shape[0], r, *delta.shape[2:])
        position = torch.searchsorted(idx.to(delta.device), layer.paca_indices[a])
        combined.index_add_(1, position, delta * (w * layer.scaling[a]))
    layer.update_layer(adapter_name, r=r, paca_alpha=float(r), indices=idx)
    with torch.no_grad():
        layer.paca_delta[adapter_name].copy_(combined)
