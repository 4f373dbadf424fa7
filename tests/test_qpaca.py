"""QPaCA: PaCA over a bitsandbytes 4-bit (NF4) base loaded the standard transformers way.

Pinned: layer outputs and gradients equal a dense reference built from the dequantized weight; a
whole-model loss and its delta gradients equal 16-bit PaCA on a model holding the dequantized weights;
the backward keeps only x[..., idx] and the packed weight; the memory footprint grows by exactly the
deltas and indices and stays about 4-bit; save/load round trip; merge never re-quantizes; export to a
16-bit merged model and to an exact LoRA adapter; unsupported quantization is refused by name.
"""

import sys

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from paca import PacaConfig
from paca.export import export_lora, export_merged
from paca.ops.quantized import dequantize
from paca.tuner.quantized import Linear4bit as PacaLinear4bit

bnb = pytest.importorskip("bitsandbytes")
HIDDEN = 64  # intermediate 128, 4 heads of 16, 2 kv heads


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama (hidden 64, GQA) saved in float32: the '16-bit' checkpoint the 4-bit model is loaded from.

    Every layer's output width is a multiple of 32: bitsandbytes' CPU inference layout (used by the untuned
    4-bit layers in eval mode) needs it, as real models have it.
    """
    path = tmp_path_factory.mktemp("base")
    tiny_llama(hidden=HIDDEN).save_pretrained(path)
    return str(path)


def load_4bit(path, compute_dtype=torch.float32, double_quant=False):
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )
    return LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()


def randomize_deltas(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "paca_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def paca_4bit_layers(model):
    return {m.layer_name: m for m in model.modules() if isinstance(m, PacaLinear4bit)}


@pytest.mark.parametrize(
    "compute_dtype,double_quant,tol",
    [(torch.float32, False, 1e-5), (torch.float32, True, 1e-5), (torch.bfloat16, False, 3e-2)],
)
def test_layer_output_and_gradients_match_dense_reference(base_dir, compute_dtype, double_quant, tol):
    model = get_peft_model(
        load_4bit(base_dir, compute_dtype, double_quant), PacaConfig(r=3, paca_alpha=6.0, target_modules=["o_proj"])
    )
    randomize_deltas(model)
    layer = paca_4bit_layers(model)["model.layers.0.self_attn.o_proj"]
    delta, idx, scale = layer.paca_delta["default"], layer.paca_indices["default"], layer.scaling["default"]
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))

    dense = dequantize(layer.get_base_layer().weight, torch.float64)
    delta_ref = delta.detach().double().requires_grad_(True)
    x_ref = x.detach().double().requires_grad_(True)
    w_ref = dense.index_add(1, idx, delta_ref * scale)  # W = deq(Q), W[:, idx] += s D
    y_ref = x_ref @ w_ref.t()
    y_ref.backward(torch.ones_like(y_ref))

    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(delta.grad.double(), delta_ref.grad, atol=tol, rtol=tol)


def test_model_loss_and_gradients_match_16bit_paca_on_dequantized_weights(base_dir, token_ids):
    config = dict(r=2, paca_alpha=4.0, target_modules="all-linear", seed=3)
    qmodel = get_peft_model(load_4bit(base_dir), PacaConfig(**config))
    randomize_deltas(qmodel)
    reference = tiny_llama(hidden=HIDDEN)
    with torch.no_grad():  # every 4-bit linear of the 4-bit model holds deq(Q); the reference gets exactly that
        for name, layer in paca_4bit_layers(qmodel).items():
            reference.get_submodule(name).weight.copy_(layer.dequantized_weight())
    reference = get_peft_model(reference, PacaConfig(**config))
    randomize_deltas(reference)

    loss = qmodel(input_ids=token_ids, labels=token_ids).loss
    loss.backward()
    loss_ref = reference(input_ids=token_ids, labels=token_ids).loss
    loss_ref.backward()

    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in qmodel.named_parameters() if p.requires_grad}
    grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_ref.keys() and len(grads) == 14  # 7 linear layers x 2 blocks
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_backward_keeps_only_selected_inputs_and_packed_weight(base_dir):
    model = get_peft_model(load_4bit(base_dir), PacaConfig(r=3, target_modules=["down_proj"]))
    layer = paca_4bit_layers(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 5, 2 * HIDDEN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    packed = layer.get_base_layer().weight
    floats = [t for t in saved if t.is_floating_point()]
    assert any(t is packed or t.data_ptr() == packed.data_ptr() for t in saved)  # the packed uint8 weight
    assert sorted(tuple(t.shape) for t in floats) == [(2, 5, 3), (HIDDEN, 3)]  # x[..., idx] and the delta D
    assert all(t.numel() < HIDDEN * 2 * HIDDEN for t in floats)  # no dense (d_out, d_in) copy, no full input


def tuned_layer_bytes(model):
    """Bytes of every parameter and buffer under the tuned layers (4-bit weight, quant state, delta, indices)."""
    total = 0
    for layer in paca_4bit_layers(model).values():
        total += sum(t.numel() * t.element_size() for t in layer.parameters())
        total += sum(t.numel() * t.element_size() for t in layer.buffers())
        state = layer.get_base_layer().weight.quant_state
        total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    return total


def test_memory_footprint_grows_by_the_deltas_only_and_stays_about_4bit(tmp_path):
    # Wider than the shared tiny model so the ratios mean something: hidden 256, r 4 (the paper uses 8 of 4096).
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    quantized = load_4bit(str(tmp_path))
    before = quantized.get_memory_footprint()
    model = get_peft_model(quantized, PacaConfig(r=4, target_modules="all-linear"))
    layers = paca_4bit_layers(model)
    added = sum(m.paca_delta["default"].numel() * 4 + m.paca_indices["default"].numel() * 8 for m in layers.values())
    assert model.get_memory_footprint() == before + added  # fp32 deltas and int64 indices, nothing else

    weights_16bit = sum(m.in_features * m.get_base_layer().out_features * 2 for m in layers.values())
    ratio = tuned_layer_bytes(model) / weights_16bit
    assert 0.25 < ratio < 0.35, ratio  # 4-bit codes (0.25) + absmax + fp32 deltas; a 16-bit copy would be > 1


def test_save_load_round_trip(base_dir, tmp_path, token_ids):
    model = get_peft_model(load_4bit(base_dir), PacaConfig(r=2, target_modules="all-linear", selection="weight_norm"))
    randomize_deltas(model)
    expected = model(input_ids=token_ids).logits
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(load_4bit(base_dir), tmp_path)
    torch.testing.assert_close(loaded(input_ids=token_ids).logits, expected, atol=0, rtol=0)
    for name, layer in paca_4bit_layers(loaded).items():
        original = paca_4bit_layers(model)[name]
        assert torch.equal(layer.paca_indices["default"], original.paca_indices["default"])
        assert torch.equal(layer.paca_delta["default"], original.paca_delta["default"])


def test_merge_is_exact_and_never_requantizes(base_dir, token_ids):
    model = get_peft_model(load_4bit(base_dir), PacaConfig(r=2, target_modules=["q_proj", "down_proj"]))
    randomize_deltas(model)
    packed = {n: m.get_base_layer().weight.data.clone() for n, m in paca_4bit_layers(model).items()}
    # First: on a CPU with AVX512-BF16 this eval forward lets bitsandbytes repack the *untuned* 4-bit layers,
    # which changes their outputs (bf16 scales); every output compared below is computed after it.
    with model.disable_adapter():
        base_out = model(input_ids=token_ids).logits
    expected = model(input_ids=token_ids).logits

    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=token_ids).logits, expected, atol=0, rtol=0)
    for name, layer in paca_4bit_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight.data, packed[name])  # packed 4-bit codes untouched
    model.unmerge_adapter()
    torch.testing.assert_close(model(input_ids=token_ids).logits, expected, atol=0, rtol=0)
    assert not torch.allclose(base_out, expected)
    # Disabled, the adapters leave the plain 4-bit model's outputs (up to bitsandbytes repacking its untuned layers
    # for the CPU, which rounds their scales to bf16 on CPUs with AVX512-BF16: hence a tolerance, far below the
    # tuned outputs' distance).
    with torch.no_grad():
        plain = load_4bit(base_dir)(input_ids=token_ids).logits
    tuned_distance = (expected - plain).abs().max().item()
    assert (base_out - plain).abs().max().item() < 0.05 * tuned_distance

    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj' has a 4-bit base.*paca export"):
        model.merge_and_unload()


def test_export_merged_is_16bit_and_lora_export_reproduces_qpaca(base_dir, tmp_path, token_ids):
    model = get_peft_model(
        load_4bit(base_dir),
        PacaConfig(r=2, paca_alpha=4.0, target_modules=["o_proj", "up_proj"], task_type="CAUSAL_LM"),
    )
    randomize_deltas(model)
    model.train()  # train mode: bitsandbytes' eval-mode CPU kernel rounds the LoRA base's scales
    expected = model(input_ids=token_ids).logits
    model.save_pretrained(tmp_path / "adapter")

    export_merged(str(tmp_path / "adapter"), str(tmp_path / "merged"), dtype=torch.bfloat16)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    original = LlamaForCausalLM.from_pretrained(base_dir)
    assert getattr(merged.config, "quantization_config", None) is None
    for name, layer in paca_4bit_layers(model).items():
        w = merged.get_submodule(name).weight
        w0 = original.get_submodule(name).weight.detach().to(torch.bfloat16).float()  # the 16-bit checkpoint
        idx = layer.paca_indices["default"]
        assert w.dtype == torch.bfloat16
        expected_w = w0.index_add(1, idx, layer.paca_delta["default"].detach() * layer.scaling["default"])
        torch.testing.assert_close(w, expected_w.to(torch.bfloat16), atol=0, rtol=0)  # 16-bit base + delta

    export_lora(str(tmp_path / "adapter"), str(tmp_path / "lora"))
    qlora = PeftModel.from_pretrained(load_4bit(base_dir), tmp_path / "lora").train()
    assert isinstance(qlora.peft_config["default"], LoraConfig)
    torch.testing.assert_close(qlora(input_ids=token_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_training_step_changes_only_the_deltas(base_dir, token_ids):
    model = get_peft_model(load_4bit(base_dir), PacaConfig(r=2, target_modules="all-linear"))
    packed = {n: m.get_base_layer().weight.data.clone() for n, m in paca_4bit_layers(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=token_ids, labels=token_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, layer in paca_4bit_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight.data, packed[name])


# -- bad input -----------------------------------------------------------------------------------------


def test_8bit_and_other_quantization_are_refused_by_name():
    model = tiny_llama()
    model.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(ValueError, match="bitsandbytes 8-bit"):
        get_peft_model(model, PacaConfig(target_modules=["q_proj"]))
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        get_peft_model(model, PacaConfig(target_modules=["q_proj"]))


def test_bnb_8bit_layer_is_refused_with_its_module_name():
    model = torch.nn.Sequential(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False))
    with pytest.raises(TypeError, match=r"module '0' of type bitsandbytes.*Linear8bitLt"):
        get_peft_model(model, PacaConfig(target_modules=["0"]))


def test_4bit_model_without_bitsandbytes_says_how_to_install(monkeypatch):
    model = tiny_llama()
    model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ImportError, match=r"bitsandbytes is not installed.*pip install 'paca\[quant\]'"):
        get_peft_model(model, PacaConfig(target_modules=["q_proj"]))


def cpu_repacking_bitsandbytes():
    """bitsandbytes' in-place CPU repack (0.49+), or a skip on versions without it."""
    from bitsandbytes import functional

    if not hasattr(functional, "_convert_weight_packed_for_cpu"):
        pytest.skip(f"bitsandbytes {bnb.__version__} does not repack 4-bit weights for the CPU")
    return functional._convert_weight_packed_for_cpu


def test_base_forward_in_eval_never_repacks_a_tuned_weight(base_dir, token_ids):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel on an eval no-grad forward, rounding its scales to
    bf16 for good; a QPaCA layer's base must keep the exact layout, whatever the CPU, and get its flag back on
    unload."""
    cpu_repacking_bitsandbytes()
    quantized = load_4bit(base_dir)
    for module in quantized.modules():  # as on a CPU with AVX512-BF16, where bitsandbytes repacks
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    model = get_peft_model(quantized, PacaConfig(r=2, target_modules=["down_proj"], seed=1))
    randomize_deltas(model)
    layer = paca_4bit_layers(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 2 * HIDDEN)
    with torch.no_grad():
        expected = layer(x)
        with model.disable_adapter():
            layer(x)  # the base layer's own forward, eval mode, no gradients
        assert not getattr(layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", False)
        torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    assert model.unload().get_submodule("model.layers.0.mlp.down_proj").support_avx512bf16_for_cpu is True


def test_an_already_repacked_4bit_weight_is_refused_by_name(base_dir):
    repack = cpu_repacking_bitsandbytes()
    model = load_4bit(base_dir)
    base = model.get_submodule("model.layers.1.mlp.down_proj")
    base.weight.data, base.weight.quant_state = repack(base.weight.data, base.weight.quant_state)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.1\.mlp\.down_proj'.*repacked.*cannot be undone"):
        get_peft_model(model, PacaConfig(r=2, target_modules=["down_proj"]))
    assert not any(isinstance(m, PacaLinear4bit) for m in model.modules())  # left as it was


def test_selection_on_a_4bit_base_reads_the_dequantized_weight(base_dir):
    from paca import select_by_gradient

    model = get_peft_model(
        load_4bit(base_dir), PacaConfig(r=3, target_modules=["o_proj", "down_proj"], selection="weight_norm")
    )
    for name, layer in paca_4bit_layers(model).items():
        norms = layer.dequantized_weight().norm(dim=0)  # (d_in,)
        assert torch.equal(layer.paca_indices["default"], norms.topk(3).indices.sort().values), name
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    chosen = select_by_gradient(model, [{"input_ids": ids, "labels": ids}], steps=1)
    assert chosen.keys() == paca_4bit_layers(model).keys()

    structured = get_peft_model(
        load_4bit(base_dir), PacaConfig(r=16, target_modules=["o_proj"], selection="structured")
    )
    for layer in paca_4bit_layers(structured).values():
        idx = layer.paca_indices["default"]  # one whole head of 16 columns (hidden 64, 4 heads)
        assert idx[0] % 16 == 0 and torch.equal(idx, idx[0] + torch.arange(16))
