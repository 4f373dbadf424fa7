"""Fused MoE experts (transformers 5's 3-D expert weights): each expert tunes ``r`` input columns of its own.

A projection of ``E`` experts has one weight, ``(E, d_out, d_in)`` (Mixtral, Qwen3-MoE, DeepSeek-V3...) or
``(E, d_in, d_out)`` when ``transposed`` (gpt-oss). The token-expert pairs are sorted by expert, so expert ``e``
owns a block of rows ``X_e``; with ``idx_e`` its ``r`` columns and ``s = paca_alpha / r``:

    W_e[:, idx_e] = W0_e[:, idx_e] + s D_e        Y_e = X_e W_e^T              (one grouped GEMM for all e)
    dL/dX_e = G_e W_e                             dL/dD_e = s G_e^T X_e[:, idx_e]   (one grouped GEMM each)

so backward keeps ``X[:, idx]`` (``S x r`` for ``S`` pairs), never ``X``, and the columns of all experts are written
into the fused weight by one scatter that stays there between calls (:mod:`paca.ops.columns`).

The three products are grouped GEMMs (``torch.nn.functional.grouped_mm``, one kernel for all experts, no host
synchronisation) where torch accepts the operands (float32/16-bit, 16-byte aligned strides); otherwise the expert
blocks run one matmul each, as transformers' eager experts do. As for the linear operator, the maths is registered
twice: an autograd Function for eager mode and torch.library ops that torch.compile keeps as one opaque
node per projection (no graph break: the routing below has static shapes).

:func:`experts_forward` is the experts module's forward in transformers' experts interface (routing, gate,
biases, routing weights, the deterministic combine), computing each projection with :func:`partial_experts_linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .columns import ResidentColumns
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


def _columns_for(columns: ResidentColumns | None, transposed: bool) -> ResidentColumns:
    return (
        columns
        if columns is not None
        else ResidentColumns(1 if transposed else 2, transient=True, transposed=transposed)
    )


def _effective(
    weight: Tensor,
    delta: Tensor | None,
    idx: Tensor | None,
    scale: float,
    dtype: torch.dtype,
    columns: ResidentColumns,
    reuse: bool = False,
) -> Tensor:
    if delta is None:
        return _cast(weight.detach(), dtype)
    return columns.written(weight, delta, idx, scale, dtype, reuse=reuse)


def _experts_forward(
    x: Tensor,
    weight: Tensor,
    delta: Tensor | None,
    idx: Tensor | None,
    offsets: Tensor,
    scale: float,
    transposed: bool,
    columns: ResidentColumns,
    read_by_backward: bool,
) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):  # x is in the compute dtype already
        w = _effective(weight, delta, idx, scale, x.dtype, columns)
        y = grouped_matmul(x, w if transposed else w.transpose(1, 2), offsets)  # X_e W_e^T
        if delta is not None:
            columns.release(read_by_backward)
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
    columns: ResidentColumns,
) -> tuple[Tensor | None, Tensor | None]:
    """``(G W, s G^T X[:, idx])`` per expert block; None for a gradient not asked for."""
    grad = grad.contiguous()
    grad_x = grad_delta = None
    with torch.autocast(grad.device.type, enabled=False):
        if needs_input_grad:
            w = _effective(weight, delta, idx, scale, grad.dtype, columns, reuse=True)
            grad_x = grouped_matmul(grad, w.transpose(1, 2) if transposed else w, offsets)  # G_e W_e
            columns.restore()  # the base weight reads as W0 again once its backward is done
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
    def forward(ctx, x, weight, delta, idx, expert_of_row, offsets, scale, transposed, columns):
        y = _experts_forward(x, weight, delta, idx, offsets, scale, transposed, columns, ctx.needs_input_grad[0])
        ctx.save_for_backward(_selected_input(x, delta, idx, expert_of_row), weight, delta, idx, offsets)
        ctx.parameters = (weight, delta, idx)  # the tensors themselves, as paca.ops.linear keeps them
        ctx.scale, ctx.transposed, ctx.columns = scale, transposed, columns
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
            ctx.columns,
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
    columns: ResidentColumns | None = None,
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
        columns: the layer's record of what the weight holds (``in_dim`` 2, or 1 when ``transposed``); None: the
            operator restores the weight before it returns.

    Returns:
        ``(S, d_out)``.
    """
    if torch.compiler.is_compiling():
        key = -1 if columns is None else columns.key
        read_by_backward = torch.is_grad_enabled() and x.requires_grad
        return CompiledPartialExperts.apply(
            x, weight, delta, idx, expert_of_row, offsets, scale, transposed, key, read_by_backward
        )
    columns = _columns_for(columns, transposed)
    if not torch.is_grad_enabled():
        return _experts_forward(x, weight, delta, idx, offsets, scale, transposed, columns, False)
    return _partial_experts_eager(x, weight, delta, idx, expert_of_row, offsets, scale, transposed, columns)


# torch.compile: as in paca.ops.linear, the library ops find the layer's ResidentColumns by key at run time.


def _columns_by_key(key: int, transposed: bool) -> ResidentColumns:
    return _columns_for(ResidentColumns.find(key), transposed)


def _partial_experts_kernel(
    x: Tensor,
    weight: Tensor,
    delta: Tensor | None,
    idx: Tensor | None,
    expert_of_row: Tensor,
    offsets: Tensor,
    scale: float,
    transposed: bool,
    columns_key: int,
    read_by_backward: bool,
) -> Tensor:
    """:func:`partial_experts_linear` as one opaque node for torch.compile."""
    return _experts_forward(
        x, weight, delta, idx, offsets, scale, transposed, _columns_by_key(columns_key, transposed), read_by_backward
    )


partial_experts_op = library_op("partial_experts", _partial_experts_kernel)


@torch.library.register_fake(partial_experts_op)
def _(x, weight, delta, idx, expert_of_row, offsets, scale, transposed, columns_key, read_by_backward):
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
    columns_key: int,
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
        _columns_by_key(columns_key, transposed),
    )
    return (grad.new_empty(0) if grad_x is None else grad_x, grad.new_empty(0) if grad_delta is None else grad_delta)


partial_experts_backward_op = library_op("partial_experts_backward", _partial_experts_backward_kernel)


@torch.library.register_fake(partial_experts_backward_op)
def _(grad, x_selected, weight, delta, idx, offsets, scale, transposed, needs_input_grad, columns_key):
    d_in = weight.shape[1] if transposed else weight.shape[2]
    grad_x = grad.new_empty(grad.shape[0], d_in) if needs_input_grad else grad.new_empty(0)
    grad_delta = delta.new_empty(delta.shape) if x_selected is not None else grad.new_empty(0)
    return grad_x, grad_delta


class CompiledPartialExperts(torch.autograd.Function):
    """What torch.compile traces for one fused experts projection: the two library ops, with the ``r`` channels of
    each token-expert pair kept between them (see :mod:`paca.ops.compiled`)."""

    @staticmethod
    def forward(ctx, x, weight, delta, idx, expert_of_row, offsets, scale, transposed, columns_key, read_by_backward):
        ctx.save_for_backward(_selected_input(x, delta, idx, expert_of_row), weight, delta, idx, offsets)
        ctx.scale, ctx.transposed, ctx.columns_key = scale, transposed, columns_key
        return partial_experts_op(
            x, weight, delta, idx, expert_of_row, offsets, scale, transposed, columns_key, read_by_backward
        )

    @staticmethod
    def backward(ctx, grad):
        x_selected, weight, delta, idx, offsets = ctx.saved_tensors
        needs_input_grad = ctx.needs_input_grad[0]
        grad_x, grad_delta = partial_experts_backward_op(
            grad, x_selected, weight, delta, idx, offsets, ctx.scale, ctx.transposed, needs_input_grad, ctx.columns_key
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


# ----------------------------------------------------------------------------------------------------
# the experts module's forward
# ----------------------------------------------------------------------------------------------------


def experts_forward(
    experts: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    tuned: dict[str, tuple[Tensor, Tensor, float, ResidentColumns]],
) -> Tensor:
    """The forward of a transformers experts module (``@use_experts_implementation``) with tuned projections.

    Args:
        experts: the module: ``gate_up_proj`` (or ``up_proj`` when ``has_gate`` is False) and ``down_proj``, optional
            ``*_bias``, ``_apply_gate`` / ``act_fn``, ``is_transposed``, ``has_post_expert_norm``.
        hidden_states: ``(T, H)`` tokens.
        top_k_index: ``(T, K)`` the experts each token is routed to.
        top_k_weights: ``(T, K)`` their routing weights.
        tuned: projection name -> ``(delta, idx, scale, columns)``; other projections run frozen.

    Returns:
        ``(T, H)``: per token, the routing-weighted sum of its experts' outputs.
    """
    if getattr(experts, "_is_expert_parallel", False):
        raise NotImplementedError("PaCA experts do not support transformers' expert parallelism yet.")
    num_tokens, top_k = top_k_index.shape
    device_type = hidden_states.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden_states.dtype
    )
    expert_ids = top_k_index.reshape(-1)
    expert_of_row, order = torch.sort(expert_ids, stable=True)  # the pairs sorted by expert
    counts = torch.zeros(experts.num_experts, dtype=torch.int32, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int32))  # static shape: no sync
    offsets = counts.cumsum(0, dtype=torch.int32)
    token_of_row = order // top_k
    x = hidden_states[token_of_row].to(compute_dtype)

    def project(x: Tensor, name: str) -> Tensor:
        delta, idx, scale, columns = tuned.get(name, (None, None, 1.0, None))
        y = partial_experts_linear(
            x, getattr(experts, name), delta, idx, expert_of_row, offsets, scale, experts.is_transposed, columns
        )
        if experts.has_bias:
            y = y + getattr(experts, f"{name}_bias")[expert_of_row].to(y.dtype)
        return y

    if experts.has_gate:
        h = experts._apply_gate(project(x, "gate_up_proj"))
    else:
        h = experts.act_fn(project(x, "up_proj"))
    y = project(h.to(compute_dtype), "down_proj")
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    # Back to (token, k) order by a gather (whose backward keeps only the indices; index_copy's would keep y), then
    # a sum over k: deterministic (no atomic scatter-add), in the routing weights' dtype, as transformers does.
    unsorted = y[torch.argsort(order)]
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)
