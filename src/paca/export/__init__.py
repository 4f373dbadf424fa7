"""`paca export`: a PaCA adapter as a merged transformers model or as an exact PEFT LoRA adapter.

A column delta is a rank-r product. With ``s = paca_alpha / r`` and ``e_j`` the j-th unit vector,

    W - W0 = s * D E^T,   E = [e_idx_1 ... e_idx_r]   (d_in x r)

so the LoRA adapter ``B = s * D`` (d_out x r), ``A = E^T`` (one-hot rows), ``lora_alpha = r`` (LoRA scaling 1)
reproduces it exactly (:mod:`.factors`). For a convolution the delta spans ``r * prod(kernel)`` (channel, tap)
pairs, so the LoRA rank there is ``r * prod(kernel)``. Fused MoE experts export in PEFT's ``target_parameters``
layout: one rank-r LoRA per expert of each projection.

- :mod:`.factors`  the LoRA factors of a column delta (pure maths)
- :mod:`.lora`     the PEFT LoRA adapter directory (:func:`export_lora`)
- :mod:`.merged`   the merged transformers model directory (:func:`export_merged`)
- :mod:`.output`   atomic output directories
- :mod:`.cli`      the `paca export` command
"""

from .cli import main
from .factors import expert_lora_factors, lora_factors
from .lora import export_lora
from .merged import export_merged

__all__ = ["export_lora", "export_merged", "expert_lora_factors", "lora_factors", "main"]
