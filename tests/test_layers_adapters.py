"""The PaCA layers' merge, unmerge, disable and several adapters (paca.tuner.Linear / Conv).

Pinned: merge() keeps the output and unmerge() restores the base weight bit for bit; a disabled adapter gives the
base output exactly; two active adapters add up and each gets its own gradient (dense float64 reference); a new
adapter selects its columns from the pretrained weight, not the tuned one.
"""

import pytest
import torch
from test_layers import LAYER_KINDS, assert_matches_reference, make_layer, randomize_delta, reference_forward


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
