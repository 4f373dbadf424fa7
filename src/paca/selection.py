"""Which input columns each layer tunes.

Every strategy returns sorted, unique int64 indices into the layer's input dimension. The chosen
indices are stored in the adapter (``paca_indices``), so loading never selects again.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def layer_seed(seed: int, layer_name: str) -> int:
    """A 63-bit seed from the config seed and the layer's name: stable across processes and runs."""
    digest = hashlib.sha256(f"{seed}/{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_columns(d_in: int, r: int, seed: int, layer_name: str) -> Tensor:
    """``r`` distinct columns of ``range(d_in)`` drawn uniformly, reproducible from ``seed`` and ``layer_name``."""
    generator = torch.Generator().manual_seed(layer_seed(seed, layer_name))
    return torch.randperm(d_in, generator=generator)[:r].sort().values


def weight_norm_columns(weight: Tensor, r: int, in_dim: int) -> Tensor:
    """The ``r`` input columns of ``weight`` with the largest L2 norm (paper section 5)."""
    other = [d for d in range(weight.dim()) if d != in_dim]
    norms = weight.detach().float().pow(2).sum(dim=other)  # (d_in,)
    return norms.topk(r).indices.sort().values.cpu()


def check_indices(idx: Tensor, d_in: int | None, r: int, where: str) -> None:
    """Raise ValueError unless ``idx`` holds ``r`` sorted, unique integers in ``[0, d_in)`` (``d_in`` None: unknown)."""
    if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
        raise ValueError(f"{where}: paca_indices must be a 1-D integer tensor, got {idx.dtype} of shape "
                         f"{tuple(idx.shape)}.")
    if idx.numel() != r:
        raise ValueError(f"{where}: {idx.numel()} paca_indices for r={r}.")
    if r and (int(idx.min()) < 0 or (d_in is not None and int(idx.max()) >= d_in)):
        raise ValueError(f"{where}: paca_indices out of range for an input dimension of {d_in} "
                         f"(min {int(idx.min())}, max {int(idx.max())}).")
    if r > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{where}: paca_indices must be sorted and unique (found duplicates or disorder).")
