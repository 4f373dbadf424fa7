"""PaCA on MoE routers (paca.tuner.router), and the MoE modules PaCA refuses.

Pinned: a router's own forward runs with its logits from W0 + s * D (Mixtral: F.linear on the weight; gpt-oss:
with a bias; DeepSeek-V3: on a float32 cast of it, also of a 16-bit weight) and its outputs and delta gradient equal
a dense float64 reference; torch.compile(fullgraph=True) of a router matches eager; a router computing its logits
other than by F.linear on its weight, and experts outside transformers' experts interface, are refused by name.
"""

import copy

import pytest
import torch
from peft import get_peft_model
from test_experts import TOKENS, R
from test_experts_models import tiny_moe
from torch import nn

from paca import PacaConfig
from paca.tuner.router import Router


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_router_logits_and_gradients_equal_the_dense_reference_in_float64(kind):
    """The router's own forward runs with its logits from W0 + s * D (Mixtral: F.linear on the weight; gpt-oss:
    with a bias; DeepSeek-V3: on a float32 cast of it); outputs and the delta gradient equal the dense reference."""
    model = tiny_moe(kind).double()
    router = next(
        m
        for n, m in model.named_modules()
        if n.endswith("mlp.router" if kind == "gpt_oss" else "mlp.gate")
        and not isinstance(m, nn.Linear)
        and hasattr(m, "weight")
    )
    w0 = router.weight.detach().clone()
    layer = Router(router, "default", "gate", r=R, paca_alpha=2 * R, init_weights=False, seed=3)
    reference = copy.deepcopy(router)
    with torch.no_grad():
        reference.weight.add_(layer.get_delta_weight("default"))
    hidden = torch.randn(
        TOKENS, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    outputs, grads = [], []
    for module in (layer, reference):
        x = hidden.clone().requires_grad_()
        out = module(x)
        logits = out[0]
        (logits * torch.arange(logits.numel(), dtype=logits.dtype).view_as(logits).cos()).sum().backward()
        outputs.append(out)
        grads.append(x.grad)
    tol = dict(rtol=1e-5, atol=1e-6) if kind == "deepseek_v3" else dict(rtol=1e-10, atol=1e-10)  # its fp32 logits
    for got, want in zip(outputs[0], outputs[1]):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
    idx = layer.paca_indices["default"]
    expected = layer.scaling["default"] * reference.weight.grad[:, idx]
    torch.testing.assert_close(layer.paca_delta["default"].grad, expected, **tol)
    assert torch.equal(layer.state_dict()["base_layer.weight"], w0)
    layer.enable_adapters(False)  # after a forward (its columns written): the base router's outputs, exactly
    base = copy.deepcopy(router)
    with torch.no_grad():
        base.weight.copy_(w0)
    for got, want in zip(layer(hidden), base(hidden)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_router_casting_its_16_bit_weight_to_float32_is_still_tuned(token_ids):
    """DeepSeek-V3's router computes F.linear on ``self.weight.type(torch.float32)``: in bf16 that is a copy, which
    the router layer recognises as its weight, so the delta applies and gets a gradient."""
    model = get_peft_model(
        tiny_moe("deepseek_v3").to(torch.bfloat16), PacaConfig(r=4, target_modules=["mlp.gate"], init_weights=False)
    )
    router = next(m for m in model.modules() if isinstance(m, Router))
    model(token_ids).logits.float().sum().backward()
    assert router.paca_delta["default"].grad.abs().sum() > 0


def test_torch_compile_fullgraph_of_a_router_matches_eager():
    layer = Router(
        tiny_moe("mixtral").model.layers[0].mlp.gate, "default", "gate", r=3, paca_alpha=6.0, init_weights=False
    )
    hidden = torch.randn(TOKENS, 32, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        for module in (layer, compiled):
            layer.zero_grad()
            module(hidden)[0].square().sum().backward()
            if module is layer:
                expected_out, expected_grad = layer(hidden)[0], layer.paca_delta["default"].grad.clone()
        torch.testing.assert_close(compiled(hidden)[0], expected_out)
        torch.testing.assert_close(layer.paca_delta["default"].grad, expected_grad)
    finally:
        torch._dynamo.reset()


def test_a_router_computing_its_logits_otherwise_is_refused_by_name():
    class MatmulRouter(nn.Module):  # logits by a matmul, not F.linear: its delta would be ignored
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return x @ self.weight.t()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = MatmulRouter()

    with pytest.raises(
        TypeError,
        match=r"cannot tune router 'router' \(MatmulRouter\): its forward does not compute "
        r"its logits as F\.linear on its weight",
    ):
        get_peft_model(Block(), PacaConfig(r=2, target_modules=["router"]))


def test_experts_outside_the_transformers_interface_are_refused_by_name():
    class LoopedExperts(nn.Module):  # fused weights, its own forward (as Llama 4's experts)
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = LoopedExperts()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(TypeError, match=r"module 'experts'.*outside transformers' experts interface"):
        get_peft_model(Block(), PacaConfig(r=2, target_modules=["experts"]))
