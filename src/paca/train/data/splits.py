"""Which records train and which evaluate: a named eval source, a saved dataset's 'validation' split, or a seeded
share of the training records held out."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Collection

from .sources import is_hub_split, looks_like_a_path, splits_of


def split_examples(examples: list, eval_split: float, seed: int) -> tuple[list, list]:
    """``(train, eval)``: a seeded random ``eval_split`` (fraction or count) of the examples is held out."""
    count = round(eval_split * len(examples)) if 0 < eval_split < 1 else int(eval_split)
    if count >= len(examples):
        raise ValueError(
            f"eval_split={eval_split:g} would hold out {count} of the {len(examples)} examples, "
            "leaving none to train on; lower eval_split."
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def read_splits(
    source: str,
    split: str,
    eval_split: float,
    seed: int,
    eval_source: str,
    read: Callable[[str, str], list],
    builtin_names: Collection[str] = (),
) -> tuple[list, list, str]:
    """``(train, eval, eval_source)`` records of ``source`` (several comma-separated ones concatenated), each read
    by ``read(name, split)``: the eval records are ``eval_source`` (a file or dataset, a built-in record set, or a
    split of a single ``source``), else a saved DatasetDict's 'validation' split, else ``eval_split`` of the
    training records.

    Raises:
        ValueError: ``eval_source`` names a split of several sources, or neither a source nor a split of ``source``.
    """
    sources = [s.strip() for s in source.split(",") if s.strip()]
    train = [record for name in sources for record in read(name, split)]
    single = sources[0] if len(sources) == 1 else None
    if not eval_source and single and split != "validation" and "validation" in splits_of(single, builtin_names):
        eval_source = "validation"
    if not eval_source:
        train, held_out = split_examples(train, eval_split, seed)
        return train, held_out, ""
    if os.path.exists(eval_source) or eval_source in builtin_names:
        return train, read(eval_source, "train"), eval_source
    if single and (
        eval_source in splits_of(single, builtin_names) or is_hub_split(single, eval_source, builtin_names)
    ):
        return train, read(single, eval_source), eval_source
    if not looks_like_a_path(eval_source) and "/" not in eval_source and not single:
        raise ValueError(
            f"eval_data '{eval_source}' names a split, which needs a single data source (data holds "
            f"{len(sources)}); give an eval file or dataset instead."
        )
    if single and os.path.isdir(single):
        splits = splits_of(single, builtin_names)
        raise ValueError(
            f"eval_data '{eval_source}' is neither a file or dataset nor a split of data '{single}'"
            + (f" (its splits: {', '.join(splits)})." if splits else ".")
        )
    return train, read(eval_source, "train"), eval_source
