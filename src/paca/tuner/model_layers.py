"""The PaCA layers of a model, taken together: listing, restoring, removing, and weights tied to other modules."""

from __future__ import annotations

import collections

from peft.utils.other import _get_submodules
from torch import nn

from .layer import PacaLayer, SingleWeightLayer


def paca_layers(model: nn.Module) -> dict[str, PacaLayer]:
    """The PaCA layers of ``model`` by their name in the base model."""
    return {m.layer_name: m for m in model.modules() if isinstance(m, PacaLayer)}


def restore_base_weights(model: nn.Module) -> None:
    """Write the pretrained columns back into every PaCA layer's base weight, for code that reads the base
    weights directly (the next forward writes the tuned columns again). state_dict, disable_adapter, merge,
    unload, copies and ``.to()`` do this by themselves."""
    for layer in model.modules():
        if isinstance(layer, PacaLayer):
            layer.restore_base_weight()


def mark_shared_weights(model: nn.Module) -> None:
    """Make PaCA layers whose base weight another module also holds (tied embeddings and head) restore it after
    every call, so the tuned columns never reach the other module."""
    owners = collections.Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    for layer in model.modules():
        if isinstance(layer, SingleWeightLayer):
            layer._column_writer.transient = owners[id(layer.get_base_layer().weight)] > 1


def remove_adapter_layers(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every PaCA layer; a layer left without adapters gives back its base layer."""
    for key, module in list(model.named_modules()):
        if not isinstance(module, PacaLayer) or adapter_name not in module.paca_delta:
            continue
        if len(module.paca_delta) > 1:
            module.delete_adapter(adapter_name)
            continue
        if module.merged:
            module.unmerge()
        parent, _, target_name = _get_submodules(model, key)
        setattr(parent, target_name, module.release_base_layer())
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)


def restore_requires_grad(flags: dict) -> None:
    """Give parameters back the ``requires_grad`` flags recorded before an injection that failed."""
    for param, requires_grad in flags.items():
        param.requires_grad_(requires_grad)
