"""The QPaCA algorithm: a partial-connection linear layer over a 4-bit (NF4/FP4) bitsandbytes weight.

The frozen weight is kept packed in 4 bits (``Q``, with its bitsandbytes quantization state); the
tuned columns are never quantized: with ``deq(Q)`` the dequantized weight in the compute dtype,

    W = deq(Q),  W[:, idx] = deq(Q)[:, idx] + s * D,   s = paca_alpha / r

    forward:   y     = x W^T + b                  (one matmul on a transient dequantized copy)
    backward:  dL/dx = g W                        (W dequantized again: no 16-bit copy is kept)
               dL/dD = s * g^T x[..., idx]        (only x[..., idx] and the packed Q are kept)

Both passes write the columns into the transient dense copy with :func:`paca.ops.columns.write_into_copy`,
rounded once to the compute dtype as 16-bit PaCA does into its weight. ``D`` (``d_out x r``, float32 like every
trainable adapter weight) is the only tensor beside the 4-bit weight; each dequantization reproduces the base
values of the tuned columns bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .columns import write_into_copy
from .eager import eager_apply


def dequantize(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The dense ``(d_out, d_in)`` weight of a bitsandbytes ``Params4bit`` in ``dtype`` (a new tensor)."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def _forward_4bit(x: Tensor, weight: Tensor, bias: Tensor | None, delta: Tensor, idx: Tensor, scale: float) -> Tensor:
    dense = dequantize(weight, x.dtype)  # (d_out, d_in), transient: freed on return
    return F.linear(x, write_into_copy(dense, delta, idx, scale, 1), bias)  # (..., d_out)


class PartialLinear4bitFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W = deq(Q)``, ``W[:, idx] += scale * delta``; keeps only ``x[..., idx]`` and ``Q``."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, delta: Tensor, idx: Tensor, scale: float
    ) -> Tensor:
        y = _forward_4bit(x, weight, bias, delta, idx, scale)
        x_selected = x.index_select(-1, idx) if delta.requires_grad else None  # (..., r)
        ctx.save_for_backward(x_selected, weight, delta, idx)  # weight: the packed 4-bit parameter itself
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_selected, weight, delta, idx = ctx.saved_tensors
        grad_input = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            dense = dequantize(weight, grad.dtype)  # dequantized again, not kept from the forward
            grad_input = grad @ write_into_copy(dense, delta, idx, ctx.scale, 1)  # (..., d_in)
        if x_selected is not None:
            g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
            xs = x_selected.reshape(-1, x_selected.shape[-1]).to(grad.dtype)  # (N, r)
            grad_delta = (xs.t() @ g).t().to(delta.dtype).mul_(ctx.scale)  # (d_out, r)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_input, None, grad_bias, grad_delta, None, None


_partial_linear_4bit_eager = eager_apply(PartialLinear4bitFunction)


def partial_linear_4bit(
    x: Tensor, weight: Tensor, bias: Tensor | None, delta: Tensor, idx: Tensor, scale: float
) -> Tensor:
    """Linear layer over a packed 4-bit ``weight`` (bitsandbytes ``Params4bit``) with columns ``idx`` tuned.

    Args:
        x: input ``(..., d_in)``; its dtype is the compute dtype.
        weight: bitsandbytes ``Params4bit`` of a ``(d_out, d_in)`` weight, with its ``quant_state``.
        bias: optional ``(d_out,)``.
        delta: tuned delta ``(d_out, r)``.
        idx: sorted, unique int64 input-column indices ``(r,)``.
        scale: ``paca_alpha / r``.
    """
    bias = None if bias is None else bias.to(x.dtype)
    if not torch.is_grad_enabled():  # inference: nothing to save
        return _forward_4bit(x, weight, bias, delta, idx, scale)
    return _partial_linear_4bit_eager(x, weight, bias, delta, idx, scale)
