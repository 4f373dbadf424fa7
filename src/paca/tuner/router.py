"""The tuned MoE router: r input columns of a transformers router's ``weight`` (``num_experts x hidden``).

    W[:, idx] = W0[:, idx] + (paca_alpha / r) * D          logits = x W^T (+ b)

transformers 5's routers (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``, ``DeepseekV3TopkRouter``, ``GptOssTopKRouter``
...) are not ``nn.Linear``: each computes its logits with ``F.linear(x, self.weight)`` (often on an fp32 cast of
the weight) inside a forward that also takes the top-k. The layer runs that forward unchanged and swaps only the
logits product for :func:`paca.ops.partial_linear` (so backward keeps ``x[..., idx]``, as for a linear layer):
a torch function mode sees ``F.linear`` called on the router's weight, or on a ``.float()`` / ``.type()`` /
``.to()`` of it, for the length of the call. A router computing its logits otherwise is refused when the adapter
is created (a probe call must reach ``F.linear``), never silently left untuned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..ops import partial_linear
from .layer import SingleWeightLayer

_CASTS = (Tensor.float, Tensor.type, Tensor.to)


def is_router(module: nn.Module) -> bool:
    """A transformers MoE router: not a linear layer, a 2-D ``weight`` (one row per expert), "Router" in its name."""
    weight = module._parameters.get("weight")
    return (
        not isinstance(module, nn.Linear)
        and "router" in type(module).__name__.lower()
        and isinstance(weight, Tensor)
        and weight.dim() == 2
    )


class _TunedLogits(TorchFunctionMode):
    """For one router call: ``F.linear`` on the router's weight (or a cast of it) becomes the partial product."""

    def __init__(self, weight: Tensor, delta: Tensor, idx: Tensor, scale: float, column_writer):
        super().__init__()
        self.weight, self.applied = weight, (delta, idx, scale, column_writer)
        self.casts: list[Tensor] = []  # tensors that are the weight in another dtype
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CASTS and args and args[0] is self.weight:
            out = func(*args, **kwargs)
            self.casts.append(out)
            return out
        if func is F.linear and len(args) > 1 and (args[1] is self.weight or any(args[1] is c for c in self.casts)):
            self.hits += 1
            x = args[0]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            delta, idx, scale, column_writer = self.applied
            y = partial_linear(x, self.weight, None, delta, idx, scale, False, column_writer)
            return y if bias is None else y + bias.to(y.dtype)
        return func(*args, **kwargs)


class Router(SingleWeightLayer):
    """PaCA on a transformers MoE router: ``forward`` is the router's own, with its logits from the tuned weight."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, layer_name: str, r: int, paca_alpha: float, **kwargs
    ) -> None:
        super().__init__(base_layer, layer_name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, paca_alpha, **kwargs)
        self._check_reachable()

    def _partial_forward(self, x: Tensor, delta: Tensor, idx: Tensor, scale: float, *args, **kwargs):
        base = self._modules["base_layer"]
        mode = _TunedLogits(base.weight, delta, idx, scale, self._column_writer)
        with mode:
            out = base(x, *args, **kwargs)
        if mode.hits != 1:
            raise RuntimeError(
                f"module '{self.layer_name}': the router's forward computed its logits "
                f"{mode.hits} times through F.linear on its weight, expected once."
            )
        return out

    def forward(self, x: Tensor, *args, **kwargs):
        if "adapter_names" in kwargs:
            raise ValueError(
                f"module '{self.layer_name}': adapter_names (one adapter per batch row) cannot reach "
                "PaCA routers and experts, which see routed tokens; set_adapter() one adapter instead."
            )
        applied = self._applied_delta()
        if applied is None:
            return self._base_forward(x, *args, **kwargs)
        return self._partial_forward(x, *applied, *args, **kwargs)

    def _check_reachable(self) -> None:
        """Refuse a router whose forward does not compute its logits as ``F.linear`` on its weight."""
        base = self._modules["base_layer"]
        weight = base.weight
        if weight.device.type == "meta":
            return
        probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
        name = next(iter(self.paca_delta))
        delta, idx = self.paca_delta[name], self.paca_indices[name]
        mode = _TunedLogits(weight, delta.detach(), idx, self.scaling[name], None)
        try:
            with torch.no_grad(), mode:
                base(probe)
        except Exception as err:  # a router's own failure on a probe token: not tunable this way
            raise TypeError(
                f"PaCA cannot tune router '{self.layer_name}' ({type(base).__name__}): a probe call "
                f"failed ({type(err).__name__}: {err}); remove it from target_modules."
            ) from None
        if mode.hits != 1:
            raise TypeError(
                f"PaCA cannot tune router '{self.layer_name}' ({type(base).__name__}): its forward does "
                "not compute its logits as F.linear on its weight; remove it from target_modules."
            )
