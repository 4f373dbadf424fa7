"""What fig2 and profile train: every method resident on one shared base; and the token batch of every part
(table4 and fig3 build one method alone: ``fitting``)."""

from __future__ import annotations

import torch

from .methods import QUANTIZED, Trainee, make_trainee, quantized_copy
from .presets import build_model
from .results import Results
from .search import free_memory


def random_tokens(vocab: int, batch: int, seq: int, seed: int, device: torch.device) -> torch.Tensor:
    """The same token batch for every method (seeded, independent of the global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


def run_tokens(results: Results, batch: int, seq: int) -> torch.Tensor:
    """The run's token batch of ``batch x seq`` (its model's vocabulary, its seed and device)."""
    s = results.settings
    return random_tokens(results.vocab, batch, seq, s.seed, s.device)


def clear_grads(trainee: Trainee) -> None:
    for p in trainee.trainable_parameters:
        p.grad = None


class ResidentTrainees:
    """Every method of the run built beside the others on one shared base; a method whose step fails is dropped.

    Methods whose base weights are frozen share the base's tensors, so all fit on the device at once and their
    steps can be interleaved. ``by_method`` keeps the run's method order, less the methods dropped.
    """

    def __init__(self, results: Results):
        self.results = results
        self.by_method = self._build()

    def _build(self) -> dict[str, Trainee]:
        results, s = self.results, self.results.settings
        results.progress.update(f"building {s.model.name} on {s.device} in {str(s.dtype).removeprefix('torch.')}")
        base = build_model(s.model, s.dtype, s.device, s.seed)
        quantized = None
        trainees = {}
        for m in s.methods:
            if m in QUANTIZED and quantized is None:
                quantized = results.attempt(m, "quantizing the base model", quantized_copy, base, s.dtype)
                if quantized is None:
                    continue
            trainee = results.attempt(
                m,
                "building it beside the other methods (fig2 keeps them all resident)",
                make_trainee,
                m,
                base,
                s.r,
                s.alpha,
                s.seed,
                quantized,
                for_compile=s.compile_backend is not None,
            )
            if trainee is not None:
                trainees[m] = trainee
        return trainees

    def step(self, method: str, action, *args):
        """``action(trainee, *args)`` on ``method``'s trainee; a failure (out of memory included) drops the method
        from the part, recorded. None when it failed or the method is no longer resident."""
        if method not in self.by_method:
            return None
        s = self.results.settings
        trainee = self.by_method[method]
        result = self.results.attempt(
            method, f"at batch {s.batch} x {s.seq} tokens during fig2", action, trainee, *args
        )
        if result is None:
            clear_grads(self.by_method.pop(method))
            free_memory()
        return result

    def release(self) -> None:
        """Drop every trainee and return their memory (the next part builds its own)."""
        self.by_method = {}
        free_memory()
