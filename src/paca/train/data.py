"""Training data: read examples (JSONL or JSON arrays, saved or hub datasets, the built-in demo), tokenise, label
what is learned.

Records in any of the formats users have (each names what it is by its keys):

    messages [+ tools]          OpenAI / TRL chat: system, user, assistant (content and/or tool_calls), tool turns
    conversations [+ tools]     ShareGPT (LLaMA-Factory): human, gpt, system, function_call, observation turns
    instruction, input, output  Alpaca (optional system and history)
    prompt, response            one exchange
    prompt, completion          TRL: strings (plain text, no chat template) or lists of messages (a chat)
    text                        TRL language modelling: plain text, every token learned

A chat is rendered by the tokenizer's chat template (with its tools) and learned on the assistant's tokens only;
without a template, the turns are joined by newlines and the last response ends with EOS. Plain text
(prompt/completion strings, text) is learned on the completion's tokens.
"""

from __future__ import annotations

import difflib
import json
import os
import random
from dataclasses import dataclass, field

from . import demo

IGNORE = -100  # label of tokens the loss skips (prompt, padding)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
FORMATS = (
    "'messages' (chat), 'conversations' (ShareGPT), 'instruction'/'output' (Alpaca), 'prompt'/'response', "
    "'prompt'/'completion' (TRL) or 'text'"
)


@dataclass
class Example:
    """One conversation (or plain text) and where it came from (``file:line``, ``file[i]``, ``dataset[i]``)."""

    messages: list[dict]
    where: str
    tools: list | None = None  # function schemas the chat template renders
    plain: tuple[str, str] | None = None  # (prompt, completion) text, no chat template: completion learned
    learned_from: int = 0  # assistant turns before this message are context (TRL's prompt), not learned


@dataclass
class TokenizedData:
    """Token ids and labels of the training and evaluation examples, and what tokenising had to change."""

    train: list[dict]
    eval: list[dict]
    truncated: int = 0  # examples cut to max_length
    dropped: list[str] = field(default_factory=list)  # examples whose response lay wholly beyond max_length
    eval_source: str = ""  # where the eval examples came from ("": held out of the training data)

    def report(self, max_length: int) -> str:
        line = f"data: {len(self.train):,} train / {len(self.eval):,} eval examples"
        if self.eval_source and self.eval:
            line += f" (eval: {self.eval_source})"
        if self.truncated:
            line += f"; {self.truncated:,} truncated to max_length={max_length}"
        if self.dropped:
            line += (
                f"; {len(self.dropped):,} dropped (no response token left after truncation, e.g. {self.dropped[0]})"
            )
        return line


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def load_examples(source: str, split: str = "train") -> list[Example]:
    """Examples from a JSONL file, a JSON array file, a ``save_to_disk`` directory, a hub dataset, or a built-in
    demo task.

    Raises:
        FileNotFoundError: a path that does not exist, or a name the hub cannot resolve.
        ValueError: a malformed line or record (naming file and line), or no examples at all.
    """
    if source in demo.TASKS:
        examples = [_example(record, f"{source}[{i}]") for i, record in enumerate(demo.TASKS[source]())]
    elif os.path.isfile(source):
        examples = _read_json_file(source)
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


def splits_of(source: str) -> list[str]:
    """The split names of a saved ``DatasetDict`` directory (empty for files, single datasets and the demo)."""
    if source in demo.TASKS or not os.path.isdir(source):
        return []
    import datasets

    try:
        loaded = datasets.load_from_disk(source)
    except FileNotFoundError:
        return []
    return list(loaded) if isinstance(loaded, datasets.DatasetDict) else []


def _nearest_local_file(source: str) -> str | None:
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


def _looks_like_a_path(source: str) -> bool:
    # A hub name is "name" or "org/name"; anything with a file extension or an explicit root is a path.
    return source.endswith((".jsonl", ".json", ".txt")) or source.startswith((".", os.sep, "~"))


def _read_json_file(path: str, parse=None) -> list:
    """A JSON array of records (LLaMA-Factory's ``alpaca_data.json``) or JSON lines, told apart by the first
    character; each record read by ``parse(record, where)`` (default: as an :class:`Example`)."""
    parse = parse or _example
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


def _read_jsonl(path: str, parse) -> list:
    examples = []
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
            examples.append(parse(record, where))
    return examples


def _load_from_disk(path: str, split: str):
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


def _load_from_hub(name: str, split: str):
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


def _read_dataset(dataset, source: str) -> list[Example]:
    return [_example(dict(row), f"{source}[{i}]") for i, row in enumerate(dataset)]


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------


def _example(record, where: str) -> Example:
    """An Example from a record of any format in the module docstring; ValueError naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        return Example(_messages(record["messages"], where), where, _tools(record.get("tools"), where))
    if "conversations" in record:
        return _sharegpt(record, where)
    if "instruction" in record and "output" in record:
        return _alpaca(record, where)
    if "prompt" in record and "completion" in record:
        return _prompt_completion(record, where)
    if "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"{where}: 'prompt' and 'response' must be strings.")
        return Example(
            _with_system(
                record, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], where
            ),
            where,
        )
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string.")
        return Example([], where, plain=("", record["text"]))
    raise ValueError(f"{where}: expected {FORMATS}; got keys {sorted(record)}.")


def _with_system(record: dict, messages: list[dict], where: str) -> list[dict]:
    system = record.get("system")
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise ValueError(f"{where}: 'system' must be a string, got {system!r}.")
    return [{"role": "system", "content": system}, *messages]


def _content(value, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts (text parts only)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {p.get("type") for p in value}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise ValueError(
            f"{where}: content parts of type {', '.join(sorted(map(str, kinds - {'text'})))} are not "
            "supported (text-only training); give text parts."
        )
    raise ValueError(f"{where}: content must be a string or a list of text parts, got {value!r}.")


def _messages(messages, where: str) -> list[dict]:
    """Checked chat turns: role, content (text), and an assistant's tool_calls or a tool's name / tool_call_id kept
    for the chat template."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    checked = []
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not (isinstance(m, dict) and m.get("role") in ROLES):
            raise ValueError(f'{at} must be {{"role": one of {", ".join(ROLES)}, "content": a string}}, got {m!r}.')
        calls = m.get("tool_calls")
        if m.get("content") is None and not calls:
            raise ValueError(f"{at} has no content (and no tool_calls).")
        message = {"role": m["role"], "content": "" if m.get("content") is None else _content(m["content"], at)}
        if calls:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise ValueError(f"{at}: tool_calls must be a list, on an assistant message.")
            message["tool_calls"] = calls
        for extra in ("name", "tool_call_id"):
            if m["role"] == "tool" and extra in m:
                message[extra] = m[extra]
        checked.append(message)
    if checked[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the response to learn).")
    return checked


def _tools(tools, where: str) -> list | None:
    """Function schemas: a list, or a JSON string of one (LLaMA-Factory's ShareGPT 'tools')."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: 'tools' is a string but not JSON ({err.msg}).") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"{where}: 'tools' must be a list of function schemas (objects).")
    # LLaMA-Factory lists bare schemas ({name, description, parameters}); chat templates read OpenAI's form.
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def _tool_call(value: str, where: str) -> list[dict]:
    """A ShareGPT function_call turn (JSON: one call or a list, each with name and arguments) as tool_calls."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: a function_call turn must hold JSON {{name, arguments}} ({err.msg}).") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise ValueError(f"{where}: a function_call turn must hold JSON {{name, arguments}}.")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]


def _sharegpt(record: dict, where: str) -> Example:
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES and isinstance(t.get("value"), str) for t in turns
    ):
        raise ValueError(
            f"{where}: 'conversations' must be a list of {{\"from\": one of "
            f'{", ".join(SHAREGPT_ROLES)}, "value": a string}}.'
        )
    messages = []
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES[turn["from"]]
        if turn["from"] == "function_call":
            messages.append(
                {"role": role, "content": "", "tool_calls": _tool_call(turn["value"], f"{where}: conversations[{i}]")}
            )
        else:
            messages.append({"role": role, "content": turn["value"]})
    return Example(_messages(_with_system(record, messages, where), where), where, _tools(record.get("tools"), where))


def _alpaca(record: dict, where: str) -> Example:
    """Alpaca: instruction, optional input, output, optional system and history ([[instruction, output], ...])."""
    if not (
        isinstance(record.get("instruction"), str)
        and isinstance(record.get("output"), str)
        and isinstance(record.get("input") or "", str)
    ):
        raise ValueError(f"{where}: 'instruction', 'input' and 'output' must be strings.")
    history = record.get("history") or []
    if not (
        isinstance(history, list)
        and all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history)
    ):
        raise ValueError(f"{where}: 'history' must be a list of [instruction, output] string pairs.")
    messages = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    return Example(_with_system(record, messages, where), where)


def _prompt_completion(record: dict, where: str) -> Example:
    """TRL's prompt/completion: two strings (plain text), or two lists of messages (a chat: prompt turns, then the
    completion's assistant turns)."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return Example([], where, plain=(prompt, completion))
    if isinstance(prompt, list) and isinstance(completion, list) and completion:
        if not all(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
            raise ValueError(f"{where}: the 'completion' messages must be the assistant's.")
        return Example(
            _messages(prompt + completion, where), where, _tools(record.get("tools"), where), learned_from=len(prompt)
        )
    raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both be lists of messages.")


# ----------------------------------------------------------------------------------------------------
# Tokenising
# ----------------------------------------------------------------------------------------------------


def tokenize_examples(examples: list[Example], tokenizer) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per example: labels hold the learned token ids (the assistant's, or a plain
    completion's), -100 elsewhere."""
    results: list = [None] * len(examples)
    plain = [i for i, e in enumerate(examples) if e.plain is not None]
    chats = [i for i, e in enumerate(examples) if e.plain is None]
    for i, pair in zip(plain, _tokenize_plain_text([examples[i] for i in plain], tokenizer)):
        results[i] = pair
    if chats:
        chat_examples = [examples[i] for i in chats]
        pairs = (
            _tokenize_chats(chat_examples, tokenizer)
            if tokenizer.chat_template
            else _tokenize_untemplated(chat_examples, tokenizer)
        )
        for i, pair in zip(chats, pairs):
            results[i] = pair
    return results


def _tokenize_chats(examples: list[Example], tokenizer) -> list[tuple[list[int], list[int]]]:
    # Render every text first and encode them in one batch (the tokenizer's fast path). For each learned
    # assistant turn, the prefix up to its start (with the generation prompt) and up to its end locate its tokens.
    texts, layout = [], []

    for example in examples:

        def render(messages, example=example, **kwargs):
            try:
                return tokenizer.apply_chat_template(messages, tools=example.tools, tokenize=False, **kwargs)
            except Exception as err:  # jinja2's TemplateError and whatever the template's own code raises
                raise ValueError(
                    f"{example.where}: the tokenizer's chat template cannot render this conversation "
                    f"({type(err).__name__}: {err})."
                ) from None

        messages = example.messages
        turns = []  # per learned assistant turn: (index of its prefix text, index of its end text or None: the end)
        full = len(texts)
        texts.append(render(messages))
        for turn, message in enumerate(messages):
            if message["role"] != "assistant" or turn < example.learned_from:
                continue
            texts.append(render(messages[:turn], add_generation_prompt=True))
            prefix = len(texts) - 1
            end = None
            if turn < len(messages) - 1:
                texts.append(render(messages[: turn + 1]))
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
                raise ValueError(
                    f"{example.where}: the tokenizer's chat template does not render this conversation "
                    "as its prefixes, so the response tokens cannot be located."
                )
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


def _special(tokenizer) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def _turn_text(message: dict) -> str:
    calls = message.get("tool_calls")
    return message["content"] + (json.dumps([c.get("function", c) for c in calls]) if calls else "")


def _tokenize_untemplated(examples: list[Example], tokenizer) -> list[tuple[list[int], list[int]]]:
    # No template: context turns joined by newlines, then the last response (the only one learned) and EOS.
    contexts = ["".join(_turn_text(m) + "\n" for m in example.messages[:-1]) for example in examples]
    responses = [_turn_text(example.messages[-1]) for example in examples]
    return _join(contexts, responses, tokenizer)


def _tokenize_plain_text(examples: list[Example], tokenizer) -> list[tuple[list[int], list[int]]]:
    # TRL's plain prompt/completion and text: the strings as they are (no chat template), the completion learned.
    return _join([e.plain[0] for e in examples], [e.plain[1] for e in examples], tokenizer)


def _join(prompts: list[str], completions: list[str], tokenizer) -> list[tuple[list[int], list[int]]]:
    if not prompts:
        return []
    bos, eos = _special(tokenizer)
    results = []
    for prompt, answer in zip(
        tokenizer(prompts, add_special_tokens=False)["input_ids"],
        tokenizer(completions, add_special_tokens=False)["input_ids"],
    ):
        prompt, answer = bos + prompt, answer + eos
        results.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return results


def split_examples(examples: list[Example], eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
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


def tokenize(
    train: list[Example], held_out: list[Example], tokenizer, max_length: int, train_on_prompt: bool = False
) -> TokenizedData:
    """Tokenise both splits, truncating to ``max_length`` and dropping examples left without a response token;
    with ``train_on_prompt`` every token of the training split is learned (evaluation still scores the responses:
    what the run is for)."""
    result = TokenizedData([], [])
    for examples, out in ((train, result.train), (held_out, result.eval)):
        for example, (ids, labels) in zip(examples, tokenize_examples(examples, tokenizer)):
            if train_on_prompt and out is result.train:
                labels = list(ids)
            if len(ids) > max_length:
                result.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE for label in labels):
                result.dropped.append(example.where)
                continue
            out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    if not result.train:
        raise ValueError(f"no training example has a response token within max_length={max_length}; raise max_length.")
    return result


def load_data(
    source: str,
    split: str,
    tokenizer,
    max_length: int,
    eval_split: float,
    seed: int,
    eval_source: str = "",
    train_on_prompt: bool = False,
) -> TokenizedData:
    """Read, split and tokenise ``source``: what `paca train` feeds the Trainer.

    The evaluation examples are ``eval_source`` (a file or dataset read like ``source``, or a split of ``source``),
    else ``source``'s 'validation' split when it is a saved DatasetDict with one, else ``eval_split`` of
    ``source`` held out.
    """
    train, held_out, eval_source = read_splits(source, split, eval_split, seed, eval_source, load_examples)
    data = tokenize(train, held_out, tokenizer, max_length, train_on_prompt)
    data.eval_source = eval_source
    return data


def read_splits(source: str, split: str, eval_split: float, seed: int, eval_source: str, read) -> tuple:
    """``(train, eval, eval_source)`` records of ``source`` (several comma-separated ones concatenated), each read
    by ``read(name, split)``: the eval records are ``eval_source`` (a file or dataset, or a split of a single
    ``source``), else a saved DatasetDict's 'validation' split, else ``eval_split`` of the training records."""
    sources = [s.strip() for s in source.split(",") if s.strip()]
    train = [record for name in sources for record in read(name, split)]
    single = sources[0] if len(sources) == 1 else None
    if not eval_source and single and split != "validation" and "validation" in splits_of(single):
        eval_source = "validation"
    if not eval_source:
        train, held_out = split_examples(train, eval_split, seed)
        return train, held_out, ""
    if os.path.exists(eval_source) or eval_source in demo.TASKS:
        return train, read(eval_source, "train"), eval_source
    if single and (eval_source in splits_of(single) or _hub_split(single, eval_source)):
        return train, read(single, eval_source), eval_source
    if not _looks_like_a_path(eval_source) and "/" not in eval_source and not single:
        raise ValueError(
            f"eval_data '{eval_source}' names a split, which needs a single data source (data holds "
            f"{len(sources)}); give an eval file or dataset instead."
        )
    if single and os.path.isdir(single):
        splits = splits_of(single)
        raise ValueError(
            f"eval_data '{eval_source}' is neither a file or dataset nor a split of data '{single}'"
            + (f" (its splits: {', '.join(splits)})." if splits else ".")
        )
    return train, read(eval_source, "train"), eval_source


def _hub_split(source: str, name: str) -> bool:
    """Whether ``name`` reads as a split of the hub dataset ``source`` (e.g. eval_data=validation)."""
    return not os.path.exists(source) and source not in demo.TASKS and not _looks_like_a_path(name) and "/" not in name


def render_with_labels(ids: list[int], labels: list[int], tokenizer) -> str:
    """The example as the model sees it, learned spans in ``[[...]]``: what `paca train dry_run=true` prints."""
    parts, learned, span = [], False, []
    for token, label in zip(ids, labels):
        if (label != IGNORE) != learned:
            parts.append(tokenizer.decode(span) if not learned else f"[[{tokenizer.decode(span)}]]")
            span, learned = [], label != IGNORE
        span.append(token)
    parts.append(f"[[{tokenizer.decode(span)}]]" if learned else tokenizer.decode(span))
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------
# Preference pairs (stage=dpo)
# ----------------------------------------------------------------------------------------------------


@dataclass
class PreferenceData:
    """Preference pairs in TRL's form (``prompt``, ``chosen``, ``rejected``), for its DPOTrainer to tokenise."""

    train: list[dict]
    eval: list[dict]
    eval_source: str = ""
    truncated: int = 0  # TRL truncates the pairs to max_length itself
    dropped: list[str] = field(default_factory=list)

    def report(self, max_length: int) -> str:
        line = f"data: {len(self.train):,} train / {len(self.eval):,} eval preference pairs"
        return line + (f" (eval: {self.eval_source})" if self.eval_source and self.eval else "")


PREFERENCE_FORMATS = (
    "'prompt'/'chosen'/'rejected' (TRL: strings or lists of messages), 'chosen'/'rejected' "
    "conversations (TRL's implicit prompt), 'instruction'/'chosen'/'rejected' (LLaMA-Factory "
    "Alpaca) or 'conversations'/'chosen'/'rejected' (LLaMA-Factory ShareGPT)"
)


def preference_pair(record, where: str) -> dict:
    """A record of any preference format as TRL's ``{prompt, chosen, rejected}`` (conversational where the record
    is); ValueError naming ``where`` otherwise."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: expected a preference pair: {PREFERENCE_FORMATS}; got {got}.")
    chosen, rejected = record["chosen"], record["rejected"]
    if "instruction" in record:  # LLaMA-Factory's Alpaca-style ranking data
        prompt = _alpaca({**record, "output": ""}, where).messages[:-1]
        return {
            "prompt": prompt,
            "chosen": [_reply(chosen, where, "chosen")],
            "rejected": [_reply(rejected, where, "rejected")],
        }
    if "conversations" in record:  # LLaMA-Factory's ShareGPT-style ranking data: the turns are the prompt
        reply = {"from": "gpt", "value": ""}
        prompt = _sharegpt({**record, "conversations": [*record["conversations"], reply]}, where).messages[:-1]
        return {
            "prompt": prompt,
            "chosen": [_reply(chosen, where, "chosen")],
            "rejected": [_reply(rejected, where, "rejected")],
        }
    if "prompt" in record:
        prompt = record["prompt"]
        if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}  # plain text, no chat template
        if all(isinstance(x, list) for x in (prompt, chosen, rejected)):
            prompt_messages = _messages([*prompt, {"role": "assistant", "content": ""}], where)[:-1]
            return {
                "prompt": prompt_messages,
                "chosen": _messages(chosen, f"{where} (chosen)"),
                "rejected": _messages(rejected, f"{where} (rejected)"),
            }
        raise ValueError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings or all lists of messages.")
    if isinstance(chosen, list) and isinstance(rejected, list):  # implicit prompt: TRL takes the common prefix
        return {
            "chosen": _messages(chosen, f"{where} (chosen)"),
            "rejected": _messages(rejected, f"{where} (rejected)"),
        }
    raise ValueError(f"{where}: expected a preference pair: {PREFERENCE_FORMATS}.")


def _reply(value, where: str, name: str) -> dict:
    """An assistant reply: a string, or a ShareGPT turn ``{"from": "gpt", "value": ...}``."""
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        value = value["value"]
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{name}' must be a string or a {{from, value}} turn, got {value!r}.")
    return {"role": "assistant", "content": value}


def load_preferences(source: str, split: str, eval_split: float, seed: int, eval_source: str = "") -> PreferenceData:
    """Preference pairs from the same sources as :func:`load_examples` (files, saved or hub datasets, several
    comma-separated), held out or read from ``eval_source`` as :func:`load_data` does."""

    def read(name: str, part: str) -> list[dict]:
        if os.path.isfile(name):
            return _read_json_file(name, preference_pair)
        if os.path.isdir(name):
            rows = _load_from_disk(name, part)
        elif _looks_like_a_path(name) or _nearest_local_file(name):
            nearest = _nearest_local_file(name)
            raise FileNotFoundError(
                f"data file '{name}' not found" + (f"; did you mean '{nearest}'?" if nearest else ".")
            )
        else:
            rows = _load_from_hub(name, part)
        return [preference_pair(dict(row), f"{name}[{i}]") for i, row in enumerate(rows)]

    train, held_out, eval_source = read_splits(source, split, eval_split, seed, eval_source, read)
    if not train:
        raise ValueError(f"data '{source}' holds no preference pairs.")
    return PreferenceData(train, held_out, eval_source)
