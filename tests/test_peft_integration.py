"""PaCA behaves as a PEFT method: every PeftModel / transformers / Trainer entry point a user reaches for.

Reference for outputs: the plain base model (bit-exact where PEFT promises it: disabled adapter, unmerge,
unload) or a dense float64 re-computation of the tuned columns.
"""

import contextlib
import copy
import io

import peft
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from packaging import version
from peft import get_peft_model

from paca import PacaConfig, PacaLayer, paca_layers

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_deltas(model, seed=0, std=0.1, adapter=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "paca_delta" in n and (adapter is None or n.endswith(f".{adapter}")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def base_state(model):
    """Every tensor of a plain (or unloaded) model, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(state, model):
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k, v in state.items():
        assert torch.equal(v, now[k]), f"{k} changed"


def linear_out_features(module):
    return module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.weight.shape[0]


# ----------------------------------------------------------------------------------------------------
# targeting and trainable parameters
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


# ----------------------------------------------------------------------------------------------------
# disable / merge / unmerge / unload
# ----------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layers_report_in_and_out_features_of_their_base(arch):
    make = tiny_llama if arch == "llama" else tiny_gpt2
    model = get_peft_model(make(), PacaConfig(r=4, target_modules="all-linear"))
    for layer in paca_layers(model).values():
        weight = layer.get_base_layer().weight
        d_out, d_in = (weight.shape[1], weight.shape[0]) if layer.is_transposed else weight.shape
        assert (layer.in_features, layer.out_features) == (d_in, d_out)


# ----------------------------------------------------------------------------------------------------
# transformers integration
# ----------------------------------------------------------------------------------------------------


def test_transformers_load_adapter_on_plain_model_matches_peft_model(tmp_path, token_ids):
    """transformers' model.load_adapter(dir) on a plain model gives the PeftModel's outputs."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    randomize_deltas(model)
    model.eval()
    expected = model(token_ids).logits
    model.save_pretrained(tmp_path / "adapter")

    plain = tiny_llama()
    plain.load_adapter(str(tmp_path / "adapter"))
    assert len(paca_layers(plain)) == 14
    plain.eval()
    torch.testing.assert_close(plain(token_ids).logits, expected, rtol=0, atol=0)


def _trainer(model, out_dir, max_steps):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 8), generator=g)]
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="linear",
        weight_decay=0.01,
    )
    return Trainer(model=model, args=args, train_dataset=data)


def test_trainer_resume_from_checkpoint_gives_same_delta_as_uninterrupted_run(tmp_path):
    """HF Trainer: save at step 2, resume_from_checkpoint to step 4 == an uninterrupted 4-step run."""
    cfg = PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    full = get_peft_model(tiny_llama(), cfg)
    _trainer(full, tmp_path / "full", max_steps=4).train()
    expected = {n: p.detach().clone() for n, p in full.named_parameters() if "paca_delta" in n}
    assert any(p.abs().sum() > 0 for p in expected.values())

    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    resumed = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    _trainer(resumed, tmp_path / "resumed", max_steps=4).train(resume_from_checkpoint=str(checkpoint))
    got = {n: p.detach() for n, p in resumed.named_parameters() if "paca_delta" in n}
    assert got.keys() == expected.keys()
    for n, d in expected.items():
        torch.testing.assert_close(got[n], d, rtol=1e-5, atol=1e-7, msg=n)


def test_mamba_layers_its_fused_kernel_reads_directly_are_named_and_train_on_the_slow_path():
    """Mamba's fused CUDA path reads x_proj / dt_proj / out_proj weights directly (their deltas would be ignored
    there): one warning names them; on the CPU path they are called and train."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    base = MambaForCausalLM(
        MambaConfig(
            hidden_size=32, state_size=4, num_hidden_layers=2, vocab_size=64, intermediate_size=64, time_step_rank=4
        )
    )
    with pytest.warns(
        UserWarning,
        match=r"Mamba's fused CUDA path .* 4 tuned layer\(s\) \(e\.g\. "
        r"'backbone\.layers\.0\.mixer\.x_proj'\)",
    ):
        model = get_peft_model(base, PacaConfig(r=2, target_modules=["in_proj", "x_proj", "out_proj"]))
    ids = torch.randint(0, 64, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
