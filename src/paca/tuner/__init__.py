"""PaCA as a PEFT method: config, layer and model (PEFT's folder contract).

On peft >= 0.22, which ships its own PaCA, paca does not register a rival method: PEFT's ``PACA`` type maps to
paca's config and tuner, so adapter files of either load into paca, and :class:`PacaModel` hands a plain
``peft.PacaConfig`` to PEFT's own tuner (a user chooses the implementation by the config class). On older peft,
paca registers ``PACA`` itself.
"""

from peft import mapping
from peft.utils import register_peft_method

from .config import PEFT_HAS_PACA, PacaConfig
from .conv import Conv
from .experts import Experts
from .layer import PacaLayer, SingleWeightLayer
from .linear import Linear
from .model import PacaModel
from .quantized import Linear4bit
from .registration import PACA_PEFT_TYPE
from .router import Router

if PEFT_HAS_PACA:
    from peft.tuners.paca import PacaLayer as PeftPacaLayer

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PACA_PEFT_TYPE] = PacaConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PACA_PEFT_TYPE] = PacaModel
    PeftPacaLayer.register(PacaLayer)  # isinstance(layer, peft.tuners.paca.PacaLayer): "a PaCA layer", either's
elif PACA_PEFT_TYPE not in mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(name="paca", config_cls=PacaConfig, model_cls=PacaModel, prefix="paca_")

__all__ = [
    "PACA_PEFT_TYPE",
    "Conv",
    "Experts",
    "Linear",
    "Linear4bit",
    "PacaConfig",
    "PacaLayer",
    "PacaModel",
    "Router",
    "SingleWeightLayer",
]
