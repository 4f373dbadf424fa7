"""Adapter switching time: PaCA (write r columns per layer, restore the originals) vs PEFT LoRA (unmerge and
merge the dense B A), with two adapters loaded on one base, r=8 and 64.

    python benchmarks/switching_time.py            # Llama-shaped blocks (hidden 2048, FFN 5632), 4 blocks, fp32

A switch makes the other adapter the merged one: forwards afterwards run the plain base layers. Prints a
Markdown table of median wall-clock times over --repeats switches (CPU, --threads threads).
"""

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import paca

warnings.filterwarnings("ignore")


def save_adapters(directory, config, adapter_config, kind):
    """Two adapters with non-zero weights (a stand-in for training), saved under directory/{kind}-a, -b."""
    paths = []
    for seed, name in [(1, "a"), (2, "b")]:
        model = get_peft_model(LlamaForCausalLM(config), adapter_config(seed))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        path = f"{directory}/{kind}-{name}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def median_ms(fn, repeats):
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn("a" if i % 2 else "b")
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def adapter_configs(r: int) -> dict:
    """The config of each method at rank ``r``, by method, as a function of the adapter's seed."""

    def paca_config(seed):
        return paca.PacaConfig(r=r, paca_alpha=2 * r, target_modules="all-linear", random_seed=seed)

    def lora_config(seed):
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)

    return {"PaCA": paca_config, "LoRA": lora_config}


def switcher(model, kind: str):
    """``switch(name)``: make adapter ``name`` the merged one, as ``kind`` (PaCA or LoRA) switches."""
    if kind == "PaCA":
        return lambda name: paca.switch_adapter(model, name)

    def switch(name):
        model.unmerge_adapter()
        model.set_adapter(name)
        model.merge_adapter([name])

    return switch


def time_switches(directory: str, config, kind: str, adapter_config, repeats: int) -> tuple[float, bool]:
    """(median switch ms, whether unmerging gave back the base weights bit for bit) of one method."""
    a, b = save_adapters(directory, config, adapter_config, kind)
    base = LlamaForCausalLM.from_pretrained(f"{directory}/base")
    original = {n: p.detach().clone() for n, p in base.named_parameters() if "proj" in n}
    model = PeftModel.from_pretrained(base, a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    switch = switcher(model, kind)
    switch("a")
    ms = median_ms(switch, repeats)
    model.unmerge_adapter()
    exact = all(
        torch.equal(p, original[n.replace("base_model.model.", "").replace(".base_layer", "")])
        for n, p in model.named_parameters()
        if "base_layer.weight" in n
    )
    return ms, exact


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=2048,
    )
    directory = tempfile.mkdtemp()
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(f"{directory}/base")
    n_layers = 7 * args.layers
    print(
        f"Llama-shaped: hidden {args.hidden}, FFN {args.intermediate}, {args.layers} blocks, all {n_layers} linear "
        f"layers adapted, fp32, CPU {args.threads} thread(s); median of {args.repeats} switches\n"
    )
    print("| method | r | switch (unmerge + merge) ms | per layer ms | exact restore |")
    print("|---|---:|---:|---:|---|")
    for r in [int(x) for x in args.ranks.split(",")]:
        for kind, adapter_config in adapter_configs(r).items():
            ms, exact = time_switches(directory, config, kind, adapter_config, args.repeats)
            print(
                f"| {kind} | {r} | {ms:.2f} | {ms / n_layers:.3f} | {'bit-exact' if exact else 'no (float drift)'} |"
            )


if __name__ == "__main__":
    main()
