"""PaCA as a PEFT method: config, layer and model (PEFT's folder contract), registered on import."""

from peft.utils import register_peft_method

from .config import PacaConfig
from .layer import Conv, Linear, PacaLayer
from .model import PacaModel
from .registration import PACA_PEFT_TYPE

register_peft_method(name="paca", config_cls=PacaConfig, model_cls=PacaModel, prefix="paca_")

__all__ = ["PACA_PEFT_TYPE", "Conv", "Linear", "PacaConfig", "PacaLayer", "PacaModel"]
