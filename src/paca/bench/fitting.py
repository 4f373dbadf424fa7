"""Whether one step of a method, alone on the device, fits under the memory cap: the probe of table4 and fig3.

On CUDA ``--memory-cap-gib`` limits the allocator (set_per_process_memory_fraction), so a step over the cap runs
out of memory as it would on the smaller card. The CPU has no allocator to cap and a real out-of-memory kills the
process: there a size is out of memory when its accounted bytes (parameters, gradients, optimizer state,
activations) exceed the cap.
"""

from __future__ import annotations

import torch

from .measure import accounting_step
from .methods import Trainee
from .presets import device_memory_bytes
from .results import Results
from .search import Probe
from .settings import Settings
from .trainees import clear_grads, run_tokens


def apply_memory_cap(settings: Settings) -> None:
    """Cap the CUDA allocator at ``--memory-cap-gib`` (nothing to do on CPU or without a cap)."""
    s = settings
    if s.memory_cap_bytes is not None and s.device.type == "cuda":
        fraction = s.memory_cap_bytes / device_memory_bytes(s.device)
        torch.cuda.set_per_process_memory_fraction(fraction, s.device)


def fits(results: Results, trainee: Trainee, batch: int, seq: int, size: int) -> Probe:
    """One step at ``batch x seq`` (``size`` is the one searched); on CPU a step whose accounted bytes exceed the
    cap does not fit."""
    s = results.settings
    try:
        account = accounting_step(trainee, run_tokens(results, batch, seq), s.dtype, count_flops=False)
    finally:
        clear_grads(trainee)
    # Alone on the device, the allocator's peak is the method's whole footprint (CPU: accounted bytes).
    memory = account.peak_allocated_bytes if s.device.type == "cuda" else account.accounted_bytes
    if s.device.type == "cpu" and memory > s.memory_cap_bytes:
        return Probe(size, fits=False, memory_bytes=memory, note="accounted bytes over the cap")
    return Probe(size, fits=True, memory_bytes=memory)
