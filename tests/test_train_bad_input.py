"""`paca train` bad input and Ctrl-C: exit status 1 (130) with one message, no traceback, nothing written.

A model without tokenizer files, a missing model or data file, an unknown key, settings that cannot apply, a
missing deepspeed, bad data lines; Ctrl-C prints the command that resumes.
"""

import sys

import pytest

from paca.train import demo
from paca.train.cli import main


def test_a_model_directory_without_tokenizer_files_is_refused_naming_it(task_file, tmp_path, capsys):
    """Weights without a tokenizer: transformers may return an empty tokenizer that trains on nothing (and reports
    100% exact match); refused before training, naming the directory."""
    base = tmp_path / "weights-only"
    demo.random_model(0).save_pretrained(base)
    assert main([f"model={base}", f"data={task_file}", "max_steps=1", f"output_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert f"model '{base}' has no tokenizer files" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=./no/such/model"], "model './no/such/model' not found"),
        (["data=missing.jsonl"], "data file 'missing.jsonl' not found"),
        (["lrr=0.1"], "unknown key 'lrr'; did you mean 'lr'"),
        (["max_length=4"], "no training example has a response token within max_length=4"),
        (["fsdp=true"], "fsdp=true shards across processes and this is one: launch with `torchrun"),
        (["stage=dpo", "packing=true"], "key 'packing' shapes supervised batches (stage=sft)"),
        (["stage=dpo", "train_on_prompt=true"], "key 'train_on_prompt' shapes supervised batches"),
        (["router_aux_loss_coef=-1"], "key 'router_aux_loss_coef' must be 0 or more"),
    ],
)
def test_bad_input_exits_with_a_message_and_writes_nothing(task_file, tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    argv = [
        f"data={task_file}",
        "model=paca-demo-random",
        f"output_dir={out}",
        "max_steps=1",
        "eval_split=8",
        *overrides,
    ]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_deepspeed_without_its_package_is_a_clear_error(task_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed: import raises ImportError
    out = tmp_path / "run"
    argv = [
        f"data={task_file}",
        "model=paca-demo-random",
        f"output_dir={out}",
        "max_steps=1",
        "eval_split=8",
        "deepspeed=zero3",
    ]
    assert main(argv) == 1
    assert "deepspeed=zero3 needs the deepspeed package: pip install deepspeed" in capsys.readouterr().err
    assert not out.exists()


def test_bad_data_lines_are_reported_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main([f"data={bad}", "model=paca-demo-random", f"output_dir={tmp_path / 'a'}"]) == 1
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert main([f"data={empty}", "model=paca-demo-random", f"output_dir={tmp_path / 'b'}"]) == 1
    assert "holds no examples" in capsys.readouterr().err


def test_ctrl_c_is_one_line_with_the_command_that_resumes(monkeypatch, tmp_path, capsys):
    """Ctrl-C during a run: no traceback through the Trainer; one line with the resume command (the dated
    output_dir filled in when none was given), exit status 130."""
    import paca.train.cli as cli

    def interrupted(cfg):
        cfg.output_dir = str(tmp_path / "runs" / "dated")  # what run() fills in
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert cli.main(["max_steps=5", "--lr", "1e-3"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"Resume with: paca train max_steps=5 --lr=1e-3 output_dir={tmp_path / 'runs' / 'dated'} resume=true" in err
