"""The PaCA layers (paca.tuner.Linear, paca.tuner.Conv): their gradients, and outputs following the current delta.

Layers: paca.tuner.Linear on nn.Linear and GPT-2's Conv1D, paca.tuner.Conv on Conv1d/2d/3d (grouped included).

Pinned: gradcheck through the layer modules; delta gradients equal the dense reference's column gradients and the
base weight gets none; the output always reflects the *current* delta (after an optimizer step, load_state_dict,
in-place edits, in train and eval mode); Conv2d padding modes and unbatched inputs; the base weight reads as W0 bit
for bit once a backward is done. Shared here: the layer builders and the dense reference other tests import.
Reference: a dense float64 layer whose weight has the tuned columns shifted by ``s * D``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from paca.tuner import Conv as PacaConv
from paca.tuner import Linear as PacaLinear

LAYER_KINDS = ["linear", "gpt2_conv1d", "conv2d", "conv1d", "conv3d", "grouped_conv2d"]
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def make_layer(kind, dtype=torch.float32, bias=True, r=3, alpha=6.0, seed=0, d_in=16, d_out=8):
    """A PaCA layer of ``kind`` around a fresh base layer (d_in 16, d_out 8), and an input for it."""
    torch.manual_seed(seed)
    if kind == "conv2d":
        base = torch.nn.Conv2d(d_in, d_out, 3, stride=(2, 1), padding=1, dilation=(1, 2), bias=bias)
        x = torch.randn(2, d_in, 6, 7)
    elif kind == "conv1d":
        base = torch.nn.Conv1d(d_in, d_out, 3, stride=2, padding=1, bias=bias)
        x = torch.randn(2, d_in, 9)
    elif kind == "conv3d":
        base = torch.nn.Conv3d(d_in, d_out, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 0), bias=bias)
        x = torch.randn(2, d_in, 4, 5, 3)
    elif kind == "grouped_conv2d":  # 2 groups of 8 input channels: r local channels of every group
        base = torch.nn.Conv2d(d_in, d_out, 3, padding=1, groups=2, bias=bias)
        x = torch.randn(2, d_in, 5, 6)
    elif kind == "gpt2_conv1d":
        base = Conv1D(d_out, d_in)
        if not bias:
            base.bias = None
        torch.nn.init.normal_(base.weight, std=0.2)
        x = torch.randn(2, 5, d_in)
    else:
        base = torch.nn.Linear(d_in, d_out, bias=bias)
        x = torch.randn(2, 5, d_in)
    base = base.to(dtype).requires_grad_(False)
    layer_cls = PacaConv if isinstance(base, CONVOLUTIONS) else PacaLinear
    layer = layer_cls(base, "default", "layer", r=r, paca_alpha=alpha)
    return layer, x.to(dtype)


def randomize_delta(layer, adapter="default", seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    delta = layer.paca_delta[adapter]
    with torch.no_grad():
        delta.copy_(torch.randn(delta.shape, generator=g) * std)


def dense_reference(layer, x, adapters=("default",)):
    """float64 output of the base layer with the listed adapters' columns applied densely."""
    base = layer.get_base_layer()
    w = layer.state_dict()["base_layer.weight"].detach().double()  # W0: read as the base
    for a in adapters:
        delta = layer.paca_delta[a].detach().double() * layer.scaling[a]
        delta = delta.t() if layer.column_axis == 0 else delta
        w = w.index_add(layer.column_axis, layer.paca_indices[a], delta)
    b = None if base.bias is None else base.bias.detach().double()
    return reference_forward(layer, x.detach().double(), w, b)


def reference_forward(layer, x, w, b):
    """The base layer's operation with weight ``w`` and bias ``b`` (any dtype, differentiable)."""
    base = layer.get_base_layer()
    if isinstance(base, CONVOLUTIONS):
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
        return conv(x, w, b, base.stride, layer.padding, base.dilation, base.groups)
    if isinstance(base, Conv1D):
        return x @ w + (0 if b is None else b)
    return F.linear(x, w, b)


def assert_matches_reference(layer, x, adapters=("default",), tol=1e-5):
    out = layer(x)
    torch.testing.assert_close(out.double(), dense_reference(layer, x, adapters), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------------
# gradcheck through the layer modules
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "kind,input_shape",
    [
        ("linear", (2, 3, 6)),
        ("linear", (4, 6)),
        ("gpt2_conv1d", (2, 3, 6)),
        ("gpt2_conv1d", (4, 6)),
        ("conv2d", (1, 6, 5, 4)),
    ],
    ids=["linear_3d", "linear_2d", "conv1d_3d", "conv1d_2d", "conv2d"],
)
def test_layer_passes_float64_gradcheck(kind, input_shape, bias):
    """float64 gradcheck of a PaCA layer w.r.t. input, delta and a trainable bias."""
    layer, _ = make_layer(kind, dtype=torch.float64, bias=bias, r=2, d_in=6, d_out=3)
    randomize_delta(layer)
    x = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    delta = layer.paca_delta["default"].detach().double().requires_grad_(True)
    names = ["paca_delta.default"] + (["base_layer.bias"] if bias else [])
    tensors = [delta] + ([layer.get_base_layer().bias.detach().clone().requires_grad_(True)] if bias else [])

    def run(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x,))

    assert gradcheck(run, (x, *tensors), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_gradients_match_dense_reference_and_base_gets_none(kind):
    """Through the module: dL/dD = s * dL/dW[:, idx] of the dense reference; base weight gets no grad."""
    layer, x = make_layer(kind, dtype=torch.float64)
    randomize_delta(layer)
    base = layer.get_base_layer()
    base.bias.requires_grad_(True)
    x.requires_grad_(True)
    w = base.weight.detach().clone()  # W0 (after a forward the tensor holds the tuned columns, see paca.ops.columns)
    layer(x).square().sum().backward()

    idx, s = layer.paca_indices["default"], layer.scaling["default"]
    delta = layer.paca_delta["default"].detach()
    w_eff = w.index_copy(
        layer.column_axis,
        idx,
        w.index_select(layer.column_axis, idx) + s * (delta.t() if layer.column_axis == 0 else delta),
    ).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    reference_forward(layer, xr, w_eff, base.bias.detach()).square().sum().backward()
    grad_cols = w_eff.grad.index_select(layer.column_axis, idx)
    expected = s * (grad_cols.t() if layer.column_axis == 0 else grad_cols)
    torch.testing.assert_close(layer.paca_delta["default"].grad, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    assert base.weight.grad is None
    assert torch.equal(layer.state_dict()["base_layer.weight"], w)  # read as the base: pretrained


# ----------------------------------------------------------------------------------------------------
# outputs reflect the current delta
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_output_reflects_delta_after_optimizer_step(kind, mode):
    """After an optimizer step the very next forward (train or eval mode) uses the updated delta."""
    layer, x = make_layer(kind)
    layer.train(mode == "train")
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = layer(x).detach()
    for _ in range(2):  # the second step also checks the forward after the first one saw the new D
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert layer.paca_delta["default"].abs().sum() > 0
        assert_matches_reference(layer, x)
    assert not torch.allclose(layer(x), before)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_output_reflects_delta_after_load_state_dict(kind, mode):
    """load_state_dict of a trained layer's state gives the trained layer's outputs, in train and eval mode."""
    trained, x = make_layer(kind)
    randomize_delta(trained)
    layer, _ = make_layer(kind)
    layer.train(mode == "train")
    layer(x)  # a forward before the load must not pin the old columns
    layer.load_state_dict(trained.state_dict())
    assert_matches_reference(layer, x)
    assert torch.equal(layer(x), trained(x))


@pytest.mark.parametrize("edit", ["no_grad_add_", "data_copy_", "data_replaced"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_output_reflects_manual_in_place_edit_of_delta(kind, mode, edit):
    """Editing D in place (torch.no_grad() add_, or .data.copy_, neither of which a version counter sees the same
    way) or giving it new storage (``.data = ...``) changes the next output accordingly."""
    layer, x = make_layer(kind)
    layer.train(mode == "train")
    delta = layer.paca_delta["default"]
    layer(x)
    if edit == "no_grad_add_":
        with torch.no_grad():
            delta.add_(torch.full_like(delta, 0.25))
    elif edit == "data_copy_":
        delta.data.copy_(torch.linspace(-1, 1, delta.numel()).reshape(delta.shape))
    else:
        delta.data = torch.linspace(-1, 1, delta.numel()).reshape(delta.shape)
    assert_matches_reference(layer, x)


@pytest.mark.parametrize("padding", ["same", "valid", (2, 0)])
def test_conv2d_padding_modes_match_reference(padding):
    """Conv2d with padding='same' / 'valid' / explicit pairs gives the dense reference's output."""
    torch.manual_seed(0)
    layer = PacaConv(torch.nn.Conv2d(6, 4, 3, padding=padding), "default", "conv", r=2, paca_alpha=3.0)
    randomize_delta(layer)
    x = torch.randn(2, 6, 5, 7)
    assert_matches_reference(layer, x)


@pytest.mark.parametrize("height", [5, 8], ids=["H<C_in", "H>C_in"])
def test_conv2d_unbatched_input_matches_batched(height):
    """An unbatched (C, H, W) input, which nn.Conv2d accepts, gives the batched output and gradients."""
    torch.manual_seed(0)
    layer = PacaConv(torch.nn.Conv2d(6, 4, 3, padding=1), "default", "conv", r=2, paca_alpha=3.0)
    randomize_delta(layer)
    x = torch.randn(6, height, 5, requires_grad=True)
    out = layer(x)
    assert out.shape == (4, height, 5)
    out.square().sum().backward()
    grad_x, grad_delta = x.grad.clone(), layer.paca_delta["default"].grad.clone()
    layer.zero_grad()
    xb = x.detach().unsqueeze(0).requires_grad_(True)
    batched = layer(xb)
    batched.square().sum().backward()
    torch.testing.assert_close(out, batched[0])
    torch.testing.assert_close(grad_x, xb.grad[0])
    torch.testing.assert_close(grad_delta, layer.paca_delta["default"].grad)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_base_weight_reads_as_pretrained_bit_for_bit_after_forward_and_backward(kind):
    """PEFT's invariant: the columns are written for a forward and its backward only; once that backward is done the
    tensor itself holds W0 bit for bit (no hook needed to read it), and the next forward writes them again."""
    layer, x = make_layer(kind)
    randomize_delta(layer)
    base = layer.get_base_layer()
    w = base.weight.detach().clone()
    out = layer(x.requires_grad_(True))
    idx, column_axis = layer.paca_indices["default"], layer.column_axis
    written = w.index_copy(
        column_axis,
        idx,
        (
            w.index_select(column_axis, idx)
            + layer.scaling["default"] * layer._delta_in_weight_layout(layer.paca_delta["default"].detach())
        ),
    )
    assert torch.equal(base.weight, written)  # kept for the backward
    out.sum().backward()
    assert torch.equal(base.weight, w)
    assert torch.equal(layer.state_dict()["base_layer.weight"], w)
    with torch.no_grad():
        assert torch.equal(layer(x), out)
    assert torch.equal(base.weight, w)  # a forward with no backward to come restores at once
    layer.restore_base_weight()
    assert torch.equal(base.weight, w)
