"""PaCA on nn.Conv1d / Conv2d / Conv3d: ``r`` tuned input channels, every kernel tap of each (paper appendix B).

Grouped and depthwise convolutions tune local channels of every group. The operator: :func:`paca.ops.partial_conv`.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import partial_conv
from .layer import SingleWeightLayer


class Conv(SingleWeightLayer):
    """PaCA on nn.Conv1d / nn.Conv2d / nn.Conv3d with zero padding: ``D`` is ``C_out x r x *kernel``.

    Raises:
        ValueError: a padding mode other than zeros, or an asymmetric ``padding='same'``.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, layer_name: str, r: int, paca_alpha: float, **kwargs
    ) -> None:
        super().__init__(base_layer, layer_name)
        conv = self.get_base_layer()
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"module '{layer_name}': PaCA supports convolutions with zero padding, got "
                f"padding_mode='{conv.padding_mode}'."
            )
        self.padding = self._explicit_padding(conv, layer_name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, paca_alpha, **kwargs)

    @staticmethod
    def _explicit_padding(conv: nn.Module, layer_name: str) -> tuple[int, ...]:
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        if conv.padding == "same":
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(t % 2 for t in totals):
                raise ValueError(
                    f"module '{layer_name}': padding='same' with an even kernel is asymmetric; "
                    "PaCA supports symmetric padding only."
                )
            return tuple(t // 2 for t in totals)
        return tuple(conv.padding)

    def _partial_forward(self, x: Tensor, delta: Tensor, idx: Tensor, scale: float) -> Tensor:
        conv = self._modules["base_layer"]
        return partial_conv(
            self._autocast_input(x),
            conv.weight,
            conv.bias,
            delta,
            idx,
            scale,
            conv.stride,
            self.padding,
            conv.dilation,
            conv.groups,
            self._column_writer,
        )
