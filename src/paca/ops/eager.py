"""Eager calls of the operators' autograd Functions without ``Function.apply``'s Python wrapper.

``torch.autograd.Function.apply`` is a Python classmethod that, on every call, looks for a ``setup_context``, checks
for functorch transforms and unwraps dead functorch wrappers before it calls the C++ ``_FunctionBase.apply``; it
runs once per tuned layer per step, where a few microseconds are a visible share of a launch-bound step
(docs/BENCHMARKS.md). A PaCA layer's arguments are plain tensors, so outside functorch the C++ entry point does the
same work. Each operator calls its Function through :func:`eager_apply`: the public ``apply`` under torch.func
transforms or for a tensor left from one, the C++ entry point otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

functorch_active = torch._C._are_functorch_transforms_active
functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def c_apply(function: type[torch.autograd.Function]) -> Callable:
    """The C++ ``apply`` of ``function`` (its public ``apply`` on a torch without that entry point)."""
    base = getattr(torch._C, "_FunctionBase", None)
    raw = None if base is None else base.__dict__.get("apply")
    return function.apply if raw is None else raw.__get__(None, function)


def eager_apply(function: type[torch.autograd.Function]) -> Callable:
    """``apply(x, *args)`` of ``function`` in eager mode: through C++ unless torch.func is involved."""
    in_cpp = c_apply(function)

    def apply(x, *args):
        if functorch_active() or functorch_wrapped(x):
            return function.apply(x, *args)
        return in_cpp(x, *args)

    return apply
