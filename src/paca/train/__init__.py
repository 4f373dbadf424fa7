"""`paca train`: fine-tune a model end to end with PaCA (or QPaCA, LoRA, DoRA, full fine-tuning).

Built on TRL's SFTTrainer and DPOTrainer over transformers' Trainer (loop, mixed precision, accumulation,
DDP / FSDP2 / DeepSpeed through accelerate). Files: ``config`` (the flat key schema), ``data`` (reading, chat
template, learned-token labels), ``methods`` (loading the base and applying the method), ``trainer`` (the
wiring, atomic checkpoints, NaN guard), ``checkpoints``, ``report`` (progress line, metrics.jsonl, summary),
``plot``, ``demo`` (the built-in two-stage demo), ``cli``.
"""

from .config import TrainConfig, load_config
from .trainer import TrainingStopped, run

__all__ = ["TrainConfig", "TrainingStopped", "load_config", "run"]
