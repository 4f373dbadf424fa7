"""Convolutions (1-, 2- and 3-d): input channels are the columns; W ``(C_out, C_in / groups, *kernel)``, delta
``(C_out, r, *kernel)``.

With ``groups > 1`` a column ``j`` of the weight is local channel ``j`` of every group, so it reads input channel
``g * C_in / groups + j`` of each group ``g``: those ``groups * r`` input channels are what backward keeps. A
depthwise convolution (one channel per group) has one column: its whole filter bank.

As for the linear operator, the maths lives in two functions registered twice: an autograd Function for eager
mode and torch.library ops (one opaque node per layer, :mod:`paca.ops.compiled`) under torch.compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .columns import ColumnWriter
from .compiled import library_op
from .eager import eager_apply

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def conv_weight_grad(x: Tensor, weight_shape, grad: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """``dL/dW`` of a convolution (any of 1-3 d) from its input and output gradient."""
    return _CONV_WEIGHT_GRAD[len(weight_shape) - 2](x, weight_shape, grad, stride, padding, dilation, groups)


def input_channels(idx: Tensor, channels_per_group: int, groups: int) -> Tensor:
    """The input channels columns ``idx`` read: ``idx`` itself, or local channel ``idx`` of every group."""
    if groups == 1:
        return idx
    offsets = torch.arange(groups, device=idx.device) * channels_per_group  # (groups,)
    return (offsets[:, None] + idx[None, :]).flatten()  # (groups * r,), group-major as the convolution reads them


def _writer_for(writer: ColumnWriter | None) -> ColumnWriter:
    return writer if writer is not None else ColumnWriter(1, transient=True)


def _conv_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    stride,
    padding,
    dilation,
    groups: int,
    writer: ColumnWriter,
    read_by_backward: bool,
) -> Tensor:
    w = writer.weight_with_columns(weight, delta, idx, scale, x.dtype)
    y = _CONV[weight.dim() - 2](x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
    writer.after_forward(read_by_backward)
    return y


def _conv_backward(
    grad: Tensor,
    x_selected: Tensor | None,
    weight: Tensor,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    stride,
    padding,
    dilation,
    groups: int,
    input_shape,
    needs_input_grad: bool,
    writer: ColumnWriter,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dL/dx, scale * conv_weight_grad(x[:, channels of idx], g))``; None for a gradient not asked for."""
    grad_input = grad_delta = None
    if needs_input_grad:
        w = writer.weight_with_columns(weight, delta, idx, scale, grad.dtype, reuse=True)
        grad_input = _CONV_INPUT_GRAD[weight.dim() - 2](input_shape, w, grad, stride, padding, dilation, groups)
        writer.restore()  # the base weight reads as W0 again once its backward is done
    if x_selected is not None:
        grad_delta = conv_weight_grad(x_selected.to(grad.dtype), delta.shape, grad, stride, padding, dilation, groups)
        grad_delta = grad_delta.to(delta.dtype).mul_(scale)
    return grad_input, grad_delta


def _bias_grad(grad: Tensor) -> Tensor:
    return grad.sum((0, *range(2, grad.dim())))


def _selected_input(x: Tensor, weight: Tensor, idx: Tensor, groups: int) -> Tensor:
    return x.index_select(1, input_channels(idx, weight.shape[1], groups))  # (B, groups * r, *spatial)


class PartialConvFunction(torch.autograd.Function):
    """``y = conv(x, W) + b`` with ``W[:, idx] = W0[:, idx] + scale * delta``; keeps only the input channels of idx."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, scale, stride, padding, dilation, groups, writer):
        y = _conv_forward(
            x, weight, bias, delta, idx, scale, stride, padding, dilation, groups, writer, ctx.needs_input_grad[0]
        )
        x_selected = _selected_input(x, weight, idx, groups) if delta.requires_grad else None
        ctx.save_for_backward(x_selected, weight, delta, idx)
        ctx.parameters = (weight, delta, idx)  # the tensors themselves, as paca.ops.linear keeps them
        ctx.conv = (stride, padding, dilation, groups)
        ctx.scale, ctx.input_shape, ctx.has_bias, ctx.writer = scale, x.shape, bias is not None, writer
        return y

    @staticmethod
    def backward(ctx, grad):
        x_selected = ctx.saved_tensors[0]  # unpacks all four: autograd's in-place check
        weight, delta, idx = ctx.parameters
        grad_input, grad_delta = _conv_backward(
            grad,
            x_selected,
            weight,
            delta,
            idx,
            ctx.scale,
            *ctx.conv,
            ctx.input_shape,
            ctx.needs_input_grad[0],
            ctx.writer,
        )
        grad_bias = _bias_grad(grad) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, None, grad_bias, grad_delta, None, None, None, None, None, None, None


_partial_conv_eager = eager_apply(PartialConvFunction)


def partial_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    stride,
    padding,
    dilation,
    groups: int = 1,
    writer: ColumnWriter | None = None,
) -> Tensor:
    """Convolution (1-3 d by ``weight``'s rank, zero padding) with input columns ``idx`` of ``weight`` shifted by
    ``scale * delta``.

    ``x`` is ``(B, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``, as for ``F.conv2d``. ``columns``: the
    layer's :class:`ColumnWriter` (None: the operator restores ``weight`` before it returns).
    """
    if x.dim() == weight.dim() - 1:  # unbatched: the operators index channels on dim 1
        return partial_conv(
            x.unsqueeze(0), weight, bias, delta, idx, scale, stride, padding, dilation, groups, writer
        ).squeeze(0)
    if torch.compiler.is_compiling():
        key = -1 if writer is None else writer.key
        read_by_backward = torch.is_grad_enabled() and x.requires_grad
        return CompiledPartialConv.apply(
            x,
            weight,
            bias,
            delta,
            idx,
            scale,
            list(stride),
            list(padding),
            list(dilation),
            groups,
            key,
            read_by_backward,
        )
    writer = _writer_for(writer)
    if not torch.is_grad_enabled():  # inference: nothing to save, no backward to read the columns
        return _conv_forward(x, weight, bias, delta, idx, scale, stride, padding, dilation, groups, writer, False)
    return _partial_conv_eager(x, weight, bias, delta, idx, scale, stride, padding, dilation, groups, writer)


def _partial_conv_kernel(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    writer_key: int,
    read_by_backward: bool,
) -> Tensor:
    """:func:`partial_conv` as one opaque node for torch.compile."""
    return _conv_forward(
        x,
        weight,
        bias,
        delta,
        idx,
        scale,
        stride,
        padding,
        dilation,
        groups,
        _writer_for(ColumnWriter.find(writer_key)),
        read_by_backward,
    )


partial_conv_op = library_op("partial_conv", _partial_conv_kernel)


@torch.library.register_fake(partial_conv_op)
def _(x, weight, bias, delta, idx, scale, stride, padding, dilation, groups, writer_key, read_by_backward):
    return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)


def _partial_conv_backward_kernel(
    grad: Tensor,
    x_selected: Tensor | None,
    weight: Tensor,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    input_shape: list[int],
    needs_input_grad: bool,
    writer_key: int,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``partial_conv_op``; an empty tensor stands for a gradient not asked for."""
    grad_input, grad_delta = _conv_backward(
        grad,
        x_selected,
        weight,
        delta,
        idx,
        scale,
        stride,
        padding,
        dilation,
        groups,
        input_shape,
        needs_input_grad,
        _writer_for(ColumnWriter.find(writer_key)),
    )
    return (
        grad.new_empty(0) if grad_input is None else grad_input,
        delta.new_empty(0) if grad_delta is None else grad_delta.contiguous(),
    )


partial_conv_backward_op = library_op("partial_conv_backward", _partial_conv_backward_kernel)


@torch.library.register_fake(partial_conv_backward_op)
def _(
    grad,
    x_selected,
    weight,
    delta,
    idx,
    scale,
    stride,
    padding,
    dilation,
    groups,
    input_shape,
    needs_input_grad,
    writer_key,
):
    grad_input = grad.new_empty(input_shape) if needs_input_grad else grad.new_empty(0)
    grad_delta = delta.new_empty(delta.shape) if x_selected is not None else delta.new_empty(0)
    return grad_input, grad_delta


class CompiledPartialConv(torch.autograd.Function):
    """What torch.compile traces for a PaCA convolution: the two library ops, with the selected input channels kept
    between them (see :mod:`paca.ops.compiled`)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, delta, idx, scale, stride, padding, dilation, groups, writer_key, read_by_backward
    ):
        x_selected = _selected_input(x, weight, idx, groups) if delta.requires_grad else None
        ctx.save_for_backward(x_selected, weight, delta, idx)
        ctx.conv = (scale, stride, padding, dilation, groups, list(x.shape), writer_key)
        ctx.has_bias = bias is not None
        return partial_conv_op(
            x, weight, bias, delta, idx, scale, stride, padding, dilation, groups, writer_key, read_by_backward
        )

    @staticmethod
    def backward(ctx, grad):
        x_selected, weight, delta, idx = ctx.saved_tensors
        scale, stride, padding, dilation, groups, input_shape, writer_key = ctx.conv
        needs_input_grad = ctx.needs_input_grad[0]
        grad_input, grad_delta = partial_conv_backward_op(
            grad,
            x_selected,
            weight,
            delta,
            idx,
            scale,
            stride,
            padding,
            dilation,
            groups,
            input_shape,
            needs_input_grad,
            writer_key,
        )
        grad_bias = _bias_grad(grad) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (
            grad_input if needs_input_grad else None,
            None,
            grad_bias,
            grad_delta if x_selected is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
