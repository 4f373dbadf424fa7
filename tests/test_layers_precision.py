"""The PaCA layers' precision: 16-bit base weights with a float32 delta, and autocast.

Pinned: a bf16/fp16 base layer with an fp32 delta gives 16-bit outputs and input gradients and an fp32 delta
gradient, each close to the float64 reference, the base weight untouched; get_peft_model on a bf16 Llama keeps fp32
deltas and matches an fp32 model; under CPU autocast the output has the base layer's autocast dtype and the
gradients are fp32 and close to the reference; MPS autocast is seen though torch's any-autocast flag leaves it out.
"""

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model
from test_layers import LAYER_KINDS, dense_reference, make_layer, randomize_delta, reference_forward

from paca import PacaConfig
from paca.tuner import Linear as PacaLinear


def dense_reference_grads(layer, x, probe):
    """float64 (dL/dx, dL/dD) of ``loss = sum(y * probe)`` through the dense reference."""
    xr = x.detach().double().requires_grad_(True)
    d = layer.paca_delta["default"].detach().double().requires_grad_(True)
    base = layer.get_base_layer()
    shift = (d.t() if layer.column_axis == 0 else d) * layer.scaling["default"]
    w = (
        layer.state_dict()["base_layer.weight"]
        .detach()
        .double()
        .index_add(layer.column_axis, layer.paca_indices["default"], shift)
    )
    b = None if base.bias is None else base.bias.detach().double()
    (reference_forward(layer, xr, w, b) * probe.double()).sum().backward()
    return xr.grad, d.grad


def assert_close_at_16_bits(got, want):
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_16_bit_base_with_fp32_delta_matches_the_reference_and_grad_is_fp32(kind, dtype):
    """16-bit base layer, fp32 delta (as get_peft_model's autocast_adapter_dtype leaves it): 16-bit output and
    input gradient, fp32 delta gradient, each close to the float64 reference; base weight untouched."""
    layer, x = make_layer(kind, dtype=dtype)
    layer.paca_delta["default"] = torch.nn.Parameter(layer.paca_delta["default"].float())
    randomize_delta(layer)
    w = layer.get_base_layer().weight.detach().clone()
    x.requires_grad_(True)
    out = layer(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), dense_reference(layer, x), rtol=3e-2, atol=5e-2)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out.float() * probe).sum().backward()
    assert layer.paca_delta["default"].grad.dtype == torch.float32 and x.grad.dtype == dtype
    expected_x, expected_delta = dense_reference_grads(layer, x, probe)
    assert_close_at_16_bits(x.grad, expected_x)
    assert_close_at_16_bits(layer.paca_delta["default"].grad, expected_delta)
    assert torch.equal(layer.state_dict()["base_layer.weight"], w)


def test_bf16_model_through_get_peft_model_keeps_fp32_delta_and_matches_fp32_model(token_ids):
    """get_peft_model on a bf16 Llama: fp32 deltas; logits close to an fp32 model with the same weights."""
    model16 = get_peft_model(tiny_llama(dtype=torch.bfloat16), PacaConfig(r=4, target_modules="all-linear"))
    model32 = get_peft_model(tiny_llama(dtype=torch.bfloat16).float(), PacaConfig(r=4, target_modules="all-linear"))
    deltas = [p for n, p in model16.named_parameters() if "paca_delta" in n]
    assert deltas and all(p.dtype == torch.float32 and p.requires_grad for p in deltas)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (n16, p16), (_, p32) in zip(model16.named_parameters(), model32.named_parameters()):
            if "paca_delta" in n16:
                p16.copy_(torch.randn(p16.shape, generator=g) * 0.05)
                p32.copy_(p16)
    out16 = model16(token_ids, labels=token_ids)
    out32 = model32(token_ids, labels=token_ids)
    torch.testing.assert_close(out16.logits.float(), out32.logits, rtol=0.05, atol=0.05)
    out16.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in deltas)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_autocast_matches_base_layer_dtypes_and_reference(kind, dtype):
    """Under torch.autocast(cpu, bf16 or fp16) the output has the base layer's autocast dtype and is close to the
    reference; backward gives fp32 gradients close to the float64 reference's."""
    layer, x = make_layer(kind)
    randomize_delta(layer)
    layer.get_base_layer().bias.requires_grad_(True)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
        expected_dtype = layer.get_base_layer()(x).dtype
    assert out.dtype == expected_dtype == dtype
    torch.testing.assert_close(out.double(), dense_reference(layer, x), rtol=3e-2, atol=5e-2)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out.float() * probe).sum().backward()
    assert x.grad.dtype == torch.float32
    assert layer.paca_delta["default"].grad.dtype == torch.float32
    expected_x, expected_delta = dense_reference_grads(layer, x, probe)
    assert_close_at_16_bits(x.grad, expected_x)
    assert_close_at_16_bits(layer.paca_delta["default"].grad, expected_delta)
    assert layer.get_base_layer().bias.grad.dtype == torch.float32
    assert layer.get_base_layer().weight.dtype == torch.float32


def test_mps_autocast_is_seen_though_torch_s_any_autocast_flag_leaves_it_out():
    """torch._C._is_any_autocast_enabled() is False under MPS autocast alone: the layer asks MPS separately."""

    class MpsInput:  # what the layer reads of an input; this machine has no MPS device
        is_mps = True
        device = torch.device("mps")

        def to(self, dtype):
            return dtype

    enabled = torch.is_autocast_enabled("mps")
    torch.set_autocast_enabled("mps", True)
    try:
        assert PacaLinear._autocast_input(MpsInput()) == torch.get_autocast_dtype("mps")
    finally:
        torch.set_autocast_enabled("mps", enabled)
