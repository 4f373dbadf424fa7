"""The LoRA export: a PEFT LoRA adapter directory equal to a PaCA adapter, which plain PEFT and serving engines load.

Every tuned layer becomes a LoRA target with scaling 1 (``lora_alpha = r``) and its own rank in ``rank_pattern``
(:mod:`.factors`); routers and fused experts become ``target_parameters`` (PEFT wraps their parameters). Only the
base model's shapes are read (an empty model). Exports plain PEFT would refuse, or load wrongly, are refused.
"""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import save_file

from ..adapter_file import WEIGHTS_NAME, load_adapter_tensors, read_adapter_config
from ..modeling import load_model
from ..tuner.config import layer_r_and_alpha
from ..tuner.router import is_router
from .factors import expert_lora_factors, lora_factors
from .output import atomic_dir

# PaCA's bias setting in LoRA's vocabulary: the biases of tuned layers are those of the LoRA-wrapped layers.
_LORA_BIAS = {"none": "none", "all": "all", "paca_only": "lora_only"}


def export_lora(adapter_dir: str, out_dir: str, base: str | None = None) -> str:
    """Write an exact PEFT LoRA adapter equivalent to the PaCA adapter in ``adapter_dir``; returns ``out_dir``.

    Raises:
        ValueError: not a PaCA adapter, no base model named, a module missing from the base, a layer with no exact
            LoRA form (grouped convolution, Conv1D mixed with other layers), or targets plain PEFT would refuse or
            load as something else.
    """
    config = _paca_adapter_config(adapter_dir)
    tensors = load_adapter_tensors(adapter_dir)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base model; pass --base.")
    model = load_model(base, config.get("task_type"), empty=True)  # shapes only, no weights read
    lora = LoraTargets(adapter_dir, base, config, dict(model.named_modules()))
    experts: dict[str, list[str]] = {}
    for key in tensors:
        if ".paca_delta." in key:  # fused experts: <module>.paca_delta.<projection>
            prefix, _, projection = key.rpartition(".paca_delta.")
            experts.setdefault(prefix, []).append(projection)
    for prefix, projections in experts.items():
        lora.add_experts(prefix, projections, tensors)
    for key, tensor in tensors.items():
        if ".paca_delta." in key or ".paca_indices." in key:
            continue
        if key.endswith(".paca_delta"):
            prefix = key.removesuffix(".paca_delta")
            lora.add_layer(prefix, tensor, tensors[prefix + ".paca_indices"])
        elif not key.endswith(".paca_indices"):
            lora.tensors[key] = tensor  # biases and modules_to_save travel unchanged
    lora_config = lora.config(base)
    _check_plain_peft_loads(adapter_dir, lora_config, model)
    with atomic_dir(out_dir) as tmp:
        lora_config.save_pretrained(tmp)
        save_file(lora.tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def _paca_adapter_config(adapter_dir: str) -> dict:
    config = read_adapter_config(adapter_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "PACA":
        raise ValueError(
            f"{adapter_dir}: adapter_config.json holds a {peft_type or 'untyped'} adapter, not PaCA; "
            + (
                "it is already a PEFT LoRA adapter, which serving engines load as it is."
                if peft_type == "LORA"
                else "--to lora converts PaCA adapters only."
            )
        )
    return config


class LoraTargets:
    """The LoRA tensors, targets and per-target ranks of an export, added one tuned module at a time.

    Args:
        adapter_dir: the PaCA adapter (errors name it).
        base: the base model's name or path (errors name it).
        config: the PaCA adapter's config, as saved.
        modules: the base model's modules by name.
    """

    def __init__(self, adapter_dir: str, base: str, config: dict, modules: dict) -> None:
        self.adapter_dir, self.base, self.paca_config, self.modules = adapter_dir, base, config, modules
        self.tensors: dict[str, torch.Tensor] = {}
        self.target_modules: list[str] = []
        self.target_parameters: list[str] = []
        self.ranks: dict[str, int] = {}  # target pattern -> LoRA rank (= lora_alpha: scaling 1)
        self.fan_in_fan_out = False

    def _module(self, name: str) -> torch.nn.Module:
        module = self.modules.get(name)
        if module is None:
            raise ValueError(f"{self.adapter_dir}: module '{name}' of the adapter is not in base model '{self.base}'.")
        return module

    def _scale(self, name: str) -> float:
        """The layer's ``paca_alpha / r`` (a layer narrower than r keeps it too)."""
        c = self.paca_config
        r, alpha = layer_r_and_alpha(
            int(c["r"]), float(c["paca_alpha"]), c.get("rank_pattern"), c.get("alpha_pattern"), name
        )
        return alpha / r

    def _add(self, path: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.tensors[f"{path}.lora_A.weight"] = a.contiguous()
        self.tensors[f"{path}.lora_B.weight"] = b.contiguous()

    def add_experts(self, prefix: str, projections: list[str], tensors: dict) -> None:
        """Fused experts: one rank-r LoRA per expert of each projection, where PEFT's ParamWrappers put them."""
        name = prefix.removeprefix("base_model.model.")
        module = self._module(name)
        scale = self._scale(name)
        paths = _param_wrapper_paths(prefix, module, projections)
        for projection in projections:
            delta = tensors[f"{prefix}.paca_delta.{projection}"]  # (E, d_out, r)
            in_features = getattr(module, projection).shape[1 if module.is_transposed else 2]
            idx = tensors[f"{prefix}.paca_indices.{projection}"]
            self._add(paths[projection], *expert_lora_factors(delta, idx, scale, in_features))
            self.target_parameters.append(f"{name}.{projection}")
            self.ranks[f"^{name}.{projection}$"] = delta.shape[2]  # the layer's r (clamped to a narrow d_in)

    def add_layer(self, prefix: str, delta: torch.Tensor, idx: torch.Tensor) -> None:
        """A linear, Conv1D, convolution or router layer: one LoRA of rank r (``r * prod(kernel)``)."""
        name = prefix.removeprefix("base_model.model.")
        module = self._module(name)
        is_conv = isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        if is_conv and module.groups != 1:
            raise ValueError(
                f"{self.adapter_dir}: module '{name}' is a grouped convolution (groups={module.groups}), whose "
                "column delta has no exact LoRA form in PEFT; export --to merged instead."
            )
        is_conv1d = type(module).__name__ == "Conv1D"
        if self.target_modules and self.fan_in_fan_out != is_conv1d:
            raise ValueError(
                f"{self.adapter_dir}: the adapter tunes both transformers Conv1D and other layers; a LoRA "
                "config has one fan_in_fan_out for all of them. Export --to merged instead."
            )
        self.fan_in_fan_out = is_conv1d
        in_features = module.weight.shape[0] if is_conv1d else module.weight.shape[1]
        kernel = tuple(module.kernel_size) if is_conv else ()
        a, b = lora_factors(delta, idx, self._scale(name), in_features, kernel)
        self._add(prefix, a, b)
        pattern = f"^{name}$"
        if is_router(module):  # not an nn.Linear: PEFT wraps its weight (target_parameters), at the same key path
            self.target_parameters.append(f"{name}.weight")
            pattern = f"^{name}(.weight)?$"  # PEFT matches the parameter's name, and checks the module's
        else:
            self.target_modules.append(name)
        self.ranks[pattern] = a.shape[0]

    def config(self, base: str):
        """The ``peft.LoraConfig``: the smallest rank as ``r``, the others in rank_pattern / alpha_pattern."""
        from peft import LoraConfig

        c = self.paca_config
        r = sorted(set(self.ranks.values()))[0]
        others = {k: v for k, v in self.ranks.items() if v != r}
        return LoraConfig(
            r=r,
            lora_alpha=r,
            target_modules=self.target_modules,
            target_parameters=self.target_parameters or None,
            lora_dropout=0.0,
            bias=_LORA_BIAS[c.get("bias", "none")],
            fan_in_fan_out=self.fan_in_fan_out,
            task_type=c.get("task_type"),
            base_model_name_or_path=base,
            modules_to_save=c.get("modules_to_save"),
            rank_pattern=others,
            alpha_pattern=dict(others),
        )


def _param_wrapper_paths(name: str, module: torch.nn.Module, projections: list[str]) -> dict[str, str]:
    """Where PEFT puts the LoRA of each targeted parameter of ``module``: one ParamWrapper per parameter, nested in
    the module's parameter order (the first is innermost, reached through ``base_layer``)."""
    ordered = [p for p in module._parameters if p in projections]
    return {p: name + ".base_layer" * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}


def _check_plain_peft_loads(adapter_dir: str, lora_config, model) -> None:
    """Refuse an export plain PEFT would refuse to load, or would load with deltas silently dropped."""
    refused = _targets_peft_refuses(lora_config, model)
    if refused:
        raise ValueError(
            f"{adapter_dir}: plain PEFT refuses LoRA on '{refused[0]}' of this "
            f"{model.config.model_type} model ({refused[1]}); export --to merged instead."
        )
    moved = _targets_peft_would_move(lora_config, model)
    if moved:
        raise ValueError(
            f"{adapter_dir}: plain PEFT would load {len(moved)} of the exported LoRA targets (e.g. "
            f"'{moved[0]}') as fused expert parameters of this {model.config.model_type} model (its "
            "transformers v4 -> v5 MoE conversion takes any name ending in gate_proj / up_proj / "
            "down_proj for an expert), silently dropping their deltas; export --to merged instead."
        )


def _targets_peft_refuses(lora_config, model) -> tuple[str, str] | None:
    """(target, PEFT's reason) for the first exported target plain PEFT would refuse to load (Mamba's out_proj,
    whose fused kernel reads the weight directly), else None."""
    from peft.tuners.tuners_utils import _check_lora_target_modules_mamba

    for target in sorted(lora_config.target_modules or ()):
        try:
            _check_lora_target_modules_mamba(lora_config, model, target.rpartition(".")[2])
        except ValueError as err:
            return target, str(err).split("] ", 1)[-1].split(". Please")[0]
    return None


def _targets_peft_would_move(lora_config, model) -> list[str]:
    """Targets that PEFT's MoE config conversion (run by PeftModel.from_pretrained) would turn into experts."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without the conversion moves nothing
        return []
    probe = copy.deepcopy(lora_config)
    convert_peft_config_for_transformers(probe, model, None)
    return sorted(set(lora_config.target_modules) - set(probe.target_modules or ()))
