"""Which input columns each layer tunes (paper section 5; S²FT's structured selection): the column maths.

Every strategy returns sorted, unique int64 indices into the layer's input dimension. The chosen
indices are stored in the adapter (``paca_indices``), so loading never selects again. Pure torch: the tuner's
layers call these; the gradient calibration pass (:mod:`paca.tuner.calibration`) and the structured layout of a
transformers config (:mod:`paca.tuner.structured`) live above the tuner's layers.

    random        r columns drawn uniformly, seeded by (random_seed, module name) as PEFT's PaCA does
    weight_norm   argtop_r_j ||W0[:, j]||_2
    gradient      argtop_r_j sum_steps sum_i (dL/dW_ij)^2        (select_by_gradient, no weight update)
    structured    attention output: whole heads, columns [h*hd, (h+1)*hd);  FFN down: whole channels
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def layer_seed(random_seed: int | None, key: str) -> int | None:
    """PEFT's per-layer seed: ``(random_seed + crc32(key)) % 2**63`` for the module key (e.g.
    ``model.layers.0.self_attn.q_proj``); None (the global RNG) when ``random_seed`` is None."""
    if random_seed is None:
        return None
    return (random_seed + zlib.crc32(key.encode("utf-8"))) % (2**63)


def random_columns(d_in: int, r: int, random_seed: int | None, key: str) -> Tensor:
    """``r`` distinct columns of ``range(d_in)`` drawn uniformly, sorted: ``randperm(d_in)[:r]`` from
    :func:`layer_seed`'s generator, so the same config picks the same columns as PEFT's own PaCA."""
    seed = layer_seed(random_seed, key)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randperm(d_in, generator=generator)[:r].sort().values


def weight_norm_columns(weight: Tensor, r: int, column_axis: int) -> Tensor:
    """The ``r`` input columns of ``weight`` with the largest L2 norm (paper section 5)."""
    other = [d for d in range(weight.dim()) if d != column_axis]
    norms = weight.detach().float().pow(2).sum(dim=other)  # (d_in,)
    return norms.topk(r).indices.sort().values.cpu()


def check_indices(idx: Tensor, d_in: int | None, r: int, where: str) -> None:
    """Raise ValueError unless ``idx`` holds ``r`` sorted, unique integers in ``[0, d_in)`` (``d_in`` None: any)."""
    if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
        raise ValueError(
            f"{where}: paca_indices must be a 1-D integer tensor, got {idx.dtype} of shape {tuple(idx.shape)}."
        )
    if idx.numel() != r:
        raise ValueError(f"{where}: {idx.numel()} paca_indices for r={r}.")
    if r and (int(idx.min()) < 0 or (d_in is not None and int(idx.max()) >= d_in)):
        raise ValueError(
            f"{where}: paca_indices out of range for an input dimension of {d_in} "
            f"(min {int(idx.min())}, max {int(idx.max())})."
        )
    if r > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{where}: paca_indices must be sorted and unique (found duplicates or disorder).")


def check_expert_indices(idx: Tensor, num_experts: int, d_in: int | None, r: int, where: str) -> None:
    """Raise ValueError unless ``idx`` is ``(num_experts, r)`` with each row valid column indices."""
    if idx.dim() != 2 or idx.shape[0] != num_experts:
        raise ValueError(
            f"{where}: paca_indices must have shape ({num_experts}, {r}) (one row per expert), got {tuple(idx.shape)}."
        )
    for e in range(num_experts):
        check_indices(idx[e], d_in, r, f"{where}, expert {e}")


def structured_columns(d_in: int, r: int, block: int, seed: int | None, layer_name: str) -> Tensor:
    """``r // block`` whole blocks of ``block`` consecutive columns, drawn at random (seeded like random_columns).

    With ``block = head_dim`` on an attention output projection, block ``h`` is head ``h``'s columns
    ``[h * head_dim, (h + 1) * head_dim)``; with ``block = 1`` every column is its own channel.
    """
    if block <= 0 or d_in % block or r % block:
        raise ValueError(
            f"module '{layer_name}': structured selection needs r={r} and d_in={d_in} to be multiples "
            f"of the block size {block}."
        )
    blocks = random_columns(d_in // block, r // block, seed, layer_name)  # (r / block,) chosen heads
    return (blocks[:, None] * block + torch.arange(block)).reshape(-1)  # sorted: blocks sorted, offsets ascending


def column_scores(grad_w: Tensor) -> Tensor:
    """``sum_i (dL/dW_ij)^2`` for every input column ``j`` of a weight gradient (``(d_out, d_in)`` or a
    convolution's ``(C_out, C_in, *kernel)``): ``(d_in,)``."""
    return grad_w.pow(2).sum(0) if grad_w.dim() == 2 else grad_w.pow(2).sum((0, *range(2, grad_w.dim())))
