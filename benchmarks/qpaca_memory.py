"""QPaCA memory: weight bytes of a 16-bit model, its 4-bit NF4 form, and 4-bit + PaCA / + LoRA adapters,
plus the activation bytes one training step keeps for backward (PaCA: x[..., idx]; LoRA: x and x A^T).

    python examples/qpaca_memory.py            # Llama-shaped blocks (hidden 2048, GQA 32/4, FFN 5632), r=8

Prints a Markdown table. CPU only; about a minute on 2 cores.
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
        model(input_ids=ids, labels=ids).loss
    return saved.bytes


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
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)

    rows = []
    dense = LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    rows.append(("16-bit (bf16)", dense.get_memory_footprint(), block_bytes(dense), None))
    lora16 = get_peft_model(dense, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    rows.append(
        (
            f"16-bit + LoRA r={args.r}",
            lora16.get_memory_footprint(),
            block_bytes(lora16),
            saved_activation_bytes(lora16, ids),
        )
    )
    del dense, lora16
    dense = LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    paca16 = get_peft_model(dense, paca.PacaConfig(r=args.r, paca_alpha=2 * args.r, target_modules="all-linear"))
    rows.append(
        (
            f"16-bit + PaCA r={args.r}",
            paca16.get_memory_footprint(),
            block_bytes(paca16),
            saved_activation_bytes(paca16, ids),
        )
    )
    del dense, paca16

    def load_4bit():
        return LlamaForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu")

    q = load_4bit()
    rows.append(("4-bit NF4", q.get_memory_footprint(), block_bytes(q), None))
    qlora = get_peft_model(q, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    rows.append(
        (
            f"4-bit + LoRA r={args.r} (QLoRA)",
            qlora.get_memory_footprint(),
            block_bytes(qlora),
            saved_activation_bytes(qlora, ids),
        )
    )
    qpaca = get_peft_model(load_4bit(), paca.PacaConfig(r=args.r, paca_alpha=2 * args.r, target_modules="all-linear"))
    rows.append(
        (
            f"4-bit + PaCA r={args.r} (QPaCA)",
            qpaca.get_memory_footprint(),
            block_bytes(qpaca),
            saved_activation_bytes(qpaca, ids),
        )
    )

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
