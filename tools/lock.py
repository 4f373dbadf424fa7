"""The locked set-up: write constraints.txt from an environment, or show how an environment differs from it.

    python tools/lock.py write constraints.txt [--hold "pkg==ver ..."]   # pin every installed distribution
    python tools/lock.py diff constraints.txt                             # installed vs locked, one line each

`make lock` and `make test-latest` call it from their own virtual environments (see docs/DEPENDENCIES.md).
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from importlib import metadata

# Never pinned: the project itself (installed editable from the checkout).
SELF = {"paca"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Every distribution of this interpreter, by canonical name; local labels dropped (torch 2.13.0+cpu -> 2.13.0).

    The first one on sys.path wins, as for imports: setuptools puts its vendored copies (packaging, wheel, ...)
    on sys.path once imported, behind site-packages.
    """
    found = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name not in SELF and name not in found:
            found[name] = dist.version.split("+")[0]
    return found


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.split("#")[0].strip()
            if not line:
                continue
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
            if match is None:
                raise SystemExit(f"{path}:{number}: expected 'name==version', got '{line}'")
            pins[canonical(match[1])] = match[2]
    return pins


def write(path: str, hold: str) -> None:
    pins = installed()
    header = [
        f"# The locked set-up: every distribution `make test` and `make demo` install, exact ({len(pins)}).",
        f"# Written by `make lock` on {datetime.date.today()} with Python {sys.version.split()[0]}: the newest",
        "# releases, torch held at 2.13.0 (a local CPU wheel; any other pulls GBs of CUDA packages)"
        + (f", and held back: {hold}." if hold.strip() else "."),
        "# Check newer releases with `make test-latest`; see docs/DEPENDENCIES.md.",
    ]
    with open(path, "w") as f:
        f.write("\n".join(header + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n")
    print(f"{path}: {len(pins)} pins")


def diff(path: str) -> int:
    """Print each distribution whose installed version is not the locked one; the count of them."""
    locked, now = read_lock(path), installed()
    rows = [
        (name, locked.get(name, "-"), now.get(name, "-"))
        for name in sorted(locked.keys() | now.keys())
        if locked.get(name) != now.get(name)
    ]
    if not rows:
        print(f"installed = {path} ({len(locked)} pins)")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'package':<{width}}  {'locked':<14} installed")
    for name, old, new in rows:
        print(f"{name:<{width}}  {old:<14} {new}")
    print(f"{len(rows)} of {len(locked.keys() | now.keys())} distributions differ from {path}")
    return len(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("write", "diff"))
    parser.add_argument("lock")
    parser.add_argument("--hold", default="", help="requirements held back, recorded in the header")
    args = parser.parse_args(argv)
    if args.action == "write":
        write(args.lock, args.hold)
    else:
        diff(args.lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
