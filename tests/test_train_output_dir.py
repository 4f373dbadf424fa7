"""`paca train` output_dir: what it may replace and where a run lands.

A directory holding a run is refused unless resume=true or overwrite=true; overwrite replaces only paca runs, never
the base model, and keeps the old run until the new one has saved; a failed run's leftovers do not block its retry;
~ is expanded; a file in the way is refused before anything loads.
"""

import pytest
from train_run_helpers import config

from paca.train import demo, run
from paca.train.cli import main


def test_an_output_dir_holding_a_run_is_refused_unless_resume_or_overwrite(task_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"data={task_file}", "model=paca-demo-random", f"output_dir={out}", "batch_size=8", "eval_split=8"]
    assert main(args + ["max_steps=4", "save_steps=2"]) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(args + ["max_steps=2"]) == 1
    err = capsys.readouterr().err
    assert "already holds a run (2 checkpoint(s), newest checkpoint-4" in err and "resume=true" in err
    assert (out / "adapter_model.safetensors").read_bytes() == before  # untouched
    assert main(args + ["max_steps=2", "save_steps=2", "overwrite=true"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's are gone
    empty = tmp_path / "empty"
    assert main(args[:2] + [f"output_dir={empty}", "resume=true"]) == 1
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_overwrite_replaces_only_paca_runs_and_never_the_base_model(task_file, tmp_path, capsys):
    base = tmp_path / "base"
    demo.random_model(0).save_pretrained(base)
    demo.build_tokenizer().save_pretrained(base)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    common = [f"data={task_file}", "batch_size=8", "eval_split=8", "max_steps=1", "overwrite=true"]
    assert main(common + [f"model={base}", f"output_dir={foreign}"]) == 1
    assert "holds files paca train did not write" in capsys.readouterr().err
    assert (foreign / "config.json").read_text() == "{}"

    (base / "train_config.yaml").write_text("# a full fine-tuning run's output, now used as a base\n")
    for output_dir in (base, base / "sub", tmp_path):
        (base / "sub").mkdir(exist_ok=True)
        (base / "sub" / "train_config.yaml").write_text("")
        (base / "sub" / "x").write_text("")
        assert main(common + [f"model={base}", f"output_dir={output_dir}"]) == 1
        assert "would delete files of the base model" in capsys.readouterr().err, output_dir
    assert (base / "model.safetensors").is_file()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved_its_adapter(task_file, tmp_path, monkeypatch):
    """overwrite=true moves the old run aside (output_dir/.previous-run) and deletes it only after the new run has
    saved: a new run that fails first leaves the old adapter and checkpoints intact there."""
    import paca.train.pipeline as pipeline

    out = tmp_path / "run"
    args = [f"data={task_file}", "model=paca-demo-random", f"output_dir={out}", "batch_size=8", "eval_split=8"]
    assert main(args + ["max_steps=2", "save_steps=2"]) == 0
    old = (out / "adapter_model.safetensors").read_bytes()

    def fails(*a, **k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_save_final", fails)
        with pytest.raises(RuntimeError, match="disk full"):
            main(args + ["max_steps=1", "overwrite=true", "seed=1"])
    aside = out / ".previous-run"
    assert (aside / "adapter_model.safetensors").read_bytes() == old
    assert (aside / "checkpoint-2").is_dir() and (aside / "train_config.yaml").is_file()
    assert main(args + ["max_steps=1", "overwrite=true", "seed=1"]) == 0
    assert not aside.exists() and (out / "adapter_model.safetensors").read_bytes() != old


def test_a_run_that_failed_before_logging_does_not_block_its_retry(task_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.yaml").write_text("lr: .nan\n")  # all a run that failed at once leaves behind
    run(config(task_file, out, "max_steps=1"))
    assert (out / "adapter_model.safetensors").is_file()


def test_home_relative_paths_are_expanded_so_checkpoints_and_adapter_land_together(task_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    run(config(task_file, "~/runs/a", "max_steps=2", "save_steps=2"))
    home_run = tmp_path / "home" / "runs" / "a"
    assert (home_run / "checkpoint-2").is_dir() and (home_run / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "~").exists()


def test_an_output_dir_that_is_a_file_is_refused_before_loading(task_file, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for output_dir, message in ((blocker, "is a file, not a directory"), (blocker / "sub", "cannot be created")):
        assert main([f"data={task_file}", "model=./no/such/model", f"output_dir={output_dir}"]) == 1
        assert message in capsys.readouterr().err  # checked before the (missing) model is even looked for
