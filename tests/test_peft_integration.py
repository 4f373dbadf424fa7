"""PaCA behaves as a PEFT method: targeting, trainable parameters, initialisation and several adapters.

Pinned: the trainable parameters are sum(d_out * r) and PEFT counts them so; target_modules (a list, all-linear,
the architecture's LoRA defaults), exclude_modules and layers_to_transform pick the layers PEFT's LoRA would; a
fresh adapter leaves the outputs unchanged and init_weights=False starts with a small nonzero delta; layers report
their base's in/out features; named adapters each give their own outputs, a mixed-adapter batch gives each row its
own adapter, and delete_adapter keeps the other. Merge/unload: tests/test_peft_integration_merge.py; transformers
and Trainer: tests/test_peft_integration_transformers.py.

Reference for outputs: the plain base model or a model carrying only the adapter in question.
"""

import contextlib
import io

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import get_peft_model

from paca import PacaConfig, PacaLayer, paca_layers

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_deltas(model, seed=0, std=0.1, adapter=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "paca_delta" in n and (adapter is None or n.endswith(f".{adapter}")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def linear_out_features(module):
    return module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.weight.shape[0]


# ----------------------------------------------------------------------------------------------------
# targeting, trainable parameters and the initial delta
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("r", [1, 4])
def test_trainable_parameters_are_sum_of_d_out_times_r(arch, r):
    """get_nb_trainable_parameters / print_trainable_parameters count exactly sum(d_out * r) over tuned layers."""
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    expected = sum(
        linear_out_features(m) * r
        for n, m in base.named_modules()
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and "lm_head" not in n
    )
    model = get_peft_model(base, PacaConfig(r=r, target_modules="all-linear"))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in printed.getvalue()
    assert all("paca_delta" in n for n, p in model.named_parameters() if p.requires_grad)


def test_target_modules_list_wraps_only_named_layers():
    """A list of names wraps exactly those layers (suffix match) in every block, nothing else."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=2, target_modules=["q_proj", "down_proj"]))
    names = set(paca_layers(model))
    assert names == {f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_linear_wraps_every_linear_but_lm_head(arch):
    """'all-linear' wraps every nn.Linear / GPT-2 Conv1D except the output head."""
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    expected = {
        n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    } - {"lm_head"}
    model = get_peft_model(base, PacaConfig(r=2, target_modules="all-linear"))
    assert set(paca_layers(model)) == expected
    assert not isinstance(model.base_model.model.lm_head, PacaLayer)


def test_default_targets_are_lora_defaults_for_the_architecture():
    """target_modules unset: the architecture's usual LoRA targets (q_proj and v_proj for Llama)."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=2))
    assert set(paca_layers(model)) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }


def test_exclude_modules_are_left_alone():
    """exclude_modules removes matching layers from the targets."""
    model = get_peft_model(
        tiny_llama(), PacaConfig(r=2, target_modules="all-linear", exclude_modules=["down_proj", "k_proj"])
    )
    names = set(paca_layers(model))
    assert names and not any(n.endswith(("down_proj", "k_proj")) for n in names)
    assert len(names) == 2 * (len(LLAMA_LINEAR) - 2)


def test_layers_to_transform_limits_tuning_to_given_blocks():
    """layers_to_transform=[1] (layers_pattern 'layers') tunes only block 1."""
    model = get_peft_model(
        tiny_llama(), PacaConfig(r=2, target_modules=LLAMA_LINEAR, layers_to_transform=[1], layers_pattern="layers")
    )
    names = set(paca_layers(model))
    assert len(names) == len(LLAMA_LINEAR) and all(n.startswith("model.layers.1.") for n in names)


def test_fresh_adapter_leaves_outputs_unchanged(token_ids):
    """D starts at zero: a new PaCA model gives exactly the base model's logits."""
    expected = tiny_llama()(token_ids).logits
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear"))
    assert torch.equal(model(token_ids).logits, expected)


def test_init_weights_false_starts_with_a_small_nonzero_delta(token_ids):
    """PEFT's convention for tests: init_weights=False gives an adapter that changes the outputs from the start,
    normal(0, 0.1) from the global RNG as PEFT's PaCA draws it: the same one for the same torch seed."""
    base_logits = tiny_llama()(token_ids).logits
    models = []
    for _ in range(2):
        base = tiny_llama()
        torch.manual_seed(3)
        models.append(get_peft_model(base, PacaConfig(r=4, init_weights=False)))
    deltas = [[p.detach() for n, p in m.named_parameters() if "paca_delta" in n] for m in models]
    assert all(0.05 < d.std() < 0.2 for d in deltas[0])
    assert all(torch.equal(a, b) for a, b in zip(*deltas))
    assert not torch.allclose(models[0](token_ids).logits, base_logits)
    assert torch.equal(get_peft_model(tiny_llama(), PacaConfig(r=4))(token_ids).logits, base_logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layers_report_in_and_out_features_of_their_base(arch):
    make = tiny_llama if arch == "llama" else tiny_gpt2
    model = get_peft_model(make(), PacaConfig(r=4, target_modules="all-linear"))
    for layer in paca_layers(model).values():
        weight = layer.get_base_layer().weight
        d_out, d_in = (weight.shape[1], weight.shape[0]) if layer.is_transposed else weight.shape
        assert (layer.in_features, layer.out_features) == (d_in, d_out)


# ----------------------------------------------------------------------------------------------------
# several adapters
# ----------------------------------------------------------------------------------------------------


def _single_adapter_logits(config, source, adapter, token_ids):
    """Logits of a fresh model carrying only ``adapter``'s deltas copied from ``source``."""
    single = get_peft_model(tiny_llama(), config)
    wanted = {
        n.replace(f".{adapter}", ".default"): p
        for n, p in source.named_parameters()
        if n.endswith(f"paca_delta.{adapter}")
    }
    with torch.no_grad():
        for n, p in single.named_parameters():
            if "paca_delta" in n:
                p.copy_(wanted.pop(n))
    assert not wanted
    return single(token_ids).logits


def test_named_adapters_each_give_their_own_outputs(token_ids):
    """add_adapter + set_adapter: each adapter gives the outputs of a model carrying only that adapter."""
    cfg_a = PacaConfig(r=4, target_modules=["q_proj", "v_proj"], seed=1)
    cfg_b = PacaConfig(r=2, paca_alpha=4.0, target_modules=["v_proj", "down_proj"], seed=2)
    model = get_peft_model(tiny_llama(), cfg_a)
    model.add_adapter("b", cfg_b)
    randomize_deltas(model, seed=5, std=0.3)
    assert model.active_adapter == "default"
    logits_a = model(token_ids).logits
    torch.testing.assert_close(logits_a, _single_adapter_logits(cfg_a, model, "default", token_ids))
    model.set_adapter("b")
    logits_b = model(token_ids).logits
    torch.testing.assert_close(logits_b, _single_adapter_logits(cfg_b, model, "b", token_ids))
    assert not torch.allclose(logits_a, logits_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("paca_delta.b") for n in trainable)


def test_mixed_adapter_batch_gives_each_row_its_own_adapter(token_ids):
    """model(..., adapter_names=[...]) as PEFT's LoRA offers it: row i runs with adapter_names[i] ("__base__": no
    adapter), equal to running that adapter on the whole batch; also through generate(); training mode, unknown
    names and merged adapters are refused."""
    # PEFT's modules_to_save wrapper needs every named adapter to have its copy: both train the head.
    cfg_a = PacaConfig(r=4, target_modules=["q_proj", "v_proj"], seed=1, modules_to_save=["lm_head"])
    cfg_b = PacaConfig(
        r=2, paca_alpha=4.0, target_modules=["v_proj", "down_proj"], seed=2, modules_to_save=["lm_head"]
    )
    model = get_peft_model(tiny_llama(), cfg_a)
    model.add_adapter("b", cfg_b)
    randomize_deltas(model, seed=5, std=0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save.b" in name:
                p.add_(0.1)
    model.eval()
    one = token_ids[:1]
    ids = torch.cat([one, one.flip(1), one.roll(1, 1)])  # 3 rows
    per_adapter = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        per_adapter[name] = model(ids).logits
    with model.disable_adapter():
        per_adapter["__base__"] = model(ids).logits
    names = ["b", "__base__", "default"]
    mixed = model(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], rtol=1e-6, atol=1e-6)
    generated = model.generate(ids[:2, :4], adapter_names=["default", "__base__"], max_new_tokens=3, do_sample=False)
    model.set_adapter("default")
    alone = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[0], alone[0])
    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        model(ids, adapter_names=["nope", "b", "b"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(ids, adapter_names=names)


def test_delete_adapter_removes_its_state_and_keeps_the_other(token_ids):
    """delete_adapter drops every tensor of that adapter; the remaining adapter's outputs are unchanged."""
    cfg = PacaConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(), cfg)
    model.add_adapter("b", PacaConfig(r=2, target_modules=["q_proj", "o_proj"], seed=3))
    randomize_deltas(model, seed=5, std=0.3)
    expected = model(token_ids).logits
    model.set_adapter("b")
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        model.delete_adapter("b")
    assert "b" not in model.peft_config
    assert not any(k.endswith(".b") for k in model.state_dict())
    model.set_adapter("default")
    torch.testing.assert_close(model(token_ids).logits, expected, rtol=0, atol=0)
