"""One entry point for `paca` and `python -m paca`: train, bench, export."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("paca.train.cli", "fine-tune a model from a YAML config (no arguments: the built-in demo)"),
    "bench": ("paca.bench.cli", "measure step time and memory of PaCA vs LoRA, DoRA, full FT, side by side"),
    "export": ("paca.export.cli", "write an adapter as a merged model or as a PEFT LoRA adapter"),
}


def usage() -> str:
    lines = ["usage: paca <command> [args]", "", "commands:"]
    lines += [f"  {name:<8}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`paca <command> --help` for a command's options; `paca --version` for the versions."]
    return "\n".join(lines)


def _version_or_none(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(
            f"paca {version('paca')} (torch {version('torch')}, transformers {version('transformers')}, "
            f"peft {version('peft')}, trl {_version_or_none('trl')})"
        )
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"paca: unknown command '{command}'.\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(rest) or 0
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as err:
        print(f"paca {command}: error: {err}", file=sys.stderr)
        return 1
