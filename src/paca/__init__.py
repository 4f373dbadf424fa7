"""paca: Partial Connection Adaptation (ICLR 2025) for HuggingFace PEFT.

``import paca`` makes PEFT's ``PACA`` type run paca's implementation (on peft < 0.22, which has none, it registers
the method), so ``peft.get_peft_model(model, paca.PacaConfig(...))`` and ``PeftModel.from_pretrained(model, dir)``
work as for PEFT's own methods; a plain ``peft.PacaConfig`` still runs PEFT's own PaCA.
"""

from .upstream_noise import install_filters

install_filters()  # before the imports below bring in peft, which imports bitsandbytes

from .tuner import PacaConfig, PacaLayer, PacaModel  # noqa: E402
from .tuner.calibration import select_by_gradient  # noqa: E402
from .tuner.model_layers import paca_layers, restore_base_weights  # noqa: E402
from .tuner.switching import add_weighted_adapter, switch_adapter  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "PacaConfig",
    "PacaLayer",
    "PacaModel",
    "add_weighted_adapter",
    "paca_layers",
    "restore_base_weights",
    "select_by_gradient",
    "switch_adapter",
    "__version__",
]
