"""`paca train` supervised runs through TRL's SFTTrainer: padding-free and packed batches, train_on_prompt, a
chat_template override, exact match from TRL's fused LM head, and what the SFTTrainer would otherwise change
silently (a 4-bit base's deltas cast to bf16, an adapter on the LM head the fused head never applies).

Runs use the demo architecture (2 layers, hidden 64) on a small JSONL of the demo task, in-process.
"""

import json

import pytest
import torch
from train_run_helpers import adapter
from train_run_helpers import config as run_config
from transformers import TrainerCallback

from paca.train import demo, run
from paca.train.cli import main
from paca.train.config import load_config
from paca.train.data import IGNORE, load_data
from paca.train.trainers import exact_match_verdicts, sft_trainer_class


def config(task_file, output_dir, *overrides):
    return run_config(task_file, output_dir, "max_steps=3", *overrides)


def test_padding_free_batches_reach_the_padded_run_s_adapter_and_metrics(task_file, tmp_path):
    """One row per batch, no padding: attention stays within each example (transformers reads the boundaries from
    the position ids), so the update and the evaluation equal the padded run's."""
    padded = run(config(task_file, tmp_path / "padded"))
    free = run(config(task_file, tmp_path / "free", "padding_free=true"))
    a, b = adapter(tmp_path / "padded"), adapter(tmp_path / "free")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    assert any(t.abs().max() > 1e-3 for n, t in a.items() if "delta" in n)
    for when in ("eval_before", "eval_after"):
        assert free[when]["eval_loss"] == pytest.approx(padded[when]["eval_loss"], abs=1e-5)


def test_exact_match_of_padding_free_rows_equals_the_padded_rows_on_the_same_weights(task_file, tmp_path):
    """80 steps on 8 examples, evaluated on the same 8 (so exact match is not 0); then the finished run resumed
    with padding_free=true: no step left, so the final evaluation scores the same weights in one padding-free row
    per batch."""
    eight = tmp_path / "eight.jsonl"
    eight.write_text("".join(open(task_file).readlines()[:8]))
    out = tmp_path / "run"
    padded = run(
        config(
            task_file,
            out,
            f"data={eight}",
            f"eval_data={eight}",
            "max_steps=80",
            "lr=0.05",
            "logging_steps=40",
            "save_steps=80",
        )
    )
    free = run(load_config([f"output_dir={out}", "resume=true", "padding_free=true"]))
    assert free["steps"] == padded["steps"] == 80
    assert 0 < padded["eval_after"]["eval_exact_match"] < 1
    assert free["eval_after"]["eval_exact_match"] == padded["eval_after"]["eval_exact_match"]
    assert free["eval_after"]["eval_loss"] == pytest.approx(padded["eval_after"]["eval_loss"], abs=1e-5)


def test_packing_fills_max_length_rows_so_an_epoch_takes_fewer_steps(task_file, tmp_path):
    settings = ("max_steps=-1", "epochs=1", "max_length=64")
    unpacked = run(config(task_file, tmp_path / "rows", *settings))
    packed = run(config(task_file, tmp_path / "packed", *settings, "packing=true"))
    assert unpacked["steps"] == 8  # 64 examples, 8 per batch
    assert packed["steps"] <= unpacked["steps"] // 2  # two or more examples per 64-token row
    assert packed["last_loss"] < packed["first_loss"]


def test_exact_match_verdicts_split_a_padding_free_row_at_each_example_start():
    # Two examples in one row: positions 0..3 and 0..2, then one pad token (position 0, nothing learned).
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]])
    label_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0]])  # per next-token label: t + 1 = 1..7
    is_top1 = torch.tensor([[0, 1, 1, 0, 1, 0, 0]])  # the second example misses its last token
    verdicts = exact_match_verdicts(is_top1, label_mask, position_ids)
    assert verdicts.tolist() == [[1, 1], [0, 1], [1, 0]]  # (all right, has a learned token) per example
    # Rows of one example each: the same rule per row.
    rows = exact_match_verdicts(torch.tensor([[1, 1], [1, 0]]), torch.tensor([[1, 1], [0, 1]]))
    assert rows.tolist() == [[1, 1], [0, 1]]
    # A row that does not start at position 0 still starts an example.
    assert exact_match_verdicts(
        torch.tensor([[1, 1, 1]]), torch.tensor([[1, 1, 1]]), torch.tensor([[5, 6, 0, 1]])
    ).tolist() == [[1, 1], [1, 1]]


def test_train_on_prompt_learns_every_training_token_and_still_evaluates_responses(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"upper {w}", "response": w.upper()}) + "\n" for w in ("abc", "dog", "cat", "sun")
        )
    )
    tokenizer = demo.build_tokenizer()
    loaded = load_data(str(data), "train", tokenizer, 64, 1, 0, train_on_prompt=True)
    assert all(row["labels"] == row["input_ids"] for row in loaded.train)
    assert all(IGNORE in row["labels"] for row in loaded.eval)  # the eval example's prompt is not scored


def test_a_chat_template_file_or_directory_replaces_the_model_s_own(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "upper abc", "response": "ABC"}) + "\n")
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}{{ m.role | upper }} {{ m.content }}{% if m.role == 'assistant' %}"
        "{{ eos_token }}{% else %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT "
        "{% endif %}"
    )
    base = ["model=paca-demo-random", f"data={data}", "eval_split=0", "dry_run=true"]
    assert main([*base, f"chat_template={template}"]) == 0
    assert "USER upper abc ASSISTANT [[ABC</s>]]" in capsys.readouterr().out
    tokenizer_dir = tmp_path / "tok"
    tokenizer = demo.build_tokenizer()
    tokenizer.chat_template = template.read_text()
    tokenizer.save_pretrained(tokenizer_dir)
    assert main([*base, f"chat_template={tokenizer_dir}"]) == 0
    assert "USER upper abc ASSISTANT [[ABC</s>]]" in capsys.readouterr().out
    assert main([*base, f"chat_template={tmp_path / 'missing.jinja'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat_template" in err[0] and "missing.jinja" in err[0] and "not found" in err[0]


def test_an_adapter_on_the_lm_head_is_refused_since_the_fused_head_would_skip_it(task_file, tmp_path):
    # TRL's own refusal: its fused head multiplies by lm_head.weight, so an adapter there would never train.
    with pytest.raises(ValueError, match="PEFT adapter to `lm_head` is not supported"):
        run(config(task_file, tmp_path / "head", "target_modules=q_proj,lm_head"))
    assert not (tmp_path / "head" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_4bit_base_keeps_float32_deltas_where_trl_would_cast_them_to_bf16(task_file, tmp_path, stage):
    pytest.importorskip("bitsandbytes")
    base = tmp_path / "base"
    demo.random_model(0).save_pretrained(base)
    demo.build_tokenizer().save_pretrained(base)
    data = task_file
    if stage == "dpo":
        data = tmp_path / "prefs.jsonl"
        data.write_text(
            "".join(
                json.dumps({"instruction": f"upper {w}", "input": "", "chosen": w.upper(), "rejected": w}) + "\n"
                for w in ["abc", "dog", "sun", "cat"] * 3
            )
        )
    seen = []

    class DeltaDtypes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.extend({p.dtype for n, p in model.named_parameters() if p.requires_grad})

    run(
        config(
            task_file,
            tmp_path / "q",
            f"model={base}",
            "method=qpaca",
            "max_steps=1",
            f"stage={stage}",
            f"data={data}",
            "eval_split=0",
            "batch_size=4",
        ),
        callbacks=[DeltaDtypes()],
    )
    assert seen == [torch.float32]


def test_router_aux_loss_coef_weights_the_moe_load_balancing_loss(task_file, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = demo.build_tokenizer()
    torch.manual_seed(0)
    model = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    first = {
        coef: run(
            config(
                task_file,
                tmp_path / f"c{coef}",
                f"model={tmp_path / 'moe'}",
                "max_steps=1",
                "eval_split=0",
                f"router_aux_loss_coef={coef}",
            )
        )["first_loss"]
        for coef in (0, 1)
    }
    # Top-2 of 4 experts: the balancing loss is num_experts_per_tok = 2 when the routing is even, near that here.
    assert 1.5 < first[1] - first[0] < 3


def test_the_sft_trainer_is_trl_s():
    from trl import SFTTrainer

    assert issubclass(sft_trainer_class(), SFTTrainer)


def test_older_training_libraries_are_one_line_naming_each_and_the_extra(task_file, tmp_path, monkeypatch, capsys):
    """The core installs beside axolotl's older pins; `paca train` then says what its extra needs, before anything."""
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.9.0" if name == "trl" else real(name))
    out = tmp_path / "never"
    assert main([f"data={task_file}", "model=paca-demo-random", f"output_dir={out}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trl 1.9.0 (needs >=1.16)" in err[0] and "pip install 'paca[train]'" in err[0]
    assert not out.exists()


def test_a_resume_may_turn_padding_free_on_but_not_change_packing(task_file, tmp_path, capsys):
    """padding_free keeps each batch's examples (other memory, same update); packing makes other batches."""
    from paca.train.config import RESUME_CHANGEABLE

    assert "padding_free" in RESUME_CHANGEABLE and "packing" not in RESUME_CHANGEABLE
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):

        class KilledAfterStep3(TrainerCallback):  # checkpoint-2 is the last one written
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    raise KeyboardInterrupt

        run(config(task_file, out, "max_steps=4", "save_steps=2"), callbacks=[KilledAfterStep3()])
    assert main([f"output_dir={out}", "resume=true", "packing=true"]) == 1
    assert "packing: False in the run, True given" in capsys.readouterr().err
    # A run saved before a key existed had that key's default: a resume still cannot change it.
    saved = out / "train_config.yaml"
    saved.write_text(
        "".join(
            line
            for line in saved.read_text().splitlines(keepends=True)
            if not line.startswith(("packing:", "train_on_prompt:"))
        )
    )
    assert main([f"output_dir={out}", "resume=true", "train_on_prompt=true"]) == 1
    assert "train_on_prompt: False in the run, True given" in capsys.readouterr().err
    assert main([f"output_dir={out}", "resume=true", "padding_free=true"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
