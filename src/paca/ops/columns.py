"""How the tuned columns get into the frozen weight: written for a forward and its backward, then W0 again.

A PaCA layer computes with ``W[:, idx] = P + s * D`` where ``P = W0[:, idx]`` is the pretrained value of
the ``r`` tuned columns. :class:`ColumnWriter` copies ``P`` once (``d_out x r``) and writes ``P + s * D`` into
the weight's storage: on CPU, when ``D`` has the weight's dtype, with one ``index_add_`` onto W0's columns (bit for
bit what the general form gives there), else with two operators (an ``add`` into a reused buffer and an
``index_copy_``). PEFT's invariant holds: the base weight reads as W0 between training steps.

    forward    write P + s * D (always: it reads the current D, however D was changed), one matmul; restore at
               once when no backward will read the weight (no grad, or an input that needs no gradient)
    backward   one matmul, no write when the weight still holds exactly what its forward wrote; then restore
    restore    write P back (one ``index_copy_``)

A forward with grad whose backward never runs leaves its write; the tuner layer restores before anything reads its
base weight as pretrained (state_dict, load_state_dict, disable_adapter, merge, unload, deepcopy/pickle, ``.to()``,
a new adapter's column selection). A weight shared with another module (tied embeddings and head) is *transient*:
restored before each operator returns, so the other module never sees the tuned columns. FSDP2 and ZeRO-3
re-gather the weight pristine between forward and backward: backward writes again. Writes go through ``.data``:
they must not bump the version counter autograd checks on the saved weight.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

_REGISTRY: weakref.WeakValueDictionary[int, ColumnWriter] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _composable_states() -> dict:
    if not torch.distributed.is_available():
        return {}
    from torch.distributed import _composable_state

    return _composable_state._module_state_mapping


_COMPOSABLE_STATES = _composable_states()  # FSDP2's per-module states (a weak mapping, filled by fully_shard)


def regathered(weight: Tensor) -> bool:
    """Whether a sharding framework may re-gather ``weight`` (pristine) between a forward and its backward.

    DeepSpeed ZeRO-3 (``ds_id``), FSDP1 (flattened parameters) and FSDP2 (any composable state in the
    process) free the unsharded weight after forward and gather it again, often at the same address and
    with the same version counter, so "still written" cannot be told from the tensor: backward rewrites.
    """
    return len(_COMPOSABLE_STATES) > 0 or hasattr(weight, "ds_id") or getattr(weight, "_fsdp_flattened", False)


class ColumnWriter:
    """Writes the tuned columns into one frozen weight and back: keeps ``P = W0[:, idx]`` and what is written now.

    Args:
        column_axis: the weight dimension the columns index (1 for ``(d_out, d_in)`` weights and convolutions,
            0 for GPT-2's ``(d_in, d_out)`` Conv1D; 2 or 1 for fused experts ``(E, d_out, d_in)`` or
            ``(E, d_in, d_out)``).
        transient: restore ``P`` before each operator returns (a weight shared with another module).
        transposed: the weight stores ``r`` before ``d_out`` while the delta is ``(..., d_out, r)`` (default:
            ``column_axis`` 0).

    ``idx`` is ``(r,)``, or ``(E, r)`` for fused experts: expert ``e`` tunes its own columns ``idx[e]`` (a gather /
    scatter along ``column_axis`` then, with the index broadcast over ``d_out`` without being materialised).
    """

    def __init__(self, column_axis: int, transient: bool = False, transposed: bool | None = None):
        self.column_axis = column_axis
        self.transient = transient
        self.transposed = column_axis == 0 if transposed is None else transposed
        self.key = next(_KEYS)  # how a torch.compile'd custom op finds this object again at run time
        _REGISTRY[self.key] = self
        self._pretrained: Tensor | None = None  # P, the weight's dtype and layout with r along column_axis
        self._sum: Tensor | None = None  # P + s * D, reused by every write
        self._idx: Tensor | None = None  # private copy of the indices P was read at (restore needs them)
        self._idx_source: Tensor | None = None  # the index tensor the layer passes, and its version then
        self._idx_version = -1
        self._weight: Tensor | None = None  # the tensor P + s * D was last written into
        self._written: tuple | None = None  # what that write was; None when the storage holds W0 there
        self._zero: Tensor | None = None  # see broadcast_zero

    def __deepcopy__(self, memo):
        # A copied layer gets its own record (and key): it writes into its own, copied, weight.
        return ColumnWriter(self.column_axis, self.transient, self.transposed)

    def __reduce__(self):
        return ColumnWriter, (self.column_axis, self.transient, self.transposed)

    @staticmethod
    def find(key: int) -> ColumnWriter | None:
        return _REGISTRY.get(key) if key >= 0 else None

    # -- the write ---------------------------------------------------------------------------------------
    def write(self, weight: Tensor, delta: Tensor, idx: Tensor, scale: float) -> Tensor:
        """Write ``P + scale * delta`` into columns ``idx`` of ``weight``; return the storage (no autograd).

        ``delta`` is ``(d_out, r, ...)``; for ``column_axis`` 0 it is transposed to the weight's ``(r, d_out)``.
        """
        storage = weight.data
        if not self._holds_pretrained_for(storage, idx):
            self.restore()  # another column set may be written: give those columns back first
            self._read_pretrained(storage, idx)
        shift = delta.transpose(-1, -2) if self.transposed else delta  # no autograd here: no detach needed
        if idx.dim() == 1 and shift.dtype == storage.dtype and not storage.is_cuda:
            # One operator: W0 + s * D added in place, bit for bit what the two below give on CPU (CUDA's index_add_
            # rounds s * D before adding, so there the sum is taken apart). It needs W0 in the columns.
            self.restore()  # no-op unless a forward whose backward never ran left its write
            storage.index_add_(self.column_axis, self._idx, shift, alpha=scale)
        else:
            torch.add(self._pretrained, shift, alpha=scale, out=self._sum)  # computed in fp32 if D is
            put_columns(storage, self.column_axis, self._idx, self._sum)
        self._weight = weight
        self._written = (weight.data_ptr(), weight._version, delta, scale, idx)
        return storage

    def still_written(self, weight: Tensor, delta: Tensor, idx: Tensor, scale: float) -> bool:
        """Whether ``weight`` still holds exactly the last write, made from this ``delta`` (backward's question).

        An in-place change of ``delta`` since its forward is not asked about: the weight then still holds what the
        forward computed with (autograd itself refuses the change when it unpacks the saved delta, unless saved-tensor
        hooks are active). The last write's ``delta`` and ``idx`` are kept referenced, so their addresses cannot have
        been reused.
        """
        if self._written is None or self.transient or regathered(weight):
            return False
        ptr, version, written_delta, written_scale, written_idx = self._written
        # Storage addresses where the objects differ: autograd may hand backward an alias of the saved delta.
        return (
            weight.data_ptr() == ptr
            and weight._version == version
            and scale == written_scale
            and (delta is written_delta or _same(delta, written_delta))
            and (idx is written_idx or _same(idx, written_idx))
        )

    def weight_with_columns(
        self, weight: Tensor, delta: Tensor, idx: Tensor, scale: float, dtype: torch.dtype, reuse: bool = False
    ) -> Tensor:
        """``weight``'s storage with the tuned columns written, in ``dtype`` (cast after the write if it differs).

        ``reuse``: skip the write when :meth:`still_written` says the storage still holds it (backward). A
        transient writer must be given :meth:`restore` once the returned tensor has been used.
        """
        storage = (
            weight.data
            if reuse and self.still_written(weight, delta, idx, scale)
            else self.write(weight, delta, idx, scale)
        )
        return storage if storage.dtype == dtype else storage.to(dtype)

    def after_forward(self, read_by_backward: bool) -> None:
        """After a forward: the columns stay written only for a backward that reads the weight (it restores them)."""
        if self.transient or not read_by_backward:
            self.restore()

    def broadcast_zero(self, like: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A zero of ``shape`` in ``like``'s dtype and device that allocates nothing (a 0-dim zero, expanded), kept
        for the next call: the input a backward's ``addmm(zero, ..., beta=0)`` never reads."""
        zero = self._zero
        if zero is None or zero.shape != shape or zero.dtype != like.dtype or zero.device != like.device:
            zero = self._zero = torch.zeros((), dtype=like.dtype, device=like.device).expand(shape)
        return zero

    # -- the pretrained copy -----------------------------------------------------------------------------
    def _holds_pretrained_for(self, storage: Tensor, idx: Tensor) -> bool:
        # Devices and dtypes change only through .to() and friends, which drop P (the layer's _apply).
        return (
            self._pretrained is not None
            and (idx is self._idx_source or _same(idx, self._idx_source))
            and idx._version == self._idx_version
            and self._pretrained.dtype == storage.dtype
        )

    def _read_pretrained(self, storage: Tensor, idx: Tensor) -> None:
        # The storage holds W0 at idx now: nothing is written (restored above) or this is the first write.
        self._idx = idx.clone()
        self._idx_source, self._idx_version = idx, idx._version
        # (d_out, r, ...): one copy per column set
        self._pretrained = take_columns(storage, self.column_axis, self._idx)
        self._sum = torch.empty_like(self._pretrained)

    def restore(self) -> None:
        """Write ``P`` back where the last write went (no-op when nothing is written or the storage is gone).

        Under FSDP2/ZeRO-3 the written tensor may have been freed (its storage resized to 0) or re-gathered
        pristine; writing ``P`` into a re-gathered storage changes nothing, so it is safe either way.
        """
        if self._written is None:
            return
        self._written = None
        weight, self._weight = self._weight, None
        storage = weight.data
        p = self._pretrained
        if (
            storage.untyped_storage().nbytes() == 0
            or storage.dim() != p.dim()
            or storage.dtype != p.dtype
            or storage.device != p.device
        ):
            return  # freed (FSDP2 reshard, ZeRO-3 placeholder) or converted: it holds no write of ours
        put_columns(storage, self.column_axis, self._idx, p)

    def forget(self) -> None:
        """Restore, then drop ``P``: the base weight is about to be replaced, converted or copied."""
        self.restore()
        self._pretrained = self._sum = self._idx = self._idx_source = None
        self._idx_version = -1


def _expert_index(storage: Tensor, column_axis: int, idx: Tensor) -> Tensor:
    # (E, r) -> the weight's shape with r along column_axis, broadcast (stride 0) over the other, d_out, dimension.
    shape = list(storage.shape)
    shape[column_axis] = idx.shape[1]
    return idx.unsqueeze(3 - column_axis).expand(shape)


def take_columns(storage: Tensor, column_axis: int, idx: Tensor) -> Tensor:
    """A copy of ``storage``'s columns ``idx`` along ``column_axis`` (per expert for an ``(E, r)`` ``idx``)."""
    if idx.dim() == 1:
        return storage.index_select(column_axis, idx)
    return storage.gather(column_axis, _expert_index(storage, column_axis, idx))


def put_columns(storage: Tensor, column_axis: int, idx: Tensor, columns: Tensor) -> None:
    """Write ``columns`` (laid out as :func:`take_columns` returns them) into ``storage``, in place."""
    if idx.dim() == 1:
        storage.index_copy_(column_axis, idx, columns)
    else:
        storage.scatter_(column_axis, _expert_index(storage, column_axis, idx), columns)


def _same(a: Tensor, b: Tensor) -> bool:
    """``a`` is ``b`` or an alias of it (``b`` is kept referenced, so no other tensor can have its address)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def write_into_copy(dense: Tensor, delta: Tensor, idx: Tensor, scale: float, column_axis: int) -> Tensor:
    """``dense`` (a fresh copy nobody else reads, e.g. a dequantized 4-bit weight) with columns ``idx`` shifted
    by ``scale * delta``, in place: the sum is rounded once to ``dense``'s dtype, as :class:`ColumnWriter` does."""
    columns = dense.index_select(column_axis, idx)
    torch.add(columns, delta.detach(), alpha=scale, out=columns)
    return dense.index_copy_(column_axis, idx, columns)
