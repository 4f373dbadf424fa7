"""PaCA layers on a CUDA device (skipped without one): fp32 and bf16 against the float64 CPU reference, the
delta gradient as one addmm, the base weight read back as pretrained. Run them on a GPU with
``pytest tests/test_cuda.py``.
"""

import pytest
import torch
from test_columns import reference_grads
from test_layers import LAYER_KINDS, dense_reference, make_layer, randomize_delta

from paca.bench.measure import DispatchedOperators, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_cuda_layer_matches_the_float64_reference_forward_and_backward(kind, dtype):
    layer, x = make_layer(kind, dtype=torch.float64)
    randomize_delta(layer)
    w0 = layer.state_dict()["base_layer.weight"].clone()
    expected_out = dense_reference(layer, x)
    expected_x, expected_delta = reference_grads(layer, x)
    layer.to("cuda", dtype)
    layer.paca_delta["default"].data = layer.paca_delta["default"].data.float()  # fp32 delta, as PEFT keeps it
    xc = x.to("cuda", dtype).requires_grad_(True)
    for _ in range(2):  # the second step runs on columns already written
        layer.zero_grad()
        xc.grad = None
        out = layer(xc)
        out.float().square().sum().backward()
    tol = TOLERANCE[dtype]
    scale = expected_out.abs().max().item()
    torch.testing.assert_close(out.double().cpu(), expected_out, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(xc.grad.double().cpu(), expected_x, rtol=tol, atol=tol * expected_x.abs().max().item())
    grad_delta = layer.paca_delta["default"].grad
    assert grad_delta.dtype == torch.float32
    torch.testing.assert_close(
        grad_delta.double().cpu(), expected_delta, rtol=tol, atol=tol * expected_delta.abs().max().item()
    )
    assert torch.equal(layer.state_dict()["base_layer.weight"].cpu(), w0.to(dtype))


def test_cuda_delta_gradient_is_one_addmm_and_backward_writes_nothing():
    layer, x = make_layer("linear")
    layer.to("cuda")
    randomize_delta(layer)
    x = x.cuda().requires_grad_(True)
    layer(x)
    y = layer(x)
    with DispatchedOperators() as ops:
        y.square().sum().backward()
    counts = dict(ops.counts)
    assert counts.get("addmm") == 1 and "clone" not in counts and "index_copy_" not in counts, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_cuda_experts_match_the_float64_reference_with_grouped_gemms(kind, dtype, monkeypatch):
    """Fused experts on CUDA: outputs and gradients against the float64 CPU reference, every product one grouped
    GEMM (r = 8: the r-channel operand's rows are 16 bytes in bf16)."""
    import copy

    from test_experts import experts_module, routing

    import paca.ops.experts as ops
    from paca.tuner.experts import Experts

    layer = Experts(experts_module(kind).double(), "default", "mlp.experts", r=8, paca_alpha=16.0, init_weights=False)
    hidden, index, weights = routing(dtype=torch.float64)
    probe = torch.randn_like(hidden)
    reference = copy.deepcopy(layer)
    h = hidden.clone().requires_grad_()
    (reference(h, index, weights) * probe).sum().backward()
    expected = [
        reference(hidden, index, weights).detach(),
        h.grad,
        *(d.grad for d in reference.paca_delta["default"].values()),
    ]
    layer.to("cuda", dtype)
    for d in layer.paca_delta["default"].values():
        d.data = d.data.float()
    calls = []
    grouped_mm = ops.F.grouped_mm
    monkeypatch.setattr(ops.F, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    hc = hidden.to("cuda", dtype).requires_grad_()
    out = layer(hc, index.cuda(), weights.to("cuda", dtype))
    (out.float() * probe.cuda()).sum().backward()
    assert len(calls) == 6
    got = [out, hc.grad, *(d.grad for d in layer.paca_delta["default"].values())]
    tol = TOLERANCE[dtype]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double().cpu(), b, rtol=tol, atol=tol * b.abs().max().item())


def test_cuda_kernels_per_step_stay_within_five_per_tuned_layer_and_below_lora():
    """What the dispatched-operator budget stands for, read from the device: the kernels (copies and fills
    included) one forward + backward launches, by torch.profiler. On CUDA PaCA's write is two kernels (an add and an
    index_copy_: CUDA's index_add_ would round s * D first and differ from PEFT's PaCA in the last bit), then
    x[..., idx], the delta-gradient addmm and the restore of W0: no more than the floor's + 5 per tuned layer,
    fewer than LoRA's."""
    from test_bench import TINY_TUNED_LAYERS

    from paca.bench.methods import make_trainee
    from paca.bench.presets import ModelSpec, build_model
    from paca.bench.profile import device_kernels_per_step
    from paca.bench.suite import random_tokens

    device = torch.device("cuda")
    base = build_model(ModelSpec("tiny"), torch.float32, device, seed=0)
    ids = random_tokens(512, 2, 16, seed=0, device=device)
    kernels = {}
    for method in ("floor", "paca", "lora"):
        trainee = make_trainee(method, base, 8, 16, 0)
        train_step(trainee, ids, torch.float32)  # warm-up: PaCA's first step copies the pretrained columns
        counts = [device_kernels_per_step(trainee, ids, torch.float32) for _ in range(2)]
        assert counts[0] is not None and counts[0] == counts[1], (method, counts)
        kernels[method] = counts[0]
    assert kernels["paca"] <= kernels["floor"] + 5 * TINY_TUNED_LAYERS, kernels
    assert kernels["paca"] < kernels["lora"], kernels
