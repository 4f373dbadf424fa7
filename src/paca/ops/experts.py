"""Fused MoE experts (transformers 5's 3-D expert weights): each expert tunes ``r`` input columns of its own.

A projection of ``E`` experts has one weight, ``(E, d_out, d_in)`` (Mixtral, Qwen3-MoE, DeepSeek-V3...) or
``(E, d_in, d_out)`` when ``transposed`` (gpt-oss). The token-expert pairs are sorted by expert, so expert ``e``
owns a block of rows ``X_e``; with ``idx_e`` its ``r`` columns and ``s = paca_alpha / r``:

    W_e[:, idx_e] = W0_e[:, idx_e] + s D_e        Y_e = X_e W_e^T              (one matmul per expert block)
    dL/dX_e = G_e W_e                             dL/dD_e = s G_e^T X_e[:, idx_e]

so backward keeps ``X[:, idx]`` (``S x r`` for ``S`` pairs), never ``X``, and the columns of all experts are written
into the fused weight by one scatter that stays there between calls (:mod:`paca.ops.columns`).

:func:`experts_forward` is the experts module's forward in transformers' experts interface (routing, gate,
biases, routing weights, the deterministic combine), computing each projection with :func:`partial_experts_linear`.
The expert blocks run one after another (as transformers' eager experts do); a grouped GEMM kernel would run them
in one launch on GPUs and is not used yet.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .columns import ResidentColumns


def _blocks_matmul(x: Tensor, weight: Tensor, counts: list[int], weight_is_in_by_out: bool) -> Tensor:
    """Rows of ``x`` grouped by expert (``counts[e]`` rows each) times expert ``e``'s matrix: ``x_e @ weight[e]``
    if ``weight_is_in_by_out``, else ``x_e @ weight[e]^T``."""
    d_out = weight.shape[2] if weight_is_in_by_out else weight.shape[1]
    out = x.new_empty(x.shape[0], d_out)
    start = 0
    for e, n in enumerate(counts):
        if n:
            w = weight[e] if weight_is_in_by_out else weight[e].t()
            torch.mm(x[start:start + n], w, out=out[start:start + n])
            start += n
    return out


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class PartialExpertsFunction(torch.autograd.Function):
    """Autograd of :func:`partial_experts_linear`; keeps ``x[:, idx_e]`` per row (and references to parameters)."""

    @staticmethod
    def forward(ctx, x, weight, delta, idx, expert_of_row, scale, counts, transposed, columns):
        with torch.autocast(x.device.type, enabled=False):  # x is in the compute dtype already; out= needs it
            w = (columns.written(weight, delta, idx, scale, x.dtype) if delta is not None
                 else _cast(weight.detach(), x.dtype))
            y = _blocks_matmul(x, w, counts, weight_is_in_by_out=transposed)
            if columns is not None and columns.transient:
                columns.restore()
            # The only activation kept: each row's r selected input channels, those of its expert.
            x_selected = x.gather(1, idx[expert_of_row]) if delta is not None and delta.requires_grad else None
        ctx.save_for_backward(x_selected, weight, delta, idx)
        ctx.scale, ctx.counts, ctx.transposed, ctx.columns = scale, counts, transposed, columns
        return y

    @staticmethod
    def backward(ctx, grad):
        x_selected, weight, delta, idx = ctx.saved_tensors
        scale, counts, transposed, columns = ctx.scale, ctx.counts, ctx.transposed, ctx.columns
        grad = grad.contiguous()
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            w = (columns.written(weight, delta, idx, scale, grad.dtype, reuse=True) if delta is not None
                 else _cast(weight.detach(), grad.dtype))
            grad_x = _blocks_matmul(grad, w, counts, weight_is_in_by_out=not transposed)
            if columns is not None and columns.transient:
                columns.restore()
        if x_selected is not None:
            xs = _cast(x_selected, grad.dtype)
            grad_delta = grad.new_zeros(delta.shape)  # (E, d_out, r); experts without tokens get zero
            start = 0
            for e, n in enumerate(counts):
                if n:
                    torch.mm(grad[start:start + n].t(), xs[start:start + n], out=grad_delta[e])
                    start += n
            grad_delta = _cast(grad_delta.mul_(scale), delta.dtype)
        return grad_x, None, grad_delta, None, None, None, None, None, None


def partial_experts_linear(x: Tensor, weight: Tensor, delta: Optional[Tensor], idx: Optional[Tensor],
                           expert_of_row: Tensor, scale: float, counts: list[int], transposed: bool,
                           columns: Optional[ResidentColumns]) -> Tensor:
    """One projection of all experts: row block ``e`` of ``x`` times expert ``e``'s weight with its columns tuned.

    Args:
        x: ``(S, d_in)`` token-expert pairs sorted by expert, in the compute dtype.
        weight: frozen fused weight ``(E, d_out, d_in)``, or ``(E, d_in, d_out)`` when ``transposed``.
        delta: ``(E, d_out, r)``, or None for a projection that is not tuned (then ``idx`` and ``columns`` are None).
        idx: ``(E, r)`` sorted, unique column indices of each expert.
        expert_of_row: ``(S,)`` the expert of each row of ``x`` (sorted).
        scale: ``paca_alpha / r``.
        counts: rows per expert (``E`` ints, summing to ``S``).
        columns: the layer's record of what the weight holds (``in_dim`` 2, or 1 when ``transposed``).

    Returns:
        ``(S, d_out)``.
    """
    if delta is not None and columns is None:
        columns = ResidentColumns(1 if transposed else 2, transient=True, transposed=transposed)
    return PartialExpertsFunction.apply(x, weight, delta, idx, expert_of_row, scale, counts, transposed, columns)


def experts_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    tuned: dict[str, tuple[Tensor, Tensor, float, ResidentColumns]]) -> Tensor:
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
    compute_dtype = (torch.get_autocast_dtype(hidden_states.device.type)
                     if torch.is_autocast_enabled(hidden_states.device.type) else hidden_states.dtype)
    expert_ids = top_k_index.reshape(-1)
    expert_of_row, order = torch.sort(expert_ids, stable=True)  # the pairs sorted by expert
    counts = torch.bincount(expert_of_row, minlength=experts.num_experts).tolist()  # the loop's block sizes
    token_of_row = order // top_k
    x = hidden_states[token_of_row].to(compute_dtype)

    def project(x: Tensor, name: str) -> Tensor:
        delta, idx, scale, columns = tuned.get(name, (None, None, 1.0, None))
        y = partial_experts_linear(x, getattr(experts, name), delta, idx, expert_of_row, scale, counts,
                                   experts.is_transposed, columns)
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
    # Back to (token, k) order, then a sum over k: deterministic (no atomic scatter-add), accumulated in the routing
    # weights' dtype, as transformers' experts implementations do.
    unsorted = y.new_empty(y.shape).index_copy(0, order, y)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)
