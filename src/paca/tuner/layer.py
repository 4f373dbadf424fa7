"""The tuned layer: nn.Linear, transformers' Conv1D and nn.Conv1d/2d/3d with r tuned input columns.

    W[:, idx] = W0[:, idx] + (paca_alpha / r) * D        y = x W^T + b     (one matmul)

State per adapter name: ``paca_delta`` (D, ``d_out x r``, or ``C_out x r x *kernel`` for convolutions) and
``paca_indices`` (sorted int64 ``idx``). The tuned columns are written into the frozen weight for a forward and
its backward, which restores W0 (:mod:`paca.ops.columns`); where a write is still there (a forward whose backward
never ran) the layer writes the pretrained columns back, bit for bit, before anything reads the weight as the base:
its state_dict, load_state_dict, disabled adapters, merge, unload, a copy (deepcopy, pickle) or a conversion
(``.to()``), and a new adapter's column selection. ``merge`` writes the merged columns for good (and ``unmerge``
restores them bit for bit).
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from .. import selection
from ..ops import ResidentColumns, partial_conv, partial_linear


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2-style transformers Conv1D: a linear layer whose weight is stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class ResidentTunerLayer(BaseTunerLayer):
    """What every tuned layer that writes its columns into its base weights shares (linear, convolution, 4-bit,
    router, fused experts): the base weights read back as pretrained (state_dict, load_state_dict, disabled
    adapters, unload, delete), through ``self._columns`` (``restore()`` / ``forget()``), ``merge`` / ``unmerge`` and
    ``_active_delta`` of the subclass."""

    def _watch_base_reads(self) -> None:
        """Checkpoints store, and loads replace, the pretrained weights (see the hooks below)."""
        self.register_state_dict_pre_hook(_restore_before_state_dict)
        self.register_load_state_dict_pre_hook(_restore_before_load)

    def release_base_layer(self) -> nn.Module:
        """The base layer, handed back when this PaCA layer is removed from the model."""
        self._columns.forget()
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
            self._columns.restore()  # disable_adapter(): the base weight is read as the base from now on
        super().enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        self._columns.forget()
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

    def restore_base_weight(self) -> None:
        """Write the pretrained columns back now (the next forward writes the tuned ones again)."""
        self._columns.restore()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def _get_additive_delta(self, adapter_name: str = "default") -> Tensor:
        # PEFT's get_additive_delta: PaCA is additive, W' = W0 + delta, in the delta's dtype.
        return self.get_delta_weight(adapter_name)

    def _applied_delta(self):
        """What the forward applies (the subclass's ``_active_delta``); None when it is the base layer's
        (disabled, merged, none active)."""
        if self._disable_adapters or self.merged_adapters:
            return None
        return self._active_delta()

    def _base_forward(self, *args, **kwargs) -> Tensor:
        """The base layer's output, with W0 in the tuned columns (merged columns when merged and enabled)."""
        self._columns.restore()
        if self._disable_adapters and self.merged_adapters:
            self.unmerge()
        return self.base_layer(*args, **kwargs)


class PacaLayer(ResidentTunerLayer):
    """Adapter state and the operations every PaCA layer type shares.

    Subclasses set ``in_dim`` (the weight dimension indexed by ``idx``) and implement ``forward``.
    """

    adapter_layer_names = ("paca_delta",)
    other_param_names = ("paca_indices", "r", "paca_alpha", "scaling")
    in_dim: int = 1

    def __init__(self, base_layer: nn.Module, layer_name: str, **kwargs) -> None:
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.paca_delta = nn.ParameterDict({})
        self.paca_indices = BufferDict({}, persistent=True)
        self.r: dict[str, int] = {}
        self.paca_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._premerge_columns: dict[str, Tensor] = {}  # exact originals, for a bit-exact unmerge
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self._columns = ResidentColumns(self.in_dim)
        if isinstance(self, nn.Module):
            self._watch_base_reads()

    # -- shapes -------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.get_base_layer().weight.shape[self.in_dim]

    @property
    def out_features(self) -> int:
        return self.get_base_layer().weight.shape[1 - self.in_dim]  # d_out (C_out for a convolution)

    def delta_shape(self, r: int) -> tuple[int, ...]:
        """Shape of D for this layer: the weight's, with r in place of d_in, d_out first."""
        shape = list(self.get_base_layer().weight.shape)
        shape[self.in_dim] = r
        return tuple(shape) if self.in_dim == 1 else (shape[1], r)

    def _delta_in_weight_layout(self, delta: Tensor) -> Tensor:
        return delta if self.in_dim == 1 else delta.t()

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
        self._columns.restore()  # column selection (weight_norm) reads the base weight
        weight = self.get_base_layer().weight
        if indices is None:
            indices = self.select_columns(r, seed, selection_strategy, column_block)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        selection.check_indices(indices, d_in, r, where)
        self.r[adapter_name] = r
        self.paca_alpha[adapter_name] = paca_alpha
        self.scaling[adapter_name] = paca_alpha / r if scaling is None else scaling
        self.paca_indices[adapter_name] = indices.to(weight.device)
        delta = torch.zeros(self.delta_shape(r), dtype=torch.float32, device=weight.device)
        if not init_weights:  # PEFT's convention for tests: an adapter that changes the outputs from the start
            nn.init.normal_(delta, std=0.1)
        self.paca_delta[adapter_name] = nn.Parameter(delta)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def select_columns(self, r: int, seed: int | None, strategy: str, column_block: int = 1) -> Tensor:
        """The ``r`` input columns this layer tunes, by ``strategy`` (see :mod:`paca.selection`).

        ``column_block`` is the block size of ``structured`` (head_dim for attention output projections,
        1 for FFN down projections), set by the model from its config.
        """
        if strategy == "random":
            return selection.random_columns(self.in_features, r, seed, self.layer_name)
        if strategy == "weight_norm":
            return selection.weight_norm_columns(self.get_base_layer().weight, r, self.in_dim)
        if strategy == "gradient":
            # Placeholder until paca.select_by_gradient overwrites them from a calibration pass.
            return selection.random_columns(self.in_features, r, seed, self.layer_name)
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
        self._columns.restore()
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
        return dense.index_copy_(self.in_dim, self.paca_indices[adapter_name], delta * self.scaling[adapter_name])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the tuned columns into the base weight; the originals are kept for :meth:`unmerge`."""
        self._columns.restore()
        storage = self.get_base_layer().weight.data
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.paca_delta:
                continue
            idx = self.paca_indices[name]
            original = storage.index_select(self.in_dim, idx)
            delta = self._delta_in_weight_layout(self.paca_delta[name].detach())
            merged = torch.add(original, delta, alpha=self.scaling[name]).to(storage.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise broken_adapter_error(name, self.layer_name)
            self._premerge_columns[name] = original
            storage.index_copy_(self.in_dim, idx, merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base weight bit for bit, undoing merges in reverse order."""
        storage = self.get_base_layer().weight.data
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            storage.index_copy_(self.in_dim, self.paca_indices[name], self._premerge_columns.pop(name))

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

    def _partial_forward(self, x: Tensor, delta: Tensor, idx: Tensor, scale: float) -> Tensor:
        raise NotImplementedError

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


def broken_adapter_error(adapter_name: str, layer_name: str) -> ValueError:
    """safe_merge's error, worded as PEFT's methods word it, with the module."""
    return ValueError(
        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken "
        f"(module '{layer_name}'; nothing of it was merged)."
    )


def _restore_before_state_dict(module: PacaLayer, prefix: str, keep_vars: bool) -> None:
    module._columns.restore()  # a checkpoint stores the pretrained weight, never W0 + s * D


def _restore_before_load(module: PacaLayer, state_dict: dict, prefix: str, *args) -> None:
    # New base weights make the copy of the pretrained columns stale; anything else keeps it (indices are versioned).
    if any(key.startswith(prefix + "base_layer.") for key in state_dict):
        module._columns.forget()
    else:
        module._columns.restore()


class _ResidentModule(nn.Module):
    """The forward of a layer that writes its columns into its base weight (:mod:`paca.ops.columns`), and what nn.Module does to its
    tensors, with the pretrained columns written back first. Subclasses give ``_partial_forward``."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if "adapter_names" in kwargs:
            return self._mixed_batch_forward(x, *args, **kwargs)
        applied = self._applied_delta()
        if applied is None:
            return self._base_forward(x, *args, **kwargs)
        return self._partial_forward(x, *applied)

    def extra_repr(self) -> str:
        # Which PaCA runs this layer: paca's, not PEFT's own (whose layers print as "paca.Linear").
        return "implementation=paca"

    def _apply(self, fn, recurse=True):
        self._columns.forget()  # .to(), .half(), .cuda(): convert the pretrained weight, read the columns again
        return super()._apply(fn, recurse)

    def __getstate__(self):
        self._columns.restore()  # deepcopy and pickle copy the pretrained weight
        return super().__getstate__()


class Linear(_ResidentModule, PacaLayer):
    """PaCA on nn.Linear (``W`` is ``d_out x d_in``) or GPT-2 Conv1D (``W`` stored ``d_in x d_out``).

    ``x -> x W^T + b`` with ``W[:, idx] = W0[:, idx] + (alpha / r) D``; inputs of any leading shape.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, layer_name: str, r: int, paca_alpha: float, **kwargs
    ) -> None:
        super().__init__()
        PacaLayer.__init__(self, base_layer, layer_name)
        self.is_transposed = _is_conv1d(self.get_base_layer())
        self.in_dim = 0 if self.is_transposed else 1
        self._columns = ResidentColumns(self.in_dim)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, paca_alpha, **kwargs)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        # The training step's call, once per layer per step, in as few Python operations as it takes: one active
        # adapter, enabled and not merged. Anything else (a mixed batch, extra arguments) takes the general path.
        if args or kwargs or self._disable_adapters or self.merged_adapters:
            return super().forward(x, *args, **kwargs)
        active = self._active_adapter
        name = active if isinstance(active, str) else active[0] if len(active) == 1 else None
        delta = None if name is None else self._modules["paca_delta"]._parameters.get(name)
        if delta is None:  # several adapters combine, or this layer has none of the active one
            return super().forward(x)
        base = self._modules["base_layer"]
        x = self._autocast_input(x)
        return partial_linear(
            x,
            base.weight,
            base.bias,
            delta,
            self._modules["paca_indices"]._buffers[name],
            self.scaling[name],
            self.is_transposed,
            self._columns,
        )

    def _partial_forward(self, x: Tensor, delta: Tensor, idx: Tensor, scale: float) -> Tensor:
        base = self._modules["base_layer"]
        return partial_linear(
            self._autocast_input(x), base.weight, base.bias, delta, idx, scale, self.is_transposed, self._columns
        )


class Conv(_ResidentModule, PacaLayer):
    """PaCA on nn.Conv1d / nn.Conv2d / nn.Conv3d: tunes ``r`` input channels (all kernel taps of each), as in the
    paper's appendix B; grouped and depthwise convolutions tune local channels of every group (see
    :mod:`paca.ops.conv`)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, layer_name: str, r: int, paca_alpha: float, **kwargs
    ) -> None:
        super().__init__()
        PacaLayer.__init__(self, base_layer, layer_name)
        conv = self.get_base_layer()
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"module '{layer_name}': PaCA supports convolutions with zero padding, got "
                f"padding_mode='{conv.padding_mode}'."
            )
        self.padding = self._explicit_padding(conv, layer_name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, paca_alpha, **kwargs)

    @staticmethod
    def _explicit_padding(conv: nn.Module, layer_name: str) -> tuple[int, ...]:
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        if conv.padding == "same":
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(t % 2 for t in totals):
                raise ValueError(
                    f"module '{layer_name}': padding='same' with an even kernel is asymmetric; "
                    "PaCA supports symmetric padding only."
                )
            return tuple(t // 2 for t in totals)
        return tuple(conv.padding)

    def _partial_forward(self, x: Tensor, delta: Tensor, idx: Tensor, scale: float) -> Tensor:
        conv = self._modules["base_layer"]
        return partial_conv(
            self._autocast_input(x),
            conv.weight,
            conv.bias,
            delta,
            idx,
            scale,
            conv.stride,
            self.padding,
            conv.dilation,
            conv.groups,
            self._columns,
        )
