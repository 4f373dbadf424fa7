"""`paca train [CONFIG.yaml] [key=value ...]`: parse the config, run, report; exit code 0 on success."""

from __future__ import annotations

import sys
from typing import Optional

from .config import load_config, usage
from .trainer import TrainingStopped, run


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        cfg = load_config(argv)
        if not argv:
            print("paca train: no config given: running the built-in demo (`paca train --help` for the keys).",
                  flush=True)
        run(cfg)
    except TrainingStopped as err:
        print(f"paca train: stopped: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"paca train: error: {err}", file=sys.stderr)
        return 1
    return 0
