"""The run `paca train` and :func:`paca.train.run` start: the pipeline, told what the demo's names stand for."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import TrainerCallback

from . import demo, pipeline
from .config import TrainConfig


def run(
    cfg: TrainConfig, callbacks: Iterable[TrainerCallback] = (), evaluate_before: bool = True, stream=None
) -> dict:
    """Train as ``cfg`` says, ``paca-demo``, ``paca-demo-random`` and the demo's tasks known by name; return the
    summary (also written to ``output_dir/summary.json``).

    Args:
        cfg: the run's configuration; an empty ``output_dir`` is filled in with the dated default.
        callbacks: extra Trainer callbacks.
        evaluate_before: measure the held-out loss (and exact match) before training too.
        stream: where the progress lines go (stdout).

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad input, with what, where and what to do.
        TrainingStopped: the loss turned NaN or Inf; the last good checkpoint is kept.
    """
    return pipeline.run(cfg, callbacks, evaluate_before, stream, builtins=demo.BUILTINS)
