"""`paca train [CONFIG.yaml] [key=value ...]`: parse the config, run, report; exit code 0 on success."""

from __future__ import annotations

import sys

from .config import dash_options_as_overrides, load_config, usage
from .launch import run
from .pipeline import TrainingStopped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        cfg = load_config(argv)
        if not argv:
            print(
                "paca train: no config given: running the built-in demo (`paca train --help` for the keys).",
                flush=True,
            )
        run(cfg)
    except TrainingStopped as err:
        print(f"paca train: stopped: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"paca train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # One line instead of a traceback through the Trainer: what was kept and how to go on.
        output_dir = cfg.output_dir if "cfg" in locals() else ""  # run() fills in the dated default
        try:
            items = dash_options_as_overrides(argv)
        except ValueError:
            items = argv
        kept = [a for a in items if not a.lstrip("-").startswith(("resume=", "output_dir="))]
        again = " ".join(kept + ([f"output_dir={output_dir}"] if output_dir else []) + ["resume=true"])
        print(
            f"paca train: interrupted; the last complete checkpoint is kept. Resume with: paca train {again}",
            file=sys.stderr,
        )
        return 130
    return 0
