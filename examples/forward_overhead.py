"""Where PaCA's forward time goes in the launch-bound regime (tiny preset, batch 1 x 32, one thread).

    python examples/forward_overhead.py

Prints the forward time of the frozen floor, of PaCA, of PaCA with its operators' work removed (a bare
F.linear inside the same autograd Function: what the Function call and the layer's Python cost) and of
PaCA with its adapters disabled (PEFT's wrapper only). Best of 5 runs of 200 forwards each.
"""

import time
import warnings

import torch

warnings.filterwarnings("ignore")


def best_ms(fn, calls: int = 200, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return min(times)


def main() -> None:
    import paca.ops.linear as linear
    from paca.bench.methods import make_trainee
    from paca.bench.presets import ModelSpec
    from paca.bench.suite import build_model, random_tokens

    torch.set_num_threads(1)
    base = build_model(ModelSpec("tiny"), torch.float32, torch.device("cpu"), seed=0)
    ids = random_tokens(512, 1, 32, seed=0, device=torch.device("cpu"))
    floor, paca = (make_trainee(m, base, 8, 16, 0).model for m in ("floor", "paca"))

    def forward(model):
        return lambda: model(input_ids=ids, use_cache=False).logits

    print(f"floor forward                        {best_ms(forward(floor)):.2f} ms")
    print(f"PaCA forward                         {best_ms(forward(paca)):.2f} ms")
    real = linear._linear_forward
    linear._linear_forward = lambda x, weight, bias, *rest: torch.nn.functional.linear(x, weight, bias)
    try:
        print(f"PaCA, bare F.linear in its Function  {best_ms(forward(paca)):.2f} ms")
    finally:
        linear._linear_forward = real
    with paca.disable_adapter():
        print(f"PaCA, adapters disabled              {best_ms(forward(paca)):.2f} ms")


if __name__ == "__main__":
    main()
