"""QPaCA memory: weight bytes of a 16-bit model, its 4-bit NF4 form, and 4-bit + PaCA / + LoRA adapters,
plus the activation bytes one training step keeps for backward (PaCA: x[..., idx]; LoRA: x and x A^T).

    python benchmarks/qpaca_memory.py            # Llama-shaped blocks (hidden 2048, GQA 32/4, FFN 5632), r=8

Prints a Markdown table. CPU only (docs/QPACA.md has the table of the defaults and its run time).
"""

import argparse
import tempfile
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import paca
from paca.bench.measure import SavedTensorBytes

warnings.filterwarnings("ignore")


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def block_bytes(model) -> int:
    """Parameters and buffers of the transformer blocks (with 4-bit quant states), not embeddings or head."""
    seen, total = set(), 0
    for name, module in model.named_modules():
        if ".layers." not in f".{name}." and not name.endswith("layers"):
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
            state = getattr(t, "quant_state", None)
            if state is not None:
                total += sum(x.numel() * x.element_size() for x in (state.absmax, state.code))
    return total


def saved_activation_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward in one forward (distinct storages; parameters excluded)."""
    with SavedTensorBytes(exclude=model.parameters()) as saved:
        model(input_ids=ids, labels=ids)
    return saved.bytes


def row(name: str, model, ids=None) -> tuple:
    """(name, whole footprint, block bytes, bytes saved for backward or None) of one model; ``ids``: the batch
    whose saved activations are counted (None for a frozen model that is not trained). The sizes are read before
    the forward, which may allocate (PaCA's first forward copies each layer's pretrained columns)."""
    footprint, blocks = model.get_memory_footprint(), block_bytes(model)
    return name, footprint, blocks, None if ids is None else saved_activation_bytes(model, ids)


def measure(directory: str, ids, r: int) -> list[tuple]:
    """The table's rows: 16-bit, + LoRA, + PaCA; 4-bit NF4, + LoRA (QLoRA), + PaCA (QPaCA)."""

    def lora():  # a fresh config per model: get_peft_model writes the layers it found into its config
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")

    def paca_config():
        return paca.PacaConfig(r=r, paca_alpha=2 * r, target_modules="all-linear")

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)

    def load_16bit():
        return LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)

    def load_4bit():
        return LlamaForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu")

    rows = []
    dense = load_16bit()
    rows.append(row("16-bit (bf16)", dense))
    rows.append(row(f"16-bit + LoRA r={r}", get_peft_model(dense, lora()), ids))
    del dense  # one 16-bit model resident at a time
    rows.append(row(f"16-bit + PaCA r={r}", get_peft_model(load_16bit(), paca_config()), ids))
    quantized = load_4bit()
    rows.append(row("4-bit NF4", quantized))
    rows.append(row(f"4-bit + LoRA r={r} (QLoRA)", get_peft_model(quantized, lora()), ids))
    rows.append(row(f"4-bit + PaCA r={r} (QPaCA)", get_peft_model(load_4bit(), paca_config()), ids))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    directory = tempfile.mkdtemp()
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    ids = torch.randint(0, 32000, (1, args.seq))
    rows = measure(directory, ids, args.r)

    blocks_16 = rows[0][2]
    print(
        f"Llama-shaped: hidden {args.hidden}, FFN {args.intermediate}, 32 heads / 4 KV heads, {args.layers} blocks, "
        f"vocab 32000 (embeddings and head stay 16-bit); batch 1 x {args.seq} tokens\n"
    )
    print("| model | footprint MiB | blocks MiB | blocks vs 16-bit | saved for backward MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, footprint, blocks, saved in rows:
        print(
            f"| {name} | {mib(footprint)} | {mib(blocks)} | {blocks / blocks_16:.3f} | "
            f"{'' if saved is None else mib(saved)} |"
        )


if __name__ == "__main__":
    main()
