"""`paca export`: a PaCA adapter as a merged transformers model or as an exact PEFT LoRA adapter.

A column delta is a rank-r product. With ``s = paca_alpha / r`` and ``e_j`` the j-th unit vector,

    W - W0 = s * D E^T,   E = [e_idx_1 ... e_idx_r]   (d_in x r)

so the LoRA adapter ``B = s * D`` (d_out x r), ``A = E^T`` (one-hot rows), ``lora_alpha = r``
(LoRA scaling 1) reproduces it exactly. For a convolution the delta spans ``r * prod(kernel)`` (channel, tap)
pairs, so the LoRA rank there is ``r * prod(kernel)``. Fused MoE experts export in PEFT's ``target_parameters``
layout: one rank-r LoRA per expert of each projection (:func:`expert_lora_factors`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

from .adapter_file import WEIGHTS_NAME, load_adapter_tensors, read_adapter_config
from .modeling import load_model


def lora_factors(
    delta: torch.Tensor, idx: torch.Tensor, scale: float, in_features: int, kernel_size: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA ``(A, B)`` with ``B @ A`` equal to the dense PaCA delta.

    Args:
        delta: ``(d_out, r)``, or ``(C_out, r, *kernel)`` for a convolution.
        idx: the ``r`` tuned input columns.
        scale: ``paca_alpha / r``.
        in_features: ``d_in`` (or ``C_in``).
        kernel_size: the kernel of a convolution (1-3 sizes), empty for linear layers.

    Returns:
        ``A`` of shape ``(R, d_in)`` (``(R, C_in, kh, kw)``) and ``B`` of shape ``(d_out, R)`` (``(C_out, R, 1, 1)``),
        with ``R = r`` (``r * kh * kw``).
    """
    delta = delta.float()
    r = idx.numel()
    if not kernel_size:
        a = torch.zeros(r, in_features)
        a[torch.arange(r), idx] = 1.0
        return a, delta * scale
    taps = int(torch.tensor(kernel_size).prod())
    rank = r * taps
    a = torch.zeros(rank, in_features, taps)
    rows = torch.arange(rank)
    a[rows, idx.repeat_interleave(taps), torch.arange(taps).repeat(r)] = 1.0
    b = delta.reshape(delta.shape[0], rank) * scale
    return a.reshape(rank, in_features, *kernel_size), b.reshape(*b.shape, *(1,) * len(kernel_size))


def expert_lora_factors(
    delta: torch.Tensor, idx: torch.Tensor, scale: float, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA ``(A, B)`` of fused experts in PEFT's target_parameters layout, equal to the per-expert column deltas.

    PEFT's ``ParamWrapper`` reads ``A`` ``(E * r, d_in)`` as ``(E, r, d_in)`` (expert-major rows) and ``B``
    ``(d_out, r * E)`` as ``(d_out, r, E)`` (rank-major columns), and applies ``B_e A_e`` to expert ``e``; here
    ``A_e`` holds the one-hot rows of ``idx[e]`` and ``B_e = scale * D_e``.

    Args:
        delta: ``(E, d_out, r)``.
        idx: ``(E, r)``.
    """
    experts, d_out, r = delta.shape
    a = torch.zeros(experts, r, in_features)
    a.scatter_(2, idx.unsqueeze(-1), 1.0)
    b = (delta.float() * scale).permute(1, 2, 0)  # (d_out, r, E)
    return a.reshape(experts * r, in_features), b.reshape(d_out, r * experts)


def _param_wrapper_paths(name: str, module: torch.nn.Module, projections: list[str]) -> dict[str, str]:
    """Where PEFT puts the LoRA of each targeted parameter of ``module``: one ParamWrapper per parameter, nested in
    the module's parameter order (the first is innermost, reached through ``base_layer``)."""
    ordered = [p for p in module._parameters if p in projections]
    return {p: name + ".base_layer" * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}


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


# PaCA's bias setting in LoRA's vocabulary: the biases of tuned layers are those of the LoRA-wrapped layers.
_LORA_BIAS = {"none": "none", "all": "all", "paca_only": "lora_only"}


def export_lora(adapter_dir: str, out_dir: str, base: str | None = None) -> str:
    """Write an exact PEFT LoRA adapter equivalent to the PaCA adapter in ``adapter_dir``."""
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
    from .tuner.config import layer_r_and_alpha
    from .tuner.router import is_router

    tensors = load_adapter_tensors(adapter_dir)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base model; pass --base.")
    model = load_model(base, config.get("task_type"), empty=True)  # shapes only, no weights read
    modules = dict(model.named_modules())
    lora_tensors, targets, rank_pattern, alpha_pattern, fan_in_fan_out = {}, [], {}, {}, False
    target_parameters, expert_keys = [], {}
    for key in tensors:
        if ".paca_delta." in key:  # fused experts: <module>.paca_delta.<projection>
            prefix, _, projection = key.rpartition(".paca_delta.")
            expert_keys.setdefault(prefix, []).append(projection)
    for prefix, projections in expert_keys.items():
        name = prefix.removeprefix("base_model.model.")
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{adapter_dir}: module '{name}' of the adapter is not in base model '{base}'.")
        r, alpha = layer_r_and_alpha(
            int(config["r"]),
            float(config["paca_alpha"]),
            config.get("rank_pattern"),
            config.get("alpha_pattern"),
            name,
        )
        paths = _param_wrapper_paths(prefix, module, projections)
        for projection in projections:
            in_features = getattr(module, projection).shape[1 if module.is_transposed else 2]
            a, b = expert_lora_factors(
                tensors[f"{prefix}.paca_delta.{projection}"],
                tensors[f"{prefix}.paca_indices.{projection}"],
                alpha / r,
                in_features,
            )
            lora_tensors[f"{paths[projection]}.lora_A.weight"] = a.contiguous()
            lora_tensors[f"{paths[projection]}.lora_B.weight"] = b.contiguous()
            target_parameters.append(f"{name}.{projection}")
            rank = tensors[f"{prefix}.paca_delta.{projection}"].shape[2]  # the layer's r (clamped to a narrow d_in)
            rank_pattern[f"^{name}.{projection}$"] = rank  # per expert; LoRA scaling 1 (alpha = r)
            alpha_pattern[f"^{name}.{projection}$"] = rank
    for key, delta in tensors.items():
        if ".paca_delta." in key or ".paca_indices." in key:
            continue
        if not key.endswith(".paca_delta"):
            if not key.endswith(".paca_indices"):
                lora_tensors[key] = delta  # biases and modules_to_save travel unchanged
            continue
        prefix = key.removesuffix(".paca_delta")
        name = prefix.removeprefix("base_model.model.")
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{adapter_dir}: module '{name}' of the adapter is not in base model '{base}'.")
        idx = tensors[prefix + ".paca_indices"]
        r, alpha = layer_r_and_alpha(
            int(config["r"]),
            float(config["paca_alpha"]),
            config.get("rank_pattern"),
            config.get("alpha_pattern"),
            name,
        )
        scale = alpha / r  # the layer's scale (a layer narrower than r keeps it too)
        is_conv = isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        if is_conv and module.groups != 1:
            raise ValueError(
                f"{adapter_dir}: module '{name}' is a grouped convolution (groups={module.groups}), whose "
                "column delta has no exact LoRA form in PEFT; export --to merged instead."
            )
        is_conv1d = type(module).__name__ == "Conv1D"
        if targets and fan_in_fan_out != is_conv1d:
            raise ValueError(
                f"{adapter_dir}: the adapter tunes both transformers Conv1D and other layers; a LoRA "
                "config has one fan_in_fan_out for all of them. Export --to merged instead."
            )
        fan_in_fan_out = is_conv1d
        in_features = module.weight.shape[0] if is_conv1d else module.weight.shape[1]
        a, b = lora_factors(delta, idx, scale, in_features, tuple(module.kernel_size) if is_conv else ())
        lora_tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
        lora_tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
        pattern = f"^{name}$"
        if is_router(module):  # not an nn.Linear: PEFT wraps its weight (target_parameters), at the same key path
            target_parameters.append(f"{name}.weight")
            pattern = f"^{name}(.weight)?$"  # PEFT matches the parameter's name, and checks the module's
        else:
            targets.append(name)
        rank_pattern[pattern] = a.shape[0]
        alpha_pattern[pattern] = a.shape[0]
    from peft import LoraConfig

    ranks = sorted(set(rank_pattern.values()))
    lora_config = LoraConfig(
        r=ranks[0],
        lora_alpha=ranks[0],
        target_modules=targets,
        target_parameters=target_parameters or None,
        lora_dropout=0.0,
        bias=_LORA_BIAS[config.get("bias", "none")],
        fan_in_fan_out=fan_in_fan_out,
        task_type=config.get("task_type"),
        base_model_name_or_path=base,
        modules_to_save=config.get("modules_to_save"),
        rank_pattern={k: v for k, v in rank_pattern.items() if v != ranks[0]},
        alpha_pattern={k: v for k, v in alpha_pattern.items() if v != ranks[0]},
    )
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
    with _atomic_dir(out_dir) as tmp:
        lora_config.save_pretrained(tmp)
        save_file(lora_tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def _targets_peft_would_move(lora_config, model) -> list[str]:
    """Targets that PEFT's MoE config conversion (run by PeftModel.from_pretrained) would turn into experts."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without the conversion moves nothing
        return []
    probe = copy.deepcopy(lora_config)
    convert_peft_config_for_transformers(probe, model, None)
    return sorted(set(lora_config.target_modules) - set(probe.target_modules or ()))


def export_merged(
    adapter_dir: str, out_dir: str, base: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """Write the base model with the tuned columns merged in, as a plain transformers model directory."""
    from peft import PeftModel

    import paca  # noqa: F401  (registers PaCA with PEFT)

    config = read_adapter_config(adapter_dir)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base model; pass --base.")
    model = load_model(base, config.get("task_type"), dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    with _atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        _copy_tokenizer(base, tmp)
    return out_dir


def _copy_tokenizer(base: str, out_dir: str) -> None:
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    except (OSError, ValueError, TypeError):
        pass  # a model directory without a tokenizer (e.g. built from a config) exports weights only


class _atomic_dir:
    """Write into a sibling temporary directory; rename it to ``path`` only when complete."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def __enter__(self) -> str:
        if os.path.exists(self.path) and os.listdir(self.path):
            raise FileExistsError(f"{self.path}: output directory exists and is not empty; choose another.")
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".paca-export-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.isdir(self.path):
            os.rmdir(self.path)  # empty, checked on entry
        os.replace(self.tmp, self.path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paca export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="directory of a saved PaCA adapter")
    parser.add_argument("--to", required=True, choices=["merged", "lora"], help="output format")
    parser.add_argument("out", help="output directory (must not exist or be empty)")
    parser.add_argument("--base", help="base model (default: base_model_name_or_path of the adapter)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="merged weights dtype")
    args = parser.parse_args(argv)
    if args.to == "lora":
        export_lora(args.adapter, args.out, args.base)
    else:
        export_merged(args.adapter, args.out, args.base, getattr(torch, args.dtype) if args.dtype else None)
    print(json.dumps({"exported": args.to, "adapter": args.adapter, "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
