"""`paca train` end to end: the demo and its floors, training equivalences, other methods and models, reporting.

The demo from an empty cache reaches its documented floors and its base is cached by recipe; gradient accumulation
and checkpointing give the large batch's / plain update; LoRA, DoRA, full, QPaCA and a local GPT-2 train; eval_steps,
TensorBoard, --version and the recorded base path.
"""

import json
import os
import re

import pytest
from train_run_helpers import PROGRESS_LINE, adapter, assert_same_tensors, config
from transformers import TrainerCallback

from paca.train import demo, run
from paca.train.cli import main
from paca.train.config import load_config

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
