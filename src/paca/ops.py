"""The algorithm: partial-connection layers as autograd-aware operators.

A PaCA layer with frozen weight ``W0`` (``d_out x d_in``), tuned input columns ``idx`` (``r`` of them)
and delta ``D`` (``d_out x r``) computes with the effective weight

    W = W0,  W[:, idx] = W0[:, idx] + s * D,   s = paca_alpha / r

    forward:   y      = x W^T + b                      (one matmul, no adapter branch)
    backward:  dL/dx  = g W
               dL/dD  = s * g^T x[..., idx]           (only x[..., idx] is kept for backward)

``W`` is never materialised as a second weight-sized tensor: each operator writes the ``r`` tuned
columns into the frozen weight's storage, runs the dense kernel and writes the original columns back
before returning, all inside one opaque operator. Outside the operators the frozen weight is always
bit-for-bit the pretrained one, and every forward and backward reads the *current* ``D``, however it
was changed. Each write costs ``O(d_out * r)``, next to the ``O(N * d_out * d_in)`` matmul.

The linear operator runs as a ``torch.autograd.Function`` in eager mode and as ``torch.library`` custom
ops under ``torch.compile`` (one node per layer, no graph break); Conv2d is an autograd Function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@contextlib.contextmanager
def tuned_weight(weight: Tensor, delta: Tensor, idx: Tensor, scale: float, in_dim: int,
                 dtype: torch.dtype) -> Iterator[Tensor]:
    """Yield ``weight`` in ``dtype`` with its input channels ``idx`` (along ``in_dim``) shifted by ``scale * delta``.

    ``delta`` has the weight's layout with ``r`` in place of ``d_in`` along ``in_dim``. When ``weight`` is
    already in ``dtype`` the columns are written into its storage and restored on exit (exact: the
    originals are copied, not recomputed); otherwise they are written into the cast copy.
    """
    if weight.dtype != dtype:
        cast = weight.detach().to(dtype)
        original = cast.index_select(in_dim, idx)
        cast.index_copy_(in_dim, idx, torch.add(original, delta.detach(), alpha=scale).to(dtype))
        yield cast
        return
    # .data: the transient write must not bump the version counter autograd checks on the saved weight;
    # by the time anyone else reads the weight, the original columns are back.
    storage = weight.data
    original = storage.index_select(in_dim, idx)  # (d_out, r, ...) copy of the pretrained columns
    storage.index_copy_(in_dim, idx, torch.add(original, delta.detach(), alpha=scale).to(dtype))
    try:
        yield storage
    finally:
        storage.index_copy_(in_dim, idx, original)


def _delta_in_weight_layout(delta: Tensor, transposed: bool) -> Tensor:
    # delta is stored (d_out, r) for every layer type; GPT-2's Conv1D keeps its weight as (d_in, d_out).
    return delta.t() if transposed else delta


# ----------------------------------------------------------------------------------------------------
# Linear and GPT-2 Conv1D: y = x W^T + b with W (d_out, d_in), or y = x W + b with W (d_in, d_out).
# The maths lives in two functions; it is registered twice: as a torch.autograd.Function for eager
# mode (a few microseconds of Python per call) and as torch.library custom ops that torch.compile
# keeps as one opaque node per layer (the custom-op dispatcher costs ~0.3 ms more per call in eager,
# which would starve a GPU at 200+ layers per step).
# ----------------------------------------------------------------------------------------------------

def _linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, idx: Tensor, scale: float,
                    transposed: bool) -> Tensor:
    in_dim = 0 if transposed else 1
    with tuned_weight(weight, _delta_in_weight_layout(delta, transposed), idx, scale, in_dim, x.dtype) as w:
        return F.linear(x, w.t() if transposed else w, None if bias is None else bias.to(x.dtype))


def _linear_backward(grad: Tensor, x_selected: Optional[Tensor], weight: Tensor, delta: Tensor, idx: Tensor,
                     scale: float, transposed: bool, needs_input_grad: bool
                     ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(g W, scale * g^T x[..., idx])``; None for a gradient not asked for (``x_selected`` None: no delta grad)."""
    grad_input = grad_delta = None
    if needs_input_grad:
        in_dim = 0 if transposed else 1
        with tuned_weight(weight, _delta_in_weight_layout(delta, transposed), idx, scale, in_dim,
                          grad.dtype) as w:
            grad_input = grad @ (w.t() if transposed else w)  # (..., d_in)
    if x_selected is not None:
        g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        xs = x_selected.reshape(-1, x_selected.shape[-1]).to(grad.dtype)  # (N, r)
        # One addmm with alpha = scale: the scale costs no operator of its own. beta=0 ignores the input,
        # which only has to broadcast to the output and have its dtype (a one-row view, no copy).
        if g.shape[0] == 0:  # no tokens: the one-row views below would be empty
            grad_delta = torch.zeros(delta.shape, dtype=grad.dtype, device=grad.device)
        elif grad.is_cuda:
            grad_delta = torch.addmm(xs[:1], g.t(), xs, beta=0, alpha=scale)  # (d_out, r); cuBLAS reads g^T as is
        else:
            # On CPU, (r, N) @ (N, d_out) runs 5-10x faster than g^T @ x_sel, whose output has only r columns;
            # then one copy to the (d_out, r) layout of the delta.
            grad_delta = torch.addmm(g[:1], xs.t(), g, beta=0, alpha=scale).t().contiguous()  # (d_out, r)
        grad_delta = grad_delta.to(delta.dtype)
    return grad_input, grad_delta


def _bias_grad(grad: Tensor) -> Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class PartialLinearFunction(torch.autograd.Function):
    """Eager-mode autograd of :func:`partial_linear`; keeps only ``x[..., idx]`` (and references to parameters)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, scale, transposed):
        y = _linear_forward(x, weight, bias, delta, idx, scale, transposed)
        # The only activation kept: the r selected input channels (never the full input).
        x_selected = x.index_select(-1, idx) if delta.requires_grad else None  # (..., r)
        ctx.save_for_backward(x_selected, weight, delta, idx)
        ctx.scale, ctx.transposed = scale, transposed
        return y

    @staticmethod
    def backward(ctx, grad):
        x_selected, weight, delta, idx = ctx.saved_tensors
        grad_input, grad_delta = _linear_backward(grad, x_selected, weight, delta, idx, ctx.scale, ctx.transposed,
                                                  ctx.needs_input_grad[0])
        grad_bias = _bias_grad(grad) if ctx.needs_input_grad[2] else None
        return grad_input, None, grad_bias, grad_delta, None, None, None


def partial_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, idx: Tensor,
                   scale: float, transposed: bool = False) -> Tensor:
    """``y = x W^T + b`` with ``W`` the frozen ``weight`` whose input columns ``idx`` hold ``+ scale * delta``.

    Args:
        x: input ``(..., d_in)``; its dtype is the compute dtype.
        weight: frozen weight, ``(d_out, d_in)``, or ``(d_in, d_out)`` when ``transposed`` (GPT-2 Conv1D).
        bias: optional ``(d_out,)``.
        delta: tuned delta ``(d_out, r)``.
        idx: sorted, unique int64 input-column indices ``(r,)``.
        scale: ``paca_alpha / r``.
        transposed: whether ``weight`` is stored ``(d_in, d_out)``.
    """
    if torch.compiler.is_compiling():
        return partial_linear_op(x, weight, bias, delta, idx, scale, transposed)
    if not torch.is_grad_enabled():  # inference: nothing to save
        return _linear_forward(x, weight, bias, delta, idx, scale, transposed)
    return PartialLinearFunction.apply(x, weight, bias, delta, idx, scale, transposed)


@torch.library.custom_op("paca::partial_linear", mutates_args=())
def partial_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, idx: Tensor,
                      scale: float, transposed: bool) -> Tensor:
    """:func:`partial_linear` as one opaque node for torch.compile."""
    return _linear_forward(x, weight, bias, delta, idx, scale, transposed)


@partial_linear_op.register_fake
def _(x, weight, bias, delta, idx, scale, transposed):
    d_out = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty(*x.shape[:-1], d_out)


@torch.library.custom_op("paca::partial_linear_backward", mutates_args=())
def partial_linear_backward_op(grad: Tensor, x_selected: Optional[Tensor], weight: Tensor, delta: Tensor,
                               idx: Tensor, scale: float, transposed: bool,
                               needs_input_grad: bool) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`partial_linear_op`; an empty tensor stands for a gradient not asked for."""
    grad_input, grad_delta = _linear_backward(grad, x_selected, weight, delta, idx, scale, transposed,
                                              needs_input_grad)
    return (grad.new_empty(0) if grad_input is None else grad_input,
            delta.new_empty(0) if grad_delta is None else grad_delta)


@partial_linear_backward_op.register_fake
def _(grad, x_selected, weight, delta, idx, scale, transposed, needs_input_grad):
    d_in = weight.shape[0] if transposed else weight.shape[1]
    grad_input = grad.new_empty(*grad.shape[:-1], d_in) if needs_input_grad else grad.new_empty(0)
    grad_delta = delta.new_empty(delta.shape) if x_selected is not None else delta.new_empty(0)
    return grad_input, grad_delta


def _op_setup_context(ctx, inputs, output):
    x, weight, bias, delta, idx, scale, transposed = inputs
    x_selected = x.index_select(-1, idx) if delta.requires_grad else None  # (..., r): the only activation kept
    ctx.save_for_backward(x_selected, weight, delta, idx)
    ctx.scale, ctx.transposed, ctx.has_bias = scale, transposed, bias is not None


def _op_backward(ctx, grad):
    x_selected, weight, delta, idx = ctx.saved_tensors
    needs_input_grad = ctx.needs_input_grad[0]
    grad_input, grad_delta = partial_linear_backward_op(grad, x_selected, weight, delta, idx, ctx.scale,
                                                        ctx.transposed, needs_input_grad)
    grad_bias = _bias_grad(grad) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return (grad_input if needs_input_grad else None, None, grad_bias,
            grad_delta if x_selected is not None else None, None, None, None)


partial_linear_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------------------------------
# Conv2d: input channels are the columns; W (C_out, C_in, kh, kw), delta (C_out, r, kh, kw).
# ----------------------------------------------------------------------------------------------------

class PartialConv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, W) + b`` with ``W[:, idx] = W0[:, idx] + scale * delta``; keeps only ``x[:, idx]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, scale, stride, padding, dilation):
        with tuned_weight(weight, delta, idx, scale, 1, x.dtype) as w:
            y = F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation)
        x_selected = x.index_select(1, idx) if delta.requires_grad else None  # (B, r, H, W)
        ctx.save_for_backward(x_selected, weight, delta, idx)
        ctx.conv = (stride, padding, dilation)
        ctx.scale, ctx.input_shape, ctx.has_bias = scale, x.shape, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x_selected, weight, delta, idx = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        grad_input = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            with tuned_weight(weight, delta, idx, ctx.scale, 1, grad.dtype) as w:
                grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, w, grad, stride, padding, dilation)
        if x_selected is not None:
            grad_delta = torch.nn.grad.conv2d_weight(x_selected.to(grad.dtype), delta.shape, grad, stride,
                                                     padding, dilation)
            grad_delta = grad_delta.to(delta.dtype).mul_(ctx.scale)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_input, None, grad_bias, grad_delta, None, None, None, None, None


def partial_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, idx: Tensor,
                   scale: float, stride, padding, dilation) -> Tensor:
    """Conv2d (groups 1, zero padding) with input channels ``idx`` of ``weight`` shifted by ``scale * delta``.

    ``x`` is ``(B, C_in, H, W)`` or unbatched ``(C_in, H, W)``, as for ``F.conv2d``.
    """
    if x.dim() == 3:  # the Function indexes channels on dim 1
        return PartialConv2dFunction.apply(x.unsqueeze(0), weight, bias, delta, idx, scale, stride, padding,
                                           dilation).squeeze(0)
    return PartialConv2dFunction.apply(x, weight, bias, delta, idx, scale, stride, padding, dilation)
