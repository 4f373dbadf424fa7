"""`paca train` configuration: flat YAML + key=value overrides, typed, with errors that name the nearest key."""

import glob
import os

import pytest

from paca.train.config import DEFAULT_LR, DEMO_LR, KEYS, TrainConfig, load_config, usage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_arguments_is_the_demo_with_its_own_settings_and_real_data_gets_real_run_defaults(tmp_path):
    """The demo task brings its settings (examples/demo.yaml spells them out); a user's data gets defaults for real
    runs, not the demo's lr 0.02, max_length 64 and 256 held-out examples."""
    cfg = load_config([])
    assert (cfg.model, cfg.data, cfg.method) == ("paca-demo", "paca-demo", "paca")
    assert cfg == load_config([os.path.join(REPO, "examples", "demo.yaml")])
    assert (cfg.max_length, cfg.eval_split, cfg.batch_size, cfg.learning_rate) == (64, 256, 32, DEMO_LR["paca"])
    assert load_config(["max_length=32"]).max_length == 32  # a given key wins over the demo's
    real = load_config(["model=org/model", f"data={tmp_path / 'train.jsonl'}"])
    assert (real.max_length, real.eval_split, real.batch_size) == (2048, 0.05, 8)
    assert (
        {m: load_config([f"data={tmp_path / 'x.jsonl'}", f"method={m}"]).learning_rate for m in DEFAULT_LR}
        == DEFAULT_LR
        == {"paca": 2e-4, "qpaca": 2e-4, "lora": 2e-4, "dora": 2e-4, "full": 2e-5}
    )


def test_fp16_optimizer_warmup_steps_and_report_to_are_keys_checked_by_name():
    cfg = load_config(["fp16=true", "optim=adamw_torch_fused", "warmup_steps=20", "report_to=tensorboard"])
    assert (cfg.fp16, cfg.optim, cfg.warmup_steps, cfg.report_to) == (True, "adamw_torch_fused", 20, "tensorboard")
    with pytest.raises(ValueError, match="'bf16' and 'fp16' are both true"):
        load_config(["fp16=true", "bf16=true"])
    with pytest.raises(ValueError, match="unknown optimizer 'adamw_8bt'; did you mean 'adamw_8bit'"):
        load_config(["optim=adamw_8bt"])
    with pytest.raises(ValueError, match="'report_to': 'tensorbord' is not one of none, all, "):
        load_config(["report_to=tensorbord"])


def test_command_line_overrides_the_file_which_overrides_the_defaults(tmp_path):
    path = write(tmp_path, "# model\nmodel: some/model\n# training\nlr: 1e-4\nbatch_size: 4\n")
    cfg = load_config([path, "batch_size=8", "bf16=true", "target_modules=q_proj,v_proj"])
    assert cfg.model == "some/model" and cfg.lr == 1e-4 and cfg.batch_size == 8 and cfg.bf16 is True
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.r == TrainConfig().r  # untouched keys keep their default


@pytest.mark.parametrize("where", ["file", "command line"])
def test_unknown_key_names_the_nearest_valid_key(tmp_path, where):
    argv = [write(tmp_path, "learning_rat: 0.1\n")] if where == "file" else ["learning_rat=0.1"]
    with pytest.raises(ValueError, match="unknown key 'learning_rat'; did you mean 'lr'"):
        load_config(argv)
    with pytest.raises(ValueError, match="unknown key 'gradient_acum'; did you mean 'grad_accum'"):
        load_config(["gradient_acum=4"])
    with pytest.raises(ValueError, match="unknown key 'max_step'; did you mean 'max_steps'"):
        load_config(["max_step=4"])


def test_keys_other_tools_have_and_paca_has_not_say_what_to_do_instead():
    with pytest.raises(ValueError, match="unknown key 'lora_dropout'; PaCA has no dropout"):
        load_config(["lora_dropout=0.05"])
    with pytest.raises(ValueError, match="unknown key 'load_in_8bit'; 8-bit bases are not supported"):
        load_config(["load_in_8bit=true"])


@pytest.mark.parametrize("where", ["file", "command line"])
def test_one_target_module_name_is_a_name_not_a_regex(tmp_path, where):
    """'q_proj' alone means every q_proj layer (PEFT would read a bare string as a full-name regex and find none);
    all-linear and real regexes stay strings."""
    argv = [write(tmp_path, "target_modules: q_proj\n")] if where == "file" else ["target_modules=q_proj"]
    assert load_config(argv).target_modules == ["q_proj"]
    assert load_config(["target_modules=all-linear"]).target_modules == "all-linear"
    assert load_config([r"target_modules=.*\.(q|v)_proj"]).target_modules == r".*\.(q|v)_proj"


def test_dash_dash_options_are_key_value_items(tmp_path):
    """transformers / axolotl habits: '--max_steps 3' and '--max_steps=3' both mean max_steps=3, also after a file."""
    path = write(tmp_path, "batch_size: 4\n")
    assert load_config(["--max_steps", "3"]).max_steps == 3
    assert load_config(["--max_steps=3"]).max_steps == 3
    cfg = load_config([path, "--max_steps", "3", "--lr", "1e-4", "r=4"])
    assert (cfg.batch_size, cfg.max_steps, cfg.lr, cfg.r) == (4, 3, 1e-4, 4)
    with pytest.raises(ValueError, match="'--max_steps' needs a value"):
        load_config(["--max_steps"])


def test_wrong_types_and_choices_name_the_key_and_the_source(tmp_path):
    with pytest.raises(ValueError, match="command line: key 'batch_size' expects an integer, got 'four'"):
        load_config(["batch_size=four"])
    with pytest.raises(ValueError, match="key 'bf16' expects true or false"):
        load_config(["bf16=maybe"])
    with pytest.raises(ValueError, match="key 'method' must be one of paca, qpaca, lora, dora, full; got 'adapter'"):
        load_config(["method=adapter"])
    path = write(tmp_path, "r: [1, 2]\n")
    with pytest.raises(ValueError, match=f"{path}: key 'r' expects an integer"):
        load_config([path])


def test_nested_yaml_and_missing_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="flat mapping"):
        load_config([write(tmp_path, "training:\n  lr: 0.1\n")])
    with pytest.raises(FileNotFoundError, match="config file 'nope.yaml' not found"):
        load_config(["nope.yaml"])


def test_inconsistent_values_are_refused():
    with pytest.raises(ValueError, match="resume=true needs output_dir"):
        load_config(["resume=true"])
    with pytest.raises(ValueError, match="'batch_size' must be positive"):
        load_config(["batch_size=0"])
    with pytest.raises(ValueError, match="eval_split.*fraction in \\(0, 1\\) or a whole count"):
        load_config(["eval_split=2.5"])


def test_lr_defaults_to_the_methods_value():
    assert load_config(["method=full"]).learning_rate == DEMO_LR["full"]  # on the demo task
    assert load_config(["method=full", "data=mine.jsonl"]).learning_rate == DEFAULT_LR["full"]
    assert load_config(["method=lora", "lr=0.5"]).learning_rate == 0.5


def test_written_config_reads_back_identically(tmp_path):
    cfg = load_config(["method=lora", "target_modules=[q_proj, v_proj]", "lr=3e-4", "eval_split=0.1"])
    assert load_config([write(tmp_path, cfg.to_yaml())]) == cfg


def test_help_lists_every_key_under_its_group():
    text = usage()
    for name in KEYS:
        assert f"  {name} " in text
    for group in ("model:", "method:", "data:", "training:", "output:"):
        assert group in text


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml"))))
def test_example_configs_are_valid(path):
    load_config([path])


@pytest.mark.parametrize(
    "item,message",
    [
        ("max_steps=inf", "key 'max_steps' expects an integer, got 'inf'"),
        ("epochs=nan", "key 'epochs' expects a number, got 'nan'"),
        ("eval_split=nan", "key 'eval_split' expects a number"),
        ("warmup_ratio=3", r"key 'warmup_ratio' is a fraction of the steps in \[0, 1\)"),
        ("model=", "key 'model' is empty"),
        ("data=", "key 'data' is empty"),
    ],
)
def test_non_finite_out_of_range_and_empty_values_are_refused(item, message):
    with pytest.raises(ValueError, match=message):
        load_config([item])


def test_several_datasets_are_one_comma_separated_key_from_a_yaml_list_or_the_command_line(tmp_path):
    existing = tmp_path / "a.jsonl"
    existing.write_text("")
    from_yaml = load_config([write(tmp_path, f"data: [{existing}, org/hub-set]\n")])
    assert from_yaml.data == f"{existing},org/hub-set"
    assert load_config([f"data={existing},org/hub-set"]).data == from_yaml.data
    with pytest.raises(ValueError, match="key 'data' expects a name or a list of names"):
        load_config([write(tmp_path, "data: [a, 3]\n")])


def test_data_names_lose_their_spaces_and_a_resume_takes_data_from_the_run(tmp_path):
    """Spaces around comma-separated data names; a resume restating stage=dpo without data; fp16 off on resume."""
    from paca.train.config import resumed_config

    c, d = tmp_path / "c.jsonl", tmp_path / "d.jsonl"
    c.write_text("")
    d.write_text("")
    assert load_config([f"data={c}, {d}"]).data == f"{c},{d}"
    run = tmp_path / "run"
    run.mkdir()
    saved = load_config([f"data={c}", "stage=dpo", "fp16=true"])
    (run / "train_config.yaml").write_text(saved.to_yaml())
    again = load_config(["stage=dpo", "resume=true", f"output_dir={run}", "fp16=false"])  # data from the run
    resumed = resumed_config(again, str(run / "train_config.yaml"))
    assert (resumed.data, resumed.stage, resumed.fp16) == (str(c), "dpo", False)
