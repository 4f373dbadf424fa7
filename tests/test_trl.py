"""PaCA from TRL: examples/trl_sft_dpo.py (SFTTrainer, then DPOTrainer from its adapter) runs, each stage lowers
its loss, and both write PaCA adapters that PEFT loads and that change the model's outputs."""

import os
import re
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import paca  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_trl_example_trains_sft_then_dpo_and_writes_paca_adapters(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "trl_sft_dpo.py"), "--steps", "6", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sft = re.search(r"sft: loss ([\d.]+) -> ([\d.]+)", done.stdout)
    dpo = re.search(r"dpo: loss ([\d.]+) -> ([\d.]+), reward accuracy ([\d.]+)", done.stdout)
    assert sft and float(sft[2]) < float(sft[1]), done.stdout
    assert dpo and float(dpo[2]) < float(dpo[1]), done.stdout
    ids = torch.randint(4, 60, (1, 8), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    for stage in ("sft", "dpo"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / stage)
        assert model.peft_config["default"].peft_type == "PACA"
        with torch.no_grad():
            assert not torch.allclose(model.eval()(ids).logits, base_logits, atol=1e-4)
