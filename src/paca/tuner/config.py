"""PacaConfig: the dataclass a user passes to ``peft.get_peft_model``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import InitVar, dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ..adapter_file import AdapterFileError, load_adapter_tensors
from .registration import PACA_PEFT_TYPE

LOADING_NOTE_TITLE = "## Loading this PaCA adapter"
LOADING_NOTE = f"""

{LOADING_NOTE_TITLE}

This is a PaCA (Partial Connection Adaptation) adapter saved by paca. PEFT >= 0.22 loads it with its own PaCA
where it tunes `nn.Linear` layers only; for the layers only paca tunes (fused MoE experts, routers, convolutions,
GPT-2 Conv1D) and paca's options (`rank_pattern`, `alpha_pattern`, `bias`, `selection`), `pip
install paca`, then

```python
import paca  # PaCA adapter files now load into paca's implementation
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")
```

`paca export --adapter DIR --to lora OUT` writes an exact PEFT LoRA adapter, which plain PEFT and serving
engines load without paca; `--to merged` writes the merged model.
"""


try:  # peft >= 0.22 ships its own PaCA: paca's config is a PEFT PaCA config with more fields
    from peft import PacaConfig as PeftPacaConfig
except ImportError:  # peft 0.20-0.21: no PaCA of its own; the same fields, defaults and meaning, defined here
    PeftPacaConfig = None

PEFT_HAS_PACA = PeftPacaConfig is not None


if PeftPacaConfig is None:

    @dataclass
    class _PeftPacaFields(PeftConfig):
        """PEFT 0.22's ``PacaConfig`` fields, for PEFT releases that have none (see ``peft.PacaConfig``'s docs)."""

        r: int = field(default=8, metadata={"help": "Number of input columns tuned in each targeted layer."})
        paca_alpha: int = field(
            default=8, metadata={"help": "Scale numerator: the delta is applied as (paca_alpha / r) * D."}
        )
        target_modules: list[str] | str | None = field(
            default=None, metadata={"help": "Module names (suffix match), a regex (full match), or 'all-linear'."}
        )
        exclude_modules: list[str] | str | None = field(
            default=None, metadata={"help": "Module names or a regex of modules not to tune, even when targeted."}
        )
        layers_to_transform: list[int] | int | None = field(
            default=None, metadata={"help": "Indices of the transformer blocks to tune (all when unset)."}
        )
        layers_pattern: list[str] | str | None = field(
            default=None, metadata={"help": "Name of the module list holding the blocks, with layers_to_transform."}
        )
        random_seed: int | None = field(
            default=None, metadata={"help": "Seed of the column choice, with each layer's name; None: the global RNG."}
        )
        paca_indices_pattern: dict | None = field(
            default_factory=dict, metadata={"help": "{name or regex: [columns]}: the columns of matching layers."}
        )
        init_weights: bool = field(
            default=True, metadata={"help": "True: a zero delta. False: normal(0, 0.1), for tests."}
        )
        modules_to_save: list[str] | None = field(
            default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
        )

    _Base = _PeftPacaFields
else:
    _Base = PeftPacaConfig

# paca's own fields: what they hold when unused. A config whose extras are all at these values is saved with PEFT's
# fields alone, so plain PEFT (>= 0.22) reads it as its own.
PACA_EXTRA_DEFAULTS = {
    "target_parameters": None,
    "selection": "random",
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
}


@dataclass
class PacaConfig(_Base):
    """Configuration of a Partial Connection Adaptation (PaCA) adapter, run by paca's implementation.

    Each targeted layer tunes ``r`` of its input columns: ``W[:, idx] = W0[:, idx] + (paca_alpha / r) * D``
    with ``D`` (``d_out x r``) zero at start and ``idx`` chosen per layer by ``selection``.

    On peft >= 0.22 this is a subclass of ``peft.PacaConfig``: every field PEFT's PaCA has keeps its name, default
    and meaning (``random_seed`` picks the same columns), and paca adds ``target_parameters``, ``selection``,
    ``bias``, ``rank_pattern`` and ``alpha_pattern``. A ``paca.PacaConfig`` runs paca's layers, a plain
    ``peft.PacaConfig`` PEFT's own (``PeftModel.from_pretrained`` reads PaCA adapter files as ``paca.PacaConfig``
    once paca is imported).

    Example::

        cfg = PacaConfig(r=8, paca_alpha=16, target_modules=["q_proj", "v_proj"], random_seed=0,
                         task_type="CAUSAL_LM")
        model = get_peft_model(base_model, cfg)
    """

    target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Fused MoE expert parameters to tune, as LoRA's target_parameters (full name or suffix, e.g. "
            "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']); each expert tunes r input columns "
            "of its own. target_modules naming an experts module (or all-linear) tunes both."
        },
    )
    selection: Literal["random", "weight_norm", "gradient", "structured"] = field(
        default="random",
        metadata={
            "help": "How columns are chosen: 'random' (PEFT's: seeded by random_seed and the layer name), "
            "'weight_norm' (largest column L2 norms of W0), 'gradient' (set by paca.select_by_gradient "
            "before training), 'structured' (whole heads / channels, S2FT-style)."
        },
    )
    bias: Literal["none", "all", "paca_only"] = field(
        default="none",
        metadata={"help": "Biases to train and save: 'none', 'all', or 'paca_only' (those of tuned layers)."},
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer r, as LoRA's: {name or regex: r}, matched against the end of the module name "
            "(e.g. {'down_proj': 16}); other layers use r."
        },
    )
    alpha_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer paca_alpha, as LoRA's: {name or regex: alpha}; the layer's scale is its alpha / its r."
        },
    )
    seed: InitVar[int | None] = None  # paca's earlier name of random_seed: old configs and adapter files still load

    def __post_init__(self, seed: int | None = None):
        if seed is not None:
            if self.random_seed is not None and self.random_seed != seed:
                raise ValueError(
                    f"PacaConfig: seed={seed} and random_seed={self.random_seed} disagree; seed is the "
                    "old name of random_seed, pass only random_seed."
                )
            self.random_seed = seed
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        if self.paca_indices_pattern is None:
            self.paca_indices_pattern = {}
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"PacaConfig.r must be a positive integer, got {self.r!r}.")
        super().__post_init__()
        self.peft_type = PACA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.bias not in ("none", "all", "paca_only"):
            raise ValueError(f"PacaConfig.bias must be 'none', 'all' or 'paca_only', got {self.bias!r}.")
        if self.bias != "none" and not _peft_saves_paca_biases():
            import peft

            raise ValueError(
                f"PacaConfig.bias={self.bias!r} needs peft >= 0.21: peft {peft.__version__} saves no bias "
                "of a PaCA adapter, so the trained biases would be lost; upgrade peft or use bias='none'."
            )
        if self.selection not in ("random", "weight_norm", "gradient", "structured"):
            raise ValueError(
                f"PacaConfig.selection must be one of random, weight_norm, gradient, structured; "
                f"got {self.selection!r}."
            )
        for name, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PacaConfig.rank_pattern['{name}'] must be a positive integer, got {value!r}.")
        for name, value in self.alpha_pattern.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"PacaConfig.alpha_pattern['{name}'] must be a number, got {value!r}.")
        if PeftPacaConfig is None:  # PEFT's own config checks these on peft >= 0.22
            if self.layers_pattern and self.layers_to_transform is None:
                raise ValueError(
                    "PacaConfig.layers_pattern is only used with layers_to_transform; set both or neither."
                )
            check_indices_pattern(self.paca_indices_pattern)

    @classmethod
    def from_peft(cls, config: PeftConfig) -> PacaConfig:
        """A paca config with the fields of ``config`` (a ``peft.PacaConfig``, or a paca one: returned as is)."""
        if isinstance(config, cls):
            return config
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
        return cls(**values)

    @classmethod
    def check_kwargs(cls, **kwargs):
        kwargs = super().check_kwargs(**kwargs)
        if kwargs.get("seed") is not None and kwargs.get("random_seed") is None:  # saved before the rename
            kwargs["random_seed"] = kwargs["seed"]
        kwargs.pop("seed", None)
        return kwargs

    def to_dict(self) -> dict:
        """The saved fields: PEFT's, plus paca's extras where they are used (so plain PEFT reads an adapter that uses
        none of them as its own, and one that does names them: PEFT warns that it ignores them)."""
        values = super().to_dict()
        for name, unused in PACA_EXTRA_DEFAULTS.items():
            if values.get(name) == unused:
                values.pop(name, None)
        return values

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
        path = (
            pretrained_model_name_or_path
            if subfolder is None
            else os.path.join(pretrained_model_name_or_path, subfolder)
        )
        missing = None
        if os.path.isdir(path):
            try:
                load_adapter_tensors(path)
            except AdapterFileError as err:
                if not err.missing:
                    raise
                missing = err  # a config alone is a valid directory; loading weights from it is not
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._missing_weights = missing  # raised by PacaModel if the config is used to load this adapter
        return config

    def layer_r_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, paca_alpha) of the layer named ``module_name``: rank_pattern / alpha_pattern, else r / paca_alpha."""
        return layer_r_and_alpha(self.r, self.paca_alpha, self.rank_pattern, self.alpha_pattern, module_name)

    @property
    def scaling(self) -> float:
        """The factor s = paca_alpha / r applied to the delta."""
        return self.paca_alpha / self.r


def layer_r_and_alpha(
    r: int, paca_alpha: float, rank_pattern: dict, alpha_pattern: dict, module_name: str
) -> tuple[int, float]:
    """(r, paca_alpha) of one layer, the patterns matched as PEFT's LoRA matches them (also from a saved config)."""
    from peft.utils.other import get_pattern_key

    r_key = get_pattern_key((rank_pattern or {}).keys(), module_name)
    alpha_key = get_pattern_key((alpha_pattern or {}).keys(), module_name)
    return (rank_pattern or {}).get(r_key, r), float((alpha_pattern or {}).get(alpha_key, paca_alpha))


def check_indices_pattern(pattern: dict) -> None:
    """PEFT's checks of ``paca_indices_pattern`` (lists of unique non-negative ints), for peft < 0.22."""
    for key, indices in pattern.items():
        if not isinstance(indices, (list, tuple)) or not all(isinstance(i, int) for i in indices):
            raise ValueError(f"PacaConfig.paca_indices_pattern[{key!r}] must be a list of int, got {indices!r}.")
        if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
            raise ValueError(
                f"PacaConfig.paca_indices_pattern[{key!r}] must hold unique, non-negative columns, got {indices!r}."
            )


def _peft_saves_paca_biases() -> bool:
    """Whether PEFT asks the tuner which entries an adapter's state dict holds (peft >= 0.21, where PaCA adds the
    biases that ``bias`` trains); older PEFT keeps entries by name only and drops PaCA's biases."""
    from peft.tuners.tuners_utils import BaseTuner

    return hasattr(BaseTuner, "_get_adapter_state_dict")
