"""`paca train`: fine-tune a model end to end with PaCA (or QPaCA, LoRA, DoRA, full fine-tuning).

Built on TRL's SFTTrainer and DPOTrainer over transformers' Trainer (loop, mixed precision, accumulation,
DDP / FSDP2 / DeepSpeed through accelerate). Modules, in the order a run uses them:

- ``config``: the flat key schema, YAML files and overrides, the checks;
- ``data``: reading records (files, saved and hub datasets), their formats, splits, tokenising with labels;
- ``model``: loading the base and applying the method; ``arguments``: the Trainer's arguments;
- ``trainers``: paca's SFT / DPO trainers (atomic checkpoints, NaN guard, exact match); ``progress``: the line
  per step;
- ``pipeline``: one run, stage by stage; ``checkpoints``, ``report``, ``plot``: what it writes;
- ``demo``: the built-in two-stage demo, a client of the pipeline (``builtin``: how it hands its names over);
- ``launch``: the run `paca train` starts (the pipeline with the demo's names); ``cli``: the command.
"""

from .config import TrainConfig, load_config
from .launch import run
from .pipeline import TrainingStopped

__all__ = ["TrainConfig", "TrainingStopped", "load_config", "run"]
