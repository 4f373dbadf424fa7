"""The results of one run by method, as the parts add to them, and how a method's failure is recorded."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field

import torch

from .errors import BenchError
from .progress import Progress
from .search import free_memory
from .settings import Settings


@dataclass
class Results:
    """Results by method, as they accumulate; a method that cannot be built is skipped by later parts.

    ``by_method[m]`` is the row the JSON document holds for method ``m``; ``profiles[m]`` its operator table.
    """

    settings: Settings
    progress: Progress
    by_method: dict[str, dict] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)
    profiles: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.by_method = {m: {"method": m} for m in self.settings.methods}
        self.vocab = self.settings.model.config().vocab_size  # read once: a model directory's config is a file

    def fail(self, method: str, message: str) -> None:
        self.by_method[method].setdefault("errors", []).append(message)
        self.progress.update(f"{method}: {message}")

    def attempt(self, method: str, what: str, action, *args, **kwargs):
        """``action(*args, **kwargs)``, or None when it failed, recorded: an unavailable method, an out-of-memory,
        or any other error (one method's failure must not lose the others' results). ``what`` says where it failed.
        """
        try:
            return action(*args, **kwargs)
        except BenchError as err:
            self.unavailable.add(method)
            self.fail(method, str(err))
        except torch.OutOfMemoryError:
            self.fail(method, f"out of memory {what}")
        except Exception as err:  # any other error: reported with its place, and the run goes on
            frame = traceback.extract_tb(err.__traceback__)[-1]
            self.fail(
                method, f"{type(err).__name__} {what}: {err} ({os.path.basename(frame.filename)}:{frame.lineno})"
            )
        free_memory()
        return None
