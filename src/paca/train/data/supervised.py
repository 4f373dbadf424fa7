"""Supervised training data (stage=sft): records read as examples, split, tokenised with learned-token labels."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..builtin import NO_RECORDS
from . import sources
from .formats import Example, parse_example
from .splits import read_splits
from .tokenization import TokenizedData, tokenize


def load_examples(
    source: str, split: str = "train", builtin_records: Mapping[str, Callable[[], list[dict]]] = NO_RECORDS
) -> list[Example]:
    """Examples from a JSONL file, a JSON array file, a ``save_to_disk`` directory, a hub dataset, or a built-in
    record set (``builtin_records``, by name).

    Raises:
        FileNotFoundError: a path that does not exist, or a name the hub cannot resolve.
        ValueError: a malformed line or record (naming file and line), or no examples at all.
    """
    examples = sources.read_records(source, split, parse_example, builtin_records)
    if not examples:
        raise ValueError(f"data '{source}' holds no examples; give a JSONL file with one example per line.")
    return examples


def load_data(
    source: str,
    split: str,
    tokenizer,
    max_length: int,
    eval_split: float,
    seed: int,
    eval_source: str = "",
    train_on_prompt: bool = False,
    builtin_records: Mapping[str, Callable[[], list[dict]]] = NO_RECORDS,
) -> TokenizedData:
    """Read, split and tokenise ``source``: what `paca train` feeds the Trainer.

    The evaluation examples are ``eval_source`` (a file or dataset read like ``source``, or a split of ``source``),
    else ``source``'s 'validation' split when it is a saved DatasetDict with one, else ``eval_split`` of
    ``source`` held out.
    """

    def read(name: str, part: str) -> list[Example]:
        return load_examples(name, part, builtin_records)

    train, held_out, eval_source = read_splits(source, split, eval_split, seed, eval_source, read, builtin_records)
    data = tokenize(train, held_out, tokenizer, max_length, train_on_prompt)
    data.eval_source = eval_source
    return data
