"""The set-up: what `make test` installs is the lock, the lock fits pyproject's ranges, commands start quietly.

Pinned: every distribution pinned in constraints.txt is installed at exactly its version (skipped under
`make test-latest`, which installs the newest releases on purpose); each version the lock pins for a
dependency of pyproject.toml satisfies the range declared there; `python -m paca --help` writes nothing to
stderr (no third-party import noise); the noise filter drops only the one known bitsandbytes line.
"""

import importlib.util
import logging
import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = os.path.join(os.path.dirname(__file__), "..")
LOCK = os.path.join(ROOT, "constraints.txt")


def lock_tool():
    spec = importlib.util.spec_from_file_location("lock", os.path.join(ROOT, "tools", "lock.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_requirements() -> list[Requirement]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in names]


@pytest.mark.skipif(os.environ.get("PACA_UNLOCKED") == "1", reason="make test-latest installs the newest releases")
def test_every_locked_distribution_is_installed_at_its_locked_version():
    lock = lock_tool()
    locked, installed = lock.read_lock(LOCK), lock.installed()
    wrong = {
        name: (version, installed.get(name, "missing"))
        for name, version in locked.items()
        if installed.get(name) != version
    }
    assert not wrong, f"installed != constraints.txt (locked, installed): {wrong}; run `make test` to rebuild .venv"


def test_the_lock_pins_each_dependency_within_its_declared_range():
    lock = lock_tool()
    locked = lock.read_lock(LOCK)
    for requirement in project_requirements():
        name = lock.canonical(requirement.name)
        assert name in locked, f"{name} is a dependency in pyproject.toml but constraints.txt does not pin it"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt pins {name}=={locked[name]}, outside pyproject.toml's '{requirement}'"
        )
    assert locked["torch"] == "2.13.0"  # the local CPU wheel; any other version pulls several GB of CUDA packages


def test_the_core_admits_the_versions_axolotl_pins_and_only_the_train_extra_asks_more():
    """pip accepts paca beside axolotl 0.19 (constraints-axolotl.txt, `make test-axolotl`): every core requirement
    and those of the quant and test extras hold there; `paca train`'s extra is what needs newer releases."""
    lock = lock_tool()
    pins = lock.read_lock(os.path.join(ROOT, "constraints-axolotl.txt"))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    for line in project["dependencies"] + extras["quant"] + extras["test"]:
        requirement = Requirement(line)
        name = lock.canonical(requirement.name)
        assert name in pins and requirement.specifier.contains(pins[name], prereleases=True), (
            f"'{requirement}' excludes axolotl's {name}=={pins.get(name, 'missing')} (constraints-axolotl.txt)"
        )
    too_old = [
        line
        for line in extras["train"]
        if not Requirement(line).specifier.contains(pins[lock.canonical(Requirement(line).name)])
    ]
    assert too_old, "the train extra admits axolotl's set: docs/TRAINING.md's 'From axolotl' says it does not"


def test_a_command_starts_without_third_party_noise():
    done = subprocess.run(
        [sys.executable, "-m", "paca", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: paca")
    assert done.stderr == ""


def test_the_noise_filter_drops_only_the_known_bitsandbytes_line():
    from paca.upstream_noise import _MissingKernelsPackage

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 1, message, None, None)

    keep = _MissingKernelsPackage().filter
    assert not keep(
        record(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
            "Please make sure you already `pip install kernels` and the kernels >= 0.11.1"
        )
    )
    assert keep(record("Failed to load CPU gemm_4bit_forward from kernels-community: HTTP 404"))  # a real failure
    assert keep(record("some other bitsandbytes warning"))
