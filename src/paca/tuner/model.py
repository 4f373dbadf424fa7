"""PacaModel: finds the targeted layers of a model and replaces them with PaCA layers (PEFT's BaseTuner)."""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import _get_submodules
from torch import nn

from .. import selection
from ..quantized import check_quantization, is_bnb_4bit
from .config import PEFT_HAS_PACA, PacaConfig
from .experts import Experts, check_expert_indices, expert_projections
from .layer import Conv, Linear, PacaLayer, _is_conv1d
from .quantized import Linear4bit
from .router import Router, is_router

SUPPORTED_TYPES = (
    "nn.Linear, transformers Conv1D, nn.Conv1d / Conv2d / Conv3d (grouped too), bitsandbytes "
    "Linear4bit (NF4/FP4), transformers fused MoE experts and routers"
)

TUNED_LAYERS = (PacaLayer, Experts)  # every module the tuner puts in the model


# Mamba's mixer hands these weights to its fused CUDA kernel (mamba_inner_fn) rather than calling the modules.
_MAMBA_DIRECT_WEIGHTS = frozenset({"x_proj", "dt_proj", "out_proj"})


def fused_expert_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s own 3-D parameters: the fused experts of transformers 5's MoE blocks (one
    ``(num_experts, out, in)`` tensor per projection, e.g. gate_up_proj and down_proj)."""
    if type(module).__module__.startswith("torch.nn"):  # a Conv1d's weight is 3-D too
        return []
    return [name for name, p in module._parameters.items() if p is not None and p.dim() == 3]


def _input_dim(module: nn.Module) -> int | None:
    """d_in of a layer PaCA can tune (None for other modules: they are refused by type later)."""
    if isinstance(module, TUNED_LAYERS) or is_bnb_4bit(module):
        return module.in_features
    if is_router(module):
        return module.weight.shape[1]
    if expert_projections(module):
        return min(getattr(module, p).shape[1 if module.is_transposed else 2] for p in expert_projections(module))
    if _is_conv1d(module):
        return module.weight.shape[0]
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.weight.shape[1]  # a grouped convolution: channels per group
    return None


def _layer_class(base: nn.Module):
    if is_bnb_4bit(base):  # before nn.Linear: bitsandbytes' linear layers subclass it
        return Linear4bit
    if type(base).__module__.startswith("bitsandbytes"):
        return None  # 8-bit and other bitsandbytes layers: not supported
    if isinstance(base, nn.Linear) or _is_conv1d(base):
        return Linear
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Conv
    if expert_projections(base):
        return Experts
    if is_router(base):
        return Router
    return None


class PacaModel(BaseTuner):
    """Partial Connection Adaptation of a pretrained model.

    Each targeted layer trains ``r`` of its input columns (see :class:`paca.PacaConfig`). Created by
    ``peft.get_peft_model(model, PacaConfig(...))``; loaded by ``PeftModel.from_pretrained``.
    """

    prefix: str = "paca_"
    tuner_layer_cls = TUNED_LAYERS
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
            if isinstance(target, Experts) or expert_projections(target):
                raise ValueError(
                    f"paca_indices_pattern gives columns to '{layer_name}', a fused experts module; "
                    "its experts each tune columns of their own: leave it out of the pattern."
                )
            # PEFT's meaning: these columns, however many, at the config's scale paca_alpha / r
            kwargs.update(indices=given, r=given.numel(), scaling=paca_alpha / r)
        if isinstance(target, Experts) or expert_projections(target):
            kwargs["projections"] = projections
        elif config.selection == "structured":  # whole heads / channels: the layout comes from the model config
            kwargs.update(
                selection.structured_layer_kwargs(
                    getattr(self.model, "config", None), r, paca_alpha, layer_name, target_name, parent, target
                )
            )
        if target_name in _MAMBA_DIRECT_WEIGHTS and "Mamba" in type(parent).__name__:
            self._bypassed_layers.setdefault(adapter_name, []).append(layer_name)
        d_in = _input_dim(target)
        if given is not None and d_in is not None and int(given.max()) >= d_in:
            raise ValueError(
                f"module '{layer_name}': the indices in paca_indices_pattern must be smaller than "
                f"in_features ({d_in}) of the base layer, got {given.tolist()}."
            )
        linear = isinstance(target, Linear) or _layer_class(target) is Linear
        if given is None and d_in is not None and kwargs["r"] > d_in and linear:
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
            self._narrow_layers.setdefault(adapter_name, []).append(f"{layer_name} (r={r}, d_in={d_in})")
        if given is None and d_in is not None and kwargs["r"] > d_in:
            # All of a narrow layer's columns (an image stem's 3 channels), at the adapter's scale alpha / r.
            kwargs["paca_alpha"] = kwargs["paca_alpha"] * d_in / kwargs["r"]
            kwargs["r"] = d_in
            self._narrow_layers.setdefault(adapter_name, []).append(f"{layer_name} (r={r}, d_in={d_in})")
        if isinstance(target, TUNED_LAYERS):
            target.update_layer(adapter_name, **kwargs)
            return
        layer_cls = _layer_class(target)
        if layer_cls is None and fused_expert_parameters(target):
            raise TypeError(
                f"PaCA cannot tune module '{layer_name}' ({type(target).__name__}): its experts are fused "
                f"3-D parameters ({', '.join(fused_expert_parameters(target))}) outside transformers' "
                "experts interface (@use_experts_implementation), whose forward PaCA replaces; remove it "
                "from target_modules (its attention and dense layers can be tuned)."
            )
        if layer_cls is None:
            raise TypeError(
                f"Target module '{layer_name}' of type {type(target).__module__}."
                f"{type(target).__qualname__} is not supported by PaCA; supported types: {SUPPORTED_TYPES}. "
                "Remove it from target_modules or add it to exclude_modules."
            )
        new_module = layer_cls(target, adapter_name, layer_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is set active
        self._replace_module(parent, target_name, new_module, target)

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
            if isinstance(layer, TUNED_LAYERS):
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
            if isinstance(module, (*TUNED_LAYERS, AuxiliaryTrainingWrapper))
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
            _restore_requires_grad(self._requires_grad_before_inject.pop(adapter_name))
            raise
        finally:
            config.target_parameters = wanted
        mark_shared_weights(model)
        frozen = frozen_experts(model)
        if frozen and self._all_linear:
            warnings.warn(
                f"PaCA adapter '{adapter_name}': {len(frozen)} fused MoE experts module(s) (e.g. "
                f"'{frozen[0]}' of type {type(model.get_submodule(frozen[0])).__name__}) stay frozen: their "
                "experts are outside transformers' experts interface, whose forward PaCA replaces.",
                stacklevel=2,
            )
        bypassed = self._bypassed_layers.pop(adapter_name, [])
        if bypassed:
            warnings.warn(
                f"PaCA adapter '{adapter_name}': Mamba's fused CUDA path (mamba-ssm kernels, training) reads "
                f"the weights of {len(bypassed)} tuned layer(s) (e.g. '{bypassed[0]}') directly instead of "
                "calling them, so there their deltas would be ignored; on CPU or without mamba-ssm they "
                "are called. Tune in_proj (always called) or keep to the slow path.",
                stacklevel=2,
            )
        narrow = self._narrow_layers.pop(adapter_name, [])
        if narrow:
            warnings.warn(
                f"PaCA adapter '{adapter_name}': r exceeds the input dimension of {len(narrow)} layer(s): "
                f"{', '.join(narrow)}; each tunes all its input columns, at its scale paca_alpha / r.",
                stacklevel=2,
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
        """Add ``adapter_name`` = sum of ``weights[i] * adapters[i]``, exact (see :func:`paca.switching.add_weighted_adapter`)."""
        from ..switching import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name)

    def unload(self) -> nn.Module:
        """The base model with every PaCA layer removed and the base weights exactly as they were."""
        for module in self.model.modules():
            if isinstance(module, TUNED_LAYERS) and module.merged:
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
                    _restore_requires_grad(getattr(tuner, "_requires_grad_before_inject", {}).pop(adapter_name, {}))
            raise
        return remapped


def resolve_all_linear(config: PacaConfig, model: nn.Module) -> bool:
    """Resolve ``target_modules="all-linear"`` as PEFT does (every linear layer but the output head), plus every
    transformers experts module and MoE router (PEFT's LoRA reaches those through target_parameters). Whether it
    was all-linear."""
    target = config.target_modules
    if not (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return False
    _maybe_include_all_linear_layers(config, model)
    config.target_modules = set(config.target_modules) | {
        name for name, m in model.named_modules() if expert_projections(m) or is_router(m)
    }
    return True


def given_columns(config: PacaConfig, module_key: str) -> torch.Tensor | None:
    """The sorted columns ``config.paca_indices_pattern`` gives the module ``module_key`` (as PEFT matches the
    pattern: its keys are names or regexes), or None."""
    from peft.utils.other import get_pattern_key

    pattern = config.paca_indices_pattern or {}
    if not pattern:
        return None
    key = get_pattern_key(pattern.keys(), module_key)
    if key not in pattern:
        return None
    return torch.tensor(sorted(pattern[key]), dtype=torch.int64)


def frozen_experts(model: nn.Module) -> list[str]:
    """Modules holding fused experts that no PaCA experts layer wraps."""
    wrapped = {id(m.get_base_layer()) for m in model.modules() if isinstance(m, Experts)}
    return [name for name, m in model.named_modules() if fused_expert_parameters(m) and id(m) not in wrapped]


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, names: list[str]):
    kwargs["adapter_names"] = names
    return args, kwargs


def _restore_requires_grad(flags: dict) -> None:
    for param, requires_grad in flags.items():
        param.requires_grad_(requires_grad)


def check_state_dict_fits(model: nn.Module, adapter_name: str, state_dict: dict) -> None:
    """Raise ValueError, naming the module, if a PaCA entry of ``state_dict`` does not fit ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Experts) and adapter_name in module.paca_delta:
            _check_experts_state_dict_fits(name, module, adapter_name, state_dict)
        if not isinstance(module, PacaLayer) or adapter_name not in module.paca_delta:
            continue
        layer = module.layer_name
        delta = state_dict.get(f"{name}.paca_delta.{adapter_name}")
        idx = state_dict.get(f"{name}.paca_indices.{adapter_name}")
        if delta is None and idx is None:
            continue
        if delta is None or idx is None:
            missing = "paca_delta" if delta is None else "paca_indices"
            raise ValueError(f"module '{layer}': the adapter has no {missing} for this layer.")
        expected = module.delta_shape(module.r[adapter_name])
        if tuple(delta.shape) != expected:
            raise ValueError(
                f"module '{layer}': paca_delta has shape {tuple(delta.shape)} but this model needs "
                f"{expected} (r={module.r[adapter_name]}); was the adapter trained on another model?"
            )
        if not delta.dtype.is_floating_point:
            raise ValueError(f"module '{layer}': paca_delta has dtype {delta.dtype}, expected a float dtype.")
        selection.check_indices(idx, module.in_features, module.r[adapter_name], f"module '{layer}'")
        if not torch.isfinite(delta).all():
            raise ValueError(f"module '{layer}': paca_delta holds NaN or Inf values.")


def _check_experts_state_dict_fits(name: str, module: Experts, adapter_name: str, state_dict: dict) -> None:
    for projection, own in module.paca_delta[adapter_name].items():
        where = f"module '{module.layer_name}' ({projection})"
        delta = state_dict.get(f"{name}.paca_delta.{adapter_name}.{projection}")
        idx = state_dict.get(f"{name}.paca_indices.{adapter_name}.{projection}")
        if delta is None and idx is None:
            continue
        if delta is None or idx is None:
            raise ValueError(f"{where}: the adapter has no {'paca_delta' if delta is None else 'paca_indices'} here.")
        if tuple(delta.shape) != tuple(own.shape):
            raise ValueError(
                f"{where}: paca_delta has shape {tuple(delta.shape)} but this model needs "
                f"{tuple(own.shape)}; was the adapter trained on another model?"
            )
        check_expert_indices(idx, own.shape[0], module.input_dim(projection), own.shape[2], where)
        if not torch.isfinite(delta).all():
            raise ValueError(f"{where}: paca_delta holds NaN or Inf values.")


def remove_adapter_layers(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every PaCA layer; a layer left without adapters gives back its base layer."""
    for key, module in list(model.named_modules()):
        if not isinstance(module, TUNED_LAYERS) or adapter_name not in module.paca_delta:
            continue
        if len(module.paca_delta) > 1:
            module.delete_adapter(adapter_name)
            continue
        if module.merged:
            module.unmerge()
        parent, _, target_name = _get_submodules(model, key)
        setattr(parent, target_name, module.release_base_layer())
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)


def mark_shared_weights(model: nn.Module) -> None:
    """Make PaCA layers whose base weight another module also holds (tied embeddings and head) restore it after
    every call, so the tuned columns never reach the other module."""
    owners = collections.Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    for layer in model.modules():
        if isinstance(layer, PacaLayer):
            layer._columns.transient = owners[id(layer.get_base_layer().weight)] > 1


def restore_base_weights(model: nn.Module) -> None:
    """Write the pretrained columns back into every PaCA layer's base weight, for code that reads the base
    weights directly (the next forward writes the tuned columns again). state_dict, disable_adapter, merge,
    unload, copies and ``.to()`` do this by themselves."""
    for layer in model.modules():
        if isinstance(layer, TUNED_LAYERS):
            layer.restore_base_weight()


def paca_layers(model: nn.Module) -> dict[str, PacaLayer | Experts]:
    """The PaCA layers of ``model`` by their name in the base model."""
    return {m.layer_name: m for m in model.modules() if isinstance(m, TUNED_LAYERS)}
