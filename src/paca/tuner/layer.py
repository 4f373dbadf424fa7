"""The tuned layers' two base classes: :class:`PacaLayer` (every PaCA layer) and :class:`SingleWeightLayer`.

    W[:, idx] = W0[:, idx] + (paca_alpha / r) * D        y = x W^T + b     (one matmul)

State per adapter name: ``paca_delta`` (D) and ``paca_indices`` (sorted int64 ``idx``), held per projection by
fused experts. The tuned columns are written into the frozen weight for a forward and its backward, which restores
W0 (:mod:`paca.ops.columns`); where a write is still there (a forward whose backward never ran) the layer writes
the pretrained columns back, bit for bit, before anything reads the weight as the base: its state_dict,
load_state_dict, disabled adapters, merge, unload, a copy (deepcopy, pickle) or a conversion (``.to()``), and a new
adapter's column selection. ``merge`` writes the merged columns for good (and ``unmerge`` restores them bit for
bit). The layer types: :mod:`.linear`, :mod:`.conv`, :mod:`.quantized`, :mod:`.router` (single-weight layers) and
:mod:`.experts`.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from .. import selection
from ..ops import ColumnWriter


class PacaLayer(nn.Module, BaseTunerLayer):
    """Every layer the tuner puts in a model: ``isinstance(m, PacaLayer)`` means "a PaCA layer".

    What they share: the adapter state, the base weights read back as pretrained (state_dict, load_state_dict,
    disabled adapters, unload, delete, copies, conversions) through ``self._column_writer`` (``restore()`` /
    ``forget()``), and the forward's dispatch to the subclass's ``_partial_forward`` with ``_active_delta``.

    Args:
        base_layer: the frozen module.
        layer_name: its name in the base model (errors name it).
        column_writer: writes the tuned columns into the base weight (a :class:`paca.ops.ColumnWriter`, or one
            per projection for fused experts).
        per_projection: adapters hold one delta and one index tensor per projection (fused experts).
    """

    adapter_layer_names = ("paca_delta",)
    other_param_names = ("paca_indices", "r", "paca_alpha", "scaling")

    def __init__(
        self, base_layer: nn.Module, layer_name: str, column_writer, per_projection: bool = False, **kwargs
    ) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.paca_delta = nn.ModuleDict() if per_projection else nn.ParameterDict({})
        self.paca_indices = nn.ModuleDict() if per_projection else BufferDict({}, persistent=True)
        self.r: dict[str, int] = {}
        self.paca_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._premerge_columns: dict = {}  # exact originals, for a bit-exact unmerge
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self._column_writer = column_writer
        # Checkpoints store, and loads replace, the pretrained weights.
        self.register_state_dict_pre_hook(_restore_before_state_dict)
        self.register_load_state_dict_pre_hook(_restore_before_load)

    @staticmethod
    def new_delta(shape: tuple[int, ...], device, init_weights: bool) -> Tensor:
        """A float32 delta of ``shape``: zero (the layer starts as its base), or, with ``init_weights=False``,
        drawn from ``normal(0, 0.1)`` with the global RNG (PEFT's convention for tests: an adapter that changes
        the outputs from the start)."""
        delta = torch.zeros(shape, dtype=torch.float32, device=device)
        if not init_weights:
            nn.init.normal_(delta, std=0.1)
        return delta

    def _record_adapter(self, adapter_name: str, r: int, paca_alpha: float, scaling: float) -> None:
        self.r[adapter_name] = r
        self.paca_alpha[adapter_name] = paca_alpha
        self.scaling[adapter_name] = scaling

    # -- the forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if "adapter_names" in kwargs:
            return self._mixed_batch_forward(x, *args, **kwargs)
        applied = self._applied_delta()
        if applied is None:
            return self._base_forward(x, *args, **kwargs)
        return self._partial_forward(x, *applied)

    def _partial_forward(self, x: Tensor, *applied) -> Tensor:
        raise NotImplementedError

    def _applied_delta(self):
        """What the forward applies (the subclass's ``_active_delta``); None when it is the base layer's
        (disabled, merged, none active)."""
        if self._disable_adapters or self.merged_adapters:
            return None
        return self._active_delta()

    def _base_forward(self, *args, **kwargs) -> Tensor:
        """The base layer's output, with W0 in the tuned columns (merged columns when merged and enabled)."""
        self._column_writer.restore()
        if self._disable_adapters and self.merged_adapters:
            self.unmerge()
        return self.base_layer(*args, **kwargs)

    @staticmethod
    def _autocast_input(x: Tensor) -> Tensor:
        # The operators compute in x's dtype; under autocast that is the autocast dtype, as for nn.Linear.
        # The usual case, asked without building a device object (torch's "any autocast" leaves MPS out).
        if not (torch._C._is_any_autocast_enabled() or x.is_mps):
            return x
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return x.to(torch.get_autocast_dtype(device_type))
        return x

    def extra_repr(self) -> str:
        # Which PaCA runs this layer: paca's, not PEFT's own (whose layers print as "paca.Linear").
        return "implementation=paca"

    # -- the base weights read back as pretrained -----------------------------------------------------
    def _apply(self, fn, recurse=True):
        self._column_writer.forget()  # .to(), .half(), .cuda(): convert the pretrained weight, read the columns again
        return super()._apply(fn, recurse)

    def __getstate__(self):
        self._column_writer.restore()  # deepcopy and pickle copy the pretrained weight
        return super().__getstate__()

    def restore_base_weight(self) -> None:
        """Write the pretrained columns back now (the next forward writes the tuned ones again)."""
        self._column_writer.restore()

    def release_base_layer(self) -> nn.Module:
        """The base layer, handed back when this PaCA layer is removed from the model."""
        self._column_writer.forget()
        return self.get_base_layer()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """PEFT's unload: the base layer, with the adapters merged if ``merge``, else exactly pretrained."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.release_base_layer()

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled:
            self._column_writer.restore()  # disable_adapter(): the base weight is read as the base from now on
        super().enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        self._column_writer.forget()
        super().delete_adapter(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # PEFT moves (and casts) an adapter's entries to the base layer's device and float dtype. peft < 0.21 (the
        # release axolotl 0.19 pins) casts integer buffers too: the column indices would become floats (rounded,
        # in 16 bits). They keep their int64 and only follow the device.
        indices = {}
        for name in (*self.adapter_layer_names, *self.other_param_names):
            held = getattr(self, name, None)
            if isinstance(held, BufferDict) and adapter_name in held and not held[adapter_name].is_floating_point():
                indices[name] = held[adapter_name]
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        for name, tensor in indices.items():
            held = getattr(self, name)
            held[adapter_name] = tensor.to(held[adapter_name].device)

    # -- PEFT's conversion to LoRA --------------------------------------------------------------------
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def _get_additive_delta(self, adapter_name: str = "default") -> Tensor:
        # PEFT's get_additive_delta: PaCA is additive, W' = W0 + delta, in the delta's dtype.
        return self.get_delta_weight(adapter_name)


class SingleWeightLayer(PacaLayer):
    """A PaCA layer over one weight whose ``column_axis`` the adapter's columns index: linear, convolution, 4-bit,
    router. Several adapters may be active at once (their columns combine) and a batch may mix adapters per row.

    Subclasses give ``_partial_forward(x, delta, idx, scale)``.
    """

    def __init__(self, base_layer: nn.Module, layer_name: str, column_axis: int = 1, **kwargs) -> None:
        super().__init__(base_layer, layer_name, ColumnWriter(column_axis), **kwargs)
        self.column_axis = column_axis  # the weight axis the columns index: 1 for (d_out, d_in), 0 for (d_in, d_out)

    # -- shapes -------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.get_base_layer().weight.shape[self.column_axis]

    @property
    def out_features(self) -> int:
        return self.get_base_layer().weight.shape[1 - self.column_axis]  # d_out (C_out for a convolution)

    def delta_shape(self, r: int) -> tuple[int, ...]:
        """Shape of D for this layer: the weight's, with r in place of d_in, d_out first."""
        shape = list(self.get_base_layer().weight.shape)
        shape[self.column_axis] = r
        return tuple(shape) if self.column_axis == 1 else (shape[1], r)

    def _delta_in_weight_layout(self, delta: Tensor) -> Tensor:
        return delta if self.column_axis == 1 else delta.t()

    # -- adapters -----------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        paca_alpha: float,
        seed: int | None = None,
        selection_strategy: str = "random",
        indices: Tensor | None = None,
        inference_mode: bool = False,
        column_block: int = 1,
        init_weights: bool = True,
        scaling: float | None = None,
        **kwargs,
    ) -> None:
        """Add adapter ``adapter_name``: choose its columns and create a zero delta.

        ``seed`` is the config's ``random_seed`` (None: the global RNG); ``indices`` given columns (then ``r`` is
        their number); ``scaling`` the scale when it is not ``paca_alpha / r`` (PEFT's ``paca_indices_pattern``
        keeps ``paca_alpha / config.r``).

        Raises:
            ValueError: if ``r`` is not in ``[1, d_in]`` or ``indices`` are not valid for this layer.
        """
        d_in = self.in_features
        where = f"module '{self.layer_name}'"
        if not isinstance(r, int) or r <= 0 or r > d_in:
            raise ValueError(f"{where}: r={r} must be between 1 and the layer's input dimension {d_in}.")
        self._column_writer.restore()  # column selection (weight_norm) reads the base weight
        weight = self.get_base_layer().weight
        if indices is None:
            indices = self.select_columns(r, seed, selection_strategy, column_block)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        selection.check_indices(indices, d_in, r, where)
        self._record_adapter(adapter_name, r, paca_alpha, paca_alpha / r if scaling is None else scaling)
        self.paca_indices[adapter_name] = indices.to(weight.device)
        self.paca_delta[adapter_name] = nn.Parameter(self.new_delta(self.delta_shape(r), weight.device, init_weights))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def select_columns(self, r: int, seed: int | None, strategy: str, column_block: int = 1) -> Tensor:
        """The ``r`` input columns this layer tunes, by ``strategy`` (see :mod:`paca.selection`).

        ``column_block`` is the block size of ``structured`` (head_dim for attention output projections,
        1 for FFN down projections), set by the model from its config.
        """
        if strategy in ("random", "gradient"):  # gradient: placeholders until paca.select_by_gradient sets them
            return selection.random_columns(self.in_features, r, seed, self.layer_name)
        if strategy == "weight_norm":
            return selection.weight_norm_columns(self.get_base_layer().weight, r, self.column_axis)
        if strategy == "structured":
            return selection.structured_columns(self.in_features, r, column_block, seed, self.layer_name)
        raise ValueError(
            f"module '{self.layer_name}': column selection '{strategy}' is not available for "
            f"{type(self.get_base_layer()).__name__}."
        )

    def set_indices(self, adapter_name: str, indices: Tensor) -> None:
        """Replace the tuned columns of ``adapter_name`` (its delta is reset to zero)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        selection.check_indices(indices, self.in_features, self.r[adapter_name], f"module '{self.layer_name}'")
        self._column_writer.restore()
        self.paca_indices[adapter_name] = indices.to(self.paca_indices[adapter_name].device)
        with torch.no_grad():
            self.paca_delta[adapter_name].zero_()

    def _active_delta(self) -> tuple[Tensor, Tensor, float] | None:
        """(delta, idx, scale) of the active adapters, combined into one column set; None if none is active.

        Several active adapters add up: their columns are merged (sorted union) and overlapping
        columns receive the sum of the scaled deltas, differentiably.
        """
        active = self._active_adapter  # PEFT's active_adapters, without its two properties (once per layer call)
        return self._combined_delta([active] if isinstance(active, str) else active)

    def _combined_delta(self, adapter_names: list[str]) -> tuple[Tensor, Tensor, float] | None:
        """(delta, idx, scale) of ``adapter_names`` added up, as for :meth:`_active_delta`; None if none is here."""
        if len(adapter_names) == 1:  # the common case, once per layer call: plain dict lookups, no module __getattr__
            delta = self._modules["paca_delta"]._parameters.get(adapter_names[0])
            if delta is None:
                return None
            name = adapter_names[0]
            return delta, self._modules["paca_indices"]._buffers[name], self.scaling[name]
        active = [a for a in adapter_names if a in self.paca_delta]
        if not active:
            return None
        if len(active) == 1:
            a = active[0]
            return self.paca_delta[a], self.paca_indices[a], self.scaling[a]
        union = torch.unique(torch.cat([self.paca_indices[a] for a in active]))  # sorted
        first = self.paca_delta[active[0]]
        shape = list(first.shape)
        shape[1] = union.numel()
        combined = first.new_zeros(shape)
        for a in active:
            position = torch.searchsorted(union, self.paca_indices[a])
            combined = combined.index_add(1, position, self.paca_delta[a] * self.scaling[a])
        return combined, union, 1.0

    # -- merge --------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """Dense ``W - W0`` of one adapter: zero but for the tuned columns, which hold ``scale * D``."""
        weight = self.get_base_layer().weight
        delta = self._delta_in_weight_layout(self.paca_delta[adapter_name].detach())
        dense = torch.zeros(weight.shape, dtype=delta.dtype, device=delta.device)
        return dense.index_copy_(self.column_axis, self.paca_indices[adapter_name], delta * self.scaling[adapter_name])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the tuned columns into the base weight; the originals are kept for :meth:`unmerge`."""
        self._column_writer.restore()
        storage = self.get_base_layer().weight.data
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.paca_delta:
                continue
            idx = self.paca_indices[name]
            original = storage.index_select(self.column_axis, idx)
            delta = self._delta_in_weight_layout(self.paca_delta[name].detach())
            merged = torch.add(original, delta, alpha=self.scaling[name]).to(storage.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise broken_adapter_error(name, self.layer_name)
            self._premerge_columns[name] = original
            storage.index_copy_(self.column_axis, idx, merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base weight bit for bit, undoing merges in reverse order."""
        storage = self.get_base_layer().weight.data
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            storage.index_copy_(self.column_axis, self.paca_indices[name], self._premerge_columns.pop(name))

    def _mixed_batch_forward(self, x: Tensor, *args, adapter_names: list[str], **kwargs) -> Tensor:
        """Each row of the batch (dim 0) through its own adapter (``"__base__"``: none), as PEFT's
        ``model(..., adapter_names=[...])``: rows are grouped by adapter, each group runs with its columns."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"module '{self.layer_name}': {len(adapter_names)} adapter_names for a batch of "
                f"{x.shape[0]} rows; pass one name per row."
            )
        if self.merged_adapters:
            raise ValueError(
                f"module '{self.layer_name}': adapter_names cannot be used while adapters are merged "
                f"({self.merged_adapters}); unmerge_adapter() first."
            )
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(row)
        result = None
        for name, rows in groups.items():
            applied = None if self._disable_adapters or name == "__base__" else self._combined_delta([name])
            part = x[rows]
            out = (
                self._base_forward(part, *args, **kwargs) if applied is None else self._partial_forward(part, *applied)
            )
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result[rows] = out
        return result


def broken_adapter_error(adapter_name: str, layer_name: str) -> ValueError:
    """safe_merge's error, worded as PEFT's methods word it, with the module."""
    return ValueError(
        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken "
        f"(module '{layer_name}'; nothing of it was merged)."
    )


def _restore_before_state_dict(module: PacaLayer, prefix: str, keep_vars: bool) -> None:
    module._column_writer.restore()  # a checkpoint stores the pretrained weight, never W0 + s * D


def _restore_before_load(module: PacaLayer, state_dict: dict, prefix: str, *args) -> None:
    # New base weights make the copy of the pretrained columns stale; anything else keeps it (indices are versioned).
    if any(key.startswith(prefix + "base_layer.") for key in state_dict):
        module._column_writer.forget()
    else:
        module._column_writer.restore()
