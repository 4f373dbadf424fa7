"""One training step, timed by phase, and the byte and FLOP accounting of a step.

Time: forward | backward | optimizer, by ``time.perf_counter`` on CPU and CUDA events on GPU (the
device is synchronised before a step starts and when it ends).
Memory: bytes of tensors saved for backward (distinct storages, model state excluded), counted by
``torch.autograd.graph.saved_tensors_hooks``; parameter, gradient and optimizer-state bytes (distinct
storages); on CUDA the allocator's peak during the step; on Linux the process's peak RSS.
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one step (forward and backward matmuls and
attention; elementwise work and the optimizer are not counted), taught the PaCA operators and CPU
flash attention, which it does not know (``flops``).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .flops import flop_formulas
from .methods import Trainee


@dataclass
class StepRecord:
    """Durations of one step's phases; on CUDA the allocator's peak during the step, absolute and on top
    of what was allocated when it started."""

    forward_s: float
    backward_s: float
    optimizer_s: float
    transient_peak_bytes: int | None = None
    peak_allocated_bytes: int | None = None

    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s

    @property
    def forward_backward_s(self) -> float:
        """The step without the optimizer: what the floor (no optimizer) is compared on."""
        return self.forward_s + self.backward_s


class PhaseClock:
    """Marks phase boundaries: host clock on CPU, CUDA events on GPU (read after one final sync)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self) -> None:
        self.marks = []
        if self.cuda:
            torch.cuda.synchronize()
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def autocast(device: torch.device, dtype: torch.dtype):
    """16-bit mixed precision as in the paper (adapters kept in fp32 compute in 16 bits); fp32: nothing."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(
    trainee: Trainee,
    input_ids: Tensor,
    dtype: torch.dtype,
    during=None,
    after_backward: Callable[[], None] | None = None,
    compiled: bool = True,
) -> StepRecord:
    """Forward (loss on the batch itself as labels), backward, AdamW step and zeroing of the gradients.

    ``during`` is a context entered around forward and backward; ``after_backward`` runs between backward
    and the optimizer step, off the clock. ``compiled``: run ``trainee.compiled`` where there is one.
    """
    model = trainee.compiled if compiled and trainee.compiled is not None else trainee.model
    device = input_ids.device
    clock = PhaseClock(device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(device)
        found = torch.cuda.memory_allocated(device)
    clock.start()
    with during or contextlib.nullcontext():
        with autocast(device, dtype):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        clock.mark()
        loss.backward()
    clock.mark()
    del loss
    if after_backward is not None:
        after_backward()
    clock.mark()
    if trainee.optimizer is not None:
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
    clock.mark()
    forward_s, backward_s, _, optimizer_s = clock.durations()
    peak = torch.cuda.max_memory_allocated(device) if clock.cuda else None
    return StepRecord(forward_s, backward_s, optimizer_s, None if peak is None else peak - found, peak)


# ----------------------------------------------------------------------------------------------------
# Bytes
# ----------------------------------------------------------------------------------------------------


def _storage_key(t: Tensor) -> tuple | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested, fake)
        return None
    return (t.device, storage.data_ptr()) if storage.data_ptr() else None


def distinct_storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats count once)."""
    sizes = {}
    for t in tensors:
        key = _storage_key(t)
        if key is not None:
            sizes[key] = t.untyped_storage().nbytes()
    return sum(sizes.values())


def model_state_tensors(model: nn.Module) -> list[Tensor]:
    """Parameters, buffers and the quantization state of 4-bit weights (their scales)."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            tensors += [v for v in vars(state).values() if isinstance(v, Tensor)]
            state = getattr(state, "state2", None)
    return tensors


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    return distinct_storage_bytes(
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)
    )


class SavedTensorBytes:
    """Context counting the bytes of distinct storages saved for backward, ``exclude`` (model state) left out.

    A saved view keeps its whole storage alive, so the storage's size is what is counted.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self.excluded = {k for k in map(_storage_key, exclude) if k is not None}
        self.sizes: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is not None and key not in self.excluded:
            self.sizes[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The process's peak RSS since the last reset (Linux VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------------
# Dispatched operators
# ----------------------------------------------------------------------------------------------------

# Not counted: ops that only allocate or relabel memory and launch no kernel on a GPU.
_NO_KERNEL = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "detach",
        "alias",
        "lift_fresh",
        "_unsafe_view",
        "_reshape_alias",
    }
)


class DispatchedOperators(TorchDispatchMode):
    """Counts the aten compute operators a region dispatches (views, detach and bare allocations excluded).

    Each one is a kernel launch on a GPU, so in the launch-bound regime (small batches, many layers) this
    count, not the FLOPs, sets the step time. Deterministic for a given model, input shape and torch version.
    """

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ----------------------------------------------------------------------------------------------------
# The accounting step
# ----------------------------------------------------------------------------------------------------


@dataclass
class Accounting:
    """What one step of a method holds and computes (a step of its own, not one of the timed ones)."""

    flops: int
    activation_bytes: int  # saved for backward, model state excluded
    param_bytes: int  # parameters, buffers, 4-bit scales (shared base weights counted: the method needs them)
    grad_bytes: int
    optimizer_state_bytes: int
    trainable_params: int
    dispatched_ops: int | None  # aten compute operators of forward + backward; None when not counted
    process_peak_rss_bytes: int | None
    transient_peak_bytes: int | None  # CUDA: allocator peak during the step minus what was allocated before
    peak_allocated_bytes: int | None  # CUDA: allocator peak during the step (everything resident)
    device_kernels: int | None = None  # CUDA: kernels, copies and fills of forward + backward (torch.profiler)

    @property
    def accounted_bytes(self) -> int:
        """Parameters + gradients + optimizer state + activations: the CPU's peak-memory figure."""
        return self.param_bytes + self.grad_bytes + self.optimizer_state_bytes + self.activation_bytes


def accounting_step(trainee: Trainee, input_ids: Tensor, dtype: torch.dtype, count_flops: bool = True) -> Accounting:
    """Run one training step of ``trainee`` that counts saved, gradient and state bytes, and with ``count_flops``
    its FLOPs and dispatched operators (the memory searches leave both out: per-operator Python they do not need)."""
    from torch.utils.flop_counter import FlopCounterMode

    state = model_state_tensors(trainee.model)
    saved = SavedTensorBytes(exclude=state)
    flops = FlopCounterMode(display=False, custom_mapping=flop_formulas()) if count_flops else None
    operators = DispatchedOperators() if count_flops else None
    grads: list[int] = []

    def after_backward():
        grads.append(distinct_storage_bytes(p.grad for p in trainee.trainable_parameters if p.grad is not None))

    during = contextlib.ExitStack()
    during.enter_context(saved)
    if flops is not None:
        during.enter_context(flops)
    if operators is not None:
        during.enter_context(operators)  # innermost: it sees each operator once, as the device runs it
    rss_reset = reset_peak_rss()
    # Eager even when fig2 times compiled steps: the counting modes and hooks see each eager operator.
    record = train_step(trainee, input_ids, dtype, during=during, after_backward=after_backward, compiled=False)
    return Accounting(
        flops=flops.get_total_flops() if flops is not None else 0,
        activation_bytes=saved.bytes,
        param_bytes=distinct_storage_bytes(state),
        grad_bytes=grads[0],
        optimizer_state_bytes=optimizer_state_bytes(trainee.optimizer),
        trainable_params=sum(p.numel() for p in trainee.trainable_parameters),
        dispatched_ops=operators.total if operators is not None else None,
        process_peak_rss_bytes=peak_rss_bytes() if rss_reset else None,
        transient_peak_bytes=record.transient_peak_bytes,
        peak_allocated_bytes=record.peak_allocated_bytes,
    )
