"""The evaluation protocol of the quality study: splits, the learning-rate grid, and how a learning rate is chosen.

Kept apart from training so that tests can pin it down without a model:

- ``stratified_splits``: repeated stratified k-fold. For each seed the examples are dealt into ``folds`` folds, each
  class spread evenly; every fold is the test set once. The rest is cut again, stratified, into a fit set (training)
  and a validation slice (the learning-rate choice). Test examples are never in fit or validation.
- ``choose_learning_rate``: the best validation accuracy wins, ties go to the lower validation loss. It is given
  validation scores only.
- ``search_learning_rate``: starts from a method's three-point grid (half-decade steps) and, while the choice sits
  on an edge, runs one more point past it, up to ``max_extension`` points on each side; a choice still on the edge
  after that is reported as such.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

Key = TypeVar("Key")


@dataclass(frozen=True)
class Split:
    """One train/test partition: indices into the task's examples."""

    seed: int
    fold: int
    fit: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]


def _deal(indices: list[int], labels: list[int], parts: int, rng: random.Random) -> list[list[int]]:
    """Shuffle each class and deal it round-robin into ``parts`` parts, continuing where the previous class stopped,
    so part sizes differ by at most one and every part holds each class in proportion."""
    out: list[list[int]] = [[] for _ in range(parts)]
    position = 0
    for label in sorted({labels[i] for i in indices}):
        members = [i for i in indices if labels[i] == label]
        rng.shuffle(members)
        for i in members:
            out[position % parts].append(i)
            position += 1
    return out


def stratified_splits(labels: list[int], seeds: list[int], folds: int, validation_fraction: float) -> list[Split]:
    """``len(seeds) * folds`` splits; in each, fit + validation + test partition ``range(len(labels))``."""
    if folds < 2:
        raise ValueError(f"folds={folds}: k-fold needs at least 2 folds")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction}: give a fraction between 0 and 1")
    labels = list(labels)
    splits = []
    for seed in seeds:
        rng = random.Random(seed)
        parts = _deal(list(range(len(labels))), labels, folds, rng)
        for k, test in enumerate(parts):
            train = sorted(i for j, part in enumerate(parts) if j != k for i in part)
            # Validation is dealt like a fold: a stratified slice of about validation_fraction of the training part.
            validation_parts = round(1 / validation_fraction)
            validation = _deal(train, labels, validation_parts, random.Random(seed * 1000 + k))[0]
            fit = sorted(set(train) - set(validation))
            splits.append(Split(seed, k, tuple(fit), tuple(sorted(validation)), tuple(sorted(test))))
    return splits


@dataclass(frozen=True)
class ValidationScore:
    """What the learning-rate choice may see of a run: its validation accuracy and loss, nothing of the test set."""

    accuracy: float
    loss: float


def choose_learning_rate(scores: dict[Key, ValidationScore]) -> Key:
    """The key (a learning rate or its grid step) with the best validation accuracy; among equals the one with the
    lower validation loss."""
    if not scores:
        raise ValueError("no learning rate was tried")
    return min(scores, key=lambda lr: (-scores[lr].accuracy, scores[lr].loss))


def grid_learning_rate(step: int) -> float:
    """The grid point ``step``: 10 ** (step / 2), i.e. half-decade steps (..., 1e-4, 3.2e-4, 1e-3, ...)."""
    return float(f"{10 ** (step / 2):.3g}")


@dataclass(frozen=True)
class SearchResult:
    """The learning rate chosen, the grid steps tried, and whether the choice is still on the grid's edge."""

    learning_rate: float
    steps_tried: tuple[int, ...]
    on_edge: bool


def search_learning_rate(
    centre_step: int, train: Callable[[float], ValidationScore], max_extension: int = 2
) -> SearchResult:
    """Train at the three grid points around ``centre_step``; while the choice is the lowest (highest) point tried,
    train one step below (above), at most ``max_extension`` steps past the starting grid on each side."""
    scores: dict[int, ValidationScore] = {}
    lowest, highest = centre_step - 1 - max_extension, centre_step + 1 + max_extension
    for step in (centre_step - 1, centre_step, centre_step + 1):
        scores[step] = train(grid_learning_rate(step))
    while True:
        best = choose_learning_rate(scores)
        if best == min(scores) and best > lowest:
            step = best - 1
        elif best == max(scores) and best < highest:
            step = best + 1
        else:
            break
        scores[step] = train(grid_learning_rate(step))
    on_edge = best in (min(scores), max(scores))
    return SearchResult(grid_learning_rate(best), tuple(sorted(scores)), on_edge)


def tune_and_test(centre_step: int, train_at: Callable[[float], Any], max_extension: int = 2):
    """``(SearchResult, runs by learning rate)``: the grid search of ``search_learning_rate`` over the runs
    ``train_at(lr)`` returns (``quality_train.Run``), of which only ``.validation`` reaches the choice; the caller
    reads the chosen run's test score after."""
    runs = {}

    def validation_of(learning_rate: float) -> ValidationScore:
        runs[learning_rate] = train_at(learning_rate)
        return runs[learning_rate].validation

    return search_learning_rate(centre_step, validation_of, max_extension), runs
