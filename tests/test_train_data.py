"""`paca train` data: reading records, chat template, response-only labels, truncation, eval sets, bad input.

Alpaca and ShareGPT records read as chats; only assistant turns are labelled; long examples are truncated or
dropped; malformed lines, bad records and missing files name file and line; eval_split, a saved validation split or
eval_data give the eval set. The demo's tasks hold out their words.
"""

import json

import pytest

from paca.train import demo
from paca.train.data import IGNORE, load_data, load_examples, split_examples, tokenize, tokenize_examples


def write_jsonl(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def labelled_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])


def test_chat_template_is_applied_and_only_the_response_is_labelled(tmp_path, tokenizer):
    path = write_jsonl(tmp_path, [{"prompt": "upper abc", "response": "ABC"}])
    [(ids, labels)] = tokenize_examples(load_examples(path), tokenizer)
    assert tokenizer.decode(ids) == "<s><|user|>upper abc<|assistant|>ABC</s>"
    assert labelled_text(tokenizer, ids, labels) == "ABC</s>"  # the response and its end, nothing else
    assert labels[: ids.index(tokenizer.convert_tokens_to_ids("<|assistant|>")) + 1] == [IGNORE] * (
        ids.index(tokenizer.convert_tokens_to_ids("<|assistant|>")) + 1
    )


def test_every_assistant_turn_of_a_chat_is_labelled_and_no_other(tmp_path, tokenizer):
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ]
    }
    [(ids, labels)] = tokenize_examples(load_examples(write_jsonl(tmp_path, [chat])), tokenizer)
    assert labelled_text(tokenizer, ids, labels) == "yo</s>ciao</s>"


def test_without_a_chat_template_prompt_and_response_are_joined_and_eos_ends_the_response(tmp_path, tokenizer):
    plain = demo.build_tokenizer()
    plain.chat_template = None
    [(ids, labels)] = tokenize_examples(
        load_examples(write_jsonl(tmp_path, [{"prompt": "ab", "response": "cd"}])), plain
    )
    assert plain.decode(ids) == "<s>ab\ncd</s>"
    assert labelled_text(plain, ids, labels) == "cd</s>"


def test_long_examples_are_truncated_counted_and_dropped_when_no_response_is_left(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path,
        [
            {"prompt": "a", "response": "b"},
            {"prompt": "a", "response": "b" * 40},  # response cut: truncated, kept
            {"prompt": "a" * 40, "response": "b"},
        ],
    )  # response beyond the cut: dropped
    examples = load_examples(path)
    data = tokenize(examples, [], tokenizer, max_length=16)
    assert data.truncated == 2
    assert data.dropped == [f"{path}:3"]
    assert len(data.train) == 2 and all(len(row["input_ids"]) <= 16 for row in data.train)
    assert "2 truncated to max_length=16" in data.report(16) and f"{path}:3" in data.report(16)


def test_alpaca_and_sharegpt_records_read_as_chats(tmp_path):
    path = write_jsonl(
        tmp_path,
        [
            {"instruction": "upper", "input": "abc", "output": "ABC"},
            {"instruction": "say hi", "input": "", "output": "hi", "system": "be brief"},
            {
                "conversations": [
                    {"from": "human", "value": "a"},
                    {"from": "gpt", "value": "b"},
                    {"from": "human", "value": "c"},
                    {"from": "gpt", "value": "d"},
                ]
            },
        ],
    )
    alpaca, with_system, sharegpt = (e.messages for e in load_examples(path))
    assert alpaca == [{"role": "user", "content": "upper\n\nabc"}, {"role": "assistant", "content": "ABC"}]
    assert with_system[0] == {"role": "system", "content": "be brief"} and with_system[1]["content"] == "say hi"
    assert [m["role"] for m in sharegpt] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in sharegpt] == ["a", "b", "c", "d"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "a", "response": "b"}, '{"prompt": "a", "response": '])
    with pytest.raises(ValueError, match=f"{path}:2: malformed JSON"):
        load_examples(path)


@pytest.mark.parametrize(
    "record,message",
    [
        (
            {"question": "a", "answer": "b"},
            r"expected 'messages' \(chat\), 'conversations' \(ShareGPT\), .*"
            r"'prompt'/'completion' \(TRL\) or 'text'; got keys \['answer', 'question'\]",
        ),
        ({"instruction": "a", "output": 3}, "'instruction', 'input' and 'output' must be strings"),
        ({"conversations": [{"from": "bot", "value": "a"}]}, "'conversations' must be a list"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}, "'conversations' must be a list"),
        ({"prompt": "a", "response": "b", "system": 5}, "'system' must be a string, got 5"),
        ({"prompt": "a", "response": 3}, "'prompt' and 'response' must be strings"),
        ({"messages": [{"role": "user", "content": "a"}]}, "the last message must be the assistant's"),
        ({"messages": [{"role": "bot", "content": "a"}]}, r"messages\[0\] must be"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path, [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}, record])
    with pytest.raises(ValueError, match=f"{path}:3: {message}"):
        load_examples(path)


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not UTF-8 text \\(byte 0xe9 at column 16\\)"):
        load_examples(str(path))


def test_empty_dataset_and_missing_file_are_reported(tmp_path):
    empty = write_jsonl(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match="holds no examples"):
        load_examples(empty)
    with pytest.raises(FileNotFoundError, match="data file 'missing.jsonl' not found"):
        load_examples("missing.jsonl")


def test_a_local_file_named_without_its_extension_is_refused_at_once_with_its_name(tmp_path, monkeypatch):
    """data=train while train.jsonl is there: refused naming train.jsonl, without asking the hub (which retries for
    a long while offline)."""
    write_jsonl(tmp_path, ['{"prompt": "a", "response": "b"}'], name="train.jsonl")
    monkeypatch.chdir(tmp_path)
    import paca.train.data.sources as sources

    monkeypatch.setattr(sources, "load_from_hub", lambda *a: pytest.fail("the hub was asked"))
    with pytest.raises(FileNotFoundError, match=r"data file 'train' not found; did you mean 'train\.jsonl'\?"):
        load_examples("train")
    with pytest.raises(FileNotFoundError, match=r"data file 'trian\.jsonl' not found; did you mean 'train\.jsonl'"):
        load_examples("trian.jsonl")


def test_eval_split_holds_out_a_seeded_fraction_or_count(tmp_path):
    examples = load_examples(write_jsonl(tmp_path, [{"prompt": str(i), "response": "x"} for i in range(20)]))
    train, held = split_examples(examples, 0.25, seed=3)
    assert (len(train), len(held)) == (15, 5)
    assert split_examples(examples, 0.25, seed=3)[1] == held  # reproducible
    assert len(split_examples(examples, 4, seed=3)[1]) == 4
    with pytest.raises(ValueError, match="leaving none to train on"):
        split_examples(examples, 20, seed=0)


def test_a_dataset_saved_to_disk_reads_like_jsonl(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list([{"prompt": "upper ab", "response": "AB"}] * 3).save_to_disk(str(tmp_path / "ds"))
    data = load_data(str(tmp_path / "ds"), "train", tokenizer, max_length=32, eval_split=1, seed=0)
    assert (len(data.train), len(data.eval)) == (2, 1)


def test_a_saved_validation_split_or_eval_data_is_the_eval_set_instead_of_a_held_out_part(tmp_path, tokenizer):
    import datasets

    rows = lambda n, word: {"prompt": [f"{word} {i}" for i in range(n)], "response": [word] * n}  # noqa: E731
    path = str(tmp_path / "dd")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows(6, "train")),
            "validation": datasets.Dataset.from_dict(rows(2, "valid")),
            "test": datasets.Dataset.from_dict(rows(3, "test")),
        }
    ).save_to_disk(path)
    data = load_data(path, "train", tokenizer, 64, eval_split=0.5, seed=0)
    assert (len(data.train), len(data.eval)) == (6, 2)  # all of train, the validation split: nothing held out
    assert "(eval: validation)" in data.report(64)
    assert len(load_data(path, "train", tokenizer, 64, 0.5, 0, eval_source="test").eval) == 3
    other = write_jsonl(tmp_path, [{"prompt": "a", "response": "b"}], name="eval.jsonl")
    assert len(load_data(path, "train", tokenizer, 64, 0.5, 0, eval_source=other).eval) == 1
    with pytest.raises(
        ValueError,
        match=r"eval_data 'dev' is neither a file or dataset nor a split of data .*"
        r"\(its splits: train, validation, test\)",
    ):
        load_data(path, "train", tokenizer, 64, 0.5, 0, eval_source="dev")


def test_demo_tasks_hold_out_words_never_seen_in_either_stage():
    new_task = demo.new_task_records()
    words = [r["prompt"].split()[-1] for r in new_task]
    assert len(set(words)) == len(words) == demo.NEW_TASK_EXAMPLES
    pretrain_words = {r["prompt"].split()[-1] for r in demo.pretrain_records()}
    assert not pretrain_words & set(words)
    assert new_task[0]["response"] == demo.answer(tuple(new_task[0]["prompt"].split()[:2]), words[0])
    assert {tuple(r["prompt"].split()[:2]) for r in new_task} == set(demo.NEW_TASK)
    assert demo.answer(("next", "upper"), "azz") == "BAA" and demo.answer(("prev",), "abc") == "zab"


def test_reading_refuses_null_fields_and_failing_templates_and_finds_eval_splits(tmp_path, tokenizer):
    """Null Alpaca fields, a template that fails on a record, bare LLaMA-Factory tool schemas, a split named beside
    several sources, and the preference reader's eval split (a saved DatasetDict's validation, a named split)."""
    import datasets

    from paca.train.data import load_preferences

    for record, message in (
        ({"instruction": None, "output": "x"}, "'instruction', 'input' and 'output' must be strings"),
        ({"instruction": "q", "output": None}, "'instruction', 'input' and 'output' must be"),
    ):
        with pytest.raises(ValueError, match=f":1: {message}"):
            load_examples(write_jsonl(tmp_path, [record]))
    strict = demo.build_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
        "turns') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    path = write_jsonl(tmp_path, [{"prompt": "a", "response": "b", "system": "s"}])
    with pytest.raises(
        ValueError,
        match=f"{path}:1: the tokenizer's chat template cannot render this "
        r"conversation \(TemplateError: no system turns\)",
    ):
        tokenize_examples(load_examples(path), strict)
    bare = {
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "tools": json.dumps([{"name": "weather", "parameters": {}}]),
    }
    [example] = load_examples(write_jsonl(tmp_path, [bare]))
    assert example.tools == [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    a, b = (write_jsonl(tmp_path, [{"prompt": "a", "response": "b"}] * 3, name=n) for n in ("a.jsonl", "b.jsonl"))
    with pytest.raises(ValueError, match="eval_data 'validation' names a split, which needs a single data source"):
        load_data(f"{a},{b}", "train", tokenizer, 64, 0, 0, eval_source="validation")

    pairs = lambda n: datasets.Dataset.from_dict({"prompt": ["p"] * n, "chosen": ["c"] * n, "rejected": ["r"] * n})  # noqa: E731
    saved = str(tmp_path / "prefs")
    datasets.DatasetDict({"train": pairs(5), "validation": pairs(2), "test": pairs(3)}).save_to_disk(saved)
    assert [
        len(load_preferences(saved, "train", 0.5, 0).train),
        len(load_preferences(saved, "train", 0.5, 0).eval),
    ] == [5, 2]
    assert len(load_preferences(saved, "train", 0.5, 0, eval_source="test").eval) == 3
