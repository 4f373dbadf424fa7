"""The tuned experts module: transformers 5's fused MoE experts with r tuned input columns per expert.

    W_e[:, idx_e] = W0_e[:, idx_e] + (paca_alpha / r) * D_e      for every expert e of every tuned projection

A transformers experts module (``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, gpt-oss
and most MoE models of transformers 5) holds ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` as 3-D
parameters. State per adapter name: ``paca_delta[adapter][projection]`` (D, ``E x d_out x r``) and
``paca_indices[adapter][projection]`` (``E x r``, each row sorted). As for the linear layer, the tuned columns are
written into the fused weights for a forward and its backward, which restores W0 (:mod:`paca.ops.columns`); the
forward is :func:`paca.ops.experts_forward`.

Unlike the linear layer, one adapter is applied at a time (the column sets of two adapters differ per expert),
and ``model(..., adapter_names=[...])`` is refused: the experts see tokens, not batch rows.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from .. import selection
from ..ops import ResidentColumns, experts_forward, put_columns, take_columns
from .layer import ResidentTunerLayer, _ResidentModule, broken_adapter_error


def expert_projections(module: nn.Module) -> tuple[str, ...]:
    """The projections PaCA can tune in ``module`` if it is a transformers experts module, else ``()``."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")):
        return ()  # not written to transformers' experts interface (e.g. Llama 4's experts)
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    if not all(isinstance(module._parameters.get(n), Tensor) and module._parameters[n].dim() == 3 for n in names):
        return ()
    return names


class ColumnRecords(dict):
    """The :class:`ResidentColumns` of each projection, restored and forgotten together."""

    transient = False  # expert weights are never shared with another module

    def restore(self) -> None:
        for record in self.values():
            record.restore()

    def forget(self) -> None:
        for record in self.values():
            record.forget()


class Experts(_ResidentModule, ResidentTunerLayer):
    """PaCA on a transformers experts module: ``forward(hidden_states, top_k_index, top_k_weights)`` as the module's.

    Args:
        projections: the projections to tune (default: both, e.g. ``("gate_up_proj", "down_proj")``).
    """

    adapter_layer_names = ("paca_delta",)
    other_param_names = ("paca_indices", "r", "paca_alpha", "scaling")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        layer_name: str,
        r: int,
        paca_alpha: float,
        projections: tuple[str, ...] | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.is_transposed = bool(base_layer.is_transposed)
        self.in_dim = 1 if self.is_transposed else 2  # weights (E, d_in, d_out) or (E, d_out, d_in)
        self.paca_delta = nn.ModuleDict()
        self.paca_indices = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.paca_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._premerge_columns: dict[tuple[str, str], Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self._columns = ColumnRecords(
            {
                name: ResidentColumns(self.in_dim, transposed=self.is_transposed)
                for name in expert_projections(base_layer)
            }
        )
        self._watch_base_reads()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, paca_alpha, projections=projections, **kwargs)

    # -- shapes -------------------------------------------------------------------------------------
    def weight_of(self, projection: str) -> Tensor:
        return getattr(self.get_base_layer(), projection)

    def input_dim(self, projection: str) -> int:
        return self.weight_of(projection).shape[self.in_dim]

    def delta_shape(self, projection: str, r: int) -> tuple[int, int, int]:
        weight = self.weight_of(projection)
        return weight.shape[0], weight.shape[3 - self.in_dim], r  # (E, d_out, r)

    @property
    def in_features(self) -> int:
        """The narrowest input of the tuned projections (r is clamped to it)."""
        return min(self.input_dim(p) for p in self._columns)

    def _in_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.transpose(1, 2) if self.is_transposed else delta

    # -- adapters -----------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        paca_alpha: float,
        seed: int | None = None,
        selection_strategy: str = "random",
        indices: dict | None = None,
        inference_mode: bool = False,
        init_weights: bool = True,
        projections: tuple[str, ...] | None = None,
        **kwargs,
    ) -> None:
        """Add adapter ``adapter_name``: choose each expert's columns of each projection, and zero deltas.

        Raises:
            ValueError: ``r`` not in ``[1, d_in]``, an unknown projection, or ``indices`` invalid for this module.
        """
        projections = tuple(projections or self._columns)
        where = f"module '{self.layer_name}'"
        unknown = [p for p in projections if p not in self._columns]
        if unknown:
            raise ValueError(
                f"{where}: cannot tune {', '.join(unknown)}; its tunable expert projections are "
                f"{', '.join(self._columns)}."
            )
        for p in projections:
            if not isinstance(r, int) or r <= 0 or r > self.input_dim(p):
                raise ValueError(
                    f"{where}: r={r} must be between 1 and the input dimension {self.input_dim(p)} of {p}."
                )
        self._columns.restore()  # column selection (weight_norm) reads the base weights
        deltas, chosen = nn.ParameterDict(), BufferDict({}, persistent=True)
        for p in projections:
            weight = self.weight_of(p)
            idx = indices[p] if indices is not None else self.select_columns(p, r, seed, selection_strategy)
            idx = torch.as_tensor(idx, dtype=torch.int64)
            check_expert_indices(idx, weight.shape[0], self.input_dim(p), r, f"{where} ({p})")
            chosen[p] = idx.to(weight.device)
            delta = torch.zeros(self.delta_shape(p, r), dtype=torch.float32, device=weight.device)
            if not init_weights:  # PEFT's convention for tests: an adapter that changes the outputs from the start
                nn.init.normal_(delta, std=0.1)
            deltas[p] = nn.Parameter(delta)
        dtype = self.weight_of(projections[0]).dtype
        if dtype.is_floating_point:  # as PEFT puts adapters in the base layer's dtype (autocast_adapter_dtype upcasts)
            deltas = deltas.to(dtype)
        self.paca_delta[adapter_name] = deltas
        self.paca_indices[adapter_name] = chosen
        self.r[adapter_name] = r
        self.paca_alpha[adapter_name] = paca_alpha
        self.scaling[adapter_name] = paca_alpha / r
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def select_columns(self, projection: str, r: int, seed: int | None, strategy: str) -> Tensor:
        """``(E, r)``: each expert's columns of ``projection``, by ``strategy`` (see :mod:`paca.selection`).

        ``gradient`` starts from random columns (``paca.select_by_gradient`` leaves experts there); ``structured``
        takes contiguous channel blocks of size 1, as for an FFN projection.
        """
        weight = self.weight_of(projection)
        d_in = self.input_dim(projection)
        name = f"{self.layer_name}.{projection}"
        rows = []
        for e in range(weight.shape[0]):
            if strategy in ("random", "gradient"):
                rows.append(selection.random_columns(d_in, r, seed, f"{name}.{e}"))
            elif strategy == "weight_norm":
                rows.append(selection.weight_norm_columns(weight[e], r, self.in_dim - 1))
            elif strategy == "structured":
                rows.append(selection.structured_columns(d_in, r, 1, seed, f"{name}.{e}"))
            else:
                raise ValueError(
                    f"module '{self.layer_name}': column selection '{strategy}' is not available for experts."
                )
        return torch.stack(rows)

    def _active_delta(self) -> dict | None:
        """projection -> (delta, idx, scale, record) of the active adapter; None if no adapter is active here."""
        active = [a for a in self.active_adapters if a in self.paca_delta]
        if not active:
            return None
        if len(active) > 1:
            raise ValueError(
                f"module '{self.layer_name}': {len(active)} adapters are active ({', '.join(active)}); "
                "PaCA experts apply one adapter at a time."
            )
        name = active[0]
        idx = self.paca_indices[name]
        return {p: (delta, idx[p], self.scaling[name], self._columns[p]) for p, delta in self.paca_delta[name].items()}

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *args, **kwargs) -> Tensor:
        if "adapter_names" in kwargs:
            raise ValueError(
                f"module '{self.layer_name}': adapter_names (one adapter per batch row) cannot reach "
                "PaCA experts, which see routed tokens; set_adapter() one adapter instead."
            )
        tuned = self._applied_delta()
        if tuned is None:
            return self._base_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        untouched = [p for p in self._columns if p not in tuned]
        for p in untouched:  # another adapter tuned them: W0 there
            self._columns[p].restore()
        return experts_forward(self._modules["base_layer"], hidden_states, top_k_index, top_k_weights, tuned)

    # -- merge --------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str, projection: str) -> Tensor:
        """Dense ``W - W0`` of one projection of one adapter, in the weight's layout: zero but for each expert's
        tuned columns."""
        weight = self.weight_of(projection)
        delta = self._in_weight_layout(self.paca_delta[adapter_name][projection].detach())
        dense = torch.zeros(weight.shape, dtype=delta.dtype, device=delta.device)
        put_columns(
            dense, self.in_dim, self.paca_indices[adapter_name][projection], delta * self.scaling[adapter_name]
        )
        return dense

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the tuned columns into the fused weights; the originals are kept for :meth:`unmerge`."""
        self._columns.restore()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.paca_delta:
                continue
            merged_columns = {}
            for p, delta in self.paca_delta[name].items():
                storage, idx = self.weight_of(p).data, self.paca_indices[name][p]
                original = take_columns(storage, self.in_dim, idx)
                merged = torch.add(original, self._in_weight_layout(delta.detach()), alpha=self.scaling[name]).to(
                    storage.dtype
                )
                if safe_merge and not torch.isfinite(merged).all():
                    raise broken_adapter_error(name, self.layer_name)
                merged_columns[p] = (original, merged)
            for p, (original, merged) in merged_columns.items():  # all checked first: nothing half-merged
                self._premerge_columns[(name, p)] = original
                put_columns(self.weight_of(p).data, self.in_dim, self.paca_indices[name][p], merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the fused weights bit for bit, undoing merges in reverse order."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for p in self.paca_delta[name]:
                put_columns(
                    self.weight_of(p).data,
                    self.in_dim,
                    self.paca_indices[name][p],
                    self._premerge_columns.pop((name, p)),
                )


def check_expert_indices(idx: Tensor, num_experts: int, d_in: int | None, r: int, where: str) -> None:
    """Raise ValueError unless ``idx`` is ``(num_experts, r)`` with each row valid column indices."""
    if idx.dim() != 2 or idx.shape[0] != num_experts:
        raise ValueError(
            f"{where}: paca_indices must have shape ({num_experts}, {r}) (one row per expert), got {tuple(idx.shape)}."
        )
    for e in range(num_experts):
        selection.check_indices(idx[e], d_in, r, f"{where}, expert {e}")
