"""Column selection: each strategy picks what it says, and the choice is saved, never re-made on load.

Pinned: random is seeded per layer; weight_norm equals the top-r column norms of W0 (of deq(Q) on a
4-bit base); select_by_gradient equals the top-r accumulated squared weight gradients computed by
plain autograd on the dense model, updates nothing and leaves .grad alone; structured picks whole head
blocks on attention output projections (head_dim from the config, GQA and head_dim != hidden/heads
included), any channels on FFN down projections, rounds r to whole heads with a warning, falls back to
random with a warning elsewhere; bad input is refused with a clear error.
"""

import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from paca import PacaConfig, paca_layers, select_by_gradient
from paca.selection import random_columns


def indices(model, adapter="default"):
    return {name: layer.paca_indices[adapter].clone() for name, layer in paca_layers(model).items()}


def calibration_batches(n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 64, (2, 10), generator=g)), "labels": ids} for _ in range(n)]


# -- random, weight_norm --------------------------------------------------------------------------------


def test_random_is_seeded_per_layer_and_reproducible():
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", seed=7))
    first = indices(model)
    again = indices(get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", seed=7)))
    other_seed = indices(get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", seed=8)))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other_seed[k]) for k in first)
    assert len({tuple(v.tolist()) for v in first.values()}) > 1  # layers do not share one draw
    for name, layer in paca_layers(model).items():
        assert torch.equal(first[name], random_columns(layer.in_features, 4, 7, name))


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_weight_norm_picks_the_largest_column_norms(model_fn):
    model = get_peft_model(model_fn(), PacaConfig(r=5, target_modules="all-linear", selection="weight_norm"))
    for name, layer in paca_layers(model).items():
        weight = layer.get_base_layer().weight.detach()
        norms = weight.norm(dim=layer.column_axis ^ 1)  # column norms over the output dimension
        expected = norms.topk(5).indices.sort().values
        assert torch.equal(layer.paca_indices["default"], expected), name
        assert norms[expected].min() >= norms[~torch.isin(torch.arange(norms.numel()), expected)].max()


# -- gradient -------------------------------------------------------------------------------------------


def reference_gradient_scores(batches, steps):
    """sum_steps sum_i (dL/dW_ij)^2 with plain autograd on the dense weights of a fresh model."""
    model = tiny_llama()
    weights = {n.removesuffix(".weight"): p for n, p in model.named_parameters() if n.endswith("proj.weight")}
    scores = {n: torch.zeros(p.shape[1]) for n, p in weights.items()}
    for batch in batches[:steps]:
        model.zero_grad()
        model(**batch).loss.backward()
        for n, p in weights.items():
            scores[n] += p.grad.pow(2).sum(0)
    return scores


def test_select_by_gradient_picks_the_top_accumulated_squared_gradients():
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", selection="gradient"))
    batches = calibration_batches(4)
    chosen = select_by_gradient(model, batches, steps=3)
    scores = reference_gradient_scores(batches, steps=3)
    assert chosen.keys() == scores.keys()
    for name, idx in chosen.items():
        assert torch.equal(idx, scores[name].topk(4).indices.sort().values), name
        assert torch.equal(paca_layers(model)[name].paca_indices["default"], idx)


def test_accumulated_micro_batches_score_like_the_joined_batch():
    """accumulate=2 over halves (with different response-token counts) equals accumulate=1 on the whole."""
    g = torch.Generator().manual_seed(3)
    joined = []
    for _ in range(3):
        ids = torch.randint(0, 64, (4, 10), generator=g)
        labels = ids.clone()
        labels[0, :7] = -100  # the first half counts fewer tokens: a plain mean of halves would weight it wrong
        joined.append({"input_ids": ids, "labels": labels})
    halves = [{k: v[rows] for k, v in batch.items()} for batch in joined for rows in (slice(0, 2), slice(2, 4))]
    whole = select_by_gradient(
        get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear")), joined, steps=3
    )
    accumulated = select_by_gradient(
        get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear")), halves, steps=3, accumulate=2
    )
    unweighted = select_by_gradient(
        get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear")), halves, steps=6
    )  # each half squared on its own: a different score
    assert all(torch.equal(whole[name], accumulated[name]) for name in whole)
    assert any(not torch.equal(whole[name], unweighted[name]) for name in whole)


def test_select_by_gradient_updates_nothing_and_leaves_grads_alone():
    model = get_peft_model(
        tiny_llama(),
        PacaConfig(r=4, target_modules=["q_proj", "down_proj"], selection="gradient", modules_to_save=["lm_head"]),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    select_by_gradient(model, calibration_batches(2), steps=2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in before if "paca_delta" in n or "modules_to_save" in n
    }


def test_gradient_indices_are_saved_and_loading_does_not_reselect(tmp_path):
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", selection="gradient"))
    placeholder = indices(model)
    chosen = select_by_gradient(model, calibration_batches(3), steps=3)
    assert any(not torch.equal(chosen[k], placeholder[k]) for k in chosen)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert all(torch.equal(idx, chosen[name]) for name, idx in indices(loaded).items())


def test_select_by_gradient_bad_input():
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules=["q_proj"], selection="gradient"))
    with pytest.raises(ValueError, match="no calibration batches"):
        select_by_gradient(model, [], steps=10)
    with pytest.raises(ValueError, match="batch 1 has no 'labels'"):
        select_by_gradient(model, [calibration_batches(1)[0], {"input_ids": torch.zeros(1, 4, dtype=torch.long)}])
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        select_by_gradient(model, calibration_batches(1), steps=0)
    with pytest.raises(ValueError, match="accumulate must be a positive integer"):
        select_by_gradient(model, calibration_batches(1), accumulate=0)
    with pytest.raises(ValueError, match="no PaCA layer with adapter 'other'"):
        select_by_gradient(model, calibration_batches(1), adapter_name="other")


# -- structured -----------------------------------------------------------------------------------------


def gqa_llama(head_dim=None):
    """Llama with 4 query heads, 2 KV heads; ``head_dim`` may differ from hidden / heads (as in Qwen3, Gemma)."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def assert_whole_blocks(idx, block):
    blocks = idx.reshape(-1, block)
    assert torch.equal(blocks[:, 0] % block, torch.zeros(blocks.shape[0], dtype=torch.long))
    assert torch.equal(blocks - blocks[:, :1], torch.arange(block).expand_as(blocks))


@pytest.mark.parametrize("head_dim", [None, 16])
def test_structured_picks_whole_heads_of_attention_output(head_dim):
    model = get_peft_model(
        gqa_llama(head_dim), PacaConfig(r=16, target_modules=["o_proj", "down_proj"], selection="structured")
    )
    hd = head_dim or 8
    for name, layer in paca_layers(model).items():
        idx = layer.paca_indices["default"]
        if name.endswith("o_proj"):
            assert layer.in_features == 4 * hd  # num_attention_heads (not KV heads) x head_dim
            assert idx.numel() == 16
            assert_whole_blocks(idx, hd)
        else:
            assert idx.numel() == 16 and layer.in_features == 48  # whole intermediate channels: any 16 of 48


def test_structured_rounds_r_to_whole_heads_and_keeps_the_scale(token_ids):
    with pytest.warns(UserWarning, match=r"r=12 is rounded to 2 head\(s\) = 16 columns"):
        model = get_peft_model(
            gqa_llama(), PacaConfig(r=12, paca_alpha=24.0, target_modules=["o_proj"], selection="structured")
        )
    for layer in paca_layers(model).values():
        assert layer.r["default"] == 16 and layer.paca_delta["default"].shape == (32, 16)
        assert layer.scaling["default"] == 24.0 / 12  # the config's per-column scale
        assert_whole_blocks(layer.paca_indices["default"], 8)


def test_structured_on_gpt2_and_fallback_for_hidden_input_layers():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        model = get_peft_model(
            tiny_gpt2(), PacaConfig(r=8, target_modules=["c_attn", "c_proj"], random_seed=0, selection="structured")
        )
    fallback = [w for w in caught if "'c_attn' layers read the hidden state" in str(w.message)]
    assert len(fallback) == 1 and "chosen at random" in str(fallback[0].message)  # once, not once per block
    layers = paca_layers(model)
    assert_whole_blocks(layers["transformer.h.0.attn.c_proj"].paca_indices["default"], 8)  # n_embd 32 / 4 heads
    assert layers["transformer.h.0.mlp.c_proj"].in_features == 128  # FFN down: channels
    assert torch.equal(
        layers["transformer.h.0.attn.c_attn"].paca_indices["default"],
        random_columns(32, 8, 0, "transformer.h.0.attn.c_attn"),
    )


def test_structured_indices_survive_save_and_load(tmp_path, token_ids):
    config = PacaConfig(r=12, target_modules=["o_proj", "down_proj"], selection="structured")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(gqa_llama(), config)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(gqa_llama(), tmp_path)
    assert all(torch.equal(idx, indices(model)[name]) for name, idx in indices(loaded).items())


def test_structured_without_attention_layout_is_a_clear_error():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = torch.nn.Linear(16, 16)

    model = torch.nn.Sequential(Attention())
    with pytest.raises(
        ValueError, match=r"module '0.o_proj': selection='structured' cannot find the attention layout"
    ):
        get_peft_model(model, PacaConfig(r=4, target_modules=["o_proj"], selection="structured"))

    llama = gqa_llama()
    llama.config.head_dim = 12  # says 4 x 12 = 48 columns, o_proj reads 32
    with pytest.raises(ValueError, match=r"reads 32 columns but the config gives .* = 48"):
        get_peft_model(llama, PacaConfig(r=8, target_modules=["o_proj"], selection="structured"))
