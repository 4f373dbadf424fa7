"""PaCA on one fused MoE experts module (transformers 5's 3-D expert weights; paca.ops.experts, paca.tuner.experts).

Pinned: the experts' outputs equal transformers' own experts implementations at a zero delta; outputs and gradients
(delta, hidden states, routing weights) equal a dense reference in float64 (transformers' eager experts with
W0 + s * D written into each expert's columns), for the standard (Mixtral), transposed-with-bias (gpt-oss) and
gate-less (Nemotron-H) layouts; backward keeps r channels per token-expert pair and nothing else beyond the frozen
experts' own; the columns stay written between calls while the state_dict, disabled adapters and unload see W0;
outputs follow a delta changed after a forward; merge/unmerge is bit-exact; the grouped GEMM path equals the
per-expert loop; torch.compile(fullgraph=True) matches eager. Whole MoE models: tests/test_experts_models.py;
routers: tests/test_experts_routers.py.
"""

import copy

import pytest
import torch
from torch import nn

from paca.bench.measure import SavedTensorBytes
from paca.tuner.experts import Experts, experts_forward

E, H, INTER, TOKENS, TOP_K, R = 4, 12, 8, 9, 2, 3  # sizes grouped_mm accepts (16-byte strides)


def experts_module(kind: str, implementation: str = "eager") -> nn.Module:
    """One transformers experts module with random weights: E experts, hidden H, intermediate INTER."""
    import transformers

    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        config = transformers.MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E)
    elif kind == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        config = transformers.GptOssConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E)
    else:
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts as cls

        config = transformers.NemotronHConfig(hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=E)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    module = cls(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3)
    return module


def routing(seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, H, generator=g, dtype=dtype)
    index = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(TOKENS)])
    index[0] = torch.tensor([0, 1])  # expert E-1 gets no token in some draws: keep one expert idle on purpose
    index[index == E - 1] = 2
    weights = torch.rand(TOKENS, TOP_K, generator=g, dtype=dtype).softmax(-1)
    return hidden, index, weights


def tuned(module: nn.Module, init_weights: bool = False) -> Experts:
    return Experts(module, "default", "mlp.experts", r=R, paca_alpha=2 * R, init_weights=init_weights, seed=3)


def dense_reference(layer: Experts) -> nn.Module:
    """A copy of the base experts module whose weights are W0 + s * D, as parameters (autograd gives dL/dW)."""
    layer.restore_base_weight()  # between calls the raw weight holds the tuned columns
    reference = copy.deepcopy(layer.get_base_layer())
    with torch.no_grad():
        for name in layer.paca_delta["default"]:
            getattr(reference, name).copy_(getattr(reference, name) + layer.get_delta_weight("default", name))
    return reference


KINDS = ["mixtral", "gpt_oss", "nemotron_h"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_zero_delta_equals_each_transformers_experts_implementation(kind, implementation):
    base = experts_module(kind, implementation)
    hidden, index, weights = routing()
    expected = base(hidden, index, weights)
    layer = tuned(copy.deepcopy(base), init_weights=True)
    torch.testing.assert_close(layer(hidden, index, weights), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_gradients_equal_the_dense_reference_in_float64(kind):
    layer = tuned(experts_module(kind).double())
    reference = dense_reference(layer)
    hidden, index, weights = routing(dtype=torch.float64)
    probe = torch.randn(TOKENS, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    inputs = [hidden.clone().requires_grad_(), weights.clone().requires_grad_()]
    ref_inputs = [hidden.clone().requires_grad_(), weights.clone().requires_grad_()]

    out = layer(inputs[0], index, inputs[1])
    (out * probe).sum().backward()
    ref = reference(ref_inputs[0], index, ref_inputs[1])
    (ref * probe).sum().backward()

    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)
    scale = layer.scaling["default"]
    for name, delta in layer.paca_delta["default"].items():
        weight_grad = getattr(reference, name).grad  # dL/dW of the dense weight
        idx = layer.paca_indices["default"][name]
        for e in range(E):
            columns = weight_grad[e][idx[e], :].t() if layer.is_transposed else weight_grad[e][:, idx[e]]
            torch.testing.assert_close(delta.grad[e], scale * columns, rtol=1e-10, atol=1e-10)
    assert delta.grad[E - 1].abs().sum() == 0  # the idle expert: no tokens, no gradient


def _saved_bytes(fn, module: nn.Module) -> int:
    """Bytes of the distinct tensors autograd saves during ``fn()`` that are not ``module``'s parameters or buffers
    (those are kept referenced, not copied)."""
    with SavedTensorBytes(exclude=[*module.parameters(), *module.buffers()]) as saved:
        fn()
    return saved.bytes


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_backward_keeps_r_channels_per_token_expert_pair_beyond_the_frozen_experts(kind):
    """Beyond what the frozen experts keep themselves (same forward, no delta), PaCA keeps exactly x[:, idx_e] of
    each projection's input: (tokens * top_k) x r values per projection, never a full input; and no more than
    transformers' own grouped experts keep frozen, plus those."""
    layer = tuned(experts_module(kind, "grouped_mm"))
    hidden, index, weights = routing()
    hidden.requires_grad_()
    weights.requires_grad_()  # as the router's output does
    base = layer.get_base_layer()
    selected = 2 * TOKENS * TOP_K * R * hidden.element_size()
    frozen = _saved_bytes(lambda: experts_forward(base, hidden, index, weights, {}), layer)
    paca = _saved_bytes(lambda: layer(hidden, index, weights), layer)
    assert paca - frozen == selected
    layer.restore_base_weight()
    transformers_frozen = _saved_bytes(lambda: base(hidden, index, weights), layer)
    assert paca <= transformers_frozen + selected


def test_columns_are_written_for_their_backward_only_and_every_base_view_sees_w0():
    layer = tuned(experts_module("mixtral"))
    base = layer.get_base_layer()
    pretrained = {name: getattr(base, name).detach().clone() for name in ("gate_up_proj", "down_proj")}
    hidden, index, weights = routing()
    out = layer(hidden.detach().requires_grad_(True), index, weights)
    written = base.gate_up_proj.detach() - pretrained["gate_up_proj"]  # kept for the backward
    torch.testing.assert_close(written, layer.get_delta_weight("default", "gate_up_proj"))
    state = layer.state_dict()
    for name, w0 in pretrained.items():
        assert torch.equal(state[f"base_layer.{name}"], w0)
    layer(hidden.detach().requires_grad_(True), index, weights).sum().backward()
    for name, w0 in pretrained.items():  # restored by the backward
        assert torch.equal(getattr(base, name), w0)
    out = out.detach()
    with torch.no_grad():  # a changed delta shows in the next call, as an optimizer step would change it
        layer.paca_delta["default"]["down_proj"].add_(0.5)
    torch.testing.assert_close(layer(hidden, index, weights), dense_reference(layer)(hidden, index, weights))
    assert not torch.allclose(layer(hidden, index, weights), out)
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(hidden, index, weights), copy.deepcopy(base)(hidden, index, weights))
    for name, w0 in pretrained.items():
        assert torch.equal(getattr(base, name), w0)
    layer.enable_adapters(True)
    layer(hidden, index, weights)
    released = layer.unload_and_optionally_merge_module(merge=False)
    for name, w0 in pretrained.items():
        assert torch.equal(getattr(released, name), w0)


@pytest.mark.parametrize("edit", ["data_copy_", "data_replaced", "load_state_dict"])
def test_outputs_follow_a_delta_changed_after_a_forward(edit):
    """After a forward (the columns written in the fused weights) the delta is changed through ``.data`` (which no
    version counter sees), given new storage, or loaded from another layer's state: the next output is the dense
    reference's for the new delta."""
    layer = tuned(experts_module("mixtral"))
    hidden, index, weights = routing()
    layer(hidden, index, weights)
    delta = layer.paca_delta["default"]["down_proj"]
    new = torch.linspace(-1, 1, delta.numel()).reshape(delta.shape)
    if edit == "data_copy_":
        delta.data.copy_(new)
    elif edit == "data_replaced":
        delta.data = new
    else:
        trained = tuned(experts_module("mixtral"))
        with torch.no_grad():
            trained.paca_delta["default"]["down_proj"].copy_(new)
        layer.load_state_dict(trained.state_dict())
    assert torch.equal(layer.paca_delta["default"]["down_proj"], new)
    out = layer(hidden, index, weights)
    torch.testing.assert_close(out, dense_reference(layer)(hidden, index, weights), rtol=1e-5, atol=1e-5)


def test_merge_then_unmerge_is_bit_exact_and_merged_outputs_match():
    layer = tuned(experts_module("gpt_oss"))
    base = layer.get_base_layer()
    pretrained = [p.detach().clone() for p in base.parameters()]
    hidden, index, weights = routing()
    expected = layer(hidden, index, weights)
    layer.merge(safe_merge=True)
    torch.testing.assert_close(layer(hidden, index, weights), expected, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    assert all(torch.equal(p, w0) for p, w0 in zip(base.parameters(), pretrained))
    with torch.no_grad():
        layer.paca_delta["default"]["down_proj"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaNs detected.*module 'mlp.experts'"):
        layer.merge(safe_merge=True)
    assert all(torch.equal(p, w0) for p, w0 in zip(base.parameters(), pretrained))  # nothing half-merged


def _forward_backward(layer, hidden, index, weights):
    layer.zero_grad()
    hidden = hidden.clone().requires_grad_()
    out = layer(hidden, index, weights)
    out.square().sum().backward()
    return [out, hidden.grad, *(d.grad for d in layer.paca_delta["default"].values())]


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_grouped_gemm_path_equals_the_per_expert_loop(kind, monkeypatch):
    """With aligned float32 operands the three products run as one grouped GEMM each (no per-expert loop);
    results equal the loop's, which runs where torch's grouped GEMM does not take the operands (float64,
    unaligned strides)."""
    import paca.ops.experts as ops

    layer = Experts(experts_module(kind), "default", "mlp.experts", r=4, paca_alpha=8.0, init_weights=False)
    hidden, index, weights = routing()
    calls = []
    grouped_mm = ops.F.grouped_mm
    monkeypatch.setattr(ops.F, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    grouped = _forward_backward(layer, hidden, index, weights)
    assert len(calls) == 2 * 3  # forward, input gradient and delta gradient of both projections
    monkeypatch.setattr(ops, "grouped_mm_fits", lambda *operands: False)
    looped = _forward_backward(layer, hidden, index, weights)
    assert len(calls) == 6
    for a, b in zip(grouped, looped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_matches_eager_and_reads_the_delta_at_run_time():
    layer = tuned(experts_module("mixtral"))
    hidden, index, weights = routing()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        eager = _forward_backward(layer, hidden, index, weights)
        got = _forward_backward(compiled, hidden, index, weights)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            layer.paca_delta["default"]["gate_up_proj"].add_(0.5)
        torch.testing.assert_close(compiled(hidden, index, weights), layer(hidden, index, weights))
    finally:
        torch._dynamo.reset()
