"""Tokenising examples and labelling what is learned.

A chat is rendered by the tokenizer's chat template (with its tools) and learned on the assistant's tokens only;
without a template, the turns are joined by newlines and the last response ends with EOS. Plain text
(prompt/completion strings, text) is learned on the completion's tokens. Every other token is labelled
:data:`IGNORE`, which the loss skips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .formats import Example

IGNORE = -100  # label of tokens the loss skips (prompt, padding)


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
