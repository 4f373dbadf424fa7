"""The tuned experts module: transformers 5's fused MoE experts with r tuned input columns per expert.

    W_e[:, idx_e] = W0_e[:, idx_e] + (paca_alpha / r) * D_e      for every expert e of every tuned projection

A transformers experts module (``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, gpt-oss
and most MoE models of transformers 5) holds ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` as 3-D
parameters. State per adapter name: ``paca_delta[adapter][projection]`` (D, ``E x d_out x r``) and
``paca_indices[adapter][projection]`` (``E x r``, each row sorted). As for the linear layer, the tuned columns are
written into the fused weights for a forward and its backward, which restores W0 (:mod:`paca.ops.columns`); the
forward is :func:`experts_forward`, transformers' experts forward with each projection computed by
:func:`paca.ops.partial_experts_linear`.

Unlike the linear layer, one adapter is applied at a time (the column sets of two adapters differ per expert),
and ``model(..., adapter_names=[...])`` is refused: the experts see tokens, not batch rows.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from .. import selection
from ..ops import ColumnWriter, partial_experts_linear, put_columns, take_columns
from .layer import PacaLayer, broken_adapter_error


def expert_projections(module: nn.Module) -> tuple[str, ...]:
    """The projections PaCA can tune in ``module`` if it is a transformers experts module, else ``()``."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")):
        return ()  # not written to transformers' experts interface (e.g. Llama 4's experts)
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    if not all(isinstance(module._parameters.get(n), Tensor) and module._parameters[n].dim() == 3 for n in names):
        return ()
    return names


class ProjectionWriters(dict):
    """The :class:`paca.ops.ColumnWriter` of each projection, restored and forgotten together."""

    transient = False  # expert weights are never shared with another module

    def restore(self) -> None:
        for writer in self.values():
            writer.restore()

    def forget(self) -> None:
        for writer in self.values():
            writer.forget()


class Experts(PacaLayer):
    """PaCA on a transformers experts module: ``forward(hidden_states, top_k_index, top_k_weights)`` as the module's.

    Args:
        projections: the projections to tune (default: both, e.g. ``("gate_up_proj", "down_proj")``).
    """

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
        transposed = bool(base_layer.is_transposed)
        axis = 1 if transposed else 2  # weights (E, d_in, d_out) or (E, d_out, d_in)
        writers = ProjectionWriters(
            {name: ColumnWriter(axis, transposed=transposed) for name in expert_projections(base_layer)}
        )
        super().__init__(base_layer, layer_name, writers, per_projection=True, **kwargs)
        self.is_transposed = transposed
        self.column_axis = axis
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, paca_alpha, projections=projections, **kwargs)

    # -- shapes -------------------------------------------------------------------------------------
    def weight_of(self, projection: str) -> Tensor:
        return getattr(self.get_base_layer(), projection)

    def input_dim(self, projection: str) -> int:
        return self.weight_of(projection).shape[self.column_axis]

    def delta_shape(self, projection: str, r: int) -> tuple[int, int, int]:
        weight = self.weight_of(projection)
        return weight.shape[0], weight.shape[3 - self.column_axis], r  # (E, d_out, r)

    @property
    def in_features(self) -> int:
        """The narrowest input of the tuned projections (r is clamped to it)."""
        return min(self.input_dim(p) for p in self._column_writer)

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
        projections = tuple(projections or self._column_writer)
        where = f"module '{self.layer_name}'"
        unknown = [p for p in projections if p not in self._column_writer]
        if unknown:
            raise ValueError(
                f"{where}: cannot tune {', '.join(unknown)}; its tunable expert projections are "
                f"{', '.join(self._column_writer)}."
            )
        for p in projections:
            if not isinstance(r, int) or r <= 0 or r > self.input_dim(p):
                raise ValueError(
                    f"{where}: r={r} must be between 1 and the input dimension {self.input_dim(p)} of {p}."
                )
        self._column_writer.restore()  # column selection (weight_norm) reads the base weights
        deltas, chosen = nn.ParameterDict(), BufferDict({}, persistent=True)
        for p in projections:
            weight = self.weight_of(p)
            idx = indices[p] if indices is not None else self.select_columns(p, r, seed, selection_strategy)
            idx = torch.as_tensor(idx, dtype=torch.int64)
            selection.check_expert_indices(idx, weight.shape[0], self.input_dim(p), r, f"{where} ({p})")
            chosen[p] = idx.to(weight.device)
            deltas[p] = nn.Parameter(self.new_delta(self.delta_shape(p, r), weight.device, init_weights))
        dtype = self.weight_of(projections[0]).dtype
        if dtype.is_floating_point:  # as PEFT puts adapters in the base layer's dtype (autocast_adapter_dtype upcasts)
            deltas = deltas.to(dtype)
        self.paca_delta[adapter_name] = deltas
        self.paca_indices[adapter_name] = chosen
        self._record_adapter(adapter_name, r, paca_alpha, paca_alpha / r)
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
                rows.append(selection.weight_norm_columns(weight[e], r, self.column_axis - 1))
            elif strategy == "structured":
                rows.append(selection.structured_columns(d_in, r, 1, seed, f"{name}.{e}"))
            else:
                raise ValueError(
                    f"module '{self.layer_name}': column selection '{strategy}' is not available for experts."
                )
        return torch.stack(rows)

    def _active_delta(self) -> dict | None:
        """projection -> (delta, idx, scale, writer) of the active adapter; None if no adapter is active here."""
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
        return {
            p: (delta, idx[p], self.scaling[name], self._column_writer[p])
            for p, delta in self.paca_delta[name].items()
        }

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *args, **kwargs) -> Tensor:
        if "adapter_names" in kwargs:
            raise ValueError(
                f"module '{self.layer_name}': adapter_names (one adapter per batch row) cannot reach "
                "PaCA experts, which see routed tokens; set_adapter() one adapter instead."
            )
        tuned = self._applied_delta()
        if tuned is None:
            return self._base_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        untouched = [p for p in self._column_writer if p not in tuned]
        for p in untouched:  # another adapter tuned them: W0 there
            self._column_writer[p].restore()
        return experts_forward(self._modules["base_layer"], hidden_states, top_k_index, top_k_weights, tuned)

    # -- merge --------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str, projection: str) -> Tensor:
        """Dense ``W - W0`` of one projection of one adapter, in the weight's layout: zero but for each expert's
        tuned columns."""
        weight = self.weight_of(projection)
        delta = self._in_weight_layout(self.paca_delta[adapter_name][projection].detach())
        dense = torch.zeros(weight.shape, dtype=delta.dtype, device=delta.device)
        put_columns(
            dense, self.column_axis, self.paca_indices[adapter_name][projection], delta * self.scaling[adapter_name]
        )
        return dense

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the tuned columns into the fused weights; the originals are kept for :meth:`unmerge`."""
        self._column_writer.restore()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.paca_delta:
                continue
            merged_columns = {}
            for p, delta in self.paca_delta[name].items():
                storage, idx = self.weight_of(p).data, self.paca_indices[name][p]
                original = take_columns(storage, self.column_axis, idx)
                merged = torch.add(original, self._in_weight_layout(delta.detach()), alpha=self.scaling[name]).to(
                    storage.dtype
                )
                if safe_merge and not torch.isfinite(merged).all():
                    raise broken_adapter_error(name, self.layer_name)
                merged_columns[p] = (original, merged)
            for p, (original, merged) in merged_columns.items():  # all checked first: nothing half-merged
                self._premerge_columns[(name, p)] = original
                put_columns(self.weight_of(p).data, self.column_axis, self.paca_indices[name][p], merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the fused weights bit for bit, undoing merges in reverse order."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for p in self.paca_delta[name]:
                put_columns(
                    self.weight_of(p).data,
                    self.column_axis,
                    self.paca_indices[name][p],
                    self._premerge_columns.pop((name, p)),
                )


def experts_forward(
    experts: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    tuned: dict[str, tuple[Tensor, Tensor, float, ColumnWriter]],
) -> Tensor:
    """The forward of a transformers experts module (``@use_experts_implementation``) with tuned projections.

    Args:
        experts: the module: ``gate_up_proj`` (or ``up_proj`` when ``has_gate`` is False) and ``down_proj``, optional
            ``*_bias``, ``_apply_gate`` / ``act_fn``, ``is_transposed``, ``has_post_expert_norm``.
        hidden_states: ``(T, H)`` tokens.
        top_k_index: ``(T, K)`` the experts each token is routed to.
        top_k_weights: ``(T, K)`` their routing weights.
        tuned: projection name -> ``(delta, idx, scale, writer)``; other projections run frozen.

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
        delta, idx, scale, writer = tuned.get(name, (None, None, 1.0, None))
        y = partial_experts_linear(
            x, getattr(experts, name), delta, idx, expert_of_row, offsets, scale, experts.is_transposed, writer
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
