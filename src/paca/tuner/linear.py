"""PaCA on nn.Linear and GPT-2's Conv1D: ``x -> x W^T + b`` with ``W[:, idx] = W0[:, idx] + (alpha / r) D``.

GPT-2's Conv1D stores its weight ``(d_in, d_out)``: its columns are the weight's rows (``column_axis`` 0). The
operator: :func:`paca.ops.partial_linear`.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import partial_linear
from .layer import SingleWeightLayer


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2-style transformers Conv1D: a linear layer whose weight is stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class Linear(SingleWeightLayer):
    """PaCA on nn.Linear (``W`` is ``d_out x d_in``) or GPT-2 Conv1D (``W`` stored ``d_in x d_out``).

    ``x -> x W^T + b`` with ``W[:, idx] = W0[:, idx] + (alpha / r) D``; inputs of any leading shape.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, layer_name: str, r: int, paca_alpha: float, **kwargs
    ) -> None:
        transposed = is_conv1d(base_layer)
        super().__init__(base_layer, layer_name, column_axis=0 if transposed else 1)
        self.is_transposed = transposed
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, paca_alpha, **kwargs)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        # The training step's call, once per layer per step, in as few Python operations as it takes: one active
        # adapter, enabled and not merged. Anything else (a mixed batch, extra arguments) takes the general path.
        if args or kwargs or self._disable_adapters or self.merged_adapters:
            return super().forward(x, *args, **kwargs)
        active = self._active_adapter
        name = active if isinstance(active, str) else active[0] if len(active) == 1 else None
        delta = None if name is None else self._modules["paca_delta"]._parameters.get(name)
        if delta is None:  # several adapters combine, or this layer has none of the active one
            return super().forward(x)
        base = self._modules["base_layer"]
        x = self._autocast_input(x)
        return partial_linear(
            x,
            base.weight,
            base.bias,
            delta,
            self._modules["paca_indices"]._buffers[name],
            self.scaling[name],
            self.is_transposed,
            self._column_writer,
        )

    def _partial_forward(self, x: Tensor, delta: Tensor, idx: Tensor, scale: float) -> Tensor:
        base = self._modules["base_layer"]
        return partial_linear(
            self._autocast_input(x), base.weight, base.bias, delta, idx, scale, self.is_transposed, self._column_writer
        )
