"""How the operators appear to torch.compile: one opaque ``paca::`` library op per operator and per backward.

Each family's eager autograd Function does not trace (it writes the frozen weight in place and keeps a per-layer
record), so under ``torch.compile`` a PaCA layer is one node of the graph, and its backward another. The ops are
defined with torch.library's low-level ``Library`` API, their schema inferred from the implementation's annotations
as ``torch.library.custom_op`` infers it: a compiled graph calls them once per layer per step, and
``custom_op``'s Python wrapper around the dispatcher costs ~6 us more per call (timed on CPU: 22 vs 28 us for a
call whose work takes 13 us). In the launch-bound tiny model compiled with inductor that took PaCA's forward +
backward from 1.35x-1.49x compiled LoRA's to 1.20x-1.23x (docs/BENCHMARKS.md). The fake (shape) function and the
autograd formula are registered with ``torch.library.register_fake`` / ``register_autograd`` on the op, as for a
custom op::

    partial_linear_op = library_op("partial_linear", _impl)
    torch.library.register_fake(partial_linear_op)(_fake)
    torch.library.register_autograd(partial_linear_op, _backward, setup_context=_setup)
"""

from __future__ import annotations

from typing import Callable

import torch

_LIBRARY = torch.library.Library("paca", "FRAGMENT")


def library_op(name: str, impl: Callable) -> torch._ops.OpOverload:
    """Define ``paca::name`` with ``impl``'s signature (no argument mutated, as far as the graph is concerned: the
    weight's tuned columns are the operator's own business) and ``impl`` as its kernel on every device."""
    _LIBRARY.define(name + torch.library.infer_schema(impl, mutates_args=()))
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    return getattr(torch.ops.paca, name).default
