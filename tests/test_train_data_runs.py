"""`paca train` on the data users have: each format trains, dry runs print the first example, stage=dpo.

LLaMA-Factory's alpaca JSON, TRL's prompt/completion and ShareGPT with tools each train from one command; a dry
run prints the first example with its learned tokens (or the first preference pair) and writes nothing; stage=dpo
trains preference pairs through TRL with paca's checkpoints, progress lines and summary.
"""

import json

import pytest
from test_train_formats import TOOL_TEMPLATE, WEATHER
from train_run_helpers import PROGRESS_LINE

from paca.train import demo
from paca.train.checkpoints import newest_checkpoint
from paca.train.cli import main
from paca.train.config import load_config


def write_alpaca_trl_and_sharegpt_files(tmp_path):
    """LLaMA-Factory's alpaca_data.json, TRL's prompt/completion JSONL and a ShareGPT JSONL with tools."""
    alpaca = tmp_path / "alpaca_data.json"
    alpaca.write_text(
        json.dumps(
            [{"instruction": f"upper {w}", "input": "", "output": w.upper()} for w in ("abc", "dog", "sun", "cat")],
            indent=2,
        )
    )
    trl = tmp_path / "prompt_completion.jsonl"
    trl.write_text(
        "".join(
            json.dumps({"prompt": f"upper {w}:", "completion": f" {w.upper()}"}) + "\n"
            for w in ("abc", "dog", "sun", "cat")
        )
    )
    sharegpt = tmp_path / "sharegpt_tools.jsonl"
    call = json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})
    sharegpt.write_text(
        "".join(
            json.dumps(
                {
                    "conversations": [
                        {"from": "human", "value": f"rain in {c}?"},
                        {"from": "function_call", "value": call},
                        {"from": "observation", "value": "wet"},
                        {"from": "gpt", "value": "yes"},
                    ],
                    "tools": json.dumps(WEATHER),
                }
            )
            + "\n"
            for c in ("Oslo", "Rome")
        )
    )
    return alpaca, trl, sharegpt


def test_an_alpaca_json_a_trl_prompt_completion_file_and_a_sharegpt_file_with_tools_each_train(tmp_path, capsys):
    """The files users have, each from one command: LLaMA-Factory's alpaca_data.json (a JSON array), TRL's
    prompt/completion JSONL and a ShareGPT JSONL with tools, function calls and observations (rendered by the
    model's own chat template, which knows tools)."""
    base = tmp_path / "base"
    demo.random_model(0).save_pretrained(base)
    tokenizer = demo.build_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(base)
    alpaca, trl, sharegpt = write_alpaca_trl_and_sharegpt_files(tmp_path)
    for data in (alpaca, trl, sharegpt):
        out = tmp_path / data.stem
        assert (
            main(
                [
                    f"model={base}",
                    f"data={data}",
                    f"output_dir={out}",
                    "max_steps=2",
                    "batch_size=2",
                    "eval_split=0",
                    "logging_steps=1",
                ]
            )
            == 0
        ), capsys.readouterr().err
        assert (out / "adapter_model.safetensors").is_file()
        assert "data: " in capsys.readouterr().out


def test_a_dry_run_prints_the_first_example_with_its_learned_tokens_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"prompt": "upper abc", "response": "ABC"}) + "\n")
    more = tmp_path / "b.json"
    more.write_text(json.dumps([{"instruction": "upper dog", "output": "DOG"}]))
    out = tmp_path / "never"
    assert (
        main([f"data={data},{more}", "model=paca-demo-random", f"output_dir={out}", "eval_split=0", "dry_run=true"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "data: 2 train / 0 eval examples" in printed  # two files, concatenated
    assert "<s><|user|>upper abc<|assistant|>[[ABC</s>]]" in printed
    assert not out.exists()


def test_stage_dpo_trains_preference_pairs_through_trl_with_paca_s_checkpoints_and_report(tmp_path, capsys):
    """stage=dpo: TRL's DPOTrainer on the PaCA model, with paca's atomic checkpoints, progress lines, metrics and
    summary; the loss starts at log 2 (the policy equals its reference) and falls, the reward accuracy rises."""
    base = tmp_path / "base"
    demo.random_model(0).save_pretrained(base)
    demo.build_tokenizer().save_pretrained(base)
    prefs = tmp_path / "prefs.jsonl"
    words = ["abc", "dog", "sun", "cat", "map", "pen", "cup", "hat"] * 3
    prefs.write_text(
        "".join(
            json.dumps({"instruction": f"upper {w}", "input": "", "chosen": w.upper(), "rejected": w}) + "\n"
            for w in words
        )
    )
    out = tmp_path / "dpo"
    assert (
        main(
            [
                f"model={base}",
                f"data={prefs}",
                "stage=dpo",
                f"output_dir={out}",
                "max_steps=4",
                "batch_size=4",
                "eval_split=4",
                "logging_steps=1",
                "lr=0.005",
                "save_steps=2",
            ]
        )
        == 0
    ), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "data: 20 train / 4 eval preference pairs" in printed
    assert all(PROGRESS_LINE.match(line) or "tok/s" not in line for line in printed.splitlines())
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["eval_before"]["eval_loss"] - 0.6931) < 1e-3
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert summary["eval_after"]["eval_rewards/accuracies"] > summary["eval_before"]["eval_rewards/accuracies"]
    assert (out / "adapter_model.safetensors").is_file() and newest_checkpoint(out).endswith("checkpoint-4")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PACA"
    with pytest.raises(ValueError, match="stage=dpo needs preference pairs"):
        load_config(["stage=dpo"])


def test_a_dry_run_of_stage_dpo_prints_the_first_pair(tmp_path, capsys):
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "upper abc:", "chosen": " ABC", "rejected": " abc"}) + "\n")
    assert main([f"data={prefs}", "stage=dpo", "model=paca-demo-random", "eval_split=0", "dry_run=true"]) == 0
    printed = capsys.readouterr().out
    assert "data: 1 train / 0 eval preference pairs" in printed
    assert '{"prompt": "upper abc:", "chosen": " ABC", "rejected": " abc"}' in printed
