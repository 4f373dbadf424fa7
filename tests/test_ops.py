"""The operators of paca.ops against a plain-PyTorch dense reference (float64).

Reference: the effective weight ``W = W0`` with ``W[:, idx] = W0[:, idx] + s * D``, used in an ordinary
dense layer. The operators must give the same output, the same input gradient and ``s * dW[:, idx]``
as the gradient of ``D``; the frozen weight gets no gradient and is left bit for bit as it was; and
only ``x[..., idx]`` is kept for backward.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from paca.ops import partial_conv, partial_linear

SCALE = 1.75


def _idx(d_in, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(d_in, generator=g)[:r].sort().values


def _randn(*shape, seed, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def effective_weight(w0, delta, idx, scale, column_axis):
    """Dense reference weight: ``w0`` with channels ``idx`` (along ``column_axis``) shifted by ``scale * delta``."""
    return w0.index_copy(column_axis, idx, w0.index_select(column_axis, idx) + scale * delta)


def linear_case(shape_x, d_in=10, d_out=7, r=3, bias=True, transposed=False, seed=0):
    x = _randn(*shape_x, d_in, seed=seed, requires_grad=True)
    w0 = _randn(*((d_in, d_out) if transposed else (d_out, d_in)), seed=seed + 1)
    b = _randn(d_out, seed=seed + 2, requires_grad=True) if bias else None
    delta = _randn(d_out, r, seed=seed + 3, requires_grad=True)
    return x, w0, b, delta, _idx(d_in, r, seed)


# ----------------------------------------------------------------------------------------------------
# gradcheck
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape_x", [(2, 3), (4,)], ids=["3d_input", "2d_input"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "gpt2_conv1d"])
def test_partial_linear_passes_gradcheck(shape_x, bias, transposed):
    """float64 gradcheck of the linear operator w.r.t. input, delta and (trainable) bias."""
    x, w0, b, delta, idx = linear_case(shape_x, bias=bias, transposed=transposed)
    inputs = (x, w0, b, delta, idx, SCALE, transposed)
    assert gradcheck(partial_linear, inputs, eps=1e-6, atol=1e-8)


CONV_VARIANTS = [
    dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1)),
    dict(stride=(2, 1), padding=(1, 1), dilation=(1, 1)),
    dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    dict(stride=(2, 2), padding=(0, 2), dilation=(1, 2)),
]


def conv_case(bias=True, c_in=5, c_out=4, r=2, kernel=(3, 2), seed=0):
    x = _randn(2, c_in, 7, 6, seed=seed, requires_grad=True)
    w0 = _randn(c_out, c_in, *kernel, seed=seed + 1)
    b = _randn(c_out, seed=seed + 2, requires_grad=True) if bias else None
    delta = _randn(c_out, r, *kernel, seed=seed + 3, requires_grad=True)
    return x, w0, b, delta, _idx(c_in, r, seed)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("conv", CONV_VARIANTS, ids=lambda c: "s{stride}p{padding}d{dilation}".format(**c))
def test_partial_conv_passes_gradcheck(conv, bias):
    """float64 gradcheck of the Conv2d operator over stride / padding / dilation variants."""
    x, w0, b, delta, idx = conv_case(bias=bias)
    inputs = (x, w0, b, delta, idx, SCALE, conv["stride"], conv["padding"], conv["dilation"])
    assert gradcheck(partial_conv, inputs, eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------------
# against the dense reference
# ----------------------------------------------------------------------------------------------------


def _check_against_reference(run_op, run_dense, x, w0, b, delta, idx):
    """Output, grad_x, grad_b, grad_D of the operator equal the dense reference; W0 untouched, no grad."""
    w0_before = w0.detach().clone()
    w0.requires_grad_(True)  # even when asked for, the frozen weight must receive no gradient
    y = run_op(x, w0, b, delta)
    upstream = _randn(*y.shape, seed=99)
    y.backward(upstream)
    assert w0.grad is None
    assert torch.equal(w0.detach(), w0_before)

    xr = x.detach().clone().requires_grad_(True)
    br = None if b is None else b.detach().clone().requires_grad_(True)
    w_eff = effective_weight(w0_before, delta.detach(), idx, SCALE, 1).requires_grad_(True)
    yr = run_dense(xr, w_eff, br)
    yr.backward(upstream)

    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta.grad, SCALE * w_eff.grad.index_select(1, idx), rtol=1e-12, atol=1e-12)
    if b is not None:
        torch.testing.assert_close(b.grad, br.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape_x", [(2, 3), (4,), (2, 2, 3)], ids=["3d_input", "2d_input", "4d_input"])
def test_partial_linear_matches_dense_reference(shape_x, bias):
    """nn.Linear layout: y, dL/dx, dL/db equal the dense layer's; dL/dD = s * dL/dW[:, idx]; W0 gets nothing."""
    x, w0, b, delta, idx = linear_case(shape_x, bias=bias)
    _check_against_reference(
        lambda x, w, b, d: partial_linear(x, w, b, d, idx, SCALE, False),
        lambda x, w, b: F.linear(x, w, b),
        x,
        w0,
        b,
        delta,
        idx,
    )


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape_x", [(2, 3), (4,)], ids=["3d_input", "2d_input"])
def test_partial_linear_transposed_matches_gpt2_conv1d_reference(shape_x, bias):
    """GPT-2 Conv1D layout (W stored d_in x d_out, y = x W + b): same reference, delta kept (d_out, r)."""
    x, w0, b, delta, idx = linear_case(shape_x, bias=bias, transposed=True)
    # delta is (d_out, r); in the (d_in, d_out) layout its columns are delta.t()
    w0_before = w0.clone()
    w0.requires_grad_(True)
    y = partial_linear(x, w0, b, delta, idx, SCALE, True)
    upstream = _randn(*y.shape, seed=99)
    y.backward(upstream)
    assert w0.grad is None and torch.equal(w0.detach(), w0_before)

    xr = x.detach().clone().requires_grad_(True)
    w_eff = effective_weight(w0_before, delta.detach().t(), idx, SCALE, 0).requires_grad_(True)
    yr = xr @ w_eff + (0 if b is None else b.detach())
    yr.backward(upstream)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta.grad, SCALE * w_eff.grad[idx].t(), rtol=1e-12, atol=1e-12)
    if b is not None:
        torch.testing.assert_close(b.grad, upstream.reshape(-1, upstream.shape[-1]).sum(0))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("conv", CONV_VARIANTS, ids=lambda c: "s{stride}p{padding}d{dilation}".format(**c))
def test_partial_conv_matches_dense_reference(conv, bias):
    """Conv2d: y, dL/dx, dL/db equal F.conv2d with the effective weight; dL/dD = s * dL/dW[:, idx]."""
    x, w0, b, delta, idx = conv_case(bias=bias)
    args = (conv["stride"], conv["padding"], conv["dilation"])
    _check_against_reference(
        lambda x, w, b, d: partial_conv(x, w, b, d, idx, SCALE, *args),
        lambda x, w, b: F.conv2d(x, w, b, *args),
        x,
        w0,
        b,
        delta,
        idx,
    )


def test_under_torch_func_transforms_the_operator_takes_the_public_function_apply():
    """Outside torch.func the eager operator enters its autograd Function through C++ (paca.ops.eager); under a
    transform it goes through Function.apply, which refuses a Function without setup_context, as before."""
    weight, delta, idx = torch.randn(5, 6), torch.randn(5, 2, requires_grad=True), torch.tensor([1, 4])
    x = torch.randn(3, 6, requires_grad=True)
    partial_linear(x, weight, None, delta, idx, 0.5).sum().backward()  # eager: the C++ entry point
    assert x.grad is not None and delta.grad is not None
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda v: partial_linear(v, weight, None, delta, idx, 0.5).sum())(x.detach())


def test_the_eager_operator_does_not_go_through_function_apply_s_python_wrapper(monkeypatch):
    """~2.5 us per layer call (paca.ops.eager): the training step enters the Function through C++."""
    import paca.ops.linear

    def refused(*args):
        raise AssertionError("Function.apply's Python wrapper was called")

    monkeypatch.setattr(paca.ops.linear.PartialLinearFunction, "apply", refused)
    weight, delta, idx = torch.randn(5, 6), torch.randn(5, 2, requires_grad=True), torch.tensor([1, 4])
    partial_linear(torch.randn(3, 6, requires_grad=True), weight, None, delta, idx, 0.5).sum().backward()
    assert delta.grad is not None


def test_partial_linear_frozen_delta_gets_no_grad_and_input_grad_still_flows():
    """With D frozen (inference / another adapter), dL/dx is still g W and D receives no gradient."""
    x, w0, b, delta, idx = linear_case((3,), bias=True)
    delta.requires_grad_(False)
    y = partial_linear(x, w0, b, delta, idx, SCALE, False)
    y.sum().backward()
    w_eff = effective_weight(w0, delta, idx, SCALE, 1)
    torch.testing.assert_close(x.grad, torch.ones_like(y) @ w_eff)
    assert delta.grad is None


def test_partial_linear_on_an_input_without_tokens_gives_zero_delta_gradient():
    """An empty batch (0 tokens) runs forward and backward; D's gradient is zero, of D's shape."""
    _, w0, b, delta, idx = linear_case((3,), bias=True)
    x = torch.zeros(0, 10, dtype=torch.float64, requires_grad=True)
    y = partial_linear(x, w0, b, delta, idx, SCALE, False)
    y.sum().backward()
    assert y.shape == (0, 7) and x.grad.shape == (0, 10)
    assert torch.equal(delta.grad, torch.zeros_like(delta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_linear_low_precision_is_close_to_float64_reference(dtype):
    """In float32 / bfloat16 the operator stays within the dtype's tolerance of the float64 reference."""
    x, w0, b, delta, idx = linear_case((2, 5), d_in=32, d_out=16, r=4)
    y = partial_linear(
        x.detach().to(dtype), w0.to(dtype), b.detach().to(dtype), delta.detach().float(), idx, SCALE, False
    )
    assert y.dtype == dtype
    ref = F.linear(x.detach(), effective_weight(w0, delta.detach(), idx, SCALE, 1), b.detach())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=6e-2)
    torch.testing.assert_close(y.double(), ref, **tol)


# ----------------------------------------------------------------------------------------------------
# what is kept for backward
# ----------------------------------------------------------------------------------------------------


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def _assert_only_selected_input_saved(saved, allowed, x, idx, channel_dim):
    x_sel = x.detach().index_select(channel_dim, idx)
    assert saved, "nothing was saved for backward; the hook did not see the operator"
    for t in saved:
        if any(t is a or (t.shape == a.shape and t.data_ptr() == a.data_ptr()) for a in allowed):
            continue
        assert t.shape == x_sel.shape and torch.equal(t, x_sel), (
            f"a tensor of shape {tuple(t.shape)} was saved for backward; only x[..., idx] "
            f"{tuple(x_sel.shape)}, the layer's parameters/buffers and the indices may be"
        )
        assert t.shape[channel_dim] == idx.numel() != x.shape[channel_dim]


@pytest.mark.parametrize("layer_type", ["linear", "gpt2_conv1d", "conv2d"])
def test_paca_layer_saves_only_selected_input_channels(layer_type):
    """A PaCA layer keeps for backward only x[..., idx] (r of d_in channels), its own parameters and idx."""
    from transformers.pytorch_utils import Conv1D

    from paca.tuner import Conv as PacaConv
    from paca.tuner import Linear as PacaLinear

    torch.manual_seed(0)
    if layer_type == "conv2d":
        layer = PacaConv(torch.nn.Conv2d(16, 8, 3, padding=1), "default", "conv", r=3, paca_alpha=6.0)
        x = torch.randn(2, 16, 5, 5, requires_grad=True)
        channel_dim = 1
    else:
        base = torch.nn.Linear(16, 8) if layer_type == "linear" else Conv1D(8, 16)
        layer = PacaLinear(base, "default", "proj", r=3, paca_alpha=6.0)
        x = torch.randn(2, 5, 16, requires_grad=True)
        channel_dim = -1
    for p in layer.get_base_layer().parameters():
        p.requires_grad_(False)
    allowed = list(layer.parameters()) + list(layer.buffers())
    saved, out = _saved_tensors(lambda: layer(x))
    _assert_only_selected_input_saved(saved, allowed, x, layer.paca_indices["default"], channel_dim)
    out.sum().backward()  # the saved state suffices for backward
    assert layer.paca_delta["default"].grad is not None and x.grad is not None


@pytest.mark.parametrize("height", [3, 8], ids=["H<=max_idx", "H>C_in"])
def test_partial_conv_unbatched_input_matches_batched(height):
    """partial_conv on an unbatched (C, H, W) input equals the batched call, output and gradients."""
    x = _randn(5, height, 6, seed=0, requires_grad=True)
    w0 = _randn(4, 5, 3, 3, seed=1)
    delta = _randn(4, 2, 3, 3, seed=2, requires_grad=True)
    idx = torch.tensor([1, 4])
    args = (SCALE, (1, 1), (1, 1), (1, 1))
    out = partial_conv(x, w0, None, delta, idx, *args)
    out.sum().backward()
    grad_x, grad_delta = x.grad.clone(), delta.grad.clone()
    x.grad = delta.grad = None
    batched = partial_conv(x.unsqueeze(0), w0, None, delta, idx, *args)
    batched.sum().backward()
    torch.testing.assert_close(out, batched[0])
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_delta, delta.grad)
