"""`paca export`: a saved PaCA adapter as a plain merged transformers model, or as an exact PEFT LoRA adapter.

Reference: the PaCA model's own logits (PeftModel.from_pretrained on the same base).
"""

import json
import os
import subprocess
import sys

import peft
import pytest
import torch
from conftest import needs_peft_0_21, tiny_gpt2, tiny_llama
from packaging import version
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from paca import PacaConfig, paca_layers
from paca.cli import main as paca_main
from paca.export import lora_factors

MAKE = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_adapter(tmp_path, arch, **config):
    """Save a base model and a PaCA adapter (random nonzero deltas) for it; (base_dir, adapter_dir, logits fn)."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    MAKE[arch]().save_pretrained(base_dir)
    config = {"r": 4, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **config}
    model = get_peft_model(MAKE[arch](), PacaConfig(**config)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model


def run_export(adapter_dir, to, out, base_dir):
    assert paca_main(["export", "--adapter", str(adapter_dir), "--to", to, str(out), "--base", str(base_dir)]) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_merged_loads_as_plain_model_with_equal_outputs(tmp_path, arch, token_ids):
    """--to merged: AutoModelForCausalLM loads the directory (no PEFT); logits equal the PaCA model's."""
    base_dir, adapter_dir, model = make_adapter(tmp_path, arch)
    run_export(adapter_dir, "merged", tmp_path / "merged", base_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("paca" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(MAKE[arch]().state_dict())
    torch.testing.assert_close(merged(token_ids).logits, model(token_ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_lora_loads_as_plain_peft_lora_adapter_with_equal_outputs(tmp_path, arch, token_ids):
    """--to lora: a LoraConfig adapter with lora_A / lora_B that PeftModel.from_pretrained loads on the base;
    logits equal the PaCA model's within 1e-5."""
    base_dir, adapter_dir, model = make_adapter(tmp_path, arch)
    run_export(adapter_dir, "lora", tmp_path / "lora", base_dir)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert tensors and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert len(tensors) == 2 * len(paca_layers(model))
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora").eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    torch.testing.assert_close(lora(token_ids).logits, model(token_ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        dict(rank_pattern={"down_proj": 8}, alpha_pattern={"down_proj": 4.0, r"layers\.1\..*q_proj": 2.0}),
        dict(r=4, paca_indices_pattern={"q_proj": [0, 5, 9]}),
    ],
    ids=["rank_and_alpha_pattern", "indices_pattern"],
)
def test_export_lora_of_layers_with_their_own_r_and_scale_is_exact(tmp_path, config, token_ids):
    """rank_pattern / alpha_pattern, and paca_indices_pattern (given columns, any number): each layer has its
    own r and scale; merged and LoRA exports reproduce the PaCA model's logits."""
    base_dir, adapter_dir, model = make_adapter(tmp_path, "llama", **config)
    layers = paca_layers(model)
    if "rank_pattern" in config:
        down, q1, q0 = (
            layers[f"model.layers.{i}.{n}"]
            for i, n in ((0, "mlp.down_proj"), (1, "self_attn.q_proj"), (0, "self_attn.q_proj"))
        )
        assert (down.r["default"], down.scaling["default"]) == (8, 4.0 / 8)
        assert (q1.r["default"], q1.scaling["default"]) == (4, 2.0 / 4)
        assert (q0.r["default"], q0.scaling["default"]) == (4, 8.0 / 4)  # PEFT's default paca_alpha, 8
    else:  # PEFT's paca_indices_pattern: the given columns, at the config's scale paca_alpha / r
        assert {layer.r["default"] for layer in layers.values()} == {3, 4}
        assert {layer.scaling["default"] for layer in layers.values()} == {8.0 / 4}
    run_export(adapter_dir, "lora", tmp_path / "lora", base_dir)
    run_export(adapter_dir, "merged", tmp_path / "merged", base_dir)
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = model(token_ids).logits
    torch.testing.assert_close(lora(token_ids).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged(token_ids).logits, expected, rtol=1e-6, atol=1e-6)


@needs_peft_0_21
@pytest.mark.parametrize("bias", ["all", "paca_only"])
def test_export_lora_carries_trained_biases_and_modules_to_save(tmp_path, bias, token_ids):
    """Biases (bias='all' / 'paca_only') and modules_to_save travel into the LoRA adapter; outputs still equal."""
    base_dir, adapter_dir, model = make_adapter(
        tmp_path, "gpt2", target_modules=["c_attn", "c_fc"], bias=bias, modules_to_save=["ln_f"]
    )
    run_export(adapter_dir, "lora", tmp_path / "lora", base_dir)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["bias"] == {"all": "all", "paca_only": "lora_only"}[bias]  # a value LoRA readers know
    assert config["modules_to_save"] == ["ln_f"]
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora").eval()
    torch.testing.assert_close(lora(token_ids).logits, model(token_ids).logits, rtol=1e-5, atol=1e-5)
    run_export(adapter_dir, "merged", tmp_path / "merged", base_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(token_ids).logits, model(token_ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", [(1, 1), (3, 2)])
def test_lora_factors_reproduce_the_dense_delta_of_a_conv2d_layer(kernel):
    """For Conv2d, B (C_out, R, 1, 1) composed with A (R, C_in, kh, kw) equals the dense PaCA delta."""
    from paca.tuner import Conv as PacaConv

    torch.manual_seed(0)
    layer = PacaConv(torch.nn.Conv2d(6, 4, kernel), "default", "conv", r=2, paca_alpha=5.0)
    with torch.no_grad():
        layer.paca_delta["default"].normal_()
    a, b = lora_factors(
        layer.paca_delta["default"].detach(), layer.paca_indices["default"], layer.scaling["default"], 6, kernel
    )
    assert a.shape == (2 * kernel[0] * kernel[1], 6, *kernel) and b.shape == (4, a.shape[0], 1, 1)
    dense = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    torch.testing.assert_close(dense, layer.get_delta_weight("default"), rtol=0, atol=1e-7)


def test_python_dash_m_paca_is_the_same_entry_point_as_paca(tmp_path):
    """`python -m paca export ...` (subprocess) writes the same LoRA tensors as `paca export ...` in-process."""
    base_dir, adapter_dir, _ = make_adapter(tmp_path, "llama", target_modules=["q_proj", "down_proj"])
    run_export(adapter_dir, "lora", tmp_path / "in_process", base_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "paca",
            "export",
            "--adapter",
            str(adapter_dir),
            "--to",
            "lora",
            str(tmp_path / "module"),
            "--base",
            str(base_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["exported"] == "lora"
    a = load_file(tmp_path / "in_process" / "adapter_model.safetensors")
    b = load_file(tmp_path / "module" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["paca"] == "paca.cli:main"


def test_export_refuses_non_empty_output_directory(tmp_path, capsys):
    """An existing, non-empty output directory is an error naming it; nothing in it is touched."""
    base_dir, adapter_dir, _ = make_adapter(tmp_path, "llama", target_modules=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert paca_main(["export", "--adapter", str(adapter_dir), "--to", "lora", str(out), "--base", str(base_dir)]) == 1
    assert str(out) in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_export_to_lora_of_a_lora_adapter_says_it_is_one_already(tmp_path, capsys):
    """`--to lora` given a LoRA adapter (here: one exported before) is a one-line error, not a KeyError."""
    base_dir, adapter_dir, _ = make_adapter(tmp_path, "llama", target_modules=["q_proj"])
    run_export(adapter_dir, "lora", tmp_path / "lora", base_dir)
    assert (
        paca_main(
            [
                "export",
                "--adapter",
                str(tmp_path / "lora"),
                "--to",
                "lora",
                str(tmp_path / "again"),
                "--base",
                str(base_dir),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "holds a LORA adapter, not PaCA; it is already a PEFT LoRA adapter" in err and "Traceback" not in err
    assert not (tmp_path / "again").exists()


def test_export_errors_name_the_missing_file_or_the_missing_base(tmp_path, capsys):
    """Exit code 1 and a message naming the missing adapter file, or asking for --base when none is known."""
    base_dir, adapter_dir, _ = make_adapter(tmp_path, "llama", target_modules=["q_proj"])
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    for to in ("merged", "lora"):
        assert paca_main(["export", "--adapter", str(adapter_dir), "--to", to, str(tmp_path / to)]) == 1
        assert "--base" in capsys.readouterr().err
        assert not (tmp_path / to).exists()
    os.remove(adapter_dir / "adapter_model.safetensors")
    assert (
        paca_main(
            ["export", "--adapter", str(adapter_dir), "--to", "lora", str(tmp_path / "x"), "--base", str(base_dir)]
        )
        == 1
    )
    assert str(adapter_dir / "adapter_model.safetensors") in capsys.readouterr().err


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=63)
    ).eval()


def test_export_of_a_vision_language_adapter_trained_as_causal_lm(tmp_path, token_ids):
    """LLaVA tuned with task_type='CAUSAL_LM' (TRL's recipe): the model type has no causal-LM class, so both
    exports load the saved architecture; merged and LoRA reproduce the PaCA model's logits."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llava().save_pretrained(base_dir)
    model = get_peft_model(tiny_llava(), PacaConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    model.eval().save_pretrained(adapter_dir)
    ids = token_ids.clamp(max=62)  # no image tokens: a text-only forward
    expected = model(input_ids=ids).logits
    run_export(adapter_dir, "merged", tmp_path / "merged", base_dir)
    run_export(adapter_dir, "lora", tmp_path / "lora", base_dir)
    from transformers import LlavaForConditionalGeneration

    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
    lora = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base_dir), tmp_path / "lora")
    torch.testing.assert_close(lora.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def tiny_qwen3_moe():
    """Qwen3-MoE with a dense MLP in layer 0 (mlp_only_layers) and fused experts in layer 1, as DeepSeek-V3 mixes."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        mlp_only_layers=[0],
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval()


def test_moe_model_with_a_dense_layer_exports_merged_exactly_and_lora_refuses_what_peft_would_drop(
    tmp_path, token_ids, capsys
):
    """A Qwen3-MoE model: all-linear tunes attention, the dense MLP and the fused experts. peft < 0.22's MoE conversion
    would load the dense MLP's gate/up/down LoRA as expert parameters (their deltas lost), so there --to lora refuses,
    naming it; peft 0.22 keeps them, and the LoRA export is exact; --to merged is exact."""
    from paca.tuner.experts import Experts

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_qwen3_moe().save_pretrained(base_dir)
    model = get_peft_model(tiny_qwen3_moe(), PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert "model.layers.0.mlp.down_proj" in paca_layers(model)
    assert isinstance(paca_layers(model)["model.layers.1.mlp.experts"], Experts)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    model.save_pretrained(adapter_dir)
    expected = model(token_ids).logits
    code = paca_main(
        ["export", "--adapter", str(adapter_dir), "--to", "lora", str(tmp_path / "lora"), "--base", str(base_dir)]
    )
    if version.parse(peft.__version__) < version.parse("0.22"):
        assert code != 0 and not (tmp_path / "lora").exists()
        assert "as fused expert parameters" in capsys.readouterr().err
    else:
        assert code == 0
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora").eval()
        torch.testing.assert_close(lora(token_ids).logits, expected, rtol=1e-5, atol=1e-5)
    run_export(adapter_dir, "merged", tmp_path / "merged", base_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(token_ids).logits, expected, rtol=1e-6, atol=1e-6)
