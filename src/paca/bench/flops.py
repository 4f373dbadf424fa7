"""FLOP formulas for the operators ``torch.utils.flop_counter.FlopCounterMode`` does not count by itself: PaCA's
custom ops, CPU flash attention and torch's grouped GEMM.

Each formula takes the operator's argument shapes (and ``out_shape``) and returns multiply-adds x 2.
"""

from __future__ import annotations

import math

import torch


def _partial_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * math.prod(weight_shape)


def _partial_linear_backward_flops(
    grad_shape,
    x_selected_shape,
    weight_shape,
    delta_shape,
    idx_shape,
    scale,
    transposed,
    needs_input_grad,
    out_shape=None,
    **kwargs,
) -> int:
    tokens = math.prod(grad_shape[:-1])
    flops = 2 * tokens * math.prod(weight_shape) if needs_input_grad else 0  # g W
    if x_selected_shape is not None:
        flops += 2 * tokens * math.prod(delta_shape)  # g^T x[..., idx]
    return flops


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flops(
    grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's grouped GEMM (transformers' fused experts): ``(S, K) x (E, K, N)`` (forward, input gradient) or,
    jagged along K, ``(M, S) x (S, N) -> (E, M, N)`` (weight gradient): 2 multiply-adds per output per K row."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * math.prod(out_shape[1:]) * a_shape[-1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def flop_formulas() -> dict:
    """Formulas for operators FlopCounterMode does not count by itself.

    In eager mode PaCA's linear layers run aten matmuls the counter sees; its custom ops (one opaque node
    per layer, used under torch.compile) would otherwise count as zero.
    """
    aten = torch.ops.aten
    formulas = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
    }
    if hasattr(aten, "_grouped_mm"):
        formulas[aten._grouped_mm] = _grouped_mm_flops
    for name, formula in (
        ("partial_linear", _partial_linear_flops),
        ("partial_linear_backward", _partial_linear_backward_flops),
    ):
        if hasattr(torch.ops.paca, name):
            formulas[getattr(torch.ops.paca, name)] = formula
    return formulas
