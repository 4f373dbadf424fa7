"""PaCA from TRL: supervised fine-tuning with SFTTrainer, then preference tuning with DPOTrainer, unchanged TRL.

    .venv/bin/python examples/trl_sft_dpo.py [--model DIR_OR_HUB_ID] [--steps 20] [--out runs/trl]

TRL takes a PEFT config (``peft_config=paca.PacaConfig(...)``) as it takes LoRA's: it wraps the model, trains
the PaCA deltas only, and for DPO uses the model with its adapter disabled as the frozen reference (PaCA's
disabled adapter is the pretrained weight, bit for bit). Without --model the script builds the demo's small
model with random weights (offline, seconds on a CPU); the data are a few generated conversations in TRL's
formats: conversational ``prompt`` / ``completion`` for SFT (TRL's completion-only loss: the assistant's reply is
learned, the prompt is not) and ``prompt`` / ``chosen`` / ``rejected`` for DPO.
"""

import argparse
import os
import shutil

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import paca
from paca.train import demo

WORDS = ["abc", "dog", "sun", "cat", "map", "pen", "cup", "hat"]


def sft_data() -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"upper {w}"}],
                "completion": [{"role": "assistant", "content": w.upper()}],
            }
            for w in WORDS * 4
        ]
    )


def dpo_data() -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"upper {w}"}],
                "chosen": [{"role": "assistant", "content": w.upper()}],
                "rejected": [{"role": "assistant", "content": w}],
            }
            for w in WORDS * 4
        ]
    )


def demo_model(out: str) -> str:
    """The demo architecture with random weights and its tokenizer (chat template included), saved in ``out``."""
    path = os.path.join(out, "base")
    demo.random_model(0).save_pretrained(path)
    demo.build_tokenizer().save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id or local directory (default: the demo model, random weights)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="runs/trl")
    args = parser.parse_args()
    for name in ("base", "sft", "dpo"):  # only what an earlier run of this script wrote
        shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
    torch.manual_seed(0)
    base = args.model or demo_model(args.out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    common = dict(
        max_steps=args.steps,
        per_device_train_batch_size=8,
        logging_steps=max(1, args.steps // 4),
        report_to="none",
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )

    # 1. SFT: PaCA on every linear layer; TRL renders the chat template and learns the completion only.
    sft = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        processing_class=tokenizer,
        train_dataset=sft_data(),
        args=SFTConfig(output_dir=os.path.join(args.out, "sft"), learning_rate=2e-2, **common),
        peft_config=paca.PacaConfig(r=8, paca_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    sft.train()
    sft.save_model()  # adapter_config.json + adapter_model.safetensors, a PaCA adapter
    history = [row for row in sft.state.log_history if "loss" in row]
    print(
        f"sft: loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}; adapter in {os.path.join(args.out, 'sft')}"
    )

    # 2. DPO from the SFT adapter: the policy trains the same PaCA deltas; the reference is the adapter disabled.
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), os.path.join(args.out, "sft"), is_trainable=True
    )
    dpo = DPOTrainer(
        model=policy,
        processing_class=tokenizer,
        train_dataset=dpo_data(),
        args=DPOConfig(output_dir=os.path.join(args.out, "dpo"), learning_rate=5e-3, beta=0.1, **common),
    )
    dpo.train()
    dpo.save_model()
    history = [row for row in dpo.state.log_history if "loss" in row]
    print(
        f"dpo: loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, reward accuracy "
        f"{history[-1].get('rewards/accuracies', float('nan')):.2f}; adapter in {os.path.join(args.out, 'dpo')}"
    )


if __name__ == "__main__":
    main()
