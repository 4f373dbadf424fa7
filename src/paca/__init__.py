"""paca: Partial Connection Adaptation (ICLR 2025) for HuggingFace PEFT.

``import paca`` registers the method with PEFT, so ``peft.get_peft_model(model, paca.PacaConfig(...))``
and ``PeftModel.from_pretrained(model, dir)`` work as for PEFT's own methods.
"""

from .selection import select_by_gradient
from .switching import add_weighted_adapter, switch_adapter
from .tuner import PacaConfig, PacaLayer, PacaModel
from .tuner.model import paca_layers

__version__ = "0.1.0"
__all__ = ["PacaConfig", "PacaLayer", "PacaModel", "add_weighted_adapter", "paca_layers", "select_by_gradient",
           "switch_adapter", "__version__"]
