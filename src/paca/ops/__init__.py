"""The algorithm: partial-connection layers as autograd-aware operators, one module per operator family.

Pure torch: nothing here imports peft or transformers (the tuner, :mod:`paca.tuner`, is the glue).

A PaCA layer with frozen weight ``W0`` (``d_out x d_in``), tuned input columns ``idx`` (``r`` of them)
and delta ``D`` (``d_out x r``) computes with the effective weight

    W = W0,  W[:, idx] = W0[:, idx] + s * D,   s = paca_alpha / r

    forward:   y      = x W^T + b                      (one matmul, no adapter branch)
    backward:  dL/dx  = g W
               dL/dD  = s * g^T x[..., idx]           (only x[..., idx] is kept for backward)

``W`` is never materialised as a second weight-sized tensor: the ``r`` tuned columns are written into the
frozen weight's storage (``O(d_out * r)``, next to the ``O(N * d_out * d_in)`` matmul) for a forward and its
backward, which writes ``W0``'s columns back (:mod:`paca.ops.columns`). Every forward reads the *current* ``D``,
however it was changed.

- :mod:`paca.ops.columns`  the column write, its record and restore
- :mod:`paca.ops.eager`    how the operators enter their autograd Functions in eager mode (C++, outside functorch)
- :mod:`paca.ops.compiled` how the operators appear to torch.compile (one opaque torch.library op each)
- :mod:`paca.ops.linear`   nn.Linear and GPT-2 Conv1D (autograd Function; torch.library ops under torch.compile)
- :mod:`paca.ops.conv`     nn.Conv1d/2d/3d, grouped and depthwise too (autograd Function; library ops)
- :mod:`paca.ops.experts`  fused MoE experts (3-D weights): per-expert columns, one matmul per expert block
- :mod:`paca.ops.quantized` the 4-bit (QPaCA) operator over bitsandbytes weights
"""

from .columns import ColumnWriter, put_columns, take_columns, write_into_copy
from .conv import partial_conv
from .experts import partial_experts_linear
from .linear import partial_linear
from .quantized import partial_linear_4bit

__all__ = [
    "ColumnWriter",
    "partial_conv",
    "partial_experts_linear",
    "partial_linear",
    "partial_linear_4bit",
    "put_columns",
    "take_columns",
    "write_into_copy",
]
