"""Eager calls of the operators' autograd Functions without ``Function.apply``'s Python wrapper.

``torch.autograd.Function.apply`` is a Python classmethod that, on every call, binds default arguments, checks for
functorch transforms and unwraps dead functorch wrappers before it calls the C++ ``_FunctionBase.apply``. That is
~2.5 us per call on CPU, once per tuned layer per step: about as much as the column write's two operators. A PaCA
layer's arguments are plain tensors, so outside functorch transforms the C++ entry point does the same work.
"""

from __future__ import annotations

from typing import Callable

import torch

_FUNCTION_BASE = getattr(torch._C, "_FunctionBase", None)


def eager_apply(function: type[torch.autograd.Function]) -> Callable:
    """``function.apply``, entered through C++ when no functorch transform is active or involved."""
    raw = _FUNCTION_BASE.__dict__.get("apply") if _FUNCTION_BASE is not None else None
    if raw is None:  # a torch without the C++ entry point: the public one
        return function.apply
    c_apply = raw.__get__(None, function)
    transforms_active = torch._C._are_functorch_transforms_active
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor

    def apply(x, *args):
        if transforms_active() or wrapped(x):  # torch.func (vmap, grad, ...) or a tensor left from one
            return function.apply(x, *args)
        return c_apply(x, *args)

    return apply
