"""Where PaCA's step time goes in the launch-bound regime (tiny preset, batch 1 x 32, one thread).

    python benchmarks/launch_overhead.py [--rounds 150]

Runs one forward + backward of each variant per round, interleaved in a rotating order (as ``paca bench`` does),
and prints the median over rounds of each variant's time over the frozen floor's (the bench's ``f+b xfloor``), and
of its whole step (forward, backward, AdamW step on the trainable parameters) over PEFT LoRA's (the bench's
``step xLoRA``). The PaCA variants swap the operator every PaCA linear layer calls
(``paca.tuner.linear.partial_linear``), in the same model, and each runs the product's optimizer step (their
gradients have the same shapes):

    paca              the product
    paca, no PEFT     the same layers, the model called without PEFT's PeftModel wrapper
    required          a bare autograd Function doing only the algorithm's work, as the product does it: the
                      column write (ColumnWriter.write: an add and an index_copy_), x[..., idx], the matmul;
                      backward the input-gradient matmul, the delta-gradient addmm (alpha = scale) and the
                      restore of W0 (one index_copy_, PEFT's invariant between steps). No checks:
                      no autocast, compile or functorch dispatch, no rewrite after something restored the weight,
                      no saved-tensor version checks. Not correct in general; a lower bound for an eager Function.
    required - scale  the same, the delta gradient a plain mm (what applying the scale costs)
    required - write  the same without the column write (what the write costs; its outputs are wrong)
    required - restore  the same, the columns left written after backward (what keeping PEFT's invariant, W0
                      between steps, costs)
    peft-paca         PEFT's own PaCA (peft >= 0.22) on the same columns

The floor is the frozen model with gradients flowing to the embeddings' output (``paca bench``'s floor); lora is
PEFT LoRA r = 8 on the same layers (``paca bench``'s lora).
"""

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def bare_functions():
    """The control operators: autograd Functions with nothing but the listed work (see the module docstring)."""
    from paca.ops.eager import c_apply

    class Required(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, delta, idx, scale, columns, write, scaled, restored):
            w = columns.write(weight, delta, idx, scale) if write else weight
            ctx.w, ctx.x_selected, ctx.scale, ctx.scaled = w, x.index_select(-1, idx), scale, scaled
            ctx.columns, ctx.restored = columns, restored
            return F.linear(x, w, bias)

        @staticmethod
        def backward(ctx, grad):
            g = grad.reshape(-1, grad.shape[-1])
            xs = ctx.x_selected.reshape(-1, ctx.x_selected.shape[-1])
            if ctx.scaled:  # as the product computes it: its ignored input a cached broadcast zero
                grad_delta = torch.addmm(
                    ctx.columns.broadcast_zero(g, (g.shape[1], xs.shape[1])), g.t(), xs, beta=0, alpha=ctx.scale
                )
            else:
                grad_delta = g.t() @ xs
            grad_input = grad @ ctx.w
            if ctx.restored:
                ctx.columns.restore()
            return grad_input, None, None, grad_delta, None, None, None, None, None, None

    apply = c_apply(Required)

    def operator(write: bool, scaled: bool, restored: bool = True):
        def call(x, weight, bias, delta, idx, scale, transposed, columns):
            return apply(x, weight, bias, delta, idx, scale, columns, write, scaled, restored)

        return call

    return operator


def build_variants():
    """(variants, trainee by name, the product's operator, the PaCA model): every variant's model and operator
    (None: the model's own layers), on the tiny preset; the PaCA variants share one model."""
    import paca.tuner.linear as layer
    from paca.bench.methods import make_trainee
    from paca.bench.presets import ModelSpec
    from paca.bench.suite import build_model

    base = build_model(ModelSpec("tiny"), torch.float32, torch.device("cpu"), seed=0)
    floor = make_trainee("floor", base, 8, 16, 0).model
    trainees = {method: make_trainee(method, base, 8, 16, 0) for method in ("paca", "lora", "peft-paca")}
    paca_model = trainees["paca"].model
    if any(getattr(m, "is_transposed", False) for m in paca_model.modules()):
        raise SystemExit("the controls assume nn.Linear layers (no GPT-2 Conv1D)")
    product = layer.partial_linear
    operator = bare_functions()
    variants = {  # name -> (model, operator)
        "floor": (floor, None),
        "paca": (paca_model, product),
        "paca, no PEFT": (paca_model.base_model.model, product),
        "required": (paca_model, operator(write=True, scaled=True)),
        "required - scale": (paca_model, operator(write=True, scaled=False)),
        "required - write": (paca_model, operator(write=False, scaled=True)),
        "required - restore": (paca_model, operator(write=True, scaled=True, restored=False)),
        "peft-paca": (trainees["peft-paca"].model, None),
        "lora": (trainees["lora"].model, None),
    }
    return variants, trainees, product, paca_model


def stepper(variants: dict, trainees: dict, product, paca_model, ids):
    """``step(name)``: (forward + backward, optimizer step) seconds of one step of variant ``name``."""
    import paca.tuner.linear as layer
    from paca import restore_base_weights

    def step(name: str) -> tuple[float, float]:
        model, op = variants[name]
        if op is not None:
            layer.partial_linear = op
        try:
            start = time.perf_counter()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            elapsed = time.perf_counter() - start
        finally:
            layer.partial_linear = product
        if name == "floor":  # no optimizer
            return elapsed, 0.0
        trainee = trainees.get(name, trainees["paca"])  # every PaCA variant steps the product's optimizer
        start = time.perf_counter()
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
        optimizer_s = time.perf_counter() - start
        restore_base_weights(
            paca_model
        )  # after "required - restore": every variant starts from the pretrained weights
        return elapsed, optimizer_s

    return step


def report(times: dict, rounds: int) -> None:
    """Print the medians over rounds: forward + backward over the floor's, whole step over LoRA's and PEFT's PaCA's."""

    def ms(seconds):
        return statistics.median(seconds) * 1e3

    print(
        f"median of {rounds} interleaved rounds: floor forward + backward "
        f"{ms(f for f, _ in times['floor']):.2f} ms, AdamW step paca {ms(o for _, o in times['paca']):.2f} ms, "
        f"lora {ms(o for _, o in times['lora']):.2f} ms"
    )
    print(f"  {'':18s} {'f+b xfloor':>10s} {'step xLoRA':>10s} {'step xPEFT-PaCA':>15s}")

    def step_ratio(variant_rounds, reference):
        return statistics.median((f + o) / (rf + ro) for (f, o), (rf, ro) in zip(variant_rounds, times[reference]))

    for name, variant_rounds in times.items():
        fb = statistics.median(f / floor_f for (f, _), (floor_f, _) in zip(variant_rounds, times["floor"]))
        print(
            f"  {name:18s} {fb:9.3f}x {step_ratio(variant_rounds, 'lora'):9.3f}x "
            f"{step_ratio(variant_rounds, 'peft-paca'):14.3f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=150)
    args = p.parse_args()

    from paca.bench.suite import random_tokens

    torch.set_num_threads(1)
    variants, trainees, product, paca_model = build_variants()
    ids = random_tokens(512, 1, 32, seed=0, device=torch.device("cpu"))
    step = stepper(variants, trainees, product, paca_model, ids)
    for name in variants:  # warm-up: PaCA's first call copies the pretrained columns, AdamW makes its state
        step(name)
    times = {name: [] for name in variants}  # (forward + backward, optimizer) per round
    names = list(variants)
    for k in range(args.rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:  # each variant after a different one each round
            times[name].append(step(name))
    report(times, args.rounds)


if __name__ == "__main__":
    main()
