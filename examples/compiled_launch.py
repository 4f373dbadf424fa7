"""The launch-bound regime under torch.compile: floor, PaCA and LoRA each compiled, forward + backward timed.

    python examples/compiled_launch.py [--rounds 100] [--backend inductor]

The bench's tiny preset (batch 1 x 32, one thread, float32), each method's model wrapped in ``torch.compile``
(default mode, whole model: one graph each, no break). After compiling and two untimed steps per method, every
round runs one forward + backward of each method, interleaved; the medians over rounds of the per-round ratios to
the compiled floor are printed. A PaCA layer is one opaque node of the graph (``paca.ops.compiled``), and its
backward another: each costs a Python call into the dispatcher per layer per step, where inductor compiles LoRA's
adapter into the graph.
"""

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--backend", default="inductor")
    args = p.parse_args()

    from paca import restore_base_weights
    from paca.bench.methods import make_trainee
    from paca.bench.presets import ModelSpec
    from paca.bench.suite import build_model, random_tokens

    torch.set_num_threads(1)
    base = build_model(ModelSpec("tiny"), torch.float32, torch.device("cpu"), seed=0)
    ids = random_tokens(512, 1, 32, seed=0, device=torch.device("cpu"))
    trainees = {m: make_trainee(m, base, 8, 16, 0) for m in ("floor", "paca", "lora")}
    compiled = {m: torch.compile(t.model, backend=args.backend) for m, t in trainees.items()}

    def forward_backward(method: str) -> float:
        start = time.perf_counter()
        compiled[method](input_ids=ids, labels=ids, use_cache=False).loss.backward()
        elapsed = time.perf_counter() - start
        for q in trainees[method].trainable_parameters:
            q.grad = None
        if method == "paca":
            restore_base_weights(trainees[method].model)  # the methods share the base weights
        return elapsed

    for method in compiled:
        start = time.perf_counter()
        forward_backward(method)
        forward_backward(method)
        print(f"{method}: compiled and two steps in {time.perf_counter() - start:.0f} s", flush=True)
    times = {m: [] for m in compiled}
    for _ in range(args.rounds):
        for method in compiled:
            times[method].append(forward_backward(method))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"compiled ({args.backend}) forward + backward, median of {args.rounds} interleaved rounds "
          f"(compiled floor {statistics.median(times['floor']) * 1e3:.2f} ms): PaCA {ratio('paca', 'floor'):.2f}x "
          f"the floor, LoRA {ratio('lora', 'floor'):.2f}x; PaCA {ratio('paca', 'lora'):.2f}x LoRA")


if __name__ == "__main__":
    main()
