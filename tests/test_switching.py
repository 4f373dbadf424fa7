"""Several adapters on one base: in-place switching and weighted combinations.

Pinned: after switch_adapter each adapter gives its own outputs (those of a model holding only it), on
16-bit and 4-bit bases, and switching back restores the base weight bit for bit; a weighted
combination equals the dense reference W0 + sum_a w_a (W_a - W0), with overlapping columns or not,
and saves and loads like any adapter; bad names are refused.
"""

import functools

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel, get_peft_model

from paca import PacaConfig, add_weighted_adapter, paca_layers, switch_adapter


def trained_adapter(tmp_path, name, seed, r=4, target_modules=("q_proj", "o_proj", "down_proj"), model_fn=tiny_llama):
    """Save an adapter with random deltas (a stand-in for training) and return its directory and own logits fn."""
    model = get_peft_model(
        model_fn(), PacaConfig(r=r, paca_alpha=2.0 * r, target_modules=list(target_modules), seed=seed)
    )
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "paca_delta" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path / name
    model.save_pretrained(path)
    return str(path)


def own_logits(model_fn, path, token_ids):
    return PeftModel.from_pretrained(model_fn(), path)(input_ids=token_ids).logits


def two_adapters(tmp_path, model_fn=tiny_llama, trained_on=tiny_llama):
    a = trained_adapter(tmp_path, "a", seed=1, model_fn=trained_on)
    b = trained_adapter(tmp_path, "b", seed=2, model_fn=trained_on)
    model = PeftModel.from_pretrained(model_fn(), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    return model, a, b


def test_switching_gives_each_adapter_its_own_outputs_and_restores_the_base(tmp_path, token_ids):
    model, a, b = two_adapters(tmp_path)
    base_weights = {n: m.get_base_layer().weight.detach().clone() for n, m in paca_layers(model).items()}
    expected = {"a": own_logits(tiny_llama, a, token_ids), "b": own_logits(tiny_llama, b, token_ids)}
    assert not torch.allclose(expected["a"], expected["b"])
    for name in ["a", "b", "a", "b"]:
        switch_adapter(model, name)
        assert all(m.merged_adapters == [name] for m in paca_layers(model).values())
        torch.testing.assert_close(model(input_ids=token_ids).logits, expected[name], atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for n, m in paca_layers(model).items():
        assert torch.equal(m.get_base_layer().weight, base_weights[n])  # bit for bit


def test_switching_on_a_4bit_base(tmp_path, token_ids):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    wide = functools.partial(
        tiny_llama, hidden=64
    )  # 4-bit layer widths a multiple of 32, as bitsandbytes' CPU kernel needs
    wide().save_pretrained(tmp_path / "base")

    def load_4bit():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu")

    model, a, b = two_adapters(tmp_path, model_fn=load_4bit, trained_on=wide)
    for name, path in [("a", a), ("b", b), ("a", a)]:
        switch_adapter(model, name)
        torch.testing.assert_close(
            model(input_ids=token_ids).logits, own_logits(load_4bit, path, token_ids), atol=0, rtol=0
        )


def dense_reference_logits(paths, weights, token_ids):
    """Logits of a plain model whose weights are W0 + sum_a w_a (W_a - W0), built from the adapters' dense deltas."""
    reference = tiny_llama()
    with torch.no_grad():
        for path, w in zip(paths, weights):
            for name, layer in paca_layers(PeftModel.from_pretrained(tiny_llama(), path)).items():
                reference.get_submodule(name).weight.add_(w * layer.get_delta_weight("default"))
    return reference(input_ids=token_ids).logits


@pytest.mark.parametrize("overlap", [True, False])
def test_weighted_combination_equals_the_dense_reference(tmp_path, token_ids, overlap):
    # r=24 of 32 columns: two adapters must share columns; r=2 with other seeds: typically disjoint.
    r = 24 if overlap else 2
    a = trained_adapter(tmp_path, "a", seed=1, r=r, target_modules=["q_proj", "o_proj"])
    b = trained_adapter(tmp_path, "b", seed=2, r=r, target_modules=["o_proj", "down_proj"])
    model = PeftModel.from_pretrained(tiny_llama(), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    layers = paca_layers(model)
    shared = [
        torch.isin(m.paca_indices["a"], m.paca_indices["b"]).any()
        for m in layers.values()
        if "a" in m.paca_delta and "b" in m.paca_delta
    ]
    assert any(shared) == overlap

    model.add_weighted_adapter(["a", "b"], [0.7, -1.5], "mix")
    switch_adapter(model, "mix")
    expected = dense_reference_logits([a, b], [0.7, -1.5], token_ids)
    torch.testing.assert_close(model(input_ids=token_ids).logits, expected, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path / "saved", selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved" / "mix")
    torch.testing.assert_close(loaded(input_ids=token_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_weighted_combination_of_one_adapter_scales_it(tmp_path, token_ids):
    a = trained_adapter(tmp_path, "a", seed=1)
    model = PeftModel.from_pretrained(tiny_llama(), a, adapter_name="a")
    add_weighted_adapter(model, ["a"], [0.5], "scaled")
    model.set_adapter("scaled")
    torch.testing.assert_close(
        model(input_ids=token_ids).logits, dense_reference_logits([a], [0.5], token_ids), atol=1e-5, rtol=1e-5
    )


def test_bad_adapter_names(tmp_path):
    model, _, _ = two_adapters(tmp_path)
    with pytest.raises(ValueError, match=r"adapter 'c' is not loaded; loaded: \['a', 'b'\]"):
        switch_adapter(model, "c")
    with pytest.raises(ValueError, match="must be distinct and loaded"):
        add_weighted_adapter(model, ["a", "c"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="2 adapters and 1 weights"):
        add_weighted_adapter(model, ["a", "b"], [1.0], "mix")
    with pytest.raises(ValueError, match="'a' already exists"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "a")
