"""Atomic output directories: an export is written beside its destination and renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile


class atomic_dir:
    """Write into a sibling temporary directory; rename it to ``path`` only when complete."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def __enter__(self) -> str:
        if os.path.exists(self.path) and os.listdir(self.path):
            raise FileExistsError(f"{self.path}: output directory exists and is not empty; choose another.")
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".paca-export-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.isdir(self.path):
            os.rmdir(self.path)  # empty, checked on entry
        os.replace(self.tmp, self.path)
