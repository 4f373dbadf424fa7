"""torch.compile of PaCA layers: one graph (fullgraph=True, no graph break), same outputs and gradients as eager.

Kept small: compiling is slow on CPU. ``aot_eager`` exercises dynamo and AOT autograd (where custom ops
and autograd Functions are traced); one test also runs the default inductor backend.
"""

import shutil

import pytest
import torch
from test_layers import LAYER_KINDS, make_layer, randomize_delta


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """One intra-op thread (shared 2-core machine) and a clean dynamo cache per test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _forward_backward(fn, layer, x):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.square().mean().backward()
    return out.detach(), x.grad, layer.paca_delta["default"].grad.clone(), layer.get_base_layer().bias.grad.clone()


def _check_compiled_matches_eager(kind, backend):
    layer, x = make_layer(kind)
    randomize_delta(layer)
    layer.get_base_layer().bias.requires_grad_(True)
    weight = layer.get_base_layer().weight.detach().clone()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    eager = _forward_backward(layer, layer, x)
    got = _forward_backward(compiled, layer, x)
    for name, a, b in zip(("output", "grad_x", "grad_delta", "grad_bias"), got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(layer.state_dict()["base_layer.weight"], weight)
    assert layer.get_base_layer().weight.grad is None

    # The compiled graph reads D at run time: an in-place edit shows in the next compiled call.
    with torch.no_grad():
        layer.paca_delta["default"].add_(0.5)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_compiled_layer_fullgraph_matches_eager_forward_and_backward(kind):
    """torch.compile(fullgraph=True) (aot_eager) of a PaCA layer: outputs and grads equal eager's."""
    _check_compiled_matches_eager(kind, "aot_eager")


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
)
def test_compiled_linear_layer_with_inductor_matches_eager():
    """The default inductor backend also compiles the linear PaCA layer in one graph and matches eager."""
    _check_compiled_matches_eager("linear", "inductor")


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_forward_has_no_graph_break(kind):
    """torch._dynamo.explain: a PaCA layer's forward is captured as one graph with zero graph breaks."""
    layer, x = make_layer(kind)
    explanation = torch._dynamo.explain(layer)(x.requires_grad_(True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
