"""Adapter switching time: PaCA (write r columns per layer, restore the originals) vs PEFT LoRA (unmerge and
merge the dense B A), with two adapters loaded on one base, r=8 and 64.

    python examples/switching_time.py            # Llama-shaped blocks (hidden 2048, FFN 5632), 4 blocks, fp32

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
            for n, p in model.named_parameters():
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
        configs = {
            "PaCA": lambda seed: paca.PacaConfig(r=r, paca_alpha=2 * r, target_modules="all-linear", random_seed=seed),
            "LoRA": lambda seed: LoraConfig(
                r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False
            ),
        }
        for kind, adapter_config in configs.items():
            a, b = save_adapters(directory, config, adapter_config, kind)
            base = LlamaForCausalLM.from_pretrained(f"{directory}/base")
            original = {n: p.detach().clone() for n, p in base.named_parameters() if "proj" in n}
            model = PeftModel.from_pretrained(base, a, adapter_name="a")
            model.load_adapter(b, adapter_name="b")
            if kind == "PaCA":
                switch = lambda name: paca.switch_adapter(model, name)  # noqa: E731
            else:

                def switch(name):
                    model.unmerge_adapter()
                    model.set_adapter(name)
                    model.merge_adapter([name])

            switch("a")
            ms = median_ms(switch, args.repeats)
            model.unmerge_adapter()
            exact = all(
                torch.equal(p, original[n.replace("base_model.model.", "").replace(".base_layer", "")])
                for n, p in model.named_parameters()
                if "base_layer.weight" in n
            )
            print(
                f"| {kind} | {r} | {ms:.2f} | {ms / n_layers:.3f} | {'bit-exact' if exact else 'no (float drift)'} |"
            )
            del model, base


if __name__ == "__main__":
    main()
