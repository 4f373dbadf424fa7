"""PaCA behaves as a PEFT method: disable_adapter, merge, unmerge, merge_and_unload and unload.

Pinned: inside disable_adapter() the outputs are the base model's bit for bit (merged or not); unmerge_adapter and
unload restore every base tensor bit for bit (unload also after a training step's forward and backward, and after
merge_adapter); merge_and_unload gives the plain architecture with the PaCA model's outputs; a trained
modules_to_save module without a weight of its own survives merge_and_unload (and unload as PEFT's version does
it); safe_merge of a broken adapter says what PEFT's methods say and leaves that layer unmerged.
"""

import copy

import peft
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from packaging import version
from peft import get_peft_model
from test_peft_integration import randomize_deltas

from paca import PacaConfig, PacaLayer, paca_layers


def base_state(model):
    """Every tensor of a plain (or unloaded) model, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(state, model):
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k, v in state.items():
        assert torch.equal(v, now[k]), f"{k} changed"


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disable_adapter_gives_base_outputs_exactly(arch, merged, token_ids):
    """Inside disable_adapter() logits equal the base model's bit for bit (merged or not); outside they don't."""
    make = tiny_llama if arch == "llama" else tiny_gpt2
    expected = make()(token_ids).logits
    model = get_peft_model(make(), PacaConfig(r=4, target_modules="all-linear")).eval()
    randomize_deltas(model)
    tuned = model(token_ids).logits
    if merged:
        model.merge_adapter()
    with model.disable_adapter():
        assert torch.equal(model(token_ids).logits, expected)
    torch.testing.assert_close(model(token_ids).logits, tuned, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tuned, expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_then_unmerge_restores_every_base_tensor_bit_for_bit(arch, token_ids):
    """merge_adapter changes the weights (outputs close to unmerged); unmerge_adapter restores them exactly."""
    make = tiny_llama if arch == "llama" else tiny_gpt2
    model = get_peft_model(make(), PacaConfig(r=4, target_modules="all-linear")).eval()
    randomize_deltas(model)
    before = base_state(model)
    unmerged = model(token_ids).logits
    model.merge_adapter()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(model(token_ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert_state_equal(before, model)
    assert torch.equal(model(token_ids).logits, unmerged)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_gives_plain_model_with_same_outputs(arch, token_ids):
    """merge_and_unload returns the plain architecture (no PaCA layers) with outputs close to the PaCA model."""
    make = tiny_llama if arch == "llama" else tiny_gpt2
    model = get_peft_model(make(), PacaConfig(r=4, target_modules="all-linear")).eval()
    randomize_deltas(model)
    expected = model(token_ids).logits
    merged = model.merge_and_unload()
    assert type(merged) is type(make())
    assert not any(isinstance(m, PacaLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(make().state_dict())
    torch.testing.assert_close(merged(token_ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge_first", [False, True], ids=["unmerged", "merged"])
def test_unload_restores_base_model_bit_for_bit(merge_first, token_ids):
    """unload() gives the base model back with every tensor exactly as before, after a training step's forward and
    backward (the tuned columns are written in the weights then) and even after merge_adapter."""
    reference = tiny_llama()
    before = base_state(reference)
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear"))
    randomize_deltas(model)
    model(token_ids, labels=token_ids).loss.backward()
    if merge_first:
        model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, PacaLayer) for m in plain.modules())
    assert_state_equal(before, plain)
    assert torch.equal(plain(token_ids).logits, reference(token_ids).logits)


def tiny_roberta_classifier():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    return RobertaForSequenceClassification(config).eval()


@pytest.mark.parametrize("case", ["roberta_seq_cls_head", "llama_mlp_block"])
def test_unload_and_merge_keep_a_trained_modules_to_save_module_that_has_no_weight(case, token_ids):
    """modules_to_save holding a module without a ``weight`` of its own (RoBERTa's classification head, a Llama MLP
    block): merge_and_unload keeps the trained copy with the PaCA model's outputs; unload keeps it too."""
    if case == "roberta_seq_cls_head":
        make, cfg = tiny_roberta_classifier, PacaConfig(r=4, task_type="SEQ_CLS", target_modules=["query", "value"])
        ids = token_ids[:, 1:]  # RoBERTa's position ids start after the padding index
    else:
        make, cfg = tiny_llama, PacaConfig(r=4, target_modules=["q_proj"], modules_to_save=["layers.0.mlp"])
        ids = token_ids
    model = get_peft_model(make(), cfg).eval()
    randomize_deltas(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05)
    expected = model(ids).logits
    unloaded = copy.deepcopy(model).unload()
    assert not any(isinstance(m, PacaLayer) for m in unloaded.modules())
    merged = model.merge_and_unload()
    assert not any(isinstance(m, PacaLayer) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    base_without_trained_copy = make()(ids).logits
    # unload keeps the trained copy on peft < 0.22; peft 0.22 gives back the original module, for every method
    keeps_trained_copy = version.parse(peft.__version__) < version.parse("0.22")
    assert torch.allclose(unloaded(ids).logits, base_without_trained_copy) != keeps_trained_copy


def test_safe_merge_of_a_broken_adapter_says_what_peft_methods_say_and_leaves_that_layer_unmerged():
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = paca_layers(model)["model.layers.1.self_attn.v_proj"]
    weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.paca_delta["default"][0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"NaNs detected in the merged weights\. The adapter default seems to be "
        r"broken \(module 'model\.layers\.1\.self_attn\.v_proj'",
    ):
        model.merge_adapter(safe_merge=True)
    assert not layer.merged and torch.equal(layer.get_base_layer().weight, weight)
