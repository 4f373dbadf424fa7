"""PaCA on fused MoE experts (transformers 5's 3-D expert weights; paca.ops.experts, paca.tuner.experts).

Pinned: the experts' outputs equal transformers' own experts implementations at a zero delta; outputs and gradients
(delta, hidden states, routing weights) equal a dense reference in float64 (transformers' eager experts with
W0 + s * D written into each expert's columns), for the standard (Mixtral), transposed-with-bias (gpt-oss) and
gate-less (Nemotron-H) layouts; backward keeps r channels per token-expert pair and nothing else beyond the frozen
experts' own; the columns stay written between calls while the state_dict, disabled adapters and unload see W0;
whole MoE models (Mixtral, gpt-oss, Qwen3-MoE with a dense layer, DeepSeek-V3 with shared experts) get every experts
module tuned by all-linear, train, save/load, merge and unload exactly; the LoRA export in PEFT's
target_parameters layout loads in plain PEFT exactly; target_parameters picks projections and refuses routers.
"""

import copy

import pytest
import torch
from conftest import needs_peft_0_21
from peft import PeftModel, get_peft_model
from torch import nn

from paca import PacaConfig, paca_layers
from paca.bench.measure import SavedTensorBytes
from paca.tuner.experts import Experts, experts_forward
from paca.tuner.router import Router

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


# ----------------------------------------------------------------------------------------------------
# whole MoE models
# ----------------------------------------------------------------------------------------------------


def tiny_moe(kind: str) -> nn.Module:
    import transformers

    common = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "gpt_oss":
        config = transformers.GptOssConfig(
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention"] * 2,
            **common,
        )
        cls = transformers.GptOssForCausalLM
    elif kind == "qwen3_moe":  # a dense MLP in layer 0, experts in layer 1
        config = transformers.Qwen3MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            **common,
        )
        cls = transformers.Qwen3MoeForCausalLM
    else:  # DeepSeek-V3: dense layer 0, then routed plus shared experts
        config = transformers.DeepseekV3Config(
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            **{**common, "num_key_value_heads": 4},
        )
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    return cls(config).eval()


MODELS = ["mixtral", "gpt_oss", "qwen3_moe", "deepseek_v3"]


@pytest.mark.parametrize("kind", MODELS)
def test_all_linear_tunes_every_experts_module_and_trains_saves_merges_unloads(kind, tmp_path, token_ids):
    base = tiny_moe(kind)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    layers = paca_layers(model)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert len(experts) == (2 if kind in ("mixtral", "gpt_oss") else 1)
    assert all(name in layers for name in (e.layer_name for e in experts))
    assert len([m for m in model.modules() if isinstance(m, Router)]) == len(experts)  # the routers too
    if kind in ("qwen3_moe", "deepseek_v3"):  # dense MLPs (Qwen3-MoE layer 0, DeepSeek's dense and shared experts) too
        assert any(name.endswith("mlp.down_proj") or "shared_experts" in name for name in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts.paca_delta.default.gate_up_proj" in n for n in trainable)
    assert all("paca_" in n for n in trainable)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        model(token_ids, labels=token_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(token_ids).logits
    assert not torch.allclose(expected, tiny_moe(kind)(token_ids).logits, atol=1e-4)
    assert all(torch.equal(v, w0[k]) for k, v in model.get_base_model().state_dict().items() if k in w0)

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_ids).logits, expected, rtol=1e-6, atol=1e-6)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(token_ids).logits, expected, rtol=1e-5, atol=1e-5)
    unloaded = model.unload()
    assert all(torch.equal(v, w0[k]) for k, v in unloaded.state_dict().items())


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_lora_export_in_target_parameters_layout_loads_in_plain_peft_exactly(kind, tmp_path, token_ids):
    from paca.export import export_lora

    base_dir = tmp_path / "base"
    tiny_moe(kind).save_pretrained(base_dir)
    model = get_peft_model(
        tiny_moe(kind), PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_weights=False)
    )
    with torch.no_grad():
        expected = model(token_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    export_lora(str(tmp_path / "adapter"), str(tmp_path / "lora"), str(base_dir))
    from transformers import AutoModelForCausalLM

    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora").eval()
    assert lora.peft_config["default"].target_parameters
    with torch.no_grad():
        torch.testing.assert_close(lora(token_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_target_parameters_tune_the_named_projections_and_router_and_refuse_other_parameters(token_ids):
    model = get_peft_model(
        tiny_moe("mixtral"),
        PacaConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj", "mlp.gate.weight"]),
    )
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert len(experts) == 2 and all(list(e.paca_delta["default"]) == ["down_proj"] for e in experts)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert [r.layer_name for r in routers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    model(token_ids).logits.sum().backward()
    assert all(e.paca_delta["default"]["down_proj"].grad is not None for e in experts)
    assert all(r.paca_delta["default"].grad.abs().sum() > 0 for r in routers)
    with pytest.raises(
        ValueError,
        match=r"cannot tune 'model\.layers\.0\.input_layernorm\.weight' "
        r"\(MixtralRMSNorm\)",
    ):
        get_peft_model(
            tiny_moe("mixtral"),
            PacaConfig(r=4, target_modules=["q_proj"], target_parameters=["input_layernorm.weight"]),
        )


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


def test_one_adapter_at_a_time_and_no_per_row_adapters_on_experts(token_ids):
    model = get_peft_model(tiny_moe("mixtral"), PacaConfig(r=4, target_modules=["experts"], init_weights=False))
    torch.manual_seed(1)  # init_weights=False draws the delta from the global RNG, as PEFT does
    model.add_adapter("other", PacaConfig(r=2, target_modules=["experts"], init_weights=False, random_seed=1))
    with torch.no_grad():
        first = model(token_ids).logits
        model.set_adapter("other")
        second = model(token_ids).logits
        model.set_adapter("default")
        torch.testing.assert_close(model(token_ids).logits, first)
        # Switched to, the second adapter gives what a model holding only it gives (the first one's columns gone).
        alone_base = tiny_moe("mixtral")
        torch.manual_seed(1)
        alone = get_peft_model(
            alone_base,
            PacaConfig(r=2, target_modules=["experts"], init_weights=False, random_seed=1),
            adapter_name="other",
        )
        torch.testing.assert_close(second, alone(token_ids).logits, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(first, second)
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"2 adapters are active .*one adapter at a time"):
        model(token_ids)
    model.set_adapter("default")
    with pytest.raises(ValueError, match="adapter_names .* cannot reach PaCA experts"):
        model.eval()(token_ids, adapter_names=["default", "other"])
    model.delete_adapter("other")
    assert all(list(m.paca_delta) == ["default"] for m in model.modules() if isinstance(m, Experts))
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, first)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_expert_and_router_gradients(use_reentrant, token_ids):
    """Reentrant and non-reentrant checkpointing recompute each block's forward in backward (the non-reentrant one
    while the columns are written): the experts' and routers' delta gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        config = PacaConfig(r=4, target_modules=["experts", "gate"], init_weights=False)
        model = get_peft_model(tiny_moe("mixtral"), config)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        model(token_ids, labels=token_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "paca_delta" in n})
    assert any(".gate." in n for n in grads[0]) and any(".experts." in n for n in grads[0])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


@needs_peft_0_21
def test_damaged_expert_entries_are_refused_naming_the_file_or_module(tmp_path):
    from safetensors.torch import load_file, save_file

    from paca import add_weighted_adapter
    from paca.adapter_file import AdapterFileError, load_adapter_tensors

    model = get_peft_model(tiny_moe("mixtral"), PacaConfig(r=4, target_modules=["experts"]))
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("paca_indices.down_proj"))
    tensors[key] = tensors[key].flip(-1).contiguous()  # rows out of order
    save_file(tensors, path)
    with pytest.raises(
        AdapterFileError,
        match=r"adapter_model\.safetensors.*mlp\.experts\.paca_indices\.down_proj' "
        r"expert 0: paca_indices must be sorted",
    ):
        load_adapter_tensors(str(tmp_path / "adapter"))
    narrow = get_peft_model(tiny_moe("mixtral"), PacaConfig(r=2, target_modules=["experts"]))
    narrow.save_pretrained(tmp_path / "r2")
    config_path = tmp_path / "r2" / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"r": 2', '"r": 4'))  # config and tensors disagree
    with pytest.raises(
        ValueError,
        match=r"module 'model\.layers\.0\.mlp\.experts' \(gate_up_proj\): paca_delta has "
        r"shape \(4, 48, 2\) but this model needs \(4, 48, 4\)",
    ):
        model.load_adapter(tmp_path / "r2", adapter_name="narrow")
    assert "narrow" not in model.peft_config
    with pytest.raises(ValueError, match="add_weighted_adapter: the adapters tune fused experts"):
        add_weighted_adapter(model, ["default"], [1.0], "combined")


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


@pytest.mark.parametrize("setting", ["bf16_base", "autocast"])
def test_16_bit_base_and_autocast_compute_in_16_bit_and_keep_float32_deltas(setting, token_ids):
    base = tiny_moe("mixtral")
    if setting == "bf16_base":
        base = base.to(torch.bfloat16)
    model = get_peft_model(base, PacaConfig(r=4, target_modules=["experts"], init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, Experts))
    assert all(d.dtype == torch.float32 for d in layer.paca_delta["default"].values())  # PEFT's adapter upcast
    reference = copy.deepcopy(model).merge_and_unload()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast"):
        out = model(token_ids, labels=token_ids)
        want = reference(token_ids).logits
    out.loss.backward()
    assert out.logits.dtype == want.dtype
    torch.testing.assert_close(out.logits.float(), want.float(), rtol=0.05, atol=0.05)
    for delta in layer.paca_delta["default"].values():
        assert delta.grad.dtype == torch.float32 and torch.isfinite(delta.grad).all() and delta.grad.abs().sum() > 0


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


def test_r_above_the_experts_width_is_clamped_and_the_lora_export_carries_it(tmp_path, token_ids):
    """r above the experts' input width is clamped and the LoRA export carries the clamped rank (it loads in plain
    PEFT exactly)."""
    from paca.export import export_lora

    base_dir = tmp_path / "base"
    tiny_moe("mixtral").save_pretrained(base_dir)
    with pytest.warns(UserWarning, match="r exceeds the input dimension"):
        model = get_peft_model(tiny_moe("mixtral"), PacaConfig(r=28, target_modules="all-linear", init_weights=False))
    with torch.no_grad():
        expected = model(token_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    export_lora(str(tmp_path / "adapter"), str(tmp_path / "lora"), str(base_dir))
    from transformers import AutoModelForCausalLM

    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(token_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_target_parameters_beside_all_linear_keeps_every_expert_projection_tuned():
    both = get_peft_model(
        tiny_moe("mixtral"), PacaConfig(r=4, target_modules="all-linear", target_parameters=["mlp.experts.down_proj"])
    )
    assert [sorted(m.paca_delta["default"]) for m in both.modules() if isinstance(m, Experts)] == [
        ["down_proj", "gate_up_proj"]
    ] * 2
