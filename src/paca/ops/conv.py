"""Conv2d: input channels are the columns; W ``(C_out, C_in, kh, kw)``, delta ``(C_out, r, kh, kw)``.

As for the linear operator, the maths lives in two functions registered twice: an autograd Function for eager
mode and torch.library custom ops (one opaque node per layer) under torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .columns import ResidentColumns


def _columns_for(columns: Optional[ResidentColumns]) -> ResidentColumns:
    return columns if columns is not None else ResidentColumns(1, transient=True)


def _conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, idx: Tensor, scale: float,
                  stride, padding, dilation, columns: ResidentColumns) -> Tensor:
    w = columns.written(weight, delta, idx, scale, x.dtype)
    y = F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation)
    if columns.transient:
        columns.restore()
    return y


def _conv_backward(grad: Tensor, x_selected: Optional[Tensor], weight: Tensor, delta: Tensor, idx: Tensor,
                   scale: float, stride, padding, dilation, input_shape, needs_input_grad: bool,
                   columns: ResidentColumns) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(dL/dx, scale * conv2d_weight(x[:, idx], g))``; None for a gradient not asked for."""
    grad_input = grad_delta = None
    if needs_input_grad:
        w = columns.written(weight, delta, idx, scale, grad.dtype, reuse=True)
        grad_input = torch.nn.grad.conv2d_input(input_shape, w, grad, stride, padding, dilation)
        if columns.transient:
            columns.restore()
    if x_selected is not None:
        grad_delta = torch.nn.grad.conv2d_weight(x_selected.to(grad.dtype), delta.shape, grad, stride, padding,
                                                 dilation)
        grad_delta = grad_delta.to(delta.dtype).mul_(scale)
    return grad_input, grad_delta


class PartialConv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, W) + b`` with ``W[:, idx] = W0[:, idx] + scale * delta``; keeps only ``x[:, idx]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, scale, stride, padding, dilation, columns):
        y = _conv_forward(x, weight, bias, delta, idx, scale, stride, padding, dilation, columns)
        x_selected = x.index_select(1, idx) if delta.requires_grad else None  # (B, r, H, W)
        ctx.save_for_backward(x_selected, weight, delta, idx)
        ctx.conv = (stride, padding, dilation)
        ctx.scale, ctx.input_shape, ctx.has_bias, ctx.columns = scale, x.shape, bias is not None, columns
        return y

    @staticmethod
    def backward(ctx, grad):
        x_selected, weight, delta, idx = ctx.saved_tensors
        grad_input, grad_delta = _conv_backward(grad, x_selected, weight, delta, idx, ctx.scale, *ctx.conv,
                                                ctx.input_shape, ctx.needs_input_grad[0], ctx.columns)
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, None, grad_bias, grad_delta, None, None, None, None, None, None


def partial_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, idx: Tensor,
                   scale: float, stride, padding, dilation, columns: Optional[ResidentColumns] = None) -> Tensor:
    """Conv2d (groups 1, zero padding) with input channels ``idx`` of ``weight`` shifted by ``scale * delta``.

    ``x`` is ``(B, C_in, H, W)`` or unbatched ``(C_in, H, W)``, as for ``F.conv2d``. ``columns``: the layer's
    :class:`ResidentColumns` (None: the operator restores ``weight`` before it returns).
    """
    if x.dim() == 3:  # the operators index channels on dim 1
        return partial_conv2d(x.unsqueeze(0), weight, bias, delta, idx, scale, stride, padding, dilation,
                              columns).squeeze(0)
    if torch.compiler.is_compiling():
        key = -1 if columns is None else columns.key
        return partial_conv2d_op(x, weight, bias, delta, idx, scale, list(stride), list(padding), list(dilation),
                                 key)
    return PartialConv2dFunction.apply(x, weight, bias, delta, idx, scale, stride, padding, dilation,
                                       _columns_for(columns))


@torch.library.custom_op("paca::partial_conv2d", mutates_args=())
def partial_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, idx: Tensor, scale: float,
                      stride: list[int], padding: list[int], dilation: list[int], columns_key: int) -> Tensor:
    """:func:`partial_conv2d` as one opaque node for torch.compile."""
    return _conv_forward(x, weight, bias, delta, idx, scale, stride, padding, dilation,
                         _columns_for(ResidentColumns.find(columns_key)))


@partial_conv2d_op.register_fake
def _(x, weight, bias, delta, idx, scale, stride, padding, dilation, columns_key):
    return F.conv2d(x, weight, bias, stride, padding, dilation)


@torch.library.custom_op("paca::partial_conv2d_backward", mutates_args=())
def partial_conv2d_backward_op(grad: Tensor, x_selected: Optional[Tensor], weight: Tensor, delta: Tensor,
                               idx: Tensor, scale: float, stride: list[int], padding: list[int],
                               dilation: list[int], input_shape: list[int], needs_input_grad: bool,
                               columns_key: int) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`partial_conv2d_op`; an empty tensor stands for a gradient not asked for."""
    grad_input, grad_delta = _conv_backward(grad, x_selected, weight, delta, idx, scale, stride, padding, dilation,
                                            input_shape, needs_input_grad,
                                            _columns_for(ResidentColumns.find(columns_key)))
    return (grad.new_empty(0) if grad_input is None else grad_input,
            delta.new_empty(0) if grad_delta is None else grad_delta.contiguous())


@partial_conv2d_backward_op.register_fake
def _(grad, x_selected, weight, delta, idx, scale, stride, padding, dilation, input_shape, needs_input_grad,
      columns_key):
    grad_input = grad.new_empty(input_shape) if needs_input_grad else grad.new_empty(0)
    grad_delta = delta.new_empty(delta.shape) if x_selected is not None else delta.new_empty(0)
    return grad_input, grad_delta


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, delta, idx, scale, stride, padding, dilation, columns_key = inputs
    x_selected = x.index_select(1, idx) if delta.requires_grad else None  # (B, r, H, W)
    ctx.save_for_backward(x_selected, weight, delta, idx)
    ctx.conv = (scale, stride, padding, dilation, list(x.shape), columns_key)
    ctx.has_bias = bias is not None


def _conv_op_backward(ctx, grad):
    x_selected, weight, delta, idx = ctx.saved_tensors
    scale, stride, padding, dilation, input_shape, columns_key = ctx.conv
    needs_input_grad = ctx.needs_input_grad[0]
    grad_input, grad_delta = partial_conv2d_backward_op(grad, x_selected, weight, delta, idx, scale, stride,
                                                        padding, dilation, input_shape, needs_input_grad,
                                                        columns_key)
    grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return (grad_input if needs_input_grad else None, None, grad_bias,
            grad_delta if x_selected is not None else None, None, None, None, None, None, None)


partial_conv2d_op.register_autograd(_conv_op_backward, setup_context=_conv_setup_context)
