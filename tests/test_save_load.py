"""Saving and loading a PaCA adapter: what is in the file, how big it is, and that loading restores outputs.

The file holds, per tuned layer, ``<module>.paca_delta`` (fp32, ``d_out x r``) and ``<module>.paca_indices``
(int64, ``r``), plus biases / modules_to_save when the config asks for them: nothing else.
"""

import json
import os

import pytest
import torch
from conftest import needs_peft_0_21, tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from paca import PacaConfig, paca_layers
from paca.selection import random_columns

MAKE = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def randomize(model, seed=0, std=0.1, match="paca_delta"):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and match in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def saved(tmp_path, model, name="adapter"):
    path = tmp_path / name
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("r", [1, 5])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_file_holds_only_deltas_and_indices_of_expected_size(tmp_path, arch, r):
    """adapter_model.safetensors: only '.paca_delta' (fp32 d_out x r) and '.paca_indices' (int64 r) keys;
    its size is sum(d_out * r * 4) + sum(r * 8) bytes plus a small header."""
    model = get_peft_model(MAKE[arch](), PacaConfig(r=r, target_modules="all-linear"))
    randomize(model)
    path = saved(tmp_path, model)
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(path / "adapter_model.safetensors")
    assert all(k.endswith((".paca_delta", ".paca_indices")) for k in tensors)
    layers = paca_layers(model)
    assert len(tensors) == 2 * len(layers)
    payload = 0
    for name, layer in layers.items():
        delta = tensors[f"base_model.model.{name}.paca_delta"]
        idx = tensors[f"base_model.model.{name}.paca_indices"]
        assert delta.dtype == torch.float32 and idx.dtype == torch.int64
        assert tuple(delta.shape) == layer.delta_shape(r) and tuple(idx.shape) == (r,)
        assert torch.equal(delta, layer.paca_delta["default"].detach())
        assert torch.equal(idx, layer.paca_indices["default"])
        payload += delta.numel() * 4 + idx.numel() * 8
    size = os.path.getsize(path / "adapter_model.safetensors")
    assert payload <= size <= payload + 160 * len(tensors) + 64, (size, payload)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PACA" and config["r"] == r


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["", "low_cpu_mem_usage"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loaded_adapter_gives_equal_outputs_right_after_from_pretrained(
    tmp_path, arch, mode, low_cpu_mem_usage, token_ids
):
    """PeftModel.from_pretrained on a fresh base (also with low_cpu_mem_usage, adapters built on meta):
    outputs equal the saved model's at once (no merge, no optimizer step)."""
    model = get_peft_model(MAKE[arch](), PacaConfig(r=4, target_modules="all-linear")).eval()
    randomize(model)
    expected = model(token_ids).logits
    path = saved(tmp_path, model)
    loaded = PeftModel.from_pretrained(MAKE[arch](), path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    loaded.train(mode == "train")
    if mode == "train":  # GPT-2 has dropout; compare without it
        for m in loaded.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    assert torch.equal(loaded(token_ids).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters()), "inference-mode load must be frozen"


def test_adapter_saved_without_safetensors_loads_and_is_checked(tmp_path, token_ids):
    """save_pretrained(safe_serialization=False) writes PEFT's adapter_model.bin: it loads like the .safetensors,
    and a damaged one is refused naming the file."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear")).eval()
    randomize(model)
    expected = model(token_ids).logits
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(token_ids).logits, expected)
    (tmp_path / "adapter_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: cannot read adapter weights"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_saved_model_card_says_how_to_load_a_paca_adapter_once(tmp_path):
    model = get_peft_model(tiny_llama(), PacaConfig(r=4))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Loading this PaCA adapter") == 1
    assert "import paca" in card and "PEFT >= 0.22 loads it" in card and "paca export" in card


def test_loaded_adapter_is_trainable_with_is_trainable(tmp_path, token_ids):
    """from_pretrained(..., is_trainable=True) gives trainable deltas that train from the saved values."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear"))
    randomize(model)
    path = saved(tmp_path, model)
    loaded = PeftModel.from_pretrained(tiny_llama(), path, is_trainable=True)
    trainable = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("paca_delta" in n for n in trainable)
    loaded(token_ids, labels=token_ids).loss.backward()
    assert all(p.grad is not None for p in trainable.values())


def test_loading_uses_saved_indices_not_a_new_selection(tmp_path, token_ids):
    """Loading never selects again: with another seed written into the config the saved columns still apply."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", seed=0)).eval()
    randomize(model)
    expected = model(token_ids).logits
    path = saved(tmp_path, model)
    config = json.loads((path / "adapter_config.json").read_text())
    config["seed"] = 12345
    (path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_llama(), path)
    for name, layer in paca_layers(loaded).items():
        assert torch.equal(layer.paca_indices["default"], paca_layers(model)[name].paca_indices["default"])
    assert torch.equal(loaded(token_ids).logits, expected)


def test_indices_are_reproducible_from_seed_and_layer_name():
    """Same seed -> same columns in every layer; another seed -> other columns; layers differ from each other."""

    def indices(seed):
        m = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", seed=seed))
        return {n: layer.paca_indices["default"].clone() for n, layer in paca_layers(m).items()}

    a, a_again, b = indices(0), indices(0), indices(1)
    assert a.keys() == a_again.keys() == b.keys()
    assert all(torch.equal(a[n], a_again[n]) for n in a)
    assert sum(not torch.equal(a[n], b[n]) for n in a) >= len(a) - 1
    q0, q1 = a["model.layers.0.self_attn.q_proj"], a["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0, q1), "two layers of the same shape must not share columns"
    for n, idx in a.items():
        assert torch.equal(idx, torch.unique(idx)) and idx.numel() == 4  # sorted, unique
        d_in = 64 if n.endswith("down_proj") else 32
        assert torch.equal(idx, random_columns(d_in, 4, 0, n))


def transformers_peft_integration_or_skip():
    """Skip where the installed transformers refuses the installed peft in its own PEFT integration."""
    import peft
    from packaging.version import Version
    from transformers.integrations import peft as integration

    needed = getattr(integration, "MIN_PEFT_VERSION", "0")
    if Version(peft.__version__) < Version(needed):
        pytest.skip(f"transformers' add_adapter requires peft >= {needed}; peft {peft.__version__} is installed")


def test_transformers_add_adapter_selects_the_same_columns_as_get_peft_model():
    """The layer name seeding the selection is the same whichever entry point injects the adapter."""
    transformers_peft_integration_or_skip()
    cfg = dict(r=4, target_modules=["q_proj", "down_proj"], seed=3)
    peft_layers = paca_layers(get_peft_model(tiny_llama(), PacaConfig(**cfg)))
    plain = tiny_llama()
    plain.add_adapter(PacaConfig(**cfg))
    hf_layers = paca_layers(plain)
    assert peft_layers.keys() == hf_layers.keys() and len(hf_layers) == 4
    for name, layer in peft_layers.items():
        assert torch.equal(layer.paca_indices["default"], hf_layers[name].paca_indices["default"])


def test_load_adapter_adds_a_second_named_adapter(tmp_path, token_ids):
    """PeftModel.load_adapter(dir, name) adds a second adapter whose outputs equal the saved model's."""
    first = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules=["q_proj"])).eval()
    other = get_peft_model(tiny_llama(), PacaConfig(r=2, target_modules=["v_proj", "up_proj"], seed=3)).eval()
    randomize(first, seed=1)
    randomize(other, seed=2)
    expected_first, expected_other = first(token_ids).logits, other(token_ids).logits
    path = saved(tmp_path, other, "other")
    first.load_adapter(path, adapter_name="other")
    assert torch.equal(first(token_ids).logits, expected_first)
    first.set_adapter("other")
    assert torch.equal(first(token_ids).logits, expected_other)


@needs_peft_0_21
@pytest.mark.parametrize("bias", ["all", "paca_only"])
def test_trained_biases_are_saved_and_restored(tmp_path, bias, token_ids):
    """bias='all' saves every bias, bias='paca_only' those of tuned layers; loading restores the outputs."""
    model = get_peft_model(tiny_gpt2(), PacaConfig(r=2, target_modules=["c_attn"], bias=bias)).eval()
    randomize(model, match="paca_delta")
    randomize(model, seed=1, match="bias")
    expected = model(token_ids).logits
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    if bias == "all":
        assert trainable_biases == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    else:
        assert trainable_biases == {f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)}
    path = saved(tmp_path, model)
    tensors = load_file(path / "adapter_model.safetensors")
    bias_keys = {k for k in tensors if k.endswith(".bias")}
    assert bias_keys == trainable_biases
    assert all(k in bias_keys or k.endswith((".paca_delta", ".paca_indices")) for k in tensors)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), path)
    assert torch.equal(loaded(token_ids).logits, expected)


def test_modules_to_save_are_saved_and_restored(tmp_path, token_ids):
    """modules_to_save (here GPT-2's final LayerNorm) is trained in full, saved and restored on load."""
    model = get_peft_model(tiny_gpt2(), PacaConfig(r=2, target_modules=["c_fc"], modules_to_save=["ln_f"])).eval()
    randomize(model, match="paca_delta")
    randomize(model, seed=1, match="modules_to_save")
    expected = model(token_ids).logits
    path = saved(tmp_path, model)
    tensors = load_file(path / "adapter_model.safetensors")
    extra = {k for k in tensors if not k.endswith((".paca_delta", ".paca_indices"))}
    assert extra == {"base_model.model.transformer.ln_f.weight", "base_model.model.transformer.ln_f.bias"}
    loaded = PeftModel.from_pretrained(tiny_gpt2(), path)
    assert torch.equal(loaded(token_ids).logits, expected)
    assert not torch.equal(tiny_gpt2()(token_ids).logits, expected)


def test_adapter_loaded_onto_bf16_base_keeps_fp32_delta(tmp_path, token_ids):
    """Loading onto a bf16 base keeps the saved fp32 delta in fp32 (bf16 would round small updates away)."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear"))
    randomize(model, std=1e-3)
    path = saved(tmp_path, model)
    loaded = PeftModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), path)
    for name, layer in paca_layers(loaded).items():
        delta = layer.paca_delta["default"]
        assert delta.dtype == torch.float32
        assert torch.equal(delta, paca_layers(model)[name].paca_delta["default"].detach())
    assert loaded(token_ids).logits.dtype == torch.bfloat16
