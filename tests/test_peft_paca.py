"""paca beside PEFT's own PaCA (peft >= 0.22): one config, the same columns, the same numbers, files both ways.

PEFT's PaCA is the reference here: the same config and seed must give the same columns, the same float64 outputs
and delta gradients over several training steps, merges, disabled adapters and unloads, and the base weights read
directly between steps must be W0 bit for bit in both.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model

import paca
from paca.tuner.config import PEFT_HAS_PACA

pytestmark = pytest.mark.skipif(not PEFT_HAS_PACA, reason="peft < 0.22 has no PaCA of its own")


def _pair(config_kwargs: dict, dtype=torch.float64, seed: int = 0):
    """The same base model under PEFT's PaCA and paca's, each adapter drawn from the same RNG state."""
    base = tiny_llama(dtype=dtype)
    torch.manual_seed(seed)
    theirs = get_peft_model(copy.deepcopy(base), peft.PacaConfig(**config_kwargs))
    torch.manual_seed(seed)
    ours = get_peft_model(copy.deepcopy(base), paca.PacaConfig(**config_kwargs))
    return theirs, ours


def _tuned(model) -> dict:
    return {name: m for name, m in model.named_modules() if hasattr(m, "paca_indices") and len(m.paca_indices)}


def _base_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "paca_" not in n}


def test_paca_config_is_peft_paca_config_with_its_fields_and_defaults():
    assert issubclass(paca.PacaConfig, peft.PacaConfig)
    ours, theirs = paca.PacaConfig(), peft.PacaConfig()
    for name in theirs.to_dict():
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.paca_alpha == 8 and ours.random_seed is None and ours.paca_indices_pattern == {}


def test_config_class_chooses_the_implementation():
    theirs, ours = _pair(dict(r=2, target_modules=["q_proj"], random_seed=0))
    assert type(theirs.base_model) is peft.tuners.paca.PacaModel
    assert type(ours.base_model) is paca.PacaModel
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert "implementation=paca" in repr(layer)


@pytest.mark.parametrize("random_seed", [0, 1234, None])
def test_same_config_selects_the_same_columns_as_peft(random_seed):
    theirs, ours = _pair(dict(r=3, target_modules="all-linear", random_seed=random_seed), seed=7)
    a, b = _tuned(theirs), _tuned(ours)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert torch.equal(a[name].paca_indices["default"], b[name].paca_indices["default"]), name


def test_paca_indices_pattern_gives_peft_columns_and_scale():
    pattern = {"model.layers.0.self_attn.q_proj": [5, 1, 3], "down_proj": [0, 2, 4, 6, 8]}
    theirs, ours = _pair(
        dict(
            r=2,
            paca_alpha=6,
            target_modules="all-linear",
            random_seed=0,
            paca_indices_pattern=pattern,
            init_weights=False,
        )
    )
    a, b = _tuned(theirs), _tuned(ours)
    for name in a:
        assert torch.equal(a[name].paca_indices["default"], b[name].paca_indices["default"]), name
        assert a[name].scaling["default"] == b[name].scaling["default"] == 3.0
    assert b["base_model.model.model.layers.0.self_attn.q_proj"].paca_indices["default"].tolist() == [1, 3, 5]
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(x).logits, ours(x).logits)


def _train(model, x, steps: int):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, grads


def test_float64_training_matches_peft_paca_with_merge_disable_and_unload():
    theirs, ours = _pair(dict(r=4, paca_alpha=16, target_modules="all-linear", random_seed=0, init_weights=False))
    pretrained = _base_weights(ours)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    (loss_a, grad_a), (loss_b, grad_b) = _train(theirs, x, 4), _train(ours, x, 4)
    assert [float(v) for v in loss_a] == [float(v) for v in loss_b]
    for step_a, step_b in zip(grad_a, grad_b):
        assert step_a.keys() == step_b.keys()
        for name in step_a:
            assert torch.equal(step_a[name], step_b[name]), name
    # PEFT's invariant: the base weights read directly between steps are the pretrained ones, bit for bit.
    assert all(torch.equal(pretrained[n], p) for n, p in _base_weights(ours).items())
    for model in (theirs, ours):
        model.eval()
    with torch.no_grad():
        tuned = theirs(x).logits
        assert torch.equal(tuned, ours(x).logits)
        with theirs.disable_adapter(), ours.disable_adapter():
            assert torch.equal(theirs(x).logits, ours(x).logits)
        theirs.merge_adapter(), ours.merge_adapter()
        assert torch.allclose(ours(x).logits, tuned, atol=1e-12, rtol=0)
        assert torch.equal(theirs(x).logits, ours(x).logits)
        theirs.unmerge_adapter(), ours.unmerge_adapter()
        assert all(torch.equal(pretrained[n], p) for n, p in _base_weights(ours).items())
    plain = dict(ours.unload().named_parameters())
    for name, weight in pretrained.items():
        assert torch.equal(plain[name.replace("base_model.model.", "").replace(".base_layer", "")], weight)


def test_base_weights_stay_pretrained_through_the_patterns_that_interleave_forward_and_backward():
    """Several forwards before one backward, a reference forward with the adapters disabled between a forward and
    its backward (DPO), and checkpointing's recompute: the losses are PEFT's and the base weights stay W0."""
    theirs, ours = _pair(dict(r=4, target_modules="all-linear", random_seed=0, init_weights=False))
    pretrained = _base_weights(ours)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))

    def step(model):
        first = model(x, labels=x).loss
        with torch.no_grad(), model.disable_adapter():
            reference = model(x).logits
        second = model(x.flip(0), labels=x.flip(0)).loss
        (first + second + 0.0 * reference.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return first.detach(), second.detach(), grads

    for model in (theirs, ours):
        model.train()
    a, b = step(theirs), step(ours)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])
    assert all(torch.equal(pretrained[n], p) for n, p in _base_weights(ours).items())
    for model in (theirs, ours):
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        model.base_model.model.enable_input_require_grads()
    a, b = step(theirs), step(ours)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[2][n], b[2][n]) for n in a[2])
    assert all(torch.equal(pretrained[n], p) for n, p in _base_weights(ours).items())


def test_several_active_adapters_sum_overlapping_columns_as_peft_does():
    kwargs = dict(r=6, target_modules="all-linear", init_weights=False)
    theirs, ours = _pair(dict(kwargs, random_seed=0))
    for model in (theirs, ours):
        torch.manual_seed(5)
        model.add_adapter("other", type(model.peft_config["default"])(**dict(kwargs, random_seed=1)))
        model.base_model.set_adapter(["default", "other"])
    a, b = _tuned(theirs), _tuned(ours)
    overlapping = sum(
        len(set(m.paca_indices["default"].tolist()) & set(m.paca_indices["other"].tolist())) for m in b.values()
    )
    assert overlapping > 0
    for name in a:
        for adapter in ("default", "other"):
            assert torch.equal(a[name].paca_delta[adapter], b[name].paca_delta[adapter])
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-12, rtol=0)


def test_old_seed_name_still_loads_configs_and_adapter_files(tmp_path):
    assert paca.PacaConfig(seed=5).random_seed == 5
    with pytest.raises(ValueError, match="seed is the old name of random_seed"):
        paca.PacaConfig(seed=5, random_seed=6)
    model = get_peft_model(tiny_llama(), paca.PacaConfig(r=2, target_modules=["q_proj"], random_seed=3))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["seed"] = saved.pop("random_seed")  # as paca < 0.2 wrote it
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    assert paca.PacaConfig.from_pretrained(str(tmp_path)).random_seed == 3
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert isinstance(loaded.peft_config["default"], paca.PacaConfig)


# A process that never imports paca: plain PEFT loads paca's nn.Linear adapter and refuses its Conv1D one.
PLAIN_PEFT = textwrap.dedent("""
    import sys, torch, peft, warnings
    warnings.simplefilter("ignore")
    from transformers import AutoModelForCausalLM
    from peft import PeftModel, get_peft_model
    out, x = sys.argv[1], torch.load(sys.argv[1] + "/x.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out + "/base"), out + "/from_paca").eval()
    with torch.no_grad():
        torch.save(model(x).logits, out + "/plain_peft_logits.pt")
    torch.manual_seed(4)
    config = peft.PacaConfig(r=3, target_modules="all-linear", random_seed=9, init_weights=False)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(out + "/base"), config).eval()
    theirs.save_pretrained(out + "/from_peft")
    with torch.no_grad():
        torch.save(theirs(x).logits, out + "/peft_logits.pt")
    try:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out + "/gpt2"), out + "/gpt2_paca")
        print("LOADED")
    except Exception as err:
        print("REFUSED", type(err).__name__, str(err).splitlines()[0])
    assert "paca" not in sys.modules
""")


def test_adapter_files_load_both_ways_with_plain_peft(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    ours = get_peft_model(base, paca.PacaConfig(r=3, target_modules="all-linear", random_seed=0, init_weights=False))
    ours.eval().save_pretrained(tmp_path / "from_paca")
    with torch.no_grad():
        paca_logits = ours(x).logits
    gpt2 = tiny_gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2")
    get_peft_model(gpt2, paca.PacaConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "gpt2_paca")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # paca's nn.Linear adapter in plain PEFT: the same logits.
    torch.testing.assert_close(torch.load(tmp_path / "plain_peft_logits.pt"), paca_logits, atol=1e-5, rtol=0)
    # A Conv1D adapter (a layer only paca tunes) fails loudly there.
    assert "REFUSED" in run.stdout and "not supported" in run.stdout, run.stdout
    # PEFT's own adapter in paca: the same logits, run by paca's layers.
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "from_peft")).eval()
    assert type(loaded.base_model) is paca.PacaModel
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, torch.load(tmp_path / "peft_logits.pt"), atol=1e-5, rtol=0)


def test_transformers_load_adapter_and_add_adapter_with_paca_adapters(tmp_path):
    model = get_peft_model(
        tiny_llama(), paca.PacaConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=1, init_weights=False)
    )
    model.save_pretrained(tmp_path)
    x = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x).logits
    hf = tiny_llama()
    hf.load_adapter(str(tmp_path), adapter_name="loaded")
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-6, rtol=0)
    fresh = tiny_llama()
    fresh.add_adapter(paca.PacaConfig(r=2, target_modules=["q_proj"], random_seed=1))
    assert any(type(m).__module__.startswith("paca.") for m in fresh.modules())


PLAIN_PEFT_4BIT = textwrap.dedent("""
    import sys, torch, warnings
    warnings.simplefilter("ignore")
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    out = sys.argv[1]
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(out + "/base", quantization_config=quantized, device_map="cpu")
    model = PeftModel.from_pretrained(base, out + "/adapter").eval()
    with torch.no_grad():
        torch.save(model(torch.load(out + "/x.pt")).logits, out + "/plain_peft_logits.pt")
    assert "paca" not in sys.modules
""")


def test_qpaca_adapter_loads_in_plain_peft_with_the_same_logits(tmp_path):
    """On a 4-bit base PEFT's PaCA runs a dequantized copy of the weight per call, paca's QPaCA the same maths: an
    adapter paca trained there loads in plain PEFT with the same logits."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama(hidden=64).save_pretrained(tmp_path / "base")  # widths bitsandbytes' CPU layout takes
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantized, device_map="cpu")
    torch.manual_seed(0)
    ours = get_peft_model(
        base, paca.PacaConfig(r=4, target_modules=["q_proj", "v_proj"], random_seed=0, init_weights=False)
    ).eval()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    ours.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = ours(x).logits
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_4BIT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "plain_peft_logits.pt"), expected, atol=1e-5, rtol=0)
