"""The tuned columns stay written in the frozen weight between calls (paca.ops.columns).

Pinned: how many column writes a step makes (forward one, backward none unless the weight was read as the base in
between); every reader of the base weight sees W0 (deepcopy, pickle, ``.to()``, tied modules, the benchmark's
other methods), new base weights are picked up, switching adapters between forward and backward, fused AdamW
(which bumps no version counter), and re-gathered weights (ZeRO-3/FSDP) rewritten in backward.
Reference: the dense float64 layer of test_layers.
"""

import copy
import io

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model
from test_layers import LAYER_KINDS, dense_reference, make_layer, randomize_delta, reference_forward

from paca import PacaConfig, paca_layers
from paca.bench.measure import DispatchedOperators


def count_writes(fn) -> int:
    """Writes into weights: a column write (index_add_ on CPU, when D has the weight's dtype; else an add and an
    index_copy_) or a restore (index_copy_)."""
    with DispatchedOperators() as ops:
        fn()
    return ops.counts["index_copy_"] + ops.counts["index_add_"]


def reference_grads(layer, x, adapter="default"):
    """(dL/dx, dL/dD) of loss = sum(y^2) through the dense float64 reference."""
    xr = x.detach().double().requires_grad_(True)
    delta = layer.paca_delta[adapter]
    d = delta.detach().double().requires_grad_(True)
    base = layer.get_base_layer()
    w = layer.state_dict()["base_layer.weight"].detach().double()
    shift = d.t() if layer.column_axis == 0 else d
    w = w.index_add(layer.column_axis, layer.paca_indices[adapter], shift * layer.scaling[adapter])
    reference_forward(layer, xr, w, base.bias.detach().double()).square().sum().backward()
    return xr.grad, d.grad


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_a_step_writes_the_columns_once_backward_reuses_them_and_then_restores_w0(kind):
    layer, x = make_layer(kind, dtype=torch.float64)
    randomize_delta(layer)
    x.requires_grad_(True)
    w0 = layer.get_base_layer().weight.detach().clone()
    layer(x).square().sum().backward()  # the first step also copies the pretrained columns
    x.grad = layer.paca_delta["default"].grad = None
    out = []
    assert count_writes(lambda: out.append(layer(x))) == 1
    assert count_writes(lambda: out[0].square().sum().backward()) == 1  # the restore: no second write
    assert torch.equal(layer.get_base_layer().weight, w0)
    expected_x, expected_delta = reference_grads(layer, x)
    torch.testing.assert_close(x.grad.double(), expected_x)
    torch.testing.assert_close(layer.paca_delta["default"].grad.double(), expected_delta)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_a_base_forward_between_forward_and_backward_is_rewritten_for_backward(kind):
    """TRL's DPO: policy forward, reference forward with the adapters disabled, then the policy's backward."""
    layer, x = make_layer(kind, dtype=torch.float64)
    randomize_delta(layer)
    x.requires_grad_(True)
    y = layer(x)
    layer.enable_adapters(False)
    reference = layer(x.detach())
    layer.enable_adapters(True)
    torch.testing.assert_close(reference, layer.get_base_layer()(x.detach()), rtol=0, atol=0)
    assert count_writes(lambda: y.square().sum().backward()) == 2  # written again for backward, then restored
    expected_x, expected_delta = reference_grads(layer, x)
    torch.testing.assert_close(x.grad, expected_x)
    torch.testing.assert_close(layer.paca_delta["default"].grad, expected_delta)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_backward_after_a_later_forward_of_the_same_delta_is_exact_and_restores(kind):
    """Micro-batches whose backward runs after the next one's forward, and a non-reentrant checkpoint's recompute:
    the last forward's backward reuses its write and restores W0; an earlier one writes again and restores."""
    layer, x = make_layer(kind, dtype=torch.float64)
    randomize_delta(layer)
    x.requires_grad_(True)
    w0 = layer.get_base_layer().weight.detach().clone()
    first, second = layer(x), layer(x)
    # second's backward: reuse, restore; first's: write, restore
    assert count_writes(lambda: (second.square().sum() + first.square().sum()).backward()) == 3
    assert torch.equal(layer.get_base_layer().weight, w0)
    expected_x, expected_delta = reference_grads(layer, x)
    torch.testing.assert_close(x.grad, 2 * expected_x)
    torch.testing.assert_close(layer.paca_delta["default"].grad, 2 * expected_delta)

    layer.paca_delta["default"].grad = x.grad = None
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    # the recompute finds the first forward's write: restore, write, then backward's restore
    assert count_writes(lambda: y.square().sum().backward()) == 3
    assert torch.equal(layer.get_base_layer().weight, w0)
    torch.testing.assert_close(layer.paca_delta["default"].grad, expected_delta)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_saved_tensor_hooks_that_copy_give_the_reference_gradients(kind):
    """torch.autograd.graph.save_on_cpu on a GPU hands backward copies of the saved weight and indices: backward
    still reads the module's weight (a copy holds the forward's write already; writing into it again doubled it)."""
    layer, x = make_layer(kind, dtype=torch.float64)
    randomize_delta(layer)
    x.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    expected_x, expected_delta = reference_grads(layer, x)
    torch.testing.assert_close(x.grad, expected_x)
    torch.testing.assert_close(layer.paca_delta["default"].grad, expected_delta)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_a_base_weight_changed_in_place_between_forward_and_backward_is_refused_as_by_torch(kind):
    """As for nn.Linear: backward cannot know what the weight held at forward, so autograd's version check refuses."""
    layer, x = make_layer(kind, dtype=torch.float64)
    y = layer(x.requires_grad_(True))
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.square().sum().backward()


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_another_adapter_between_forward_and_backward_gives_each_its_own_gradients(kind):
    layer, x = make_layer(kind, dtype=torch.float64, r=4)
    layer.update_layer("other", r=5, paca_alpha=2.0, seed=7)
    randomize_delta(layer, "default", seed=1)
    randomize_delta(layer, "other", seed=2)
    x.requires_grad_(True)
    y_default = layer(x)
    layer.set_adapter("other")  # also freezes "default" (PEFT): its graph is built, keep it trainable
    layer.paca_delta["default"].requires_grad_(True)
    y_other = layer(x)
    (y_default.square().sum() + y_other.square().sum()).backward()
    layer.set_adapter("default")
    _, expected_default = reference_grads(layer, x, "default")
    _, expected_other = reference_grads(layer, x, "other")
    torch.testing.assert_close(layer.paca_delta["default"].grad, expected_default)
    torch.testing.assert_close(layer.paca_delta["other"].grad, expected_other)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_fused_adamw_step_shows_in_the_next_forward(kind):
    """Fused AdamW updates D without bumping its version counter: every forward writes from the current D."""
    layer, x = make_layer(kind)
    randomize_delta(layer)
    optimizer = torch.optim.AdamW([layer.paca_delta["default"]], lr=0.1, fused=True)
    for _ in range(2):
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.testing.assert_close(layer(x).double(), dense_reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_after_a_forward_holds_the_pretrained_weight(how):
    layer, x = make_layer("linear")
    randomize_delta(layer)
    w = layer.state_dict()["base_layer.weight"].clone()
    out = layer(x)
    if how == "deepcopy":
        clone = copy.deepcopy(layer)
    else:
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert torch.equal(clone.get_base_layer().weight, w)  # the raw tensor, before the copy ever runs
    assert clone._column_writer is not layer._column_writer and clone._column_writer.key != layer._column_writer.key
    assert torch.equal(clone(x), out)
    assert torch.equal(layer(x), out)


def test_converting_after_a_forward_converts_the_pretrained_weight():
    layer, x = make_layer("linear", dtype=torch.float64)
    randomize_delta(layer)
    w = layer.state_dict()["base_layer.weight"].clone()
    layer(x)
    layer.float()
    assert torch.equal(layer.get_base_layer().weight, w.float())
    torch.testing.assert_close(layer(x.float()).double(), dense_reference(layer, x.float()), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.state_dict()["base_layer.weight"], w.float())


def test_new_base_weights_loaded_after_a_forward_are_used():
    layer, x = make_layer("linear", dtype=torch.float64)
    randomize_delta(layer)
    layer(x)
    new_weight = torch.randn_like(layer.get_base_layer().weight)
    layer.load_state_dict({"base_layer.weight": new_weight}, strict=False)
    assert torch.equal(layer.state_dict()["base_layer.weight"], new_weight)
    torch.testing.assert_close(layer(x), dense_reference(layer, x))


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # PEFT's, expected here
def test_a_weight_another_module_holds_is_restored_after_every_call(token_ids):
    """Tied input embeddings and output head: the head's tuned columns never reach the embedding lookup."""
    base = tiny_llama()
    base.config.tie_word_embeddings = True
    base.lm_head.weight = base.model.embed_tokens.weight
    embedding = base.model.embed_tokens.weight.detach().clone()
    model = get_peft_model(base, PacaConfig(r=4, target_modules=["lm_head", "q_proj"]))
    layers = paca_layers(model)
    assert (
        layers["lm_head"]._column_writer.transient
        and not layers["model.layers.0.self_attn.q_proj"]._column_writer.transient
    )
    with torch.no_grad():
        layers["lm_head"].paca_delta["default"].normal_()
    model.train()
    first = model(input_ids=token_ids).logits
    assert torch.equal(base.model.embed_tokens.weight, embedding)
    first.square().mean().backward()
    assert torch.equal(base.model.embed_tokens.weight, embedding)
    assert torch.equal(model(input_ids=token_ids).logits, first)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # PEFT's, expected here
def test_a_tied_head_computes_with_its_tuned_columns_and_gets_their_gradient(token_ids):
    """The transient head (its weight shared with the embeddings) still computes with W0 + s D in forward and backward:
    logits, the head delta's gradient and the input embeddings' gradient (through the head's input gradient) equal
    an untied float64 model whose head holds the tuned columns densely."""
    base = tiny_llama().double()
    base.config.tie_word_embeddings = True
    base.lm_head.weight = base.model.embed_tokens.weight
    w0 = base.model.embed_tokens.weight.detach().clone()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, PacaConfig(r=4, target_modules=["lm_head"]))
    head = paca_layers(model)["lm_head"]
    with torch.no_grad():
        head.paca_delta["default"].normal_()
    model.train()
    embeds = w0[token_ids].requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    (logits * probe).sum().backward()

    idx, s = head.paca_indices["default"], head.scaling["default"]
    tuned = w0.index_add(1, idx, s * head.paca_delta["default"].detach()).requires_grad_(True)
    reference.lm_head = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False, dtype=w0.dtype)  # untied
    reference.lm_head.weight = torch.nn.Parameter(tuned)
    reference.requires_grad_(False).lm_head.weight.requires_grad_(True)
    reference_embeds = w0[token_ids].requires_grad_(True)
    expected = reference(inputs_embeds=reference_embeds).logits
    (expected * probe).sum().backward()
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(embeds.grad, reference_embeds.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        head.paca_delta["default"].grad, s * reference.lm_head.weight.grad[:, idx], rtol=1e-10, atol=1e-10
    )
    assert torch.equal(base.model.embed_tokens.weight, w0)


def test_regathered_weights_are_rewritten_in_backward():
    """ZeRO-3 (``ds_id``) and FSDP free the unsharded weight after forward and gather it pristine again, often at the
    same address and version: backward must not trust that the columns are still written."""
    layer, x = make_layer("linear", dtype=torch.float64)
    randomize_delta(layer)
    layer.get_base_layer().weight.ds_id = 0
    y = layer(x.requires_grad_(True))
    with torch.no_grad():
        layer.get_base_layer().weight.data.copy_(
            layer.state_dict()["base_layer.weight"]
        )  # a re-gather: no version bump
    assert count_writes(lambda: y.square().sum().backward()) == 2  # written again, then restored
    expected_x, _ = reference_grads(layer, x)
    torch.testing.assert_close(x.grad, expected_x)


def test_benchmark_steps_leave_the_shared_base_weights_pretrained():
    """paca bench runs every method on one set of base weights: after a PaCA step they are W0 again."""
    from paca.bench.measure import train_step
    from paca.bench.methods import make_trainee
    from paca.bench.presets import ModelSpec
    from paca.bench.suite import build_model, random_tokens

    base = build_model(ModelSpec("tiny"), torch.float32, torch.device("cpu"), seed=0)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainee = make_trainee("paca", base, 8, 16, 0)
    ids = random_tokens(512, 1, 16, seed=0, device=torch.device("cpu"))
    for _ in range(2):
        train_step(trainee, ids, torch.float32)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_trl_dpo_pattern_policy_then_reference_with_adapters_disabled_then_backward(token_ids):
    """TRL's DPOTrainer without precomputed reference log-probs: the reference forward (adapters disabled) runs
    between the policy's forward and backward. It must see the base model, and the policy's gradients are as if
    it had not run."""
    base = tiny_llama()
    with torch.no_grad():
        base_logits = base(input_ids=token_ids).logits
    model = get_peft_model(base, PacaConfig(r=4))
    with torch.no_grad():
        for layer in paca_layers(model).values():
            layer.paca_delta["default"].normal_(std=0.1)
    model.train()
    model(input_ids=token_ids).logits.square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    policy = model(input_ids=token_ids).logits
    with torch.no_grad(), model.disable_adapter():
        reference = model(input_ids=token_ids).logits
    policy.square().mean().backward()
    torch.testing.assert_close(reference, base_logits, rtol=0, atol=0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-7, msg=name)
