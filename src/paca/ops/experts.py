"""Fused MoE experts (transformers 5's 3-D expert weights): each expert tunes ``r`` input columns of its own.

A projection of ``E`` experts has one weight, ``(E, d_out, d_in)`` (Mixtral, Qwen3-MoE, DeepSeek-V3...) or
``(E, d_in, d_out)`` when ``transposed`` (gpt-oss). The token-expert pairs are sorted by expert, so expert ``e``
owns a block of rows ``X_e``; with ``idx_e`` its ``r`` columns and ``s = paca_alpha / r``:

    W_e[:, idx_e] = W0_e[:, idx_e] + s D_e        Y_e = X_e W_e^T              (one grouped GEMM for all e)
    dL/dX_e = G_e W_e                             dL/dD_e = s G_e^T X_e[:, idx_e]   (one grouped GEMM each)

so backward keeps ``X[:, idx]`` (``S x r`` for ``S`` pairs), never ``X``, and the columns of all experts are written
into the fused weight by one scatter, for a forward and its backward (:mod:`paca.ops.columns`).

The three products are grouped GEMMs (``torch.nn.functional.grouped_mm``, one kernel for all experts, no host
synchronisation) where torch accepts the operands (float32/16-bit, 16-byte aligned strides); otherwise the expert
blocks run one matmul each, as transformers' eager experts do. As for the linear operator, the maths is registered
twice: an autograd Function for eager mode and torch.library ops that torch.compile keeps as one opaque
node per projection (no graph break: the routing, in :mod:`paca.tuner.experts`, has static shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .columns import ColumnWriter
from .compiled import library_op
from .eager import eager_apply

# ----------------------------------------------------------------------------------------------------
# grouped products
# ----------------------------------------------------------------------------------------------------


def _aligned(t: Tensor) -> bool:
    """What torch's grouped GEMM asks of an operand: one unit stride among the last two dimensions, the other
    strides and the address multiples of 16 bytes."""
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or t.data_ptr() % 16:
        return False
    strides = t.stride()
    if 1 not in strides[-2:]:
        return False
    return all(s * t.element_size() % 16 == 0 for s in strides if s != 1)


def grouped_mm_fits(*operands: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` takes these operands (else the per-expert loop runs)."""
    return hasattr(F, "grouped_mm") and all(_aligned(t) for t in operands)


def _block_bounds(offsets: Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()  # the loop needs the block sizes on the host
    return list(zip([0, *ends[:-1]], ends))


def grouped_matmul(x: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    """``x`` ``(S, K)`` with row block ``e`` ending at ``offsets[e]``, times ``weights[e]`` ``(K, N)``: ``(S, N)``."""
    if grouped_mm_fits(x, weights):
        return F.grouped_mm(x, weights, offs=offsets)
    out = x.new_empty(x.shape[0], weights.shape[2])
    for e, (start, end) in enumerate(_block_bounds(offsets)):
        if end > start:
            torch.mm(x[start:end], weights[e], out=out[start:end])
    return out


def grouped_outer(a_t: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """Per expert ``a_t[:, block e] @ b[block e]``: ``(M, S) x (S, N) -> (E, M, N)``; zero for experts without rows."""
    if grouped_mm_fits(a_t, b):
        return F.grouped_mm(a_t, b, offs=offsets)
    out = b.new_zeros(offsets.shape[0], a_t.shape[0], b.shape[1])
    for e, (start, end) in enumerate(_block_bounds(offsets)):
        if end > start:
            torch.mm(a_t[:, start:end], b[start:end], out=out[e])
    return out


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# ----------------------------------------------------------------------------------------------------
# the operator
# ----------------------------------------------------------------------------------------------------


def _writer_for(writer: ColumnWriter | None, transposed: bool) -> ColumnWriter:
    return (
        writer if writer is not None else ColumnWriter(1 if transposed else 2, transient=True, transposed=transposed)
    )


def _effective(
    weight: Tensor,
    delta: Tensor | None,
    idx: Tensor | None,
    scale: float,
    dtype: torch.dtype,
    writer: ColumnWriter,
    reuse: bool = False,
) -> Tensor:
    if delta is None:
        return _cast(weight.detach(), dtype)
    return writer.weight_with_columns(weight, delta, idx, scale, dtype, reuse=reuse)


def _experts_forward(
    x: Tensor,
    weight: Tensor,
    delta: Tensor | None,
    idx: Tensor | None,
    offsets: Tensor,
    scale: float,
    transposed: bool,
    writer: ColumnWriter,
    read_by_backward: bool,
) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):  # x is in the compute dtype already
        w = _effective(weight, delta, idx, scale, x.dtype, writer)
        y = grouped_matmul(x, w if transposed else w.transpose(1, 2), offsets)  # X_e W_e^T
        if delta is not None:
            writer.after_forward(read_by_backward)
    return y


def _experts_backward(
    grad: Tensor,
    x_selected: Tensor | None,
    weight: Tensor,
    delta: Tensor | None,
    idx: Tensor | None,
    offsets: Tensor,
    scale: float,
    transposed: bool,
    needs_input_grad: bool,
    writer: ColumnWriter,
) -> tuple[Tensor | None, Tensor | None]:
    """``(G W, s G^T X[:, idx])`` per expert block; None for a gradient not asked for."""
    grad = grad.contiguous()
    grad_x = grad_delta = None
    with torch.autocast(grad.device.type, enabled=False):
        if needs_input_grad:
            w = _effective(weight, delta, idx, scale, grad.dtype, writer, reuse=True)
            grad_x = grouped_matmul(grad, w.transpose(1, 2) if transposed else w, offsets)  # G_e W_e
            writer.restore()  # the base weight reads as W0 again once its backward is done
        if x_selected is not None:
            grad_delta = grouped_outer(grad.t(), _cast(x_selected, grad.dtype), offsets)  # (E, d_out, r)
            grad_delta = _cast(grad_delta.mul_(scale), delta.dtype)
    return grad_x, grad_delta


def _selected_input(x: Tensor, delta: Tensor | None, idx: Tensor | None, expert_of_row: Tensor):
    # The only activation kept: each row's r selected input channels, those of its expert.
    if delta is None or not delta.requires_grad:
        return None
    return x.gather(1, idx[expert_of_row])


class PartialExpertsFunction(torch.autograd.Function):
    """Eager-mode autograd of :func:`partial_experts_linear`; keeps ``x[:, idx_e]`` per row (and references)."""

    @staticmethod
    def forward(ctx, x, weight, delta, idx, expert_of_row, offsets, scale, transposed, writer):
        y = _experts_forward(x, weight, delta, idx, offsets, scale, transposed, writer, ctx.needs_input_grad[0])
        ctx.save_for_backward(_selected_input(x, delta, idx, expert_of_row), weight, delta, idx, offsets)
        ctx.parameters = (weight, delta, idx)  # the tensors themselves, as paca.ops.linear keeps them
        ctx.scale, ctx.transposed, ctx.writer = scale, transposed, writer
        return y

    @staticmethod
    def backward(ctx, grad):
        x_selected, _, _, _, offsets = ctx.saved_tensors
        weight, delta, idx = ctx.parameters
        grad_x, grad_delta = _experts_backward(
            grad,
            x_selected,
            weight,
            delta,
            idx,
            offsets,
            ctx.scale,
            ctx.transposed,
            ctx.needs_input_grad[0],
            ctx.writer,
        )
        return grad_x, None, grad_delta, None, None, None, None, None, None


_partial_experts_eager = eager_apply(PartialExpertsFunction)


def partial_experts_linear(
    x: Tensor,
    weight: Tensor,
    delta: Tensor | None,
    idx: Tensor | None,
    expert_of_row: Tensor,
    offsets: Tensor,
    scale: float,
    transposed: bool,
    writer: ColumnWriter | None = None,
) -> Tensor:
    """One projection of all experts: row block ``e`` of ``x`` times expert ``e``'s weight with its columns tuned.

    Args:
        x: ``(S, d_in)`` token-expert pairs sorted by expert, in the compute dtype.
        weight: frozen fused weight ``(E, d_out, d_in)``, or ``(E, d_in, d_out)`` when ``transposed``.
        delta: ``(E, d_out, r)``, or None for a projection that is not tuned (then ``idx`` is None too).
        idx: ``(E, r)`` sorted, unique column indices of each expert.
        expert_of_row: ``(S,)`` the expert of each row of ``x`` (sorted).
        offsets: ``(E,)`` int32, where each expert's block of rows ends (cumulative counts).
        scale: ``paca_alpha / r``.
        writer: the layer's :class:`ColumnWriter` (``column_axis`` 2, or 1 when ``transposed``); None: the
            operator restores the weight before it returns.

    Returns:
        ``(S, d_out)``.
    """
    if torch.compiler.is_compiling():
        key = -1 if writer is None else writer.key
        read_by_backward = torch.is_grad_enabled() and x.requires_grad
        return CompiledPartialExperts.apply(
            x, weight, delta, idx, expert_of_row, offsets, scale, transposed, key, read_by_backward
        )
    writer = _writer_for(writer, transposed)
    if not torch.is_grad_enabled():
        return _experts_forward(x, weight, delta, idx, offsets, scale, transposed, writer, False)
    return _partial_experts_eager(x, weight, delta, idx, expert_of_row, offsets, scale, transposed, writer)


# torch.compile: as in paca.ops.linear, the library ops find the layer's ColumnWriter by key at run time.


def _writer_by_key(key: int, transposed: bool) -> ColumnWriter:
    return _writer_for(ColumnWriter.find(key), transposed)


def _partial_experts_kernel(
    x: Tensor,
    weight: Tensor,
    delta: Tensor | None,
    idx: Tensor | None,
    expert_of_row: Tensor,
    offsets: Tensor,
    scale: float,
    transposed: bool,
    writer_key: int,
    read_by_backward: bool,
) -> Tensor:
    """:func:`partial_experts_linear` as one opaque node for torch.compile."""
    return _experts_forward(
        x, weight, delta, idx, offsets, scale, transposed, _writer_by_key(writer_key, transposed), read_by_backward
    )


partial_experts_op = library_op("partial_experts", _partial_experts_kernel)


@torch.library.register_fake(partial_experts_op)
def _(x, weight, delta, idx, expert_of_row, offsets, scale, transposed, writer_key, read_by_backward):
    return x.new_empty(x.shape[0], weight.shape[2] if transposed else weight.shape[1])


def _partial_experts_backward_kernel(
    grad: Tensor,
    x_selected: Tensor | None,
    weight: Tensor,
    delta: Tensor | None,
    idx: Tensor | None,
    offsets: Tensor,
    scale: float,
    transposed: bool,
    needs_input_grad: bool,
    writer_key: int,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``partial_experts_op``; an empty tensor stands for a gradient not asked for."""
    grad_x, grad_delta = _experts_backward(
        grad,
        x_selected,
        weight,
        delta,
        idx,
        offsets,
        scale,
        transposed,
        needs_input_grad,
        _writer_by_key(writer_key, transposed),
    )
    return (grad.new_empty(0) if grad_x is None else grad_x, grad.new_empty(0) if grad_delta is None else grad_delta)


partial_experts_backward_op = library_op("partial_experts_backward", _partial_experts_backward_kernel)


@torch.library.register_fake(partial_experts_backward_op)
def _(grad, x_selected, weight, delta, idx, offsets, scale, transposed, needs_input_grad, writer_key):
    d_in = weight.shape[1] if transposed else weight.shape[2]
    grad_x = grad.new_empty(grad.shape[0], d_in) if needs_input_grad else grad.new_empty(0)
    grad_delta = delta.new_empty(delta.shape) if x_selected is not None else grad.new_empty(0)
    return grad_x, grad_delta


class CompiledPartialExperts(torch.autograd.Function):
    """What torch.compile traces for one fused experts projection: the two library ops, with the ``r`` channels of
    each token-expert pair kept between them (see :mod:`paca.ops.compiled`)."""

    @staticmethod
    def forward(ctx, x, weight, delta, idx, expert_of_row, offsets, scale, transposed, writer_key, read_by_backward):
        ctx.save_for_backward(_selected_input(x, delta, idx, expert_of_row), weight, delta, idx, offsets)
        ctx.scale, ctx.transposed, ctx.writer_key = scale, transposed, writer_key
        return partial_experts_op(
            x, weight, delta, idx, expert_of_row, offsets, scale, transposed, writer_key, read_by_backward
        )

    @staticmethod
    def backward(ctx, grad):
        x_selected, weight, delta, idx, offsets = ctx.saved_tensors
        needs_input_grad = ctx.needs_input_grad[0]
        grad_x, grad_delta = partial_experts_backward_op(
            grad, x_selected, weight, delta, idx, offsets, ctx.scale, ctx.transposed, needs_input_grad, ctx.writer_key
        )
        return (
            grad_x if needs_input_grad else None,
            None,
            grad_delta if x_selected is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
