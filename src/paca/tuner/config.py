"""PacaConfig: the dataclass a user passes to ``peft.get_peft_model``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..adapter_file import load_adapter_tensors
from .registration import PACA_PEFT_TYPE


LOADING_NOTE_TITLE = "## Loading this PaCA adapter"
LOADING_NOTE = f"""

{LOADING_NOTE_TITLE}

This is a PaCA (Partial Connection Adaptation) adapter: `pip install paca`, then

```python
import paca  # registers PaCA with PEFT; without it PEFT stops at KeyError: 'PACA'
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")
```

`paca export --adapter DIR --to lora OUT` writes an exact PEFT LoRA adapter, which plain PEFT and serving
engines load without paca; `--to merged` writes the merged model.
"""


@dataclass
class PacaConfig(PeftConfig):
    """Configuration of a Partial Connection Adaptation (PaCA) adapter.

    Each targeted layer tunes ``r`` of its input columns: ``W[:, idx] = W0[:, idx] + (paca_alpha / r) * D``
    with ``D`` (``d_out x r``) zero at start and ``idx`` chosen per layer by ``selection``.

    Example::

        cfg = PacaConfig(r=8, paca_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(base_model, cfg)
    """

    r: int = field(default=8, metadata={"help": "Number of input columns tuned in each targeted layer (1 <= r <= d_in)."})
    paca_alpha: float = field(default=16.0, metadata={"help": "Scale numerator: the delta is applied as (paca_alpha / r) * D."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear' (every linear layer "
                          "but the output head, plus fused MoE experts). Supported: nn.Linear, transformers Conv1D, "
                          "nn.Conv1d/2d/3d, transformers experts modules (fused 3-D expert weights)."})
    target_parameters: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Fused MoE expert parameters to tune, as LoRA's target_parameters (full name or suffix, e.g. "
                          "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']); each expert tunes r input columns "
                          "of its own. target_modules naming an experts module (or all-linear) tunes both."})
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to tune, even when targeted."})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the transformer blocks to tune (all when unset)."})
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the module list holding the blocks, used with layers_to_transform."})
    seed: int = field(default=0, metadata={"help": "Seed of the random column choice; with the layer's name it fixes each layer's columns."})
    selection: Literal["random", "weight_norm", "gradient", "structured"] = field(
        default="random",
        metadata={"help": "How columns are chosen: 'random' (seeded), 'weight_norm' (largest column L2 norms of W0), "
                          "'gradient' (set by paca.select_by_gradient before training), 'structured' (whole heads / "
                          "channels, S2FT-style)."})
    bias: Literal["none", "all", "paca_only"] = field(
        default="none", metadata={"help": "Biases to train and save: 'none', 'all', or 'paca_only' (those of tuned layers)."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter (e.g. a classifier head)."})
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-layer r, as LoRA's: {name or regex: r}, matched against the end of the module name "
                          "(e.g. {'down_proj': 16}); other layers use r."})
    alpha_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-layer paca_alpha, as LoRA's: {name or regex: alpha}; the layer's scale is its "
                          "alpha / its r."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the delta starts at zero (the model starts as the base). False: a small random "
                          "delta, for tests that need the adapter to change the outputs (PEFT's convention)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PACA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"PacaConfig.r must be a positive integer, got {self.r!r}.")
        if self.bias not in ("none", "all", "paca_only"):
            raise ValueError(f"PacaConfig.bias must be 'none', 'all' or 'paca_only', got {self.bias!r}.")
        if self.bias != "none" and not _peft_saves_paca_biases():
            import peft

            raise ValueError(f"PacaConfig.bias={self.bias!r} needs peft >= 0.21: peft {peft.__version__} saves no bias "
                             "of a PaCA adapter, so the trained biases would be lost; upgrade peft or use bias='none'.")
        if self.selection not in ("random", "weight_norm", "gradient", "structured"):
            raise ValueError(f"PacaConfig.selection must be one of random, weight_norm, gradient, structured; "
                             f"got {self.selection!r}.")
        for name, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PacaConfig.rank_pattern['{name}'] must be a positive integer, got {value!r}.")
        for name, value in self.alpha_pattern.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"PacaConfig.alpha_pattern['{name}'] must be a number, got {value!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("PacaConfig.layers_pattern is only used with layers_to_transform; set both or neither.")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save adapter_config.json; the model card PEFT wrote beside it gets a note on loading a PaCA adapter
        (without ``import paca`` PEFT stops at ``KeyError: 'PACA'``, which says nothing)."""
        super().save_pretrained(save_directory, **kwargs)
        card = os.path.join(save_directory, "README.md")
        if os.path.isfile(card):
            with open(card, encoding="utf-8") as f:
                text = f.read()
            if LOADING_NOTE_TITLE not in text:
                with open(card, "a", encoding="utf-8") as f:
                    f.write(LOADING_NOTE)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder=None, **kwargs):
        """Load the config; for a local directory, first check the adapter file beside it.

        A missing, truncated or corrupted ``adapter_model.safetensors`` is reported here, naming the file,
        before ``PeftModel.from_pretrained`` touches the base model.
        """
        path = pretrained_model_name_or_path if subfolder is None else os.path.join(pretrained_model_name_or_path,
                                                                                     subfolder)
        if os.path.isdir(path):
            load_adapter_tensors(path)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def layer_r_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, paca_alpha) of the layer named ``module_name``: rank_pattern / alpha_pattern, else r / paca_alpha."""
        return layer_r_and_alpha(self.r, self.paca_alpha, self.rank_pattern, self.alpha_pattern, module_name)

    @property
    def scaling(self) -> float:
        """The factor s = paca_alpha / r applied to the delta."""
        return self.paca_alpha / self.r


def layer_r_and_alpha(r: int, paca_alpha: float, rank_pattern: dict, alpha_pattern: dict,
                      module_name: str) -> tuple[int, float]:
    """(r, paca_alpha) of one layer, the patterns matched as PEFT's LoRA matches them (also from a saved config)."""
    from peft.utils.other import get_pattern_key

    r_key = get_pattern_key((rank_pattern or {}).keys(), module_name)
    alpha_key = get_pattern_key((alpha_pattern or {}).keys(), module_name)
    return (rank_pattern or {}).get(r_key, r), float((alpha_pattern or {}).get(alpha_key, paca_alpha))


def _peft_saves_paca_biases() -> bool:
    """Whether PEFT asks the tuner which entries an adapter's state dict holds (peft >= 0.21, where PaCA adds the
    biases that ``bias`` trains); older PEFT keeps entries by name only and drops PaCA's biases."""
    from peft.tuners.tuners_utils import BaseTuner

    return hasattr(BaseTuner, "_get_adapter_state_dict")
