"""axolotl plugin: ``adapter: paca`` in an axolotl YAML trains PaCA instead of LoRA, through PEFT.

    plugins:
      - paca.integrations.axolotl.PacaPlugin
    adapter: paca
    paca_r: 8                    # unset: lora_r
    paca_alpha: 16               # unset: lora_alpha
    paca_target_modules: [...]   # unset: lora_target_modules; neither: all-linear
    paca_selection: random       # random, weight_norm, structured

The plugin registers ``paca`` as an adapter axolotl does not build itself (not LoRA-like: no LoraConfig is made)
and answers axolotl's ``load_adapter`` hook with ``get_peft_model(model, PacaConfig(...))``, or with the saved PaCA
adapter of ``lora_model_dir`` (resume, inference). axolotl then trains and saves the PEFT model as it does LoRA's;
the saved directory is a PaCA adapter (``PeftModel.from_pretrained`` after ``import paca``; ``paca export --to
lora`` for serving engines). This module imports axolotl: it is loaded by axolotl, from its ``plugins:`` list.
"""

from __future__ import annotations

from typing import Literal

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from pydantic import BaseModel

ADAPTER = "paca"


class PacaArgs(BaseModel):
    """The YAML keys the plugin adds to axolotl's config schema."""

    paca_r: int | None = None
    paca_alpha: float | None = None
    paca_target_modules: list[str] | str | None = None
    paca_exclude_modules: list[str] | str | None = None
    # gradient selection scores batches before training (paca.select_by_gradient), which axolotl has no step for.
    paca_selection: Literal["random", "weight_norm", "structured"] | None = None
    paca_seed: int | None = None


def paca_config(cfg):
    """The ``PacaConfig`` an axolotl config asks for: the ``paca_*`` keys, else the LoRA keys it already has."""
    import paca

    target = cfg.get("paca_target_modules") or cfg.get("lora_target_modules") or "all-linear"
    kwargs = {
        "r": cfg.get("paca_r") or cfg.get("lora_r") or 8,
        "paca_alpha": cfg.get("paca_alpha") or cfg.get("lora_alpha") or 16,
        "target_modules": target,
        "task_type": "CAUSAL_LM",
    }
    for key, name in (("exclude_modules", "paca_exclude_modules"), ("selection", "paca_selection")):
        if cfg.get(name) is not None:
            kwargs[key] = cfg.get(name)
    seed = cfg.get("paca_seed") if cfg.get("paca_seed") is not None else cfg.get("seed")
    if seed is not None:
        kwargs["random_seed"] = seed
    return paca.PacaConfig(**kwargs)


class PacaPlugin(BasePlugin):
    """``adapter: paca``: PaCA through PEFT, configured by the ``paca_*`` keys (see the module docstring)."""

    def get_input_args(self) -> str:
        return f"{__name__}.PacaArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER, lora_like=False, relora=False)]

    def register(self, cfg: dict) -> None:
        import paca  # noqa: F401  (PEFT learns the PACA type before axolotl builds or loads any adapter)

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        if cfg.get("adapter") != ADAPTER:
            return None  # another plugin's adapter, or axolotl's own
        from peft import PeftModel, get_peft_model

        config = paca_config(cfg)
        if config_only:
            return None, config
        if cfg.get("lora_model_dir"):  # axolotl's key for "start from this saved adapter"
            model = PeftModel.from_pretrained(model, cfg["lora_model_dir"], is_trainable=not inference)
            return model, model.peft_config["default"]
        model = get_peft_model(model, config)
        model.print_trainable_parameters()
        return model, config
