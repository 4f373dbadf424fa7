"""Models and record sets a run knows by name instead of loading them from the hub or disk.

The run never imports whoever provides them (the built-in demo does, :data:`paca.train.demo.BUILTINS`): the
provider hands a :class:`BuiltinSources` to :func:`paca.train.pipeline.run`, which calls each provider only
when its stage needs it, so a dry run builds no model and an output directory is checked before any is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

NO_RECORDS: Mapping[str, Callable[[], list[dict]]] = MappingProxyType({})


@dataclass(frozen=True)
class BuiltinModel:
    """A base model made by code: in memory from the run's seed (``build``), or a directory (``directory``)
    that its provider may build and cache on first use.

    Args:
        tokenizer: the model's tokenizer, made without loading (or building) the model.
        build: ``build(seed)``, the model itself.
        directory: the directory holding the model and its tokenizer, built first if need be.
        header: the line a run prints above its own header (what the model already knows).
        threads: torch threads to train with (None: leave torch's setting).
    """

    tokenizer: Callable[[], Any]
    build: Callable[[int], Any] | None = None
    directory: Callable[[], str] | None = None
    header: Callable[[], str] | None = None
    threads: int | None = None


@dataclass(frozen=True)
class BuiltinSources:
    """What a run knows by name: ``models`` for the key ``model``, ``records`` (``name() -> records``, each a
    record of the formats :mod:`paca.train.data.formats` reads) for the keys ``data`` and ``eval_data``."""

    models: Mapping[str, BuiltinModel] = field(default_factory=dict)
    records: Mapping[str, Callable[[], list[dict]]] = field(default_factory=dict)


NO_BUILTINS = BuiltinSources()
