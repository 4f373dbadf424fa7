"""Structured selection's layout (S²FT): which layers tune whole attention heads, read from a transformers config.

An attention output projection (o_proj, GPT-2's attn.c_proj, ...) reads the concatenated heads: it tunes whole
heads, blocks of ``head_dim`` columns. An FFN down projection reads the intermediate channels: any columns are
whole channels. Every other layer reads the hidden state, which has no such structure. The column maths is
:func:`paca.selection.structured_columns`.
"""

from __future__ import annotations

import math
import warnings

from torch import nn

# Output projections read the concatenated heads; down projections read the FFN's intermediate channels.
# c_proj, dense and wo name both kinds in some families: the parent module's class tells them apart.
ATTENTION_OUTPUT_NAMES = frozenset({"o_proj", "out_proj", "c_proj", "dense", "wo", "o_lin", "proj"})
FFN_DOWN_NAMES = frozenset({"down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h", "wo", "fc_out", "lin2"})


def attention_layout(model_config, where: str) -> tuple[int, int]:
    """``(num_attention_heads, head_dim)`` from a transformers config.

    ``head_dim`` is the config's own when it has one (Gemma, Qwen3 and others set it apart from
    ``hidden_size / num_attention_heads``). The output projection reads ``num_attention_heads * head_dim``
    columns whatever the number of key/value heads (GQA shares K/V, not output columns).

    Raises:
        ValueError: if the config has no attention layout.
    """
    if model_config is None:
        raise ValueError(
            f"{where}: selection='structured' cannot find the attention layout: the model has no "
            "config (num_attention_heads, head_dim). Use selection='random' or 'weight_norm'."
        )
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(
            f"{where}: selection='structured' cannot find the attention layout: the model config "
            f"({type(config).__name__}) has no num_attention_heads. Use selection='random' or "
            "'weight_norm' for this model."
        )
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        hidden = getattr(config, "hidden_size", None)
        if not isinstance(hidden, int) or hidden % heads:
            raise ValueError(
                f"{where}: selection='structured' cannot find the attention layout: the model config "
                f"({type(config).__name__}) has no head_dim and hidden_size={hidden} is not a multiple "
                f"of num_attention_heads={heads}."
            )
        head_dim = hidden // heads
    return heads, head_dim


def _role(parent: nn.Module, target_name: str) -> str:
    """'attention_output', 'ffn_down' or 'hidden_input' from the module's name and its parent's class."""
    parent_kind = type(parent).__name__.lower()
    is_attention = "attention" in parent_kind or "attn" in parent_kind
    is_ffn = any(k in parent_kind for k in ("mlp", "feedforward", "ffn", "expert"))
    if is_attention and target_name in ATTENTION_OUTPUT_NAMES:
        return "attention_output"
    if is_ffn and target_name in FFN_DOWN_NAMES:
        return "ffn_down"
    return "hidden_input"


def _input_width(module: nn.Module) -> int:
    if hasattr(module, "in_features"):  # nn.Linear, bitsandbytes Linear4bit, a PaCA layer
        return module.in_features
    if hasattr(module, "nx"):  # transformers Conv1D
        return module.nx
    return getattr(module, "in_channels", 0)


def structured_layer_kwargs(
    model_config, r: int, paca_alpha: float, layer_name: str, target_name: str, parent: nn.Module, target: nn.Module
) -> dict:
    """``update_layer`` keyword arguments of one layer under ``selection='structured'``.

    - attention output projection (o_proj, GPT-2 attn.c_proj, ...): whole heads. ``r`` counts columns and is
      rounded to the nearest whole number of heads (at least one, at most all), with a warning when it changes;
    - FFN down projection (down_proj, mlp.c_proj, fc2, ...): whole intermediate channels, i.e. any ``r`` columns,
      drawn at random (seeded);
    - any other layer (q/k/v/gate/up: their input is the hidden state, which has no head structure): random
      columns, with a warning naming the layer kind once.

    The scale stays ``paca_alpha / r`` of the config for every layer, so a rounded layer keeps the same
    per-column scale (and ``paca export --to lora`` stays exact); ``paca_alpha`` is adjusted for that.

    Raises:
        ValueError: an attention output projection whose width is not ``num_attention_heads * head_dim``,
            or a config with no attention layout.
    """
    where = f"module '{layer_name}'"
    role = _role(parent, target_name)
    if role == "ffn_down":
        return dict(selection_strategy="structured", column_block=1)
    if role == "hidden_input":
        # One warning per layer kind (same text for every block), not per layer.
        warnings.warn(
            f"selection='structured': '{target_name}' layers read the hidden state, which has no head or "
            "channel structure; their columns are chosen at random. Structured selection applies to "
            "attention output (o_proj) and FFN down (down_proj) projections.",
            stacklevel=2,
        )
        return dict(selection_strategy="random")
    heads, head_dim = attention_layout(model_config, where)
    d_in = _input_width(target)
    if d_in != heads * head_dim:
        raise ValueError(
            f"{where}: selection='structured' cannot find the attention layout: the layer reads {d_in} "
            f"columns but the config gives num_attention_heads * head_dim = {heads} * {head_dim} = "
            f"{heads * head_dim}. Use selection='random' for this model."
        )
    n_heads = min(heads, max(1, math.floor(r / head_dim + 0.5)))
    r_layer = n_heads * head_dim
    if r_layer != r:
        warnings.warn(
            f"selection='structured': '{target_name}' layers tune whole heads of {head_dim} columns; r={r} "
            f"is rounded to {n_heads} head(s) = {r_layer} columns.",
            stacklevel=2,
        )
    return dict(r=r_layer, paca_alpha=paca_alpha * r_layer / r, selection_strategy="structured", column_block=head_dim)
