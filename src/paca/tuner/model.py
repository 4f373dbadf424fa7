"""PacaModel: finds the targeted layers of a model and replaces them with PaCA layers (PEFT's BaseTuner)."""

from __future__ import annotations

import contextlib
import functools
import re
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import _get_submodules
from torch import nn

from .config import PEFT_HAS_PACA, PacaConfig
from .experts import Experts, expert_projections
from .layer import PacaLayer
from .linear import Linear
from .loading import check_state_dict_fits
from .model_layers import mark_shared_weights, remove_adapter_layers, restore_requires_grad
from .quantized import check_quantization
from .router import Router, is_router
from .structured import structured_layer_kwargs
from .switching import add_weighted_adapter
from .targets import (
    MAMBA_DIRECT_WEIGHTS,
    frozen_experts,
    given_columns,
    input_dim,
    is_experts,
    layer_class,
    resolve_all_linear,
    unsupported_error,
)


class PacaModel(BaseTuner):
    """Partial Connection Adaptation of a pretrained model.

    Each targeted layer trains ``r`` of its input columns (see :class:`paca.PacaConfig`). Created by
    ``peft.get_peft_model(model, PacaConfig(...))``; loaded by ``PeftModel.from_pretrained``.
    """

    prefix: str = "paca_"
    tuner_layer_cls = PacaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __new__(cls, *args, **kwargs):
        # PEFT maps its PACA type to this class once paca is imported; a plain peft.PacaConfig (not paca's subclass)
        # asks for PEFT's own PaCA, which then builds the tuner instead. (copy and pickle call __new__ bare.)
        if cls is PacaModel and PEFT_HAS_PACA and len(args) >= 2:
            peft_config = args[1]
            adapter_name = args[2] if len(args) > 2 else kwargs.get("adapter_name", "default")
            config = peft_config.get(adapter_name) if isinstance(peft_config, dict) else peft_config
            if config is not None and not isinstance(config, PacaConfig):
                from peft.tuners.paca import PacaModel as PeftPacaModel

                return PeftPacaModel(*args, **kwargs)
        return super().__new__(cls)

    def _create_and_replace(
        self,
        config: PacaConfig,
        adapter_name,
        target,
        target_name,
        parent,
        current_key,
        projections: tuple[str, ...] | None = None,
        **optional_kwargs,
    ) -> None:
        layer_name = current_key.removeprefix("base_model.model.")
        kwargs, given = self._layer_kwargs(config, target, target_name, parent, layer_name, current_key, projections)
        if target_name in MAMBA_DIRECT_WEIGHTS and "Mamba" in type(parent).__name__:
            self._bypassed_layers.setdefault(adapter_name, []).append(layer_name)
        self._fit_narrow_layer(config, adapter_name, target, current_key, kwargs, given)
        if isinstance(target, PacaLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        layer_cls = layer_class(target)
        if layer_cls is None:
            raise unsupported_error(target, layer_name)
        new_module = layer_cls(target, adapter_name, layer_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is set active
        self._replace_module(parent, target_name, new_module, target)

    def _layer_kwargs(self, config, target, target_name, parent, layer_name, current_key, projections):
        """``update_layer``'s keyword arguments for ``target``, and the columns paca_indices_pattern gives it."""
        r, paca_alpha = config.layer_r_and_alpha(layer_name)
        kwargs = dict(
            r=r,
            paca_alpha=paca_alpha,
            seed=config.random_seed,
            selection_strategy=config.selection,
            inference_mode=config.inference_mode,
            init_weights=config.init_weights,
        )
        given = given_columns(config, current_key)
        if given is not None:
            if is_experts(target):
                raise ValueError(
                    f"paca_indices_pattern gives columns to '{layer_name}', a fused experts module; "
                    "its experts each tune columns of their own: leave it out of the pattern."
                )
            # PEFT's meaning: these columns, however many, at the config's scale paca_alpha / r
            kwargs.update(indices=given, r=given.numel(), scaling=paca_alpha / r)
        if is_experts(target):
            kwargs["projections"] = projections
        elif config.selection == "structured":  # whole heads / channels: the layout comes from the model config
            model_config = getattr(self.model, "config", None)
            kwargs.update(
                structured_layer_kwargs(model_config, r, paca_alpha, layer_name, target_name, parent, target)
            )
        return kwargs, given

    def _fit_narrow_layer(self, config, adapter_name, target, current_key, kwargs: dict, given) -> None:
        """Check given columns against the layer's input, and fit an ``r`` wider than it (in ``kwargs``)."""
        layer_name = current_key.removeprefix("base_model.model.")
        r, paca_alpha = config.layer_r_and_alpha(layer_name)
        d_in = input_dim(target)
        if d_in is None:
            return
        if given is not None:
            if int(given.max()) >= d_in:
                raise ValueError(
                    f"module '{layer_name}': the indices in paca_indices_pattern must be smaller than "
                    f"in_features ({d_in}) of the base layer, got {given.tolist()}."
                )
            return
        if kwargs["r"] <= d_in:
            return
        if isinstance(target, Linear) or layer_class(target) is Linear:
            if not self._all_linear:  # PEFT's PaCA's rule for a linear layer named in target_modules
                raise ValueError(
                    f"module '{layer_name}': r ({kwargs['r']}) cannot be larger than in_features "
                    f"({d_in}) of the base layer."
                )
            # Under all-linear a narrow layer (Mamba's dt_proj) tunes all its columns rather than failing the model:
            # PEFT's paca_indices_pattern says exactly that (scale paca_alpha / r), so the saved config, whose
            # target_modules PEFT writes out by name, reloads here and in plain PEFT.
            given = torch.arange(d_in)
            config.paca_indices_pattern[re.escape(current_key)] = given.tolist()
            kwargs.update(indices=given, r=d_in, scaling=paca_alpha / r)
        else:
            # All of a narrow layer's columns (an image stem's 3 channels), at the adapter's scale alpha / r.
            kwargs["paca_alpha"] = kwargs["paca_alpha"] * d_in / kwargs["r"]
            kwargs["r"] = d_in
        self._narrow_layers.setdefault(adapter_name, []).append(f"{layer_name} (r={r}, d_in={d_in})")

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """``model(..., adapter_names=[...])``: one adapter per row (``"__base__"``: the base model), in eval mode,
        as PEFT's LoRA offers; the names reach each PaCA layer and modules_to_save copy through a pre-forward hook."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for layer in self.model.modules():
            if isinstance(layer, PacaLayer):
                known |= set(layer.paca_delta.keys())
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        beams = kwargs.get("num_beams")
        if isinstance(beams, int) and beams > 1:  # generate() repeats each row num_beams times
            adapter_names = [name for name in adapter_names for _ in range(beams)]
        from peft.utils.other import AuxiliaryTrainingWrapper

        handles = [
            module.register_forward_pre_hook(
                functools.partial(_inject_adapter_names, names=adapter_names), with_kwargs=True
            )
            for module in self.model.modules()
            if isinstance(module, (PacaLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put ``new_module`` where ``child`` was. A new PaCA layer holds its base layer (its adapter tensors were put
        on the base weight's device by ``update_layer``), and what unloading puts back (a base layer, the trained copy
        of a ``modules_to_save`` module) holds its own weights: nothing to copy over. PEFT's generic version copies
        ``child.weight``, which a classification head or an MLP block does not have."""
        setattr(parent, child_name, new_module)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """Inject ``adapter_name``; on any error, undo what was injected so the model is left as it was."""
        check_quantization(model)  # 8-bit, GPTQ, AWQ...: refused by name, before any layer is replaced
        # A peft.PacaConfig added to a model paca tunes (a second adapter, transformers' load_adapter) runs here too.
        self.peft_config[adapter_name] = PacaConfig.from_peft(self.peft_config[adapter_name])
        missing = getattr(self.peft_config[adapter_name], "_missing_weights", None)
        if missing is not None:  # read from a directory without weights: name the file before touching the model
            raise missing
        # Injection freezes the base model; if injecting or, later, loading the weights fails, these flags come back.
        self._requires_grad_before_inject = {adapter_name: {p: p.requires_grad for p in model.parameters()}}
        self._narrow_layers: dict[str, list[str]] = {}
        self._bypassed_layers: dict[str, list[str]] = {}
        config = self.peft_config[adapter_name]
        self._all_linear = resolve_all_linear(config, model)
        # peft >= 0.22 refuses a parameter that target_parameters names on a module target_modules also targets;
        # for paca that module is tuned whole (every expert projection, a router's weight), so the names are dropped
        # for the injection and kept in the config.
        wanted = config.target_parameters
        if wanted:
            config.target_parameters = self._parameters_beside_target_modules(config, model) or None
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            remove_adapter_layers(model, adapter_name)
            restore_requires_grad(self._requires_grad_before_inject.pop(adapter_name))
            raise
        finally:
            config.target_parameters = wanted
        mark_shared_weights(model)
        self._warn_about_untuned_parts(model, adapter_name)

    def _warn_about_untuned_parts(self, model: nn.Module, adapter_name: str) -> None:
        """Warn of experts left frozen, layers a fused kernel bypasses, and layers narrower than r."""
        frozen = frozen_experts(model)
        if frozen and self._all_linear:
            warnings.warn(
                f"PaCA adapter '{adapter_name}': {len(frozen)} fused MoE experts module(s) (e.g. "
                f"'{frozen[0]}' of type {type(model.get_submodule(frozen[0])).__name__}) stay frozen: their "
                "experts are outside transformers' experts interface, whose forward PaCA replaces.",
                stacklevel=3,
            )
        bypassed = self._bypassed_layers.pop(adapter_name, [])
        if bypassed:
            warnings.warn(
                f"PaCA adapter '{adapter_name}': Mamba's fused CUDA path (mamba-ssm kernels, training) reads "
                f"the weights of {len(bypassed)} tuned layer(s) (e.g. '{bypassed[0]}') directly instead of "
                "calling them, so there their deltas would be ignored; on CPU or without mamba-ssm they "
                "are called. Tune in_proj (always called) or keep to the slow path.",
                stacklevel=3,
            )
        narrow = self._narrow_layers.pop(adapter_name, [])
        if narrow:
            warnings.warn(
                f"PaCA adapter '{adapter_name}': r exceeds the input dimension of {len(narrow)} layer(s): "
                f"{', '.join(narrow)}; each tunes all its input columns, at its scale paca_alpha / r.",
                stacklevel=3,
            )

    def _parameters_beside_target_modules(self, config: PacaConfig, model: nn.Module) -> list[str]:
        """The entries of ``target_parameters`` that name a parameter of some module target_modules does not target."""
        if config.target_modules is None:
            return list(config.target_parameters)
        kept = []
        for target in config.target_parameters:
            for name, module in model.named_modules():
                if any(f"{name}.{p}" == target or f"{name}.{p}".endswith(f".{target}") for p in module._parameters):
                    if not self._check_target_module_exists(config, name):
                        kept.append(target)
                        break
        return kept

    def _inject_parameters(
        self, peft_config: PacaConfig, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool
    ) -> list[str]:
        """``target_parameters``, as LoRA's: fused expert parameters and router weights by name (full or suffix, e.g.
        ``"mlp.experts.down_proj"``, ``"mlp.gate.weight"``); each experts module is wrapped once, tuning the
        projections named."""
        wanted = set(peft_config.target_parameters)
        matched: dict[str, list[str]] = {}
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) or name.endswith(".base_layer"):
                holder = module.get_base_layer() if isinstance(module, (Experts, Router)) else None
                if holder is None:
                    continue
            else:
                holder = module
            for param_name in holder._parameters:
                key = f"{name}.{param_name}"
                if key in wanted or any(key.endswith(f".{target}") for target in wanted):
                    matched.setdefault(name, []).append(param_name)
        for name, params in matched.items():
            parent, target, target_name = _get_submodules(model, name)
            if isinstance(target, (Experts, Router)) and adapter_name in target.paca_delta:
                tuned = set(target.paca_delta[adapter_name]) if isinstance(target, Experts) else {"weight"}
                if set(params) <= tuned:
                    continue  # target_modules (all-linear, "experts") already tunes these for this adapter
                params = [p for p in expert_projections(target.get_base_layer()) if p in tuned | set(params)]
            if params == ["weight"] and (is_router(target) or isinstance(target, Router)):
                self._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key=name)
                continue
            tunable = expert_projections(target.get_base_layer() if isinstance(target, Experts) else target)
            refused = [p for p in params if p not in tunable]
            if refused:
                raise ValueError(
                    f"target_parameters: PaCA cannot tune '{name}.{refused[0]}' "
                    f"({type(target).__name__}); it tunes the projections of transformers' fused experts "
                    "(gate_up_proj or up_proj, down_proj) and routers' weight. Target linear layers with "
                    "target_modules."
                )
            self._create_and_replace(
                peft_config, adapter_name, target, target_name, parent, current_key=name, projections=tuple(params)
            )
        return [f"{name}.{p}" for name, params in matched.items() for p in params]

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name`` = sum of ``weights[i] * adapters[i]``, exactly (:mod:`paca.tuner.switching`)."""
        add_weighted_adapter(self, adapters, weights, adapter_name)

    def unload(self) -> nn.Module:
        """The base model with every PaCA layer removed and the base weights exactly as they were."""
        for module in self.model.modules():
            if isinstance(module, PacaLayer) and module.merged:
                module.unmerge()
        return self._unload_and_optionally_merge(merge=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # peft >= 0.21 checks an adapter file against the model before loading it (the hook below, with a clean
        # rollback); peft 0.20 has no such hook and would take out-of-range column indices silently. There, check
        # at load_state_dict, which PEFT calls with the adapter's entries: a ValueError naming the module.
        if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):
            own = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
            for adapter_name in self.peft_config:
                check_state_dict_fits(self, adapter_name, own)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            check_state_dict_fits(model, adapter_name, remapped)
        except ValueError:
            remove_adapter_layers(model, adapter_name)
            for tuner in model.modules():
                if isinstance(tuner, PacaModel):
                    restore_requires_grad(getattr(tuner, "_requires_grad_before_inject", {}).pop(adapter_name, {}))
            raise
        return remapped


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, names: list[str]):
    kwargs["adapter_names"] = names
    return args, kwargs
