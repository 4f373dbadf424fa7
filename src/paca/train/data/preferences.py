"""Preference pairs (stage=dpo): records of any preference format in TRL's form, for its DPOTrainer to tokenise."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from . import sources
from .formats import alpaca_example, checked_messages, sharegpt_example
from .splits import read_splits


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
        prompt = alpaca_example({**record, "output": ""}, where).messages[:-1]
        return {
            "prompt": prompt,
            "chosen": [_reply(chosen, where, "chosen")],
            "rejected": [_reply(rejected, where, "rejected")],
        }
    if "conversations" in record:  # LLaMA-Factory's ShareGPT-style ranking data: the turns are the prompt
        reply = {"from": "gpt", "value": ""}
        prompt = sharegpt_example({**record, "conversations": [*record["conversations"], reply]}, where).messages[:-1]
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
            prompt_messages = checked_messages([*prompt, {"role": "assistant", "content": ""}], where)[:-1]
            return {
                "prompt": prompt_messages,
                "chosen": checked_messages(chosen, f"{where} (chosen)"),
                "rejected": checked_messages(rejected, f"{where} (rejected)"),
            }
        raise ValueError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings or all lists of messages.")
    if isinstance(chosen, list) and isinstance(rejected, list):  # implicit prompt: TRL takes the common prefix
        return {
            "chosen": checked_messages(chosen, f"{where} (chosen)"),
            "rejected": checked_messages(rejected, f"{where} (rejected)"),
        }
    raise ValueError(f"{where}: expected a preference pair: {PREFERENCE_FORMATS}.")


def _reply(value, where: str, name: str) -> dict:
    """An assistant reply: a string, or a ShareGPT turn ``{"from": "gpt", "value": ...}``."""
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        value = value["value"]
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{name}' must be a string or a {{from, value}} turn, got {value!r}.")
    return {"role": "assistant", "content": value}


def load_preferences(
    source: str, split: str, eval_split: float, seed: int, eval_source: str = "", builtin_names: Collection[str] = ()
) -> PreferenceData:
    """Preference pairs from the same sources as supervised examples (files, saved or hub datasets, several
    comma-separated), held out or read from ``eval_source`` as :func:`paca.train.data.load_data` does.

    Built-in record sets hold no pairs: ``builtin_names`` only keeps them from being read as a split of ``source``.
    """

    def read(name: str, part: str) -> list[dict]:
        return sources.read_records(name, part, preference_pair)

    train, held_out, eval_source = read_splits(source, split, eval_split, seed, eval_source, read, builtin_names)
    if not train:
        raise ValueError(f"data '{source}' holds no preference pairs.")
    return PreferenceData(train, held_out, eval_source)
