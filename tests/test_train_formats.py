"""`paca train` data in the formats users have: JSON arrays, TRL prompt/completion, tools, preference pairs.

LLaMA-Factory's alpaca_data.json, TRL's plain and conversational prompt/completion, OpenAI / ShareGPT chats with
tools rendered by the model's template (calls learned, results not), and TRL / LLaMA-Factory preference pairs read
as TRL pairs; bad records of each name file and line.
"""

import json

import pytest
from test_train_data import labelled_text, write_jsonl

from paca.train import demo
from paca.train.data import load_examples, tokenize_examples

TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>{% for t in tools %}tool {{ t['function']['name'] }}"
    "{% endfor %}{% endif %}{% for m in messages %}"
    "<|{{ 'user' if m['role'] == 'tool' else m['role'] }}|>{% if m['role'] == 'tool' %}result {% endif %}"
    "{{ m['content'] }}{% for c in m.get('tool_calls') or [] %}call {{ c['function']['name'] }}"
    "{% endfor %}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.fixture
def tool_tokenizer():
    tokenizer = demo.build_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def test_a_json_array_file_reads_like_jsonl_and_a_malformed_one_names_its_line(tmp_path):
    """LLaMA-Factory's alpaca_data.json: one JSON array of records, with history and system."""
    path = tmp_path / "alpaca_data.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "upper", "input": "abc", "output": "ABC"},
                {"instruction": "again", "output": "ok", "system": "be brief", "history": [["hi", "yo"]]},
            ],
            indent=2,
        )
    )
    first, second = load_examples(str(path))
    assert first.messages == [{"role": "user", "content": "upper\n\nabc"}, {"role": "assistant", "content": "ABC"}]
    assert [m["content"] for m in second.messages] == ["be brief", "hi", "yo", "again", "ok"]
    assert second.where == f"{path}[1]"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": \n]')
    with pytest.raises(ValueError, match=f"{path}:4: malformed JSON array"):
        load_examples(str(path))


def test_trl_prompt_completion_strings_are_plain_text_and_only_the_completion_is_learned(tmp_path, tokenizer):
    path = write_jsonl(tmp_path, [{"prompt": "upper abc:", "completion": " ABC"}, {"text": "just text"}])
    (ids, labels), (text_ids, text_labels) = tokenize_examples(load_examples(path), tokenizer)
    assert tokenizer.decode(ids) == "<s>upper abc: ABC</s>"  # no chat template
    assert labelled_text(tokenizer, ids, labels) == " ABC</s>"
    assert labelled_text(tokenizer, text_ids, text_labels) == "just text</s>"  # every token but BOS


def test_trl_conversational_prompt_completion_learns_the_completion_turns_only(tmp_path, tokenizer):
    record = {
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "bye"},
        ],
        "completion": [{"role": "assistant", "content": "ciao"}],
    }
    [(ids, labels)] = tokenize_examples(load_examples(write_jsonl(tmp_path, [record])), tokenizer)
    assert tokenizer.decode(ids) == "<s><|user|>hi<|assistant|>yo</s><|user|>bye<|assistant|>ciao</s>"
    assert labelled_text(tokenizer, ids, labels) == "ciao</s>"  # the prompt's assistant turn is context


def test_tools_tool_calls_and_tool_results_render_through_the_template_and_calls_are_learned(tmp_path, tool_tokenizer):
    """An OpenAI / TRL chat with tools, and the same conversation in LLaMA-Factory's ShareGPT form (function_call
    and observation turns, tools as a JSON string): the same tokens; the call and the answer are learned, the
    tool's result is not."""
    openai = {
        "messages": [
            {"role": "user", "content": "rain?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}],
            },
            {"role": "tool", "name": "weather", "content": "wet"},
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        ],
        "tools": WEATHER,
    }
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "rain?"},
            {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
            {"from": "observation", "value": "wet"},
            {"from": "gpt", "value": "yes"},
        ],
        "tools": json.dumps(WEATHER),
    }
    (ids, labels), (ids2, labels2) = tokenize_examples(
        load_examples(write_jsonl(tmp_path, [openai, sharegpt])), tool_tokenizer
    )
    assert tool_tokenizer.decode(ids) == (
        "<s><|system|>tool weather<|user|>rain?<|assistant|>call weather</s><|user|>result wet<|assistant|>yes</s>"
    )
    assert labelled_text(tool_tokenizer, ids, labels) == "call weather</s>yes</s>"
    assert (ids2, labels2) == (ids, labels)


@pytest.mark.parametrize(
    "record,message",
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                    {"role": "assistant", "content": "a cat"},
                ]
            },
            r"content parts of type image are not supported",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "{oops"},
            "'tools' is a string but not JSON",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "a"},
                    {"from": "function_call", "value": "weather()"},
                    {"from": "gpt", "value": "b"},
                ]
            },
            r"conversations\[1\]: a function_call turn must hold JSON",
        ),
        (
            {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
            "'prompt' and 'completion' must both be strings or both be lists",
        ),
        ({"text": ""}, "'text' must be a non-empty string"),
    ],
)
def test_bad_records_of_the_new_formats_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path, [{"prompt": "a", "response": "b"}, record])
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        load_examples(path)


# -- preference pairs (stage=dpo) ----------------------------------------------------------------------


def test_preference_pairs_of_trl_and_llama_factory_read_as_trl_pairs(tmp_path):
    from paca.train.data import load_preferences

    user = [{"role": "user", "content": "upper abc"}]
    records = [
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "ABC"}],
            "rejected": [{"role": "assistant", "content": "abc"}],
        },
        {"instruction": "upper abc", "input": "", "chosen": "ABC", "rejected": "abc"},
        {
            "conversations": [{"from": "human", "value": "upper abc"}],
            "chosen": {"from": "gpt", "value": "ABC"},
            "rejected": {"from": "gpt", "value": "abc"},
        },
        {"prompt": "upper abc:", "chosen": " ABC", "rejected": " abc"},
    ]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(records))
    data = load_preferences(str(path), "train", eval_split=0, seed=0)
    trl, alpaca, sharegpt, plain = data.train
    assert (
        trl
        == alpaca
        == sharegpt
        == {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "ABC"}],
            "rejected": [{"role": "assistant", "content": "abc"}],
        }
    )
    assert plain == records[3]
    assert data.report(64) == "data: 4 train / 0 eval preference pairs"


@pytest.mark.parametrize(
    "record,message",
    [
        ({"prompt": "a", "response": "b"}, r"expected a preference pair: 'prompt'/'chosen'/'rejected'"),
        (
            {"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]},
            "'prompt', 'chosen' and 'rejected' must all be strings or all lists of messages",
        ),
        ({"instruction": "a", "chosen": 3, "rejected": "c"}, "'chosen' must be a string or a {from, value} turn"),
    ],
)
def test_bad_preference_records_name_file_and_line(tmp_path, record, message):
    from paca.train.data import load_preferences

    path = write_jsonl(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, record])
    with pytest.raises(ValueError, match=f"{path}:2: {message}"):
        load_preferences(path, "train", 0, 0)
