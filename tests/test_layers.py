"""The PaCA layers (paca.tuner.Linear on nn.Linear / GPT-2 Conv1D, paca.tuner.Conv2d).

Pinned: gradcheck through the layer modules; the output always reflects the *current* delta (after an
optimizer step, load_state_dict, in-place edits, in train and eval mode, under gradient accumulation
and gradient checkpointing); bit-exact merge/unmerge; bf16 base weights with an fp32 delta; autocast.
Reference: a dense float64 layer whose weight has the tuned columns shifted by ``s * D``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from peft import get_peft_model
from torch.autograd import gradcheck
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from paca import PacaConfig
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


# ----------------------------------------------------------------------------------------------------
# merge / unmerge / disable / several adapters
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_gives_same_output_and_unmerge_restores_base_bit_for_bit(kind):
    """merge() writes s*D into W (output unchanged up to rounding); unmerge() restores W exactly."""
    layer, x = make_layer(kind)
    randomize_delta(layer)
    w = layer.get_base_layer().weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(layer.get_base_layer().weight, w)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.get_base_layer().weight, w)
    assert torch.equal(layer(x), unmerged)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_disabled_adapter_gives_base_output_exactly(kind):
    """With adapters disabled the layer's output is the base layer's, bit for bit."""
    layer, x = make_layer(kind)
    randomize_delta(layer)
    base_out = layer.get_base_layer()(x)
    layer(x)  # leaves the tuned columns written: disabling must write W0 back
    layer.enable_adapters(False)
    assert torch.equal(layer(x), base_out)
    layer.enable_adapters(True)
    assert not torch.equal(layer(x), base_out)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_two_active_adapters_add_up(kind):
    """Two adapters active at once apply both column shifts (overlapping columns add)."""
    layer, x = make_layer(kind, r=4)
    layer.update_layer("other", r=5, paca_alpha=2.0, seed=7)
    randomize_delta(layer, "default", seed=1)
    randomize_delta(layer, "other", seed=2)
    layer.set_adapter(["default", "other"])
    assert_matches_reference(layer, x, adapters=("default", "other"))
    layer.set_adapter("other")
    assert_matches_reference(layer, x, adapters=("other",))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_a_new_adapter_selects_its_columns_from_the_pretrained_weight(kind):
    """weight_norm selection of an adapter added after a forward (the first adapter's columns written in the
    weight, with a delta large enough to change the ranking) reads W0, not the tuned weight."""
    from paca import selection

    layer, x = make_layer(kind, r=4)
    randomize_delta(layer, std=50.0)
    w0 = layer.state_dict()["base_layer.weight"].clone()
    layer(x.requires_grad_(True))  # its backward never runs: the columns stay written
    tuned = layer.get_base_layer().weight.detach().clone()
    assert not torch.equal(
        selection.weight_norm_columns(tuned, 4, layer.column_axis),
        selection.weight_norm_columns(w0, 4, layer.column_axis),
    )  # the test can tell them apart
    layer.update_layer("other", r=4, paca_alpha=8.0, selection_strategy="weight_norm")
    assert torch.equal(layer.paca_indices["other"], selection.weight_norm_columns(w0, 4, layer.column_axis))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_two_active_adapters_each_get_their_own_gradient(kind):
    """With two adapters active each delta gets dL/dD_a = s_a * dL/dW[:, idx_a] of the dense reference (overlapping
    columns give both the same column gradient), and the input gets the combined weight's gradient."""
    layer, x = make_layer(kind, dtype=torch.float64, r=4)
    layer.update_layer("other", r=5, paca_alpha=2.0, seed=7)
    randomize_delta(layer, "default", seed=1)
    randomize_delta(layer, "other", seed=2)
    layer.set_adapter(["default", "other"])
    x.requires_grad_(True)
    layer(x).square().sum().backward()

    w = layer.state_dict()["base_layer.weight"].detach().clone()
    for a in ("default", "other"):
        delta = layer.paca_delta[a].detach() * layer.scaling[a]
        w = w.index_add(layer.column_axis, layer.paca_indices[a], delta.t() if layer.column_axis == 0 else delta)
    w.requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    reference_forward(layer, xr, w, layer.get_base_layer().bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    for a in ("default", "other"):
        columns = w.grad.index_select(layer.column_axis, layer.paca_indices[a])
        expected = layer.scaling[a] * (columns.t() if layer.column_axis == 0 else columns)
        torch.testing.assert_close(layer.paca_delta[a].grad, expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# training dynamics on a tiny Llama
# ----------------------------------------------------------------------------------------------------


def _paca_llama(seed_delta=5):
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed_delta)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "paca_delta" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # nonzero: every forward depends on D
    return model.train()


def _delta_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "paca_delta" in n}


def _deltas(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "paca_delta" in n}


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_gradient_accumulation_equals_big_batch_update(micro_batches):
    """Accumulating over 1, 2 or 3 micro-batches gives the big-batch gradient and the same updated delta."""
    batch = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(2))
    big, acc = _paca_llama(), _paca_llama()
    opt_big = torch.optim.SGD([p for p in big.parameters() if p.requires_grad], lr=1.0)
    opt_acc = torch.optim.SGD([p for p in acc.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # two optimizer steps: the second accumulation must see the first update
        big(batch, labels=batch).loss.backward()
        for chunk in batch.chunk(micro_batches):
            (acc(chunk, labels=chunk).loss / micro_batches).backward()
        for (n, g_big), g_acc in zip(_delta_grads(big).items(), _delta_grads(acc).values()):
            torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-6, msg=n)
        opt_big.step(), opt_acc.step()
        opt_big.zero_grad(), opt_acc.zero_grad()
    for n, d in _deltas(big).items():
        torch.testing.assert_close(_deltas(acc)[n], d, rtol=1e-4, atol=1e-6, msg=n)
    acc.eval(), big.eval()
    torch.testing.assert_close(acc(batch).logits, big(batch).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_same_gradients(use_reentrant, token_ids):
    """gradient_checkpointing_enable (reentrant or not): same loss and delta gradients as without it."""
    plain, ckpt = _paca_llama(), _paca_llama()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert ckpt.base_model.model.model.layers[0].gradient_checkpointing
    loss_plain = plain(token_ids, labels=token_ids).loss
    loss_plain.backward()
    loss_ckpt = ckpt(token_ids, labels=token_ids).loss
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss_plain)
    expected = _delta_grads(plain)
    got = {n: p.grad for n, p in ckpt.named_parameters() if "paca_delta" in n}
    assert all(g is not None for g in got.values()), "checkpointing cut the gradient to some deltas"
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if "paca_delta" not in n:
            assert p.grad is None and q.grad is None, f"{n} is frozen but got a gradient"


def test_copy_of_layer_is_independent():
    """deepcopy of a PaCA layer (as Trainer/EMA code does) gives an independent layer with equal outputs."""
    layer, x = make_layer("linear")
    randomize_delta(layer)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), layer(x))
    with torch.no_grad():
        clone.paca_delta["default"].add_(1.0)
    assert_matches_reference(layer, x)
    assert_matches_reference(clone, x)


@pytest.mark.filterwarnings("ignore:PaCA adapter 'default'. r exceeds:UserWarning")  # pinned in test_bad_input
def test_an_mbconv_block_with_a_depthwise_convolution_trains_merges_and_reloads(tmp_path):
    """EfficientNet's MBConv (the paper's appendix B): a 3-channel stem, a depthwise 3x3 (one column: its whole
    filter bank), a pointwise 1x1, and a Conv1d / Conv3d beside them; all tuned, gradients flow, merge is exact."""
    from peft import PeftModel

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pointwise = torch.nn.Conv2d(16, 8, 1)
            self.temporal = torch.nn.Conv1d(8, 8, 3, padding=1)
            self.volume = torch.nn.Conv3d(8, 4, 1)

        def forward(self, x):  # (B, 3, H, W)
            h = self.pointwise(self.depthwise(self.stem(x)).relu())  # (B, 8, H, W)
            t = self.temporal(h.flatten(2))  # (B, 8, H*W)
            return self.volume(t.view(*h.shape).unsqueeze(2))  # (B, 4, 1, H, W)

    x = torch.randn(2, 3, 5, 6)
    targets = ["stem", "depthwise", "pointwise", "temporal", "volume"]
    model = get_peft_model(Net(), PacaConfig(r=4, target_modules=targets))
    layers = {name.split(".")[-1]: m for name, m in model.named_modules() if isinstance(m, PacaConv)}
    assert {n: m.r["default"] for n, m in layers.items()} == dict(
        stem=3, depthwise=1, pointwise=4, temporal=4, volume=4
    )
    base_out = model(x).detach()
    model(x).square().mean().backward()
    assert all(m.paca_delta["default"].grad.abs().sum() > 0 for m in layers.values())
    for m in layers.values():
        randomize_delta(m)
    out = model(x)
    assert not torch.allclose(out, base_out)
    reference = Net()  # dense float64 reference: each weight with its tuned columns shifted by s * D
    with torch.no_grad():
        for name, m in layers.items():
            conv = getattr(reference, name).double()
            conv.weight.index_add_(
                1, m.paca_indices["default"], m.paca_delta["default"].double() * m.scaling["default"]
            )
    torch.testing.assert_close(out.double(), reference.double()(x.double()), rtol=1e-4, atol=1e-4)  # fp32 chain
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Net(), tmp_path)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
