"""PaCA end to end in one page: wrap a small Llama-shaped model, train, save, reload, export.

    .venv/bin/python examples/quickstart.py [--steps 60] [--out runs/quickstart]

The model is built from a config (random weights, no download) and learns a toy task: after a token
`a`, predict `a + 1 (mod vocab)`. Only r = 8 input columns per projection are trained.
"""

import argparse
import os
import shutil
import time

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import paca
from paca.export import export_lora, export_merged


def successor_batch(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % vocab  # (B, T): each token is the previous one plus one


def save_base(base_dir: str) -> LlamaConfig:
    """A small Llama with random weights, saved where a pretrained checkpoint would be."""
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(base_dir)
    return config


def train(model, steps: int, vocab: int) -> None:
    """AdamW on the PaCA deltas (the only trainable parameters), a fresh successor batch per step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        ids = successor_batch(16, 32, vocab, generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1:
            print(f"step {step}/{steps} | loss {loss.item():.3f} | {time.perf_counter() - t0:.1f}s")


def evaluate(model, test: torch.Tensor) -> torch.Tensor:
    """Print next-token accuracy with and without the adapter; return the adapted logits."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=test).logits
        with model.disable_adapter():
            base_logits = model(input_ids=test).logits

    def accuracy(lg):
        return (lg[:, :-1].argmax(-1) == test[:, 1:]).float().mean().item()

    print(
        f"next-token accuracy on held-out sequences: base {accuracy(base_logits):.2f} -> PaCA {accuracy(logits):.2f}"
    )
    return logits


def save_and_reload(model, base_dir: str, adapter_dir: str, test: torch.Tensor, logits: torch.Tensor) -> None:
    """Save the adapter as PEFT does and check that PEFT's loader gives the same outputs."""
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=test).logits, logits)
    print(
        f"saved {adapter_dir} ({os.path.getsize(os.path.join(adapter_dir, 'adapter_model.safetensors'))} bytes); "
        f"reloaded outputs identical: {same}"
    )


def export(out: str, base_dir: str, adapter_dir: str, test: torch.Tensor, logits: torch.Tensor) -> None:
    """Export as a plain LoRA adapter and as a merged model; print how far each is from the PaCA outputs."""
    export_lora(adapter_dir, os.path.join(out, "lora"), base=base_dir)
    export_merged(adapter_dir, os.path.join(out, "merged"), base=base_dir)
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), os.path.join(out, "lora"))
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged"))
    with torch.no_grad():
        lora_gap = (lora.eval()(input_ids=test).logits - logits).abs().max().item()
        merged_gap = (merged.eval()(input_ids=test).logits - logits).abs().max().item()
    print(f"exported: LoRA adapter (max |diff| {lora_gap:.1e}), merged model (max |diff| {merged_gap:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()
    torch.manual_seed(0)
    # Only what an earlier run of this script wrote is replaced, never the rest of the folder (--out runs).
    for name in ("base", "adapter", "lora", "merged"):
        shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
    base_dir, adapter_dir = os.path.join(args.out, "base"), os.path.join(args.out, "adapter")
    config = save_base(base_dir)

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        paca.PacaConfig(r=8, paca_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.print_trainable_parameters()
    train(model, args.steps, config.vocab_size)
    test = successor_batch(8, 32, config.vocab_size, torch.Generator().manual_seed(123))
    logits = evaluate(model, test)
    save_and_reload(model, base_dir, adapter_dir, test, logits)
    export(args.out, base_dir, adapter_dir, test, logits)


if __name__ == "__main__":
    main()
