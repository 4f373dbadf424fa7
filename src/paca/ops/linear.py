"""Linear and GPT-2 Conv1D: ``y = x W^T + b`` with W ``(d_out, d_in)``, or ``y = x W + b`` with W ``(d_in, d_out)``.

The maths lives in two functions; it is registered twice: as a torch.autograd.Function for eager mode (a few
microseconds of Python per call) and as torch.library ops that torch.compile keeps as one opaque node per layer
(:mod:`paca.ops.compiled`; a library op's dispatch costs more per call than the Function's C++ entry, so eager
mode does not use them). Per call, beyond the frozen layer's own matmuls: forward ``x[..., idx]`` and the
column write (:mod:`paca.ops.columns`), backward the delta-gradient matmul, and for CPU gradients above a few
thousand values one copy of it (see :mod:`paca.ops.columns` for when backward skips the write).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .columns import ColumnWriter
from .compiled import library_op
from .eager import eager_apply


def _writer_for(writer: ColumnWriter | None, transposed: bool) -> ColumnWriter:
    # Without a layer's writer (a bare functional call) the operator writes and restores by itself.
    return writer if writer is not None else ColumnWriter(0 if transposed else 1, transient=True)


def _linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    transposed: bool,
    writer: ColumnWriter,
    read_by_backward: bool,
) -> Tensor:
    w = writer.weight_with_columns(weight, delta, idx, scale, x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = F.linear(x, w.t() if transposed else w, bias)
    writer.after_forward(read_by_backward)
    return y


def _linear_backward(
    grad: Tensor,
    x_selected: Tensor | None,
    weight: Tensor,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    transposed: bool,
    needs_input_grad: bool,
    writer: ColumnWriter,
) -> tuple[Tensor | None, Tensor | None]:
    """``(g W, scale * g^T x[..., idx])``; None for a gradient not asked for (``x_selected`` None: no delta grad)."""
    grad_input = grad_delta = None
    if needs_input_grad:
        w = writer.weight_with_columns(weight, delta, idx, scale, grad.dtype, reuse=True)
        grad_input = grad @ (w.t() if transposed else w)  # (..., d_in)
        writer.restore()  # the base weight reads as W0 again once its backward is done
    if x_selected is not None:
        g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        xs = x_selected.reshape(-1, x_selected.shape[-1])  # (N, r)
        if xs.dtype != grad.dtype:
            xs = xs.to(grad.dtype)
        if g.shape[0] == 0:  # no tokens: the one-row views below would be empty
            return grad_input, torch.zeros_like(delta)
        # One addmm with alpha = scale; beta = 0 ignores its input, a zero that allocates nothing (a broadcast row
        # of x_sel would do too, but is slower in CPU's addmm: docs/BENCHMARKS.md).
        if delta_grad_in_one_operator(grad):
            zero = writer.broadcast_zero(g, (g.shape[1], xs.shape[1]))
            grad_delta = torch.addmm(zero, g.t(), xs, beta=0, alpha=scale)  # (d_out, r); cuBLAS reads g^T as is
        else:
            # On CPU, (r, N) @ (N, d_out) runs faster than g^T x_sel, whose output rows have only r values, once
            # N * d_out is more than a few thousand; then one copy to the (d_out, r) layout of the delta.
            zero = writer.broadcast_zero(g, (xs.shape[1], g.shape[1]))
            grad_delta = torch.addmm(zero, xs.t(), g, beta=0, alpha=scale).t().contiguous()  # (d_out, r)
        if grad_delta.dtype != delta.dtype:
            grad_delta = grad_delta.to(delta.dtype)
    return grad_input, grad_delta


# Up to this many gradient values (tokens x d_out) CPU's one-operator form is the faster one: its cost is the
# operator's fixed overhead there; above it the transposed product wins (timed in docs/BENCHMARKS.md, "Operators").
ONE_OPERATOR_MAX_CPU_GRAD_VALUES = 4096


def delta_grad_in_one_operator(grad: Tensor) -> bool:
    """Whether the delta gradient is one addmm (CUDA; small CPU gradients) or an addmm and a transposing copy (the
    faster form for CPU gradients above :data:`ONE_OPERATOR_MAX_CPU_GRAD_VALUES` values)."""
    return grad.is_cuda or grad.numel() <= ONE_OPERATOR_MAX_CPU_GRAD_VALUES


def _bias_grad(grad: Tensor) -> Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class PartialLinearFunction(torch.autograd.Function):
    """Eager-mode autograd of :func:`partial_linear`; keeps only ``x[..., idx]`` (and references to parameters)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, scale, transposed, writer):
        y = _linear_forward(x, weight, bias, delta, idx, scale, transposed, writer, ctx.needs_input_grad[0])
        # The only activation kept: the r selected input channels (never the full input). The parameters are saved
        # (references, no copies) for autograd's check, as nn.Linear's, that nothing changed them in place before
        # backward.
        x_selected = x.index_select(-1, idx) if delta.requires_grad else None  # (..., r)
        ctx.save_for_backward(x_selected, weight, delta, idx)
        # The parameters themselves too: saved-tensor hooks (save_on_cpu) may unpack copies, and a rewrite in backward
        # must go into the module's weight, not a copy that already holds the write.
        ctx.parameters = (weight, delta, idx)
        ctx.scale, ctx.transposed, ctx.writer = scale, transposed, writer
        return y

    @staticmethod
    def backward(ctx, grad):
        x_selected = ctx.saved_tensors[0]  # unpacks all four: autograd's in-place check
        weight, delta, idx = ctx.parameters
        grad_input, grad_delta = _linear_backward(
            grad, x_selected, weight, delta, idx, ctx.scale, ctx.transposed, ctx.needs_input_grad[0], ctx.writer
        )
        grad_bias = _bias_grad(grad) if ctx.needs_input_grad[2] else None
        return grad_input, None, grad_bias, grad_delta, None, None, None, None


_partial_linear_eager = eager_apply(PartialLinearFunction)


def partial_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    transposed: bool = False,
    writer: ColumnWriter | None = None,
) -> Tensor:
    """``y = x W^T + b`` with ``W`` the frozen ``weight`` whose input columns ``idx`` hold ``+ scale * delta``.

    Args:
        x: input ``(..., d_in)``; its dtype is the compute dtype.
        weight: frozen weight, ``(d_out, d_in)``, or ``(d_in, d_out)`` when ``transposed`` (GPT-2 Conv1D).
        bias: optional ``(d_out,)``.
        delta: tuned delta ``(d_out, r)``.
        idx: sorted, unique int64 input-column indices ``(r,)``.
        scale: ``paca_alpha / r``.
        transposed: whether ``weight`` is stored ``(d_in, d_out)``.
        writer: the layer's :class:`ColumnWriter` (the columns written for this call and its backward); None: the
            operator restores ``weight`` before it returns.
    """
    if torch.compiler.is_compiling():
        key = -1 if writer is None else writer.key
        read_by_backward = torch.is_grad_enabled() and x.requires_grad
        return CompiledPartialLinear.apply(x, weight, bias, delta, idx, scale, transposed, key, read_by_backward)
    writer = _writer_for(writer, transposed)
    if not torch.is_grad_enabled():  # inference: nothing to save
        return _linear_forward(x, weight, bias, delta, idx, scale, transposed, writer, False)
    return _partial_linear_eager(x, weight, bias, delta, idx, scale, transposed, writer)


# torch.compile: the library ops take the ColumnWriter by key (an int the graph keeps as a constant) and find it
# at run time, so compiled and eager calls share one record of what the weight holds.


def _writer_by_key(key: int, transposed: bool) -> ColumnWriter:
    return _writer_for(ColumnWriter.find(key), transposed)


def _partial_linear_kernel(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    transposed: bool,
    writer_key: int,
    read_by_backward: bool,
) -> Tensor:
    """:func:`partial_linear` as one opaque node for torch.compile."""
    return _linear_forward(
        x, weight, bias, delta, idx, scale, transposed, _writer_by_key(writer_key, transposed), read_by_backward
    )


partial_linear_op = library_op("partial_linear", _partial_linear_kernel)


@torch.library.register_fake(partial_linear_op)
def _(x, weight, bias, delta, idx, scale, transposed, writer_key, read_by_backward):
    d_out = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty(*x.shape[:-1], d_out)


def _partial_linear_backward_kernel(
    grad: Tensor,
    x_selected: Tensor | None,
    weight: Tensor,
    delta: Tensor,
    idx: Tensor,
    scale: float,
    transposed: bool,
    needs_input_grad: bool,
    writer_key: int,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``partial_linear_op``; an empty tensor stands for a gradient not asked for."""
    grad_input, grad_delta = _linear_backward(
        grad,
        x_selected,
        weight,
        delta,
        idx,
        scale,
        transposed,
        needs_input_grad,
        _writer_by_key(writer_key, transposed),
    )
    return (
        grad.new_empty(0) if grad_input is None else grad_input,
        delta.new_empty(0) if grad_delta is None else grad_delta,
    )


partial_linear_backward_op = library_op("partial_linear_backward", _partial_linear_backward_kernel)


@torch.library.register_fake(partial_linear_backward_op)
def _(grad, x_selected, weight, delta, idx, scale, transposed, needs_input_grad, writer_key):
    d_in = weight.shape[0] if transposed else weight.shape[1]
    grad_input = grad.new_empty(*grad.shape[:-1], d_in) if needs_input_grad else grad.new_empty(0)
    grad_delta = delta.new_empty(delta.shape) if x_selected is not None else delta.new_empty(0)
    return grad_input, grad_delta


class CompiledPartialLinear(torch.autograd.Function):
    """What torch.compile traces for a PaCA linear layer: the two library ops, with ``x[..., idx]`` kept between
    them (see :mod:`paca.ops.compiled`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, scale, transposed, writer_key, read_by_backward):
        x_selected = x.index_select(-1, idx) if delta.requires_grad else None  # (..., r): the only activation kept
        ctx.save_for_backward(x_selected, weight, delta, idx)
        ctx.scale, ctx.transposed, ctx.has_bias, ctx.writer_key = scale, transposed, bias is not None, writer_key
        return partial_linear_op(x, weight, bias, delta, idx, scale, transposed, writer_key, read_by_backward)

    @staticmethod
    def backward(ctx, grad):
        x_selected, weight, delta, idx = ctx.saved_tensors
        needs_input_grad = ctx.needs_input_grad[0]
        grad_input, grad_delta = partial_linear_backward_op(
            grad, x_selected, weight, delta, idx, ctx.scale, ctx.transposed, needs_input_grad, ctx.writer_key
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
        )
