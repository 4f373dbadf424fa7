"""Column selection strategies compared (paper Table 5): held-out score after the same training budget.

    python benchmarks/selection_strategies.py      # the comparison of docs/SELECTION.md

Task (offline, seeded): a small Llama (hidden 64, 2 blocks, 4 query / 2 KV heads, FFN 128) is first
trained to copy 8 digits after a separator, then fine-tuned with PaCA (r=16 of 64/128 columns, all linear
layers) to reverse them. Score: held-out next-token accuracy on the reversed digits (teacher forcing,
512 fresh sequences). Every strategy gets the same steps, learning rate and data; ``gradient`` first
spends --calibration steps choosing columns with ``paca.select_by_gradient`` (no weight update).
Prints a Markdown table: mean and spread over --seeds PaCA seeds.
"""

import argparse
import statistics
import time
import warnings

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import paca

warnings.filterwarnings("ignore")
DIGITS, SEP, VOCAB = 8, 10, 16


def batch(n, task, generator):
    """``x SEP f(x)`` with f the identity ('copy') or reversal ('reverse'); loss on f(x) only."""
    x = torch.randint(0, 10, (n, DIGITS), generator=generator)
    y = x.flip(1) if task == "reverse" else x
    ids = torch.cat([x, torch.full((n, 1), SEP), y], 1)  # (n, 2 * DIGITS + 1)
    labels = ids.clone()
    labels[:, : DIGITS + 1] = -100
    return {"input_ids": ids, "labels": labels}


def accuracy(model, task, seed=12345):
    data = batch(512, task, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        predicted = model(input_ids=data["input_ids"]).logits[:, :-1].argmax(-1)
    target = data["labels"][:, 1:]
    mask = target != -100
    return (predicted[mask] == target[mask]).float().mean().item()


def train(model, task, steps, lr, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        model(**batch(64, task, generator)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def pretrained(steps):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return train(LlamaForCausalLM(config), "copy", steps, 3e-3, seed=0).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--calibration", type=int, default=100)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", default="random,weight_norm,gradient,structured")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: one thread avoids spin-waiting on a shared machine

    base = pretrained(args.pretrain_steps)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    print(
        f"base model after {args.pretrain_steps} copy steps: copy {accuracy(base, 'copy'):.3f}, "
        f"reverse {accuracy(base, 'reverse'):.3f}\n"
    )
    print(
        f"| selection | held-out reverse accuracy (mean ± sd, {args.seeds} seeds) | min | max | "
        "fine-tune s | selection s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for strategy in args.strategies.split(","):
        scores, times, selection_times = [], [], []
        for seed in range(args.seeds):
            base.load_state_dict(state)
            config = paca.PacaConfig(
                r=args.r,
                paca_alpha=2.0 * args.r,
                target_modules="all-linear",
                random_seed=seed,
                selection=strategy,
                task_type="CAUSAL_LM",
            )
            start = time.perf_counter()
            model = get_peft_model(base, config)
            if strategy == "gradient":
                generator = torch.Generator().manual_seed(1000 + seed)
                paca.select_by_gradient(
                    model, (batch(64, "reverse", generator) for _ in range(args.calibration)), steps=args.calibration
                )
            selection_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            train(model.train(), "reverse", args.steps, args.lr, seed=seed)
            times.append(time.perf_counter() - start)
            scores.append(accuracy(model.eval(), "reverse"))
            base = model.unload()
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(
            f"| {strategy} | {statistics.mean(scores):.3f} ± {spread:.3f} | {min(scores):.3f} | {max(scores):.3f} | "
            f"{statistics.mean(times):.1f} | {statistics.mean(selection_times):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
