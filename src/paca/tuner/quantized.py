"""QPaCA: the PaCA layer over a bitsandbytes 4-bit linear layer (paper section 4.3).

    W = deq(Q),  W[:, idx] = deq(Q)[:, idx] + (paca_alpha / r) * D        y = x W^T + b   (one matmul)

The unselected connections stay packed in 4 bits (NF4 or FP4); the tuned columns are computed in the
compute dtype and never quantized. Merging never re-quantizes: ``merge`` keeps the 4-bit weight as it
is and the merged columns are applied by the same one-matmul forward; a 16-bit merged model comes from
``paca export --to merged``. The operator: :mod:`paca.ops.quantized`. The model-level checks below refuse every
other quantization by name before a layer is replaced.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from .. import selection
from ..ops.quantized import dequantize, partial_linear_4bit
from .layer import SingleWeightLayer, broken_adapter_error

INSTALL_HINT = "install it with `pip install 'paca[quant]'` (bitsandbytes>=0.50)"
SUPPORTED_QUANTIZATION = "bitsandbytes 4-bit (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'))"


def is_bnb_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (Linear4bit, LinearNF4, LinearFP4)."""
    return type(module).__module__.startswith("bitsandbytes") and any(
        cls.__name__ == "Linear4bit" for cls in type(module).__mro__
    )


def import_bitsandbytes(where: str):
    """``bitsandbytes``, or an ImportError naming ``where`` and how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(
            f"{where} is quantized to 4 bits with bitsandbytes, but bitsandbytes is not installed; {INSTALL_HINT}."
        ) from None
    return bitsandbytes


def _quantization_config(model: nn.Module) -> dict | None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def check_quantization(model: nn.Module) -> None:
    """Raise unless ``model`` is unquantized or quantized as QPaCA supports (bitsandbytes 4-bit).

    Raises:
        ImportError: a bitsandbytes 4-bit model while bitsandbytes cannot be imported.
        ValueError: any other quantization (8-bit, GPTQ, AWQ, HQQ, ...), named.
    """
    config = _quantization_config(model)
    if config is None:
        return
    method = config.get("quant_method", "unknown")
    method = str(getattr(method, "value", method)).lower()  # transformers' QuantizationMethod enum or a string
    name = type(model).__name__
    if method == "bitsandbytes" and config.get("load_in_4bit") and not config.get("load_in_8bit"):
        import_bitsandbytes(f"model {name}")
        return
    what = "bitsandbytes 8-bit (LLM.int8)" if method == "bitsandbytes" else f"quant_method='{method}'"
    raise ValueError(
        f"PaCA cannot tune model {name} quantized with {what}; supported: {SUPPORTED_QUANTIZATION} or "
        "an unquantized model (16/32-bit)."
    )


def _check_standard_packing(base: nn.Module, layer_name: str) -> None:
    """Raise if bitsandbytes has already repacked ``base``'s weight for its CPU inference kernel.

    bitsandbytes (0.49+) repacks a 4-bit weight in place the first time the layer runs in eval mode without
    gradients on a CPU with AVX512-BF16 (``quant_state.packing_format_for_cpu``). The repack rounds the
    block scales to bfloat16 and its inverse does not restore them (for unnested scales it does not even
    restore their layout), so the pretrained weight cannot be recovered from it exactly.

    Raises:
        ValueError: the weight is in the CPU-packed layout.
    """
    state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            f"module '{layer_name}': bitsandbytes has repacked this 4-bit weight for its CPU inference "
            "kernel (it ran in eval mode without gradients on the CPU), which rounds its scales to "
            "bfloat16 and cannot be undone exactly. Load the 4-bit model again and apply PaCA before "
            "running it."
        )


def _packed_weight(base: nn.Module) -> Tensor:
    """``base.weight`` with its quant_state (some moves leave it on the module only; bitsandbytes' forward fixes it
    the same way)."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)
    return base.weight


class Linear4bit(SingleWeightLayer):
    """PaCA on a bitsandbytes ``Linear4bit`` (QPaCA): 4-bit frozen weight, tuned columns in 16+ bits.

    ``x -> x W^T + b`` with ``W = deq(Q)``, ``W[:, idx] = deq(Q)[:, idx] + (alpha / r) D``, computed in the
    layer's compute dtype (the autocast dtype under autocast) and returned in the input's dtype, as
    bitsandbytes does. The backward keeps only ``x[..., idx]`` and the packed weight.

    Raises:
        ImportError: if bitsandbytes cannot be imported.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, layer_name: str, r: int, paca_alpha: float, **kwargs
    ) -> None:
        import_bitsandbytes(f"module '{layer_name}'")
        _check_standard_packing(base_layer, layer_name)
        super().__init__(base_layer, layer_name)
        # While wrapped, the base layer must keep the standard layout that QPaCA dequantizes: its CPU repack
        # is lossy (see _check_standard_packing). unload() gives the flag back.
        self._bnb_cpu_packing = getattr(base_layer, "support_avx512bf16_for_cpu", None)
        if self._bnb_cpu_packing:
            base_layer.support_avx512bf16_for_cpu = False
        self.is_transposed = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, paca_alpha, **kwargs)

    # -- shapes: the 4-bit weight parameter is packed, so they come from the layer ---------------------
    @property
    def in_features(self) -> int:
        return self.get_base_layer().in_features

    @property
    def out_features(self) -> int:
        return self.get_base_layer().out_features

    def delta_shape(self, r: int) -> tuple[int, ...]:
        return (self.get_base_layer().out_features, r)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The base layer's dense ``(d_out, d_in)`` weight ``deq(Q)`` (a new tensor)."""
        return dequantize(_packed_weight(self.get_base_layer()), dtype)

    def select_columns(self, r: int, seed: int | None, strategy: str, column_block: int = 1) -> Tensor:
        if strategy == "weight_norm":
            return selection.weight_norm_columns(self.dequantized_weight(), r, 1)
        return super().select_columns(r, seed, strategy, column_block)

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        delta = self.paca_delta[adapter_name].detach()
        dense = delta.new_zeros(delta.shape[0], self.in_features)
        return dense.index_copy_(1, self.paca_indices[adapter_name], delta * self.scaling[adapter_name])

    # -- merge: bookkeeping only, the 4-bit weight is never re-quantized ------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Mark adapters merged: later forwards apply their (frozen) columns; the 4-bit weight is not touched.

        Writing the columns into the packed weight would re-quantize them (lossy); the forward already
        writes them into its transient dequantized copy, so a merged 4-bit layer costs what an unmerged
        one does, without gradients.
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.paca_delta:
                continue
            if safe_merge and not torch.isfinite(self.paca_delta[name]).all():
                raise broken_adapter_error(name, self.layer_name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The 4-bit base layer (``unload``); ``merge_and_unload`` is refused rather than re-quantizing.

        Raises:
            ValueError: if ``merge`` is true.
        """
        if merge:
            raise ValueError(
                f"module '{self.layer_name}' has a 4-bit base: merging into it would re-quantize the "
                "tuned columns (lossy). Save the adapter and run `paca export --adapter DIR --to merged "
                "OUT` (a 16-bit merged model), or load the base model in 16 bits and merge there."
            )
        return self.release_base_layer()

    def release_base_layer(self) -> nn.Module:
        """The bitsandbytes layer, with its CPU repacking flag as it was before PaCA wrapped it."""
        base = self.get_base_layer()
        if self._bnb_cpu_packing is not None:
            base.support_avx512bf16_for_cpu = self._bnb_cpu_packing
        return base

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if "adapter_names" in kwargs:
            return self._mixed_batch_forward(x, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            applied = self._combined_delta(self.merged_adapters)
            applied = (applied[0].detach(), *applied[1:])
        else:
            applied = self._active_delta()
        if applied is None:
            return self.base_layer(x, *args, **kwargs)
        return self._partial_forward(x, *applied)

    def _partial_forward(self, x: Tensor, delta: Tensor, idx: Tensor, scale: float) -> Tensor:
        base = self.get_base_layer()
        if torch.is_autocast_enabled(x.device.type):
            compute_dtype = torch.get_autocast_dtype(x.device.type)
        else:
            compute_dtype = base.compute_dtype or x.dtype
        return partial_linear_4bit(x.to(compute_dtype), _packed_weight(base), base.bias, delta, idx, scale).to(x.dtype)
