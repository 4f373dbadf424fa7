"""`paca train` end to end: the demo, outputs, resume, atomic checkpoints, NaN guard, bad input, methods.

Runs use the demo architecture (2 layers, hidden 64) on a small JSONL of the demo task, in-process.
"""

import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from paca.train import TrainingStopped, demo, run
from paca.train.checkpoints import newest_checkpoint
from paca.train.cli import main
from paca.train.config import load_config
from paca.train.trainers import sft_trainer_class

PROGRESS_LINE = re.compile(
    r"^step (\d+)/(\d+) \(\d+%\) \| loss [\d.]+ \| lr [\d.]+e[-+]\d+ \| [\d.]+[kMG]? tok/s \| "
    r"peak [\d.]+ (KiB|MiB|GiB) \| eta \w+$"
)


def config(task_file, output_dir, *overrides):
    return load_config(
        [
            f"data={task_file}",
            "model=paca-demo-random",
            f"output_dir={output_dir}",
            "batch_size=8",
            "eval_split=8",
            "logging_steps=1",
            "save_steps=0",
            "lr=0.02",
            *overrides,
        ]
    )


def adapter(output_dir):
    return load_file(os.path.join(output_dir, "adapter_model.safetensors"))


def assert_same_tensors(a, b, atol=0.0):
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


class Interrupt(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Stands for a kill: raise once optimizer step ``step`` is done (after its checkpoint, if any)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"killed after step {self.step}")


# The floors README.md and docs/TRAINING.md promise for the demo (both measured above them).
DEMO_BASE_FLOOR, DEMO_PACA_FLOOR = 0.99, 0.95


def test_the_demo_from_an_empty_cache_reaches_its_documented_floors(tmp_path, monkeypatch, capsys):
    """`paca train` with no arguments, whole: stage 1 builds the base from an empty cache, which
    knows its four operations; PaCA then takes the new task from 0% to at least the documented floor."""
    monkeypatch.setenv("PACA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main([f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "stage 1: building the demo base model once" in printed
    assert os.path.isfile(os.path.join(demo.base_dir(), "model.safetensors"))
    base = demo.base_summary()["eval_after"]["eval_exact_match"]
    assert base >= DEMO_BASE_FLOOR, f"stage-1 base: {base:.1%} held-out exact match"
    assert f"(held-out exact match {base:.1%})" in printed

    progress = [line for line in printed.splitlines() if line.startswith("step ")]
    assert progress and all(PROGRESS_LINE.match(line) for line in progress), progress
    assert progress[-1].startswith("step 150/150 (100%)")
    assert re.search(r"held-out eval \(256 examples\): before loss [\d.]+, exact match 0.0% -> after loss", printed)
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png", "summary.json", "metrics.jsonl"):
        assert os.path.isfile(out / name), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1] + list(range(10, 151, 10))
    assert all({"step", "loss", "lr", "tokens_per_s", "peak_memory_bytes"} <= set(r) for r in steps)
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 150]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 150 and summary["eval_before"]["eval_exact_match"] == 0.0
    after = summary["eval_after"]["eval_exact_match"]
    assert after >= DEMO_PACA_FLOOR, f"PaCA on the new task: {after:.1%} held-out exact match"

    assert main([f"output_dir={tmp_path / 'again'}", "max_steps=1"]) == 0  # the cached base is reused
    assert "building" not in capsys.readouterr().out


def test_the_demo_base_cache_key_follows_recipe_code_and_versions(monkeypatch):
    """A cached base is reused only when everything that made it is the same: any change gives a new key."""
    recipe = demo.base_recipe()
    assert demo.base_key(recipe) == demo.base_key() and len(demo.base_key()) == 12  # deterministic
    for change in (
        {"lr": recipe["lr"] * 2},
        {"steps": recipe["steps"] + 1},
        {"code_sha256": "0" * 64},
        {"versions": {**recipe["versions"], "transformers": "9.9.9"}},
    ):
        assert demo.base_key({**recipe, **change}) != demo.base_key(recipe), change
    monkeypatch.setattr(
        demo, "PRETRAIN_LR", demo.PRETRAIN_LR * 2
    )  # an edited recipe is seen without a hand-kept version
    assert demo.base_key() != demo.base_key(recipe)


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


def test_a_model_directory_without_tokenizer_files_is_refused_naming_it(task_file, tmp_path, capsys):
    """Weights without a tokenizer: transformers may return an empty tokenizer that trains on nothing (and reports
    100% exact match); refused before training, naming the directory."""
    base = tmp_path / "weights-only"
    demo.random_model(0).save_pretrained(base)
    assert main([f"model={base}", f"data={task_file}", "max_steps=1", f"output_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert f"model '{base}' has no tokenizer files" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


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


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_resume(task_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run(config(task_file, out, "max_steps=4", "save_steps=2"), callbacks=[InterruptAt(3)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: not a metrics row"):
        run(config(task_file, out, "max_steps=4", "save_steps=2", "resume=true"))
    assert (out / "adapter_model.safetensors").is_file()


def test_an_output_dir_that_is_a_file_is_refused_before_loading(task_file, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for output_dir, message in ((blocker, "is a file, not a directory"), (blocker / "sub", "cannot be created")):
        assert main([f"data={task_file}", "model=./no/such/model", f"output_dir={output_dir}"]) == 1
        assert message in capsys.readouterr().err  # checked before the (missing) model is even looked for


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


def test_gradient_accumulation_gives_the_update_of_the_large_batch(task_file, tmp_path):
    run(config(task_file, tmp_path / "large", "max_steps=3", "batch_size=8", "grad_accum=1"))
    run(config(task_file, tmp_path / "accumulated", "max_steps=3", "batch_size=4", "grad_accum=2"))
    assert_same_tensors(adapter(tmp_path / "accumulated"), adapter(tmp_path / "large"), atol=1e-6)


class RecordCheckpointing(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model()
        # transformers 5.23 renamed is_gradient_checkpointing to is_activation_checkpointing (the old name an alias)
        self.enabled = getattr(base, "is_activation_checkpointing", None)
        if self.enabled is None:
            self.enabled = base.is_gradient_checkpointing


def test_gradient_checkpointing_is_on_and_gives_the_same_update(task_file, tmp_path):
    plain, checkpointed = RecordCheckpointing(), RecordCheckpointing()
    run(config(task_file, tmp_path / "plain", "max_steps=2"), callbacks=[plain])
    run(
        config(task_file, tmp_path / "checkpointed", "max_steps=2", "gradient_checkpointing=true"),
        callbacks=[checkpointed],
    )
    assert checkpointed.enabled and not plain.enabled
    assert_same_tensors(adapter(tmp_path / "checkpointed"), adapter(tmp_path / "plain"))


@pytest.mark.parametrize(
    "method,saved",
    [("lora", "adapter_model.safetensors"), ("dora", "adapter_model.safetensors"), ("full", "model.safetensors")],
)
def test_other_methods_train_and_save(task_file, tmp_path, method, saved):
    summary = run(config(task_file, tmp_path / method, f"method={method}", "max_steps=2"))
    assert summary["method"] == method and os.path.isfile(tmp_path / method / saved)
    if method == "full":
        assert summary["trainable_parameters"] == summary["total_parameters"]


def test_a_local_gpt2_without_chat_template_or_pad_token_trains(task_file, tmp_path):
    """Any causal LM directory: GPT-2's Conv1D layers under all-linear, plain-text prompts, EOS as padding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = demo.build_tokenizer()
    tokenizer.chat_template, tokenizer.pad_token = None, None
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=len(tokenizer),
            n_positions=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    summary = run(
        load_config(
            [
                f"data={task_file}",
                f"model={base}",
                f"output_dir={tmp_path / 'run'}",
                "batch_size=8",
                "eval_split=8",
                "max_steps=2",
                "save_steps=0",
            ]
        )
    )
    targets = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["target_modules"]
    assert {t.rsplit(".", 1)[1] for t in targets} == {"c_attn", "c_proj", "c_fc"}
    assert summary["steps"] == 2 and summary["last_loss"] is not None


def test_qpaca_trains_paca_on_a_4bit_base(task_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    base = tmp_path / "base"
    demo.random_model(0).save_pretrained(base)
    demo.build_tokenizer().save_pretrained(base)
    summary = run(
        load_config(
            [
                f"data={task_file}",
                f"model={base}",
                "method=qpaca",
                f"output_dir={tmp_path / 'q'}",
                "batch_size=8",
                "eval_split=8",
                "max_steps=2",
            ]
        )
    )
    assert summary["method"] == "qpaca"
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["peft_type"] == "PACA"


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


def test_eval_steps_dividing_the_run_evaluate_the_final_weights_once(task_file, tmp_path):
    """eval_steps=2, max_steps=4: held-out evaluations at steps 0, 2 and 4, the last one reused as the final
    result instead of a second evaluation of the same weights."""
    import json

    out = tmp_path / "out"
    assert (
        main(
            [
                f"data={task_file}",
                "model=paca-demo-random",
                f"output_dir={out}",
                "batch_size=8",
                "eval_split=8",
                "max_steps=4",
                "eval_steps=2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    summary = json.loads((out / "summary.json").read_text())
    final = next(r for r in rows if "eval_loss" in r and r["step"] == 4)
    assert summary["eval_after"]["eval_loss"] == pytest.approx(final["eval_loss"])


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


def test_an_alpaca_json_a_trl_prompt_completion_file_and_a_sharegpt_file_with_tools_each_train(tmp_path, capsys):
    """The files users have, each from one command: LLaMA-Factory's alpaca_data.json (a JSON array), TRL's
    prompt/completion JSONL and a ShareGPT JSONL with tools, function calls and observations (rendered by the
    model's own chat template, which knows tools)."""
    from test_train_data import TOOL_TEMPLATE, WEATHER

    base = tmp_path / "base"
    demo.random_model(0).save_pretrained(base)
    tokenizer = demo.build_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(base)
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


def test_report_to_tensorboard_writes_event_files_offline_and_version_names_the_libraries(task_file, tmp_path, capsys):
    from paca.cli import main as paca_main

    out = tmp_path / "tb"
    run(config(task_file, out, "max_steps=2", "report_to=tensorboard"))
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    capsys.readouterr()
    assert paca_main(["--version"]) == 0
    assert re.match(
        r"paca 0\.1\.0 \(torch 2\.13\.0.*, transformers 5\.\d+\.\d+, peft 0\.\d+\.\d+, trl ", capsys.readouterr().out
    )


def test_a_relative_model_path_is_recorded_absolute_so_export_works_from_elsewhere(task_file, tmp_path, monkeypatch):
    from paca.export import export_lora

    base = tmp_path / "models" / "base"
    demo.random_model(0).save_pretrained(base)
    demo.build_tokenizer().save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    run(
        load_config(
            [f"data={task_file}", "model=models/base", "output_dir=out", "max_steps=1", "eval_split=8", "save_steps=0"]
        )
    )
    recorded = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(base)
    monkeypatch.chdir(tmp_path / "models")  # elsewhere: the relative path would not resolve here
    export_lora(str(tmp_path / "out"), str(tmp_path / "lora"))
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


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
