"""PaCA on whole MoE models (Mixtral, gpt-oss, Qwen3-MoE with a dense layer, DeepSeek-V3 with shared experts).

Pinned: all-linear tunes every experts module (and router) and the model trains, saves/loads, merges and unloads
exactly; the LoRA export in PEFT's target_parameters layout loads in plain PEFT exactly (r above the experts' width
clamped, and carried by the export); target_parameters picks projections and routers, refuses other parameters and
keeps all-linear's projections beside it; experts take one adapter at a time and no per-row adapters; gradient
checkpointing gives the same expert and router gradients; damaged expert entries in an adapter file are refused
by file or module; a 16-bit base or autocast computes in 16 bit with float32 deltas.
"""

import copy

import pytest
import torch
from conftest import needs_peft_0_21
from peft import PeftModel, get_peft_model
from torch import nn

from paca import PacaConfig, paca_layers
from paca.tuner.experts import Experts
from paca.tuner.router import Router


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


def test_target_parameters_beside_all_linear_keeps_every_expert_projection_tuned():
    both = get_peft_model(
        tiny_moe("mixtral"), PacaConfig(r=4, target_modules="all-linear", target_parameters=["mlp.experts.down_proj"])
    )
    assert [sorted(m.paca_delta["default"]) for m in both.modules() if isinstance(m, Experts)] == [
        ["down_proj", "gate_up_proj"]
    ] * 2


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
