"""Training data: read examples (JSONL, saved or hub datasets, the built-in demo), tokenise, label responses.

Every example becomes a chat (``messages``: role/content dicts) and then token ids whose labels are -100
except on the assistant's tokens: the loss counts response tokens only. With a chat template the tokenizer
renders the conversation; without one, the turns are joined by newlines and the last response ends with EOS.
"""

from __future__ import annotations

import difflib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Optional

from . import demo

IGNORE = -100  # label of tokens the loss skips (prompt, padding)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Example:
    """One conversation and where it came from (``file:line`` or ``dataset[i]``), for error messages."""

    messages: list[dict]
    where: str


@dataclass
class TokenizedData:
    """Token ids and labels of the training and evaluation examples, and what tokenising had to change."""

    train: list[dict]
    eval: list[dict]
    truncated: int = 0  # examples cut to max_length
    dropped: list[str] = field(default_factory=list)  # examples whose response lay wholly beyond max_length

    def report(self, max_length: int) -> str:
        line = f"data: {len(self.train):,} train / {len(self.eval):,} eval examples"
        if self.truncated:
            line += f"; {self.truncated:,} truncated to max_length={max_length}"
        if self.dropped:
            line += (f"; {len(self.dropped):,} dropped (no response token left after truncation, e.g. "
                     f"{self.dropped[0]})")
        return line


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------

def load_examples(source: str, split: str = "train") -> list[Example]:
    """Examples from a JSONL file, a ``save_to_disk`` directory, a hub dataset, or a built-in demo task.

    Raises:
        FileNotFoundError: a path that does not exist, or a name the hub cannot resolve.
        ValueError: a malformed line or record (naming file and line), or no examples at all.
    """
    if source in demo.TASKS:
        examples = [_example(record, f"{source}[{i}]") for i, record in enumerate(demo.TASKS[source]())]
    elif os.path.isfile(source):
        examples = _read_jsonl(source)
    elif os.path.isdir(source):
        examples = _read_dataset(_load_from_disk(source, split), source)
    elif _looks_like_a_path(source) or _nearest_local_file(source):
        nearest = _nearest_local_file(source)
        hint = f"; did you mean '{nearest}'?" if nearest else "."
        raise FileNotFoundError(f"data file '{source}' not found{hint}")
    else:
        examples = _read_dataset(_load_from_hub(source, split), source)
    if not examples:
        raise ValueError(f"data '{source}' holds no examples; give a JSONL file with one example per line.")
    return examples


def _nearest_local_file(source: str) -> Optional[str]:
    """A local data file ``source`` most likely meant (``train`` for ``train.jsonl``), so a typo is refused at
    once instead of after the hub's retries; None when nothing local is close."""
    folder = os.path.dirname(source) or "."
    if not os.path.isdir(folder):
        return None
    names = [n for n in os.listdir(folder) if n.endswith((".jsonl", ".json")) or os.path.isdir(os.path.join(folder, n))]
    base = os.path.basename(source)
    same_stem = [n for n in names if os.path.splitext(n)[0] == base]
    close = same_stem or difflib.get_close_matches(base, names, n=1, cutoff=0.8)
    return os.path.join(os.path.dirname(source), close[0]) if close else None


def _looks_like_a_path(source: str) -> bool:
    # A hub name is "name" or "org/name"; anything with a file extension or an explicit root is a path.
    return source.endswith((".jsonl", ".json", ".txt")) or source.startswith((".", os.sep, "~"))


def _read_jsonl(path: str) -> list[Example]:
    examples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                                 f"{err.start + 1}); save the file as UTF-8.") from None
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno}); each line must be "
                                 "one JSON object.") from None
            examples.append(_example(record, where))
    return examples


def _load_from_disk(path: str, split: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data directory '{path}' is not a dataset written by save_to_disk: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"data '{path}' has no split '{split}'; its splits: {', '.join(loaded)} "
                             "(set data_split).")
        loaded = loaded[split]
    return loaded


def _load_from_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as err:
        raise ValueError(f"data '{name}': {err}") from None
    except Exception as err:  # datasets raises many types for "cannot reach or find it"
        raise FileNotFoundError(f"data '{name}' is neither a local file or directory nor a dataset the hub can "
                                f"provide ({type(err).__name__}: {err}).") from None


def _read_dataset(dataset, source: str) -> list[Example]:
    return [_example(dict(row), f"{source}[{i}]") for i, row in enumerate(dataset)]


def _example(record, where: str) -> Example:
    """An Example from a prompt/response record or a chat record; ValueError naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                                 f"\"content\": a string}}, got {m!r}.")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's (the response to learn).")
        return Example([{"role": m["role"], "content": m["content"]} for m in messages], where)
    if "conversations" in record:  # ShareGPT: {"from": human/gpt/system, "value": ...}
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES
                                                  and isinstance(t.get("value"), str) for t in turns):
            raise ValueError(f"{where}: 'conversations' must be a list of {{\"from\": one of "
                             f"{', '.join(SHAREGPT_ROLES)}, \"value\": a string}}.")
        return _example({"messages": [{"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")}
                                      for t in turns]}, where)
    if "instruction" in record and "output" in record:  # Alpaca: instruction, optional input, output
        if not all(isinstance(record.get(k, ""), str) for k in ("instruction", "input", "output")):
            raise ValueError(f"{where}: 'instruction', 'input' and 'output' must be strings.")
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return _example({"prompt": prompt, "response": record["output"],
                         **({"system": record["system"]} if "system" in record else {})}, where)
    if "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"{where}: 'prompt' and 'response' must be strings.")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if "system" in record:
            if not isinstance(record["system"], str):
                raise ValueError(f"{where}: 'system' must be a string, got {record['system']!r}.")
            messages.insert(0, {"role": "system", "content": record["system"]})
        return Example(messages, where)
    raise ValueError(f"{where}: expected 'prompt' and 'response' strings, a 'messages' list (chat), "
                     f"'instruction'/'input'/'output' (Alpaca) or 'conversations' (ShareGPT); got keys {sorted(record)}.")


# ----------------------------------------------------------------------------------------------------
# Tokenising
# ----------------------------------------------------------------------------------------------------

def tokenize_examples(examples: list[Example], tokenizer) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per example: labels hold the assistant's token ids, -100 elsewhere."""
    if not examples:
        return []
    if not tokenizer.chat_template:
        return _tokenize_plain(examples, tokenizer)
    # Render every text first and encode them in one batch (the tokenizer's fast path). For each assistant
    # turn, the prefix up to its start (with the generation prompt) and up to its end locate its tokens.
    texts, layout = [], []
    for example in examples:
        messages = example.messages
        turns = []  # per assistant turn: (index of its prefix text, index of its end text or None: the end)
        full = len(texts)
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            texts.append(tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True))
            prefix = len(texts) - 1
            end = None
            if turn < len(messages) - 1:
                texts.append(tokenizer.apply_chat_template(messages[:turn + 1], tokenize=False))
                end = len(texts) - 1
            turns.append((prefix, end))
        layout.append((full, turns))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    results = []
    for example, (full, turns) in zip(examples, layout):
        ids = encoded[full]
        labels = [IGNORE] * len(ids)
        for prefix, end in turns:
            # A BPE merge across the prefix/response boundary may change the prefix's last token: allow one.
            start = _common_prefix_length(ids, encoded[prefix])
            stop = len(ids) if end is None else len(encoded[end])
            if start < len(encoded[prefix]) - 1 or start >= stop or stop > len(ids):
                raise ValueError(f"{example.where}: the tokenizer's chat template does not render this conversation "
                                 "as its prefixes, so the response tokens cannot be located.")
            labels[start:stop] = ids[start:stop]
        results.append((ids, labels))
    return results


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_plain(examples: list[Example], tokenizer) -> list[tuple[list[int], list[int]]]:
    # No template: context turns joined by newlines, then the last response (the only one learned) and EOS.
    contexts = ["".join(m["content"] + "\n" for m in example.messages[:-1]) for example in examples]
    responses = [example.messages[-1]["content"] for example in examples]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    results = []
    for prompt, answer in zip(tokenizer(contexts, add_special_tokens=False)["input_ids"],
                              tokenizer(responses, add_special_tokens=False)["input_ids"]):
        prompt, answer = bos + prompt, answer + eos
        results.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return results


def split_examples(examples: list[Example], eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """``(train, eval)``: a seeded random ``eval_split`` (fraction or count) of the examples is held out."""
    count = round(eval_split * len(examples)) if 0 < eval_split < 1 else int(eval_split)
    if count >= len(examples):
        raise ValueError(f"eval_split={eval_split:g} would hold out {count} of the {len(examples)} examples, "
                         "leaving none to train on; lower eval_split.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def tokenize(train: list[Example], held_out: list[Example], tokenizer, max_length: int) -> TokenizedData:
    """Tokenise both splits, truncating to ``max_length`` and dropping examples left without a response token."""
    result = TokenizedData([], [])
    for examples, out in ((train, result.train), (held_out, result.eval)):
        for example, (ids, labels) in zip(examples, tokenize_examples(examples, tokenizer)):
            if len(ids) > max_length:
                result.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE for label in labels):
                result.dropped.append(example.where)
                continue
            out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    if not result.train:
        raise ValueError(f"no training example has a response token within max_length={max_length}; raise "
                         "max_length.")
    return result


def load_data(source: str, split: str, tokenizer, max_length: int, eval_split: float, seed: int) -> TokenizedData:
    """Read, split and tokenise ``source``: what `paca train` feeds the Trainer."""
    train, held_out = split_examples(load_examples(source, split), eval_split, seed)
    return tokenize(train, held_out, tokenizer, max_length)
