"""The fine-tuning methods compared, each built from the same base model: model + optimizer.

    full   every weight trained (AdamW)
    lora   PEFT LoRA on the targeted layers          dora   PEFT DoRA (LoRA with use_dora=True)
    paca   PaCA on the targeted layers (paca's)    peft-paca  PEFT's own PaCA (peft >= 0.22), the same columns
    floor  every weight frozen, gradients flowing to the inputs only (no optimizer): the limit no PEFT
           step can beat, since any of them must at least run the forward and the input gradients
    qlora  LoRA on a 4-bit NF4 base (bitsandbytes)   qpaca  PaCA on a 4-bit NF4 base
    qpeft-paca  PEFT's PaCA on a 4-bit base (a dequantized copy of the weight per call)

Methods whose base weights are frozen share one copy of them (the tensors, not the modules), so several
methods fit side by side on one device for interleaved timing; ``full`` gets its own copy.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import BenchError

METHODS = ("full", "lora", "dora", "paca", "peft-paca", "floor", "qlora", "qpaca", "qpeft-paca")
QUANTIZED = ("qlora", "qpaca", "qpeft-paca")
PEFT_PACA = ("peft-paca", "qpeft-paca")  # PEFT's own PaCA: nn.Linear (and quantized linear) layers only


@dataclass
class Trainee:
    """A method ready to train: its model and optimizer (None for ``floor``)."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    compiled: nn.Module | None = None  # torch.compile(model) when fig2 times compiled steps (--compile)

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


class GradientSource:
    """The floor's embedding-output hook under torch.compile: ``out + z`` with ``z`` a zero leaf that requires grad
    (``out.requires_grad_()`` on a graph intermediate breaks the graph). Costs the compiled floor an add and a
    sum per step, which inductor fuses."""

    def __init__(self, model: nn.Module):
        weight = model.get_input_embeddings().weight
        self.zero = torch.zeros((), dtype=weight.dtype, device=weight.device, requires_grad=True)

    def __call__(self, module: nn.Module, args, out: Tensor) -> Tensor:
        return out + self.zero


def parse_methods(text: str) -> list[str]:
    """``"paca,lora"`` -> ``["paca", "lora"]``; raises BenchError naming an unknown method."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise BenchError(
            f"unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; choose from {', '.join(METHODS)}."
        )
    if len(set(names)) != len(names):
        raise BenchError(f"method listed twice in '{text}'.")
    return names


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameter and buffer tensors (no weight memory)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def quantized_copy(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose linear layers (not the output head) are bitsandbytes 4-bit NF4, as
    transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` loads them."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise BenchError("qlora and qpaca need bitsandbytes: pip install 'paca[quant]'.") from None
    quantized = sharing_copy(model)
    head = quantized.get_output_embeddings()
    device = next(model.parameters()).device
    for parent in list(quantized.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=False,
                quant_type="nf4",
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=False, module=layer
            )
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(device))  # .to quantizes
    quantized.is_loaded_in_4bit = True  # what transformers sets; PEFT dispatches its 4-bit LoRA layer on it
    return quantized


def peft_config(method: str, r: int, alpha: float, model: nn.Module | None = None, seed: int = 0):
    """The PEFT config of an adapter method (lora, dora, paca, peft-paca and their 4-bit forms) for ``model``.

    Every method tunes every linear layer but the output head and, in an MoE model, the fused experts and the
    routers: PaCA through all-linear, LoRA through its target_parameters, named here (PEFT's own all-linear
    conversion depends on the model type; gpt-oss's gets none). PEFT's own PaCA tunes nn.Linear layers only (not
    experts or routers); with the same ``random_seed`` it tunes the same columns as paca's there.
    """
    if method in ("paca", "qpaca"):
        from .. import PacaConfig

        return PacaConfig(r=r, paca_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM", random_seed=seed)
    if method in PEFT_PACA:
        from ..tuner.config import PeftPacaConfig

        if PeftPacaConfig is None:
            import peft

            raise BenchError(
                f"{method} is PEFT's own PaCA, which peft {peft.__version__} does not have (peft >= 0.22 "
                "does); run the other methods without it."
            )
        return PeftPacaConfig(
            r=r, paca_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM", random_seed=seed
        )
    from peft import LoraConfig

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        use_dora=method == "dora",
    )
    from ..tuner.experts import expert_projections
    from ..tuner.router import is_router

    modules = list(model.named_modules()) if model is not None else []
    parameters = [f"{name}.{p}" for name, m in modules for p in expert_projections(m)]
    parameters += [f"{name}.weight" for name, m in modules if is_router(m)]
    if parameters:
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        _maybe_include_all_linear_layers(config, model)
        config.target_parameters = parameters
    return config


def make_trainee(
    method: str,
    base: nn.Module,
    r: int,
    alpha: float,
    seed: int,
    quantized_base: nn.Module | None = None,
    for_compile: bool = False,
) -> Trainee:
    """Build ``method`` on ``base`` (left unchanged; frozen-weight methods share its tensors).

    ``quantized_base`` (from :func:`quantized_copy`) is used by qlora/qpaca; made here when not given.
    ``for_compile``: the model will run under torch.compile (the floor then gets its gradients another way).
    """
    torch.manual_seed(seed)  # adapter initialisation (LoRA's A) is random
    if method == "full":
        model = copy.deepcopy(base).requires_grad_(True)
        return Trainee(method, model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    if method == "floor":
        model = sharing_copy(base).requires_grad_(False)
        # Gradients flow from the loss down to the embedding output, through every layer.
        hook = GradientSource(base) if for_compile else (lambda module, args, out: out.requires_grad_(True))
        model.get_input_embeddings().register_forward_hook(hook)
        return Trainee(method, model, None)
    import peft

    from .. import PacaConfig  # noqa: F401  (registers PaCA with PEFT)

    if method in QUANTIZED:
        dtype = next(p for p in base.parameters() if p.is_floating_point()).dtype
        source = sharing_copy(quantized_base if quantized_base is not None else quantized_copy(base, dtype))
    else:
        source = sharing_copy(base)
    try:
        model = peft.get_peft_model(source, peft_config(method, r, alpha, source, seed))
    except (TypeError, ValueError, RuntimeError) as err:
        if method == "qpaca":
            raise BenchError(qpaca_unsupported(err)) from None
        raise
    if method == "qpaca":
        check_quantized_paca(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Trainee(method, model, torch.optim.AdamW(trainable, lr=1e-4))


def qpaca_unsupported(reason) -> str:
    return (
        "qpaca needs PaCA on bitsandbytes 4-bit layers, which this paca install does not support yet "
        f"({reason}); run the other methods without it."
    )


def check_quantized_paca(model: nn.Module) -> None:
    """Raise BenchError unless the PaCA layers over 4-bit layers compute what their base layer does.

    With the delta at zero a PaCA layer must reproduce its base layer; a PaCA layer that treats the packed
    4-bit weight as a dense matrix fails or differs here, before any timing.
    """
    from .. import PacaLayer

    layer = next((m for m in model.modules() if isinstance(m, PacaLayer)), None)
    if layer is None:
        raise BenchError(qpaca_unsupported("no PaCA layer was created"))
    base = layer.get_base_layer()
    dtype = getattr(base, "compute_dtype", None) or torch.float32
    device = next(layer.parameters()).device
    probe = torch.randn(
        2, base.in_features, dtype=dtype, device=device, generator=torch.Generator(device).manual_seed(0)
    )
    try:
        with torch.no_grad():
            expected, got = base(probe), layer(probe)
        same = got.shape == expected.shape and torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    except (RuntimeError, ValueError, TypeError) as err:
        raise BenchError(qpaca_unsupported(f"a PaCA layer over {type(base).__name__} failed: {err}")) from None
    if not same:
        raise BenchError(qpaca_unsupported(f"a PaCA layer over {type(base).__name__} does not reproduce it"))
