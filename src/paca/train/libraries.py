"""The libraries `paca train` runs on: those of paca's ``train`` extra, at the floors it was tested at."""

from __future__ import annotations


def missing_training_libraries() -> list[str]:
    """What the installed libraries lack against paca's ``train`` extra (TRL, datasets and the floors `paca train`
    was tested at), one entry each (``'trl 1.9.0 (needs >=1.16)'``); when paca is not installed as a
    distribution (no floors recorded), only whether TRL and datasets are there."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requires = metadata.requires("paca") or []
    except metadata.PackageNotFoundError:  # run from a source tree: no floors recorded, but TRL must be there
        import importlib.util

        return [f"{name} (not installed)" for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    problems = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is None or not requirement.marker.evaluate({"extra": "train"}):
            continue  # the core (pip checked it) or another extra
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} (not installed)")
            continue
        if not requirement.specifier.contains(installed.split("+")[0], prereleases=True):
            problems.append(f"{requirement.name} {installed} (needs {requirement.specifier})")
    return problems


def check_training_libraries() -> None:
    problems = missing_training_libraries()
    if problems:
        raise ImportError(
            f"paca train runs on the libraries of paca's 'train' extra: {', '.join(problems)}; "
            "pip install 'paca[train]' (axolotl 0.19 pins older ones: train there with the axolotl "
            "plugin instead)."
        )
