"""What the `paca train` run tests share: a small demo-task config, the saved adapter, a kill at a step.

Runs use the demo architecture (2 layers, hidden 64) on a small JSONL of the demo task, in-process.
"""

import os
import re

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from paca.train.config import load_config

PROGRESS_LINE = re.compile(
    r"^step (\d+)/(\d+) \(\d+%\) \| loss [\d.]+ \| lr [\d.]+e[-+]\d+ \| [\d.]+[kMG]? tok/s \| "
    r"peak [\d.]+ (KiB|MiB|GiB) \| eta \w+$"
)


def config(task_file, output_dir, *overrides):
    return load_config(
        [
            f"data={task_file}",
            "model=paca-demo-random",
            f"output_dir={output_dir}",
            "batch_size=8",
            "eval_split=8",
            "logging_steps=1",
            "save_steps=0",
            "lr=0.02",
            *overrides,
        ]
    )


def adapter(output_dir):
    return load_file(os.path.join(output_dir, "adapter_model.safetensors"))


def assert_same_tensors(a, b, atol=0.0):
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


class Interrupt(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Stands for a kill: raise once optimizer step ``step`` is done (after its checkpoint, if any)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"killed after step {self.step}")
