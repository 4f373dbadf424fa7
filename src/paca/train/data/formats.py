"""Record formats of supervised data, each named by its keys, read as one :class:`Example`:

messages [+ tools]          OpenAI / TRL chat: system, user, assistant (content and/or tool_calls), tool turns
conversations [+ tools]     ShareGPT (LLaMA-Factory): human, gpt, system, function_call, observation turns
instruction, input, output  Alpaca (optional system and history)
prompt, response            one exchange
prompt, completion          TRL: strings (plain text, no chat template) or lists of messages (a chat)
text                        TRL language modelling: plain text, every token learned
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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


def parse_example(record, where: str) -> Example:
    """An Example from a record of any format in the module docstring; ValueError naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        return Example(checked_messages(record["messages"], where), where, _tools(record.get("tools"), where))
    if "conversations" in record:
        return sharegpt_example(record, where)
    if "instruction" in record and "output" in record:
        return alpaca_example(record, where)
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


def checked_messages(messages, where: str) -> list[dict]:
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


def sharegpt_example(record: dict, where: str) -> Example:
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
    return Example(
        checked_messages(_with_system(record, messages, where), where), where, _tools(record.get("tools"), where)
    )


def alpaca_example(record: dict, where: str) -> Example:
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
            checked_messages(prompt + completion, where),
            where,
            _tools(record.get("tools"), where),
            learned_from=len(prompt),
        )
    raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both be lists of messages.")
