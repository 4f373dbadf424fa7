"""The axolotl plugin (``paca.integrations.axolotl``): an axolotl YAML with ``adapter: paca`` trains and saves a
PaCA adapter that PEFT loads and `paca export` converts.

Runs where axolotl is installed: `make test-axolotl` builds that venv at the versions axolotl pins
(constraints-axolotl.txt); elsewhere the module is skipped.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("axolotl", reason="axolotl is not installed here; `make test-axolotl` runs this module")

from paca.integrations.axolotl import PacaArgs, PacaPlugin, paca_config  # noqa: E402
from paca.train import demo  # noqa: E402

WORDS = ["apple", "banana", "cherry", "delta", "echo", "fox", "golf", "hotel", "india", "juliet", "kilo", "lima"]

# What a CPU run needs: no 16-bit, eager attention, and axolotl's LoRA kernels (CUDA) off.
CPU = {
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "attn_implementation": "eager",
    "gradient_checkpointing": False,
    "dataloader_num_workers": 0,
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "lora_embedding_kernel": False,
}


def axolotl_train(tmp_path, **keys):
    base = tmp_path / "base"
    demo.random_model(0).save_pretrained(base)
    demo.build_tokenizer().save_pretrained(base)
    data = tmp_path / "alpaca.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"reverse {w}", "input": "", "output": w[::-1]}) + "\n" for w in WORDS)
    )
    config = {
        "base_model": str(base),
        "tokenizer_type": "PreTrainedTokenizerFast",
        "datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "val_set_size": 0,
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 256,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "num_epochs": 1,
        "learning_rate": 0.01,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "plugins": ["paca.integrations.axolotl.PacaPlugin"],
        "adapter": "paca",
        **CPU,
        **keys,
    }
    path = tmp_path / "paca.yml"
    path.write_text(yaml.safe_dump(config))
    axolotl = os.path.join(os.path.dirname(sys.executable), "axolotl")
    # axolotl relaunches itself through `accelerate launch`, found on PATH: this venv's. Its telemetry, on by
    # default, would keep retrying an unreachable host after training.
    search_path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {
        **os.environ,
        "PATH": search_path,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [axolotl, "train", str(path)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return base, tmp_path / "out"


def test_an_axolotl_yaml_with_adapter_paca_trains_a_paca_adapter_peft_loads_and_export_converts(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import paca  # noqa: F401
    from paca.export import main as export

    base, out = axolotl_train(tmp_path, paca_r=4, paca_alpha=8, paca_target_modules=["q_proj", "v_proj", "down_proj"])
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PACA" and saved["r"] == 4 and saved["paca_alpha"] == 8
    assert set(saved["target_modules"]) == {"q_proj", "v_proj", "down_proj"}

    ids = torch.tensor([[5, 9, 14, 20, 7]])
    plain = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        before = plain(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    deltas = {n: p for n, p in tuned.named_parameters() if "paca_delta" in n}
    assert deltas and all(p.abs().max() > 0 for p in deltas.values())  # every tuned layer moved in 3 steps
    with torch.no_grad():
        after = tuned(ids).logits
    assert not torch.allclose(after, before)

    # Serving engines load LoRA: the exported adapter gives the same outputs in plain PEFT.
    assert export(["--adapter", str(out), "--to", "lora", str(tmp_path / "lora")]) == 0
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, after, atol=1e-5, rtol=0)


def test_the_paca_keys_fall_back_to_axolotl_s_lora_keys_and_all_linear():
    config = paca_config({"adapter": "paca", "lora_r": 16, "lora_alpha": 32, "seed": 7})
    assert (config.r, config.paca_alpha, config.target_modules, config.random_seed) == (16, 32, "all-linear", 7)
    config = paca_config(
        {
            "adapter": "paca",
            "lora_r": 16,
            "paca_r": 4,
            "paca_selection": "weight_norm",
            "lora_target_modules": ["q_proj"],
            "paca_seed": 3,
        }
    )
    assert (config.r, config.selection, config.target_modules, config.random_seed) == (4, "weight_norm", {"q_proj"}, 3)
    assert PacaPlugin().load_adapter(None, {"adapter": "lora"}) is None  # not ours: axolotl's own loader runs
    with pytest.raises(ValueError):
        PacaArgs(paca_selection="gradient")  # needs a scoring pass axolotl has no step for
