"""Where records come from: JSONL or JSON array files, ``save_to_disk`` directories, hub datasets, or record sets
a run knows by name; each record handed to a parser with where it came from (``file:line``, ``file[i]``,
``dataset[i]``)."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ..builtin import NO_RECORDS

Parse = Callable[[Any, str], Any]  # parse(record, where) -> the record as the caller wants it


def read_records(
    source: str, split: str, parse: Parse, builtin_records: Mapping[str, Callable[[], list[dict]]] = NO_RECORDS
) -> list:
    """Every record of ``source`` (a built-in record set, a file, a saved dataset or a hub dataset), each read by
    ``parse(record, where)``.

    Raises:
        FileNotFoundError: a path that does not exist (naming the local file it most likely meant), or a name the
            hub cannot resolve.
        ValueError: a malformed line, file or split.
    """
    if source in builtin_records:
        return [parse(record, f"{source}[{i}]") for i, record in enumerate(builtin_records[source]())]
    if os.path.isfile(source):
        return read_json_file(source, parse)
    if os.path.isdir(source):
        rows = load_from_disk(source, split)
    elif looks_like_a_path(source) or nearest_local_file(source):
        nearest = nearest_local_file(source)
        hint = f"; did you mean '{nearest}'?" if nearest else "."
        raise FileNotFoundError(f"data file '{source}' not found{hint}")
    else:
        rows = load_from_hub(source, split)
    return [parse(dict(row), f"{source}[{i}]") for i, row in enumerate(rows)]


def splits_of(source: str, builtin_names: Collection[str] = ()) -> list[str]:
    """The split names of a saved ``DatasetDict`` directory (empty for files, single datasets and built-in
    record sets)."""
    if source in builtin_names or not os.path.isdir(source):
        return []
    import datasets

    try:
        loaded = datasets.load_from_disk(source)
    except FileNotFoundError:
        return []
    return list(loaded) if isinstance(loaded, datasets.DatasetDict) else []


def is_hub_split(source: str, name: str, builtin_names: Collection[str] = ()) -> bool:
    """Whether ``name`` reads as a split of the hub dataset ``source`` (e.g. eval_data=validation)."""
    return (
        not os.path.exists(source) and source not in builtin_names and not looks_like_a_path(name) and "/" not in name
    )


def nearest_local_file(source: str) -> str | None:
    """A local data file ``source`` most likely meant (``train`` for ``train.jsonl``), so a typo is refused at
    once instead of after the hub's retries; None when nothing local is close."""
    folder = os.path.dirname(source) or "."
    if not os.path.isdir(folder):
        return None
    names = [
        n for n in os.listdir(folder) if n.endswith((".jsonl", ".json")) or os.path.isdir(os.path.join(folder, n))
    ]
    base = os.path.basename(source)
    same_stem = [n for n in names if os.path.splitext(n)[0] == base]
    close = same_stem or difflib.get_close_matches(base, names, n=1, cutoff=0.8)
    return os.path.join(os.path.dirname(source), close[0]) if close else None


def looks_like_a_path(source: str) -> bool:
    """A hub name is "name" or "org/name"; anything with a file extension or an explicit root is a path."""
    return source.endswith((".jsonl", ".json", ".txt")) or source.startswith((".", os.sep, "~"))


def read_json_file(path: str, parse: Parse) -> list:
    """A JSON array of records (LLaMA-Factory's ``alpaca_data.json``) or JSON lines, told apart by the first
    character; each record read by ``parse(record, where)``."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if not head.startswith("["):
        return _read_jsonl(path, parse)
    try:
        with open(path, encoding="utf-8-sig") as f:
            records = json.load(f)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); save "
            "the file as UTF-8."
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: malformed JSON array ({err.msg} at column {err.colno}).") from None
    return [parse(record, f"{path}[{i}]") for i, record in enumerate(records)]


def _read_jsonl(path: str, parse: Parse) -> list:
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                    f"{err.start + 1}); save the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{where}: malformed JSON ({err.msg} at column {err.colno}); each line must be "
                    "one JSON object (or give the file as one JSON array)."
                ) from None
            records.append(parse(record, where))
    return records


def load_from_disk(path: str, split: str):
    """The ``split`` of a dataset written by ``save_to_disk`` (the dataset itself when it has no splits)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data directory '{path}' is not a dataset written by save_to_disk: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"data '{path}' has no split '{split}'; its splits: {', '.join(loaded)} (set data_split)."
            )
        loaded = loaded[split]
    return loaded


def load_from_hub(name: str, split: str):
    """The ``split`` of the hub dataset ``name``; FileNotFoundError when the hub cannot provide it."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as err:
        raise ValueError(f"data '{name}': {err}") from None
    except Exception as err:  # datasets raises many types for "cannot reach or find it"
        raise FileNotFoundError(
            f"data '{name}' is neither a local file or directory nor a dataset the hub can "
            f"provide ({type(err).__name__}: {err})."
        ) from None
