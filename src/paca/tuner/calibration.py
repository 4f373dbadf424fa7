"""Gradient column selection: a calibration pass that scores every input column of every PaCA layer.

    score_j = sum_{steps} sum_i (dL/dW_ij)^2,    idx = sorted(argtop_r score)

Forward hooks on the layers put a gradient hook on each output; in backward it forms ``dL/dW`` from the layer's
input and output gradient, in float32, and adds its column scores (:func:`paca.selection.column_scores`). Only
the deltas are asked for gradients (``backward(inputs=...)``), so no other parameter's ``.grad`` changes.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .. import selection
from ..ops.conv import conv_weight_grad
from .experts import Experts
from .layer import PacaLayer, SingleWeightLayer
from .router import Router


def select_by_gradient(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    steps: int = 100,
    adapter_name: str | None = None,
    accumulate: int = 1,
) -> dict[str, Tensor]:
    """Set each PaCA layer's columns to the ``r`` with the largest accumulated squared gradient.

        score_j = sum_{steps} sum_i (dL/dW_ij)^2,    idx = sorted(argtop_r score)

    over up to ``steps`` calibration batches (paper section 5: the first 100 steps), with ``W`` the layer's
    current weight. Nothing is updated and the parameters' gradients are left as they were. Call it after
    ``get_peft_model`` and before training (gradient checkpointing off); the new indices replace those of any
    strategy, each layer's delta is reset to zero, and the indices are saved with the adapter like any others.
    MoE experts and routers keep their seeded random columns (with a warning).

    With ``accumulate = k > 1`` a step is ``k`` micro-batches, as with gradient accumulation: ``dL/dW`` is summed
    over them before squaring, each loss divided by the step's response-token count (``num_items_in_batch``, as
    transformers' Trainer passes it), so the scores equal those of the ``k`` micro-batches joined into one. This
    holds every tuned layer's float32 ``dL/dW`` through a step; with ``k = 1`` each is squared and freed at once.

    Args:
        model: a ``PeftModel`` (or any module) holding PaCA layers.
        batches: dicts the model accepts as keyword arguments, with ``labels``; tensors move to the model's device.
        steps: maximum number of steps to use (fewer if ``batches`` ends first).
        adapter_name: adapter whose columns are chosen (default: the active one).
        accumulate: micro-batches per step; ``k > 1`` needs a causal LM that accepts ``num_items_in_batch``.

    Returns:
        The new indices by layer name.

    Raises:
        ValueError: ``steps < 1`` or ``accumulate < 1``; no PaCA layer; ``batches`` empty; a batch without
            ``labels``; a model output without a loss; a layer that no gradient reached.
    """
    for name, value in (("steps", steps), ("accumulate", accumulate)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"select_by_gradient: {name} must be a positive integer, got {value!r}.")
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active[0] if isinstance(active, (list, tuple)) else active
    layers = _scored_layers(model, adapter_name)
    scores = ColumnScores(layers, accumulate)
    used = scores.run(model, batches, steps, [layer.paca_delta[adapter_name] for layer in layers])
    return _set_top_columns(layers, scores, adapter_name, used)


def _scored_layers(model: nn.Module, adapter_name: str) -> list[SingleWeightLayer]:
    """The linear and convolution PaCA layers of ``adapter_name``; experts and routers are named in a warning."""
    # MoE experts and routers (tokens routed, outputs not one tensor) keep their seeded random columns.
    kept = [m.layer_name for m in model.modules() if isinstance(m, (Experts, Router)) and adapter_name in m.paca_delta]
    layers = [
        m
        for m in model.modules()
        if isinstance(m, SingleWeightLayer) and not isinstance(m, Router) and adapter_name in m.paca_delta
    ]
    if kept:
        warnings.warn(
            f"select_by_gradient: {len(kept)} MoE experts / router module(s) (e.g. '{kept[0]}') keep their "
            "seeded random columns; gradient selection covers linear and convolution layers.",
            stacklevel=3,
        )
    if not layers:
        raise ValueError(f"select_by_gradient: the model has no PaCA layer with adapter '{adapter_name}'.")
    return layers


class ColumnScores:
    """The accumulated squared weight gradient of every column of ``layers`` over a calibration pass.

    Args:
        layers: the layers to score.
        accumulate: micro-batches per step; above 1, each layer's ``dL/dW`` is summed over a step before squaring.
    """

    def __init__(self, layers: list[SingleWeightLayer], accumulate: int) -> None:
        self.accumulate = accumulate
        self.scores = {layer: torch.zeros(layer.in_features, dtype=torch.float32) for layer in layers}
        self.step_grads: dict = {}  # layer -> dL/dW summed over the current step's micro-batches

    def _record(self, layer: SingleWeightLayer, args: tuple, output) -> None:
        # A forward hook: the gradient reaching this output, with the input, gives the layer's dL/dW.
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        x = args[0].detach()

        def accumulate_grad(grad: Tensor) -> None:  # returns None: the gradient flows on unchanged
            grad_w = _weight_grad(layer, x, grad)
            if self.accumulate == 1:  # square at once: no layer's dL/dW outlives its backward call
                self.scores[layer].add_(selection.column_scores(grad_w).cpu())
            else:
                self.step_grads[layer] = self.step_grads[layer] + grad_w if layer in self.step_grads else grad_w

        output.register_hook(accumulate_grad)

    def _end_step(self) -> None:
        for layer, grad_w in self.step_grads.items():
            self.scores[layer].add_(selection.column_scores(grad_w).cpu())
        self.step_grads.clear()

    def run(self, model: nn.Module, batches: Iterable, steps: int, deltas: list[Tensor]) -> int:
        """Forward and backward over up to ``steps`` steps of ``batches``; the number of steps run."""
        saved = [(d.requires_grad, d.grad) for d in deltas]
        device = next(model.parameters()).device
        hooks = [layer.register_forward_hook(self._record) for layer in self.scores]
        used, stream = 0, iter(batches)
        try:
            for d in deltas:
                d.requires_grad_(True)  # gradients must reach every layer output, even of a frozen adapter
            with torch.enable_grad():
                while used < steps:
                    first = used * self.accumulate
                    group = [
                        _on_device(first + i, b, device)
                        for i, b in enumerate(itertools.islice(stream, self.accumulate))
                    ]
                    if not group:
                        break
                    _backward_step(model, group, first, deltas, self.accumulate)
                    self._end_step()
                    used += 1
        finally:
            for hook in hooks:
                hook.remove()
            for d, (requires_grad, grad) in zip(deltas, saved):
                d.requires_grad_(requires_grad)
                d.grad = grad
        return used


def _backward_step(model: nn.Module, group: list[dict], first: int, deltas: list[Tensor], accumulate: int) -> None:
    extra = {"num_items_in_batch": sum(_response_tokens(b) for b in group)} if accumulate > 1 else {}
    for i, batch in enumerate(group):
        loss = getattr(model(**batch, **extra), "loss", None)
        if loss is None:
            raise ValueError(
                f"select_by_gradient: the model returned no loss for calibration batch {first + i}; is it a model "
                "with a loss head (e.g. *ForCausalLM)?"
            )
        loss.backward(inputs=deltas)  # only the deltas accumulate: no other parameter's .grad changes


def _set_top_columns(layers: list[SingleWeightLayer], scores: ColumnScores, adapter_name: str, used: int) -> dict:
    if used == 0:
        raise ValueError("select_by_gradient: no calibration batches (the iterable was empty).")
    chosen = {}
    for layer in layers:
        score = scores.scores[layer]
        if not bool((score > 0).any()):
            raise ValueError(
                f"select_by_gradient: no gradient reached module '{layer.layer_name}' in {used} "
                "calibration steps; is the layer used by the model's forward?"
            )
        idx = score.topk(layer.r[adapter_name]).indices.sort().values
        layer.set_indices(adapter_name, idx)
        chosen[layer.layer_name] = idx
    return chosen


def _on_device(index: int, batch, device) -> dict:
    if not isinstance(batch, Mapping) or batch.get("labels") is None:
        raise ValueError(
            f"select_by_gradient: calibration batch {index} has no 'labels'; pass dicts "
            "with input_ids and labels so the model returns a loss."
        )
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _weight_grad(layer: PacaLayer, x: Tensor, grad: Tensor) -> Tensor:
    """``dL/dW`` of one layer call in float32: ``(d_out, d_in)``, or the weight's shape for a convolution."""
    base = layer.get_base_layer()
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return conv_weight_grad(
            x.float(), base.weight.shape, grad.float(), base.stride, layer.padding, base.dilation, base.groups
        )
    x2 = x.reshape(-1, x.shape[-1]).float()  # (N, d_in)
    g2 = grad.reshape(-1, grad.shape[-1]).float()  # (N, d_out)
    return g2.t() @ x2


def _response_tokens(batch: Mapping) -> Tensor:
    """Tokens a causal LM's loss counts in ``batch``: labels after the one-token shift, not -100."""
    return (batch["labels"][..., 1:] != -100).sum()
