"""Which input columns each layer tunes (paper section 5; S²FT's structured selection).

Every strategy returns sorted, unique int64 indices into the layer's input dimension. The chosen
indices are stored in the adapter (``paca_indices``), so loading never selects again.

    random        r columns drawn uniformly, seeded by (random_seed, module name) as PEFT's PaCA does
    weight_norm   argtop_r_j ||W0[:, j]||_2
    gradient      argtop_r_j sum_steps sum_i (dL/dW_ij)^2        (select_by_gradient, no weight update)
    structured    attention output: whole heads, columns [h*hd, (h+1)*hd);  FFN down: whole channels
"""

from __future__ import annotations

import itertools
import math
import warnings
import zlib
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


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


def weight_norm_columns(weight: Tensor, r: int, in_dim: int) -> Tensor:
    """The ``r`` input columns of ``weight`` with the largest L2 norm (paper section 5)."""
    other = [d for d in range(weight.dim()) if d != in_dim]
    norms = weight.detach().float().pow(2).sum(dim=other)  # (d_in,)
    return norms.topk(r).indices.sort().values.cpu()


def check_indices(idx: Tensor, d_in: int | None, r: int, where: str) -> None:
    """Raise ValueError unless ``idx`` holds ``r`` sorted, unique integers in ``[0, d_in)`` (``d_in`` None: unknown)."""
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


# ----------------------------------------------------------------------------------------------------
# structured (S²FT): whole attention heads of the output projection, whole FFN channels of down projections
# ----------------------------------------------------------------------------------------------------

# Output projections read the concatenated heads; down projections read the FFN's intermediate channels.
# c_proj, dense and wo name both kinds in some families: the parent module's class tells them apart.
ATTENTION_OUTPUT_NAMES = frozenset({"o_proj", "out_proj", "c_proj", "dense", "wo", "o_lin", "proj"})
FFN_DOWN_NAMES = frozenset({"down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h", "wo", "fc_out", "lin2"})


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


# ----------------------------------------------------------------------------------------------------
# gradient: accumulated squared gradient of the loss w.r.t. each input column, over a calibration pass
# ----------------------------------------------------------------------------------------------------


def _weight_grad(layer, x: Tensor, grad: Tensor) -> Tensor:
    """``dL/dW`` of one layer call in float32: ``(d_out, d_in)``, or the weight's shape for a convolution."""
    base = layer.get_base_layer()
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        from .ops.conv import conv_weight_grad

        return conv_weight_grad(
            x.float(), base.weight.shape, grad.float(), base.stride, layer.padding, base.dilation, base.groups
        )
    x2 = x.reshape(-1, x.shape[-1]).float()  # (N, d_in)
    g2 = grad.reshape(-1, grad.shape[-1]).float()  # (N, d_out)
    return g2.t() @ x2


def _column_scores(grad_w: Tensor) -> Tensor:
    """``sum_i (dL/dW_ij)^2`` for every input column ``j``: ``(d_in,)``."""
    return grad_w.pow(2).sum(0) if grad_w.dim() == 2 else grad_w.pow(2).sum((0, *range(2, grad_w.dim())))


def _response_tokens(batch: Mapping) -> Tensor:
    """Tokens a causal LM's loss counts in ``batch``: labels after the one-token shift, not -100."""
    return (batch["labels"][..., 1:] != -100).sum()


def select_by_gradient(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    steps: int = 100,
    adapter_name: str | None = None,
    accumulate: int = 1,
) -> dict[str, Tensor]:
    """Set each PaCA layer's columns to the ``r`` with the largest accumulated squared gradient.

        score_j = sum_{steps} sum_i (dL/dW_ij)^2,    idx = sorted(argtop_r score)

    over up to ``steps`` calibration batches (paper section 5: the first 100 steps), with ``W`` the
    layer's current weight. Nothing is updated: only the forward and backward passes run, and
    gradients of the model's parameters are left as they were. Call it after ``get_peft_model`` and
    before training; the new indices replace the placeholder ones of ``selection='gradient'`` (any
    strategy's, in fact), each layer's delta is reset to zero, and the indices are saved with the
    adapter like any others. Disable gradient checkpointing during the pass.

    With ``accumulate = k > 1`` a step is ``k`` consecutive micro-batches, as with gradient
    accumulation: ``dL/dW`` is summed over them before squaring, each micro-batch's loss divided by the
    step's response-token count (the model is called with ``num_items_in_batch``, as transformers'
    Trainer does), so the scores equal those of the ``k`` micro-batches joined into one batch. This
    holds every tuned layer's ``dL/dW`` in float32 through a step (the memory of full fine-tuning's
    gradients); with ``k = 1`` each is squared and freed within its own backward call.

    Args:
        model: a ``PeftModel`` (or any module) holding PaCA layers.
        batches: iterable of dicts the model accepts as keyword arguments, with ``labels`` (e.g.
            ``input_ids``, ``attention_mask``, ``labels``); tensors are moved to the model's device.
        steps: maximum number of steps to use (fewer if ``batches`` ends first).
        adapter_name: adapter whose columns are chosen (default: the active one).
        accumulate: micro-batches per step; ``k > 1`` needs a causal LM that accepts
            ``num_items_in_batch`` (transformers' ``*ForCausalLM``).

    Returns:
        The new indices by layer name.

    Raises:
        ValueError: ``steps < 1`` or ``accumulate < 1``; no PaCA layer; ``batches`` empty; a batch without
            ``labels``; a model output without a loss; a layer that no gradient reached.
    """
    from .tuner.layer import PacaLayer

    for name, value in (("steps", steps), ("accumulate", accumulate)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"select_by_gradient: {name} must be a positive integer, got {value!r}.")
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active[0] if isinstance(active, (list, tuple)) else active
    from .tuner.experts import Experts
    from .tuner.router import Router

    # MoE experts and routers (tokens routed, outputs not one tensor) keep their seeded random columns.
    kept = [m.layer_name for m in model.modules() if isinstance(m, (Experts, Router)) and adapter_name in m.paca_delta]
    layers = [
        m
        for m in model.modules()
        if isinstance(m, PacaLayer) and not isinstance(m, Router) and adapter_name in m.paca_delta
    ]
    if kept:
        warnings.warn(
            f"select_by_gradient: {len(kept)} MoE experts / router module(s) (e.g. '{kept[0]}') keep their "
            "seeded random columns; gradient selection covers linear and convolution layers.",
            stacklevel=2,
        )
    if not layers:
        raise ValueError(f"select_by_gradient: the model has no PaCA layer with adapter '{adapter_name}'.")
    scores = {layer: torch.zeros(layer.in_features, dtype=torch.float32) for layer in layers}
    step_grads: dict = {}  # layer -> dL/dW summed over the current step's micro-batches
    deltas = [layer.paca_delta[adapter_name] for layer in layers]
    saved = [(d.requires_grad, d.grad) for d in deltas]
    device = next(model.parameters()).device

    def record(layer, args, output):
        if isinstance(output, Tensor) and output.requires_grad:
            x = args[0].detach()

            def accumulate_grad(grad: Tensor) -> None:  # returns None: the gradient flows on unchanged
                grad_w = _weight_grad(layer, x, grad)
                if accumulate == 1:  # square at once: no layer's dL/dW outlives its backward call
                    scores[layer].add_(_column_scores(grad_w).cpu())
                else:
                    step_grads[layer] = step_grads[layer] + grad_w if layer in step_grads else grad_w

            output.register_hook(accumulate_grad)

    def micro_batch(index: int, batch) -> dict:
        if not isinstance(batch, Mapping) or batch.get("labels") is None:
            raise ValueError(
                f"select_by_gradient: calibration batch {index} has no 'labels'; pass dicts "
                "with input_ids and labels so the model returns a loss."
            )
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    hooks = [layer.register_forward_hook(record) for layer in layers]
    used, stream = 0, iter(batches)
    try:
        for d in deltas:
            d.requires_grad_(True)  # gradients must reach every layer output, even of a frozen adapter
        with torch.enable_grad():
            while used < steps:
                group = [
                    micro_batch(used * accumulate + i, b) for i, b in enumerate(itertools.islice(stream, accumulate))
                ]
                if not group:
                    break
                extra = {"num_items_in_batch": sum(_response_tokens(b) for b in group)} if accumulate > 1 else {}
                for i, batch in enumerate(group):
                    loss = getattr(model(**batch, **extra), "loss", None)
                    if loss is None:
                        raise ValueError(
                            f"select_by_gradient: the model returned no loss for calibration batch "
                            f"{used * accumulate + i}; is it a model with a loss head (e.g. "
                            "*ForCausalLM)?"
                        )
                    loss.backward(inputs=deltas)  # only the deltas accumulate: no other parameter's .grad changes
                for layer, grad_w in step_grads.items():
                    scores[layer].add_(_column_scores(grad_w).cpu())
                step_grads.clear()
                used += 1
    finally:
        for hook in hooks:
            hook.remove()
        for d, (requires_grad, grad) in zip(deltas, saved):
            d.requires_grad_(requires_grad)
            d.grad = grad
    if used == 0:
        raise ValueError("select_by_gradient: no calibration batches (the iterable was empty).")
    chosen = {}
    for layer in layers:
        score = scores[layer]
        if not bool((score > 0).any()):
            raise ValueError(
                f"select_by_gradient: no gradient reached module '{layer.layer_name}' in {used} "
                "calibration steps; is the layer used by the model's forward?"
            )
        idx = score.topk(layer.r[adapter_name]).indices.sort().values
        layer.set_indices(adapter_name, idx)
        chosen[layer.layer_name] = idx
    return chosen
