"""The LoRA factors of a PaCA column delta: ``B @ A`` equals the dense delta exactly (see :mod:`paca.export`)."""

from __future__ import annotations

import torch


def lora_factors(
    delta: torch.Tensor, idx: torch.Tensor, scale: float, in_features: int, kernel_size: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA ``(A, B)`` with ``B @ A`` equal to the dense PaCA delta.

    Args:
        delta: ``(d_out, r)``, or ``(C_out, r, *kernel)`` for a convolution.
        idx: the ``r`` tuned input columns.
        scale: ``paca_alpha / r``.
        in_features: ``d_in`` (or ``C_in``).
        kernel_size: the kernel of a convolution (1-3 sizes), empty for linear layers.

    Returns:
        ``A`` of shape ``(R, d_in)`` (``(R, C_in, kh, kw)``) and ``B`` of shape ``(d_out, R)`` (``(C_out, R, 1, 1)``),
        with ``R = r`` (``r * kh * kw``).
    """
    delta = delta.float()
    r = idx.numel()
    if not kernel_size:
        a = torch.zeros(r, in_features)
        a[torch.arange(r), idx] = 1.0
        return a, delta * scale
    taps = int(torch.tensor(kernel_size).prod())
    rank = r * taps
    a = torch.zeros(rank, in_features, taps)
    rows = torch.arange(rank)
    a[rows, idx.repeat_interleave(taps), torch.arange(taps).repeat(r)] = 1.0
    b = delta.reshape(delta.shape[0], rank) * scale
    return a.reshape(rank, in_features, *kernel_size), b.reshape(*b.shape, *(1,) * len(kernel_size))


def expert_lora_factors(
    delta: torch.Tensor, idx: torch.Tensor, scale: float, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA ``(A, B)`` of fused experts in PEFT's target_parameters layout, equal to the per-expert column deltas.

    PEFT's ``ParamWrapper`` reads ``A`` ``(E * r, d_in)`` as ``(E, r, d_in)`` (expert-major rows) and ``B``
    ``(d_out, r * E)`` as ``(d_out, r, E)`` (rank-major columns), and applies ``B_e A_e`` to expert ``e``; here
    ``A_e`` holds the one-hot rows of ``idx[e]`` and ``B_e = scale * D_e``.

    Args:
        delta: ``(E, d_out, r)``.
        idx: ``(E, r)``.
    """
    experts, d_out, r = delta.shape
    a = torch.zeros(experts, r, in_features)
    a.scatter_(2, idx.unsqueeze(-1), 1.0)
    b = (delta.float() * scale).permute(1, 2, 0)  # (d_out, r, E)
    return a.reshape(experts * r, in_features), b.reshape(d_out, r * experts)
