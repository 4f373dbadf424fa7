"""How the operators appear to torch.compile: one opaque ``paca::`` library op per operator and per backward.

Each family's eager autograd Function does not trace (it writes the frozen weight in place and keeps a per-layer
record), so under ``torch.compile`` a PaCA layer is one node of the graph, and its backward another. The ops are
defined with torch.library's low-level ``Library`` API, their schema inferred from the implementation's annotations
as ``torch.library.custom_op`` infers it: a compiled graph calls them once per layer per step, and ``custom_op``'s
Python wrapper around the dispatcher would add to every call. Their autograd is an autograd.Function around the
two ops (the forward's and the backward's), which dynamo traces into the graph; an autograd formula registered on
the op itself (``torch.library.register_autograd``) would run a Python autograd kernel around every compiled call.
What each choice cost is measured in docs/BENCHMARKS.md ("Compiled")::

    partial_linear_op = library_op("partial_linear", _kernel)
    torch.library.register_fake(partial_linear_op)(_fake)

    class CompiledPartialLinear(torch.autograd.Function):  # forward: save x[..., idx], call partial_linear_op;
        ...                                                 # backward: call partial_linear_backward_op
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("paca", "FRAGMENT")


def library_op(name: str, impl: Callable) -> torch._ops.OpOverload:
    """Define ``paca::name`` with ``impl``'s signature (no argument mutated, as far as the graph is concerned: the
    weight's tuned columns are the operator's own business) and ``impl`` as its kernel on every device."""
    _LIBRARY.define(name + torch.library.infer_schema(impl, mutates_args=()))
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    return getattr(torch.ops.paca, name).default
