"""`paca train` resume, checkpoints and the NaN guard.

A killed run resumed from its newest checkpoint lands on the uninterrupted run's weights (reading the run's config,
keeping gradient-selected columns, past a metrics line cut short) and refuses changed model, data or lr; a kill
during a checkpoint save never publishes it; a NaN loss or infinite gradient stops at the last good checkpoint.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from train_run_helpers import Interrupt, InterruptAt, adapter, assert_same_tensors, config
from transformers import TrainerCallback

from paca.train import TrainingStopped, demo, run
from paca.train.checkpoints import newest_checkpoint
from paca.train.cli import main
from paca.train.config import load_config
from paca.train.trainers import sft_trainer_class


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(task_file, tmp_path):
    whole = tmp_path / "whole"
    run(config(task_file, whole, "max_steps=6", "save_steps=2"))
    parts = tmp_path / "parts"
    with pytest.raises(Interrupt):
        run(config(task_file, parts, "max_steps=6", "save_steps=2"), callbacks=[InterruptAt(5)])
    assert newest_checkpoint(parts).endswith("checkpoint-4")
    run(config(task_file, parts, "max_steps=6", "save_steps=2", "resume=true"))
    assert_same_tensors(adapter(parts), adapter(whole))
    logged = [
        json.loads(line)["step"]
        for line in (parts / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert logged == [1, 2, 3, 4, 5, 6]  # step 5, logged before the kill, is replaced, not duplicated
    evaluated = [
        json.loads(line)
        for line in (parts / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in json.loads(line)
    ]
    assert [row["step"] for row in evaluated] == [0, 6]  # the checkpoint is not re-evaluated as "before"
    before = json.loads((parts / "summary.json").read_text())["eval_before"]
    assert before == json.loads((whole / "summary.json").read_text())["eval_before"]


def test_a_resume_reads_the_run_s_config_so_omitted_keys_keep_their_values(task_file, tmp_path):
    """resume=true with only output_dir: model, data, lr, batch size... come from the run's train_config.yaml
    (not the demo's defaults) and the resumed run lands on the uninterrupted run's weights."""
    settings = ("max_steps=4", "save_steps=2", "lr=0.01", "max_length=48", "r=4")
    whole = tmp_path / "whole"
    run(config(task_file, whole, *settings))
    parts = tmp_path / "parts"
    with pytest.raises(Interrupt):
        run(config(task_file, parts, *settings), callbacks=[InterruptAt(3)])
    run(load_config([f"output_dir={parts}", "resume=true"]))
    assert_same_tensors(adapter(parts), adapter(whole))


def test_a_resume_with_another_model_data_or_lr_is_refused_before_anything_is_touched(task_file, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run(config(task_file, out, "max_steps=4", "save_steps=2"), callbacks=[InterruptAt(3)])
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(open(task_file).read())  # the same examples under another name: another data source
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for change, named in (
        (["model=paca-demo"], "model: 'paca-demo-random' in the run, 'paca-demo' given"),
        ([f"data={other_data}"], "data: "),
        (["lr=0.5", "r=2"], "lr: 0.02 in the run, 0.5 given; r: 8 in the run, 2 given"),
    ):
        code = main([f"output_dir={out}", "resume=true", *change])
        err = capsys.readouterr().err
        assert code == 1 and named in err and "A resume can change only epochs, max_steps" in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing cut or rewritten
    assert main([f"output_dir={out}", "resume=true", "max_steps=5", "logging_steps=2"]) == 0  # these may change
    assert json.loads((out / "summary.json").read_text())["steps"] == 5


def test_gradient_selection_scores_the_first_training_batches_and_resume_keeps_its_columns(
    task_file, tmp_path, capsys
):
    import paca
    from paca.train.data import load_data
    from paca.train.model import apply_method, load_base
    from paca.train.trainers import sft_collator

    settings = ("selection=gradient", "selection_steps=3", "max_steps=4", "save_steps=2")
    whole = tmp_path / "whole"
    run(config(task_file, whole, *settings))
    assert "gradient columns (scored on 3 global batches)" in capsys.readouterr().out

    # Reference: select_by_gradient itself on the first 3 training batches, in file order.
    cfg = config(task_file, tmp_path / "unused", *settings)
    model, tokenizer, _ = load_base(cfg, demo.BUILTINS.models)
    data = load_data(cfg.data, cfg.data_split, tokenizer, cfg.max_length, cfg.eval_split, cfg.seed)
    model = apply_method(model, cfg)
    batches = [sft_collator(tokenizer)(data.train[i : i + 8]) for i in (0, 8, 16)]
    chosen = paca.select_by_gradient(model, iter(batches), steps=3)
    saved = adapter(whole)
    for layer, idx in chosen.items():
        assert torch.equal(saved[f"base_model.model.{layer}.paca_indices"], idx), layer
    run(config(task_file, tmp_path / "random", "max_steps=1"))
    random_indices = {k: v for k, v in adapter(tmp_path / "random").items() if k.endswith("paca_indices")}
    assert any(not torch.equal(saved[k], v) for k, v in random_indices.items())

    parts = tmp_path / "parts"
    with pytest.raises(Interrupt):
        run(config(task_file, parts, *settings), callbacks=[InterruptAt(3)])
    run(config(task_file, parts, *settings, "resume=true"))  # the checkpoint carries the columns on
    assert_same_tensors(adapter(parts), saved)


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_resume(task_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run(config(task_file, out, "max_steps=4", "save_steps=2"), callbacks=[InterruptAt(3)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: not a metrics row"):
        run(config(task_file, out, "max_steps=4", "save_steps=2", "resume=true"))
    assert (out / "adapter_model.safetensors").is_file()


def test_a_kill_during_a_checkpoint_save_never_leaves_a_complete_looking_checkpoint(task_file, tmp_path, monkeypatch):
    trainer_class = sft_trainer_class()
    original = trainer_class._save_rng_state  # runs after the weights and optimizer are written

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise Interrupt("killed while saving checkpoint-4")
        return original(self, output_dir)

    monkeypatch.setattr(trainer_class, "_save_rng_state", dies_at_step_4)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run(config(task_file, out, "max_steps=6", "save_steps=2"))
    assert not (out / "checkpoint-4").exists()  # half-written, so never published
    assert newest_checkpoint(out).endswith("checkpoint-2")
    monkeypatch.setattr(trainer_class, "_save_rng_state", original)
    run(config(task_file, out, "max_steps=6", "save_steps=2", "resume=true"))
    assert newest_checkpoint(out).endswith("checkpoint-6") and not (out / ".staging").exists()


class NaNLossFrom(TrainerCallback):
    """From optimizer step ``step`` on, the hidden states entering the LM head (and so the loss) are NaN."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            # TRL's fused LM head reads the head's weight directly: poison what it is applied to.
            final_norm = model.get_base_model().get_decoder().norm
            final_norm.register_forward_hook(lambda module, inputs, out: out * float("nan"))


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(task_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"loss became nan at step 4.*Last good checkpoint: .*checkpoint-2"):
        run(config(task_file, out, "max_steps=6", "save_steps=2"), callbacks=[NaNLossFrom(4)])
    assert newest_checkpoint(out).endswith("checkpoint-2")
    good = load_file(os.path.join(newest_checkpoint(out), "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (out / "adapter_model.safetensors").exists()  # nothing saved after the failure


class InfiniteGradientsFrom(TrainerCallback):
    """From optimizer step ``step`` on, one delta's gradient is infinite while the loss stays finite."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            delta = next(p for n, p in model.named_parameters() if "paca_delta" in n)
            delta.register_hook(lambda grad: grad * float("inf"))


def test_infinite_gradients_under_a_finite_loss_stop_before_the_update(task_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"gradient norm became (inf|nan) at step 3.*checkpoint-2"):
        run(config(task_file, out, "max_steps=6", "save_steps=2"), callbacks=[InfiniteGradientsFrom(3)])
    good = load_file(os.path.join(newest_checkpoint(out), "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
