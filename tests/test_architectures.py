"""The architecture matrix: tiny random models of every family users fine-tune, built from transformers configs.

For each: what ``all-linear`` tunes is what PEFT LoRA's ``all-linear`` tunes (or the difference, stated below);
one training step changes the outputs; save and reload gives the same outputs; merge_and_unload gives the same
outputs; ``paca export --to lora`` loads in plain PEFT with the same outputs (or is refused where plain PEFT would
load it wrong, as stated).
"""

import functools
import warnings

import peft
import pytest
import torch
import transformers
from packaging import version
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer, ParamWrapper

from paca import PacaConfig, paca_layers
from paca.export import export_lora
from paca.modeling import load_model

G = torch.Generator().manual_seed(7)
IDS = torch.randint(1, 60, (2, 10), generator=G)
PIXELS = torch.randn(2, 3, 28, 28, generator=G)
DECODER = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _text() -> dict:
    return {"input_ids": IDS}


def _llama_like(name: str):
    """A Llama-shaped decoder at DECODER's sizes."""
    cls, config_cls = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
        "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config),
        "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config),
        "olmo2": (transformers.Olmo2ForCausalLM, transformers.Olmo2Config),
    }[name]
    extra = dict(head_dim=8) if name == "gemma2" else dict(pad_token_id=0) if name == "phi3" else {}
    return cls(config_cls(**DECODER, **extra)), _text(), "CAUSAL_LM"


def _gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config), _text(), "CAUSAL_LM"


def _opt():
    config = transformers.OPTConfig(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    return transformers.OPTForCausalLM(config), _text(), "CAUSAL_LM"


def _gpt_neox():
    config = transformers.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return transformers.GPTNeoXForCausalLM(config), _text(), "CAUSAL_LM"


def _moe(name: str):
    from test_experts_models import tiny_moe

    return tiny_moe(name), _text(), "CAUSAL_LM"


def _mamba():
    config = transformers.MambaConfig(
        vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4
    )
    return transformers.MambaForCausalLM(config), _text(), "CAUSAL_LM"


def _bert():
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config), _text(), None


def _roberta_cls():
    config = transformers.RobertaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.RobertaForSequenceClassification(config), _text(), "SEQ_CLS"


def _seq2seq_inputs() -> dict:
    return {"input_ids": IDS, "decoder_input_ids": IDS[:, :6]}


def _t5():
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config), _seq2seq_inputs(), "SEQ_2_SEQ_LM"


def _bart():
    config = transformers.BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
    )
    return transformers.BartForConditionalGeneration(config), _seq2seq_inputs(), "SEQ_2_SEQ_LM"


def _vit():
    config = transformers.ViTConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    return transformers.ViTModel(config), {"pixel_values": PIXELS}, None


def _clip():
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        projection_dim=16,
    )
    return transformers.CLIPModel(config), {"input_ids": IDS, "pixel_values": PIXELS}, None


def _llava():
    from test_export import tiny_llava

    return tiny_llava(), _text(), "CAUSAL_LM"


# name -> a builder of (model, inputs, task_type); each builds the model right after build() seeds the RNG.
_BUILDERS = {
    **{
        name: functools.partial(_llama_like, name) for name in ("llama", "qwen2", "mistral", "phi3", "gemma2", "olmo2")
    },
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
    **{name: functools.partial(_moe, name) for name in ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3")},
    "mamba": _mamba,
    "bert": _bert,
    "roberta_cls": _roberta_cls,
    "t5": _t5,
    "bart": _bart,
    "vit": _vit,
    "clip": _clip,
    "llava": _llava,
}


def _build(name: str):
    """(model, inputs, task_type) of architecture ``name``.

    Raises:
        KeyError: ``name`` is no architecture of the matrix.
    """
    return _BUILDERS[name]()


def build(name: str):
    torch.manual_seed(0)
    model, inputs, task = _build(name)
    return model.eval(), inputs, task


def main_output(out) -> torch.Tensor:
    for key in ("logits_per_image", "logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise AssertionError(f"no output tensor in {type(out).__name__}")


def lora_targets(model) -> set[str]:
    """Modules PEFT LoRA wrapped: its layers, and the modules whose parameters a ParamWrapper wraps."""
    names = set()
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.")
        if isinstance(module, ParamWrapper):
            names.add(name.replace(".base_layer", ""))
        elif isinstance(module, LoraLayer):
            names.add(name)
    return names


# What PaCA's all-linear tunes beyond LoRA's, and why.
PACA_ONLY = {
    # PEFT has no v4-to-v5 conversion for gpt-oss: LoRA's all-linear leaves experts and routers out.
    "gpt_oss": {
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
        "model.layers.0.mlp.router",
        "model.layers.1.mlp.router",
    },
}
# peft < 0.22's MoE conversion turns the dense MLP's gate/up/down targets into expert parameters: the dense layers
# (Qwen3-MoE's mlp_only_layers, DeepSeek's first layer and shared experts) get no LoRA. peft 0.22 keeps them.
PEFT_MOVES_DENSE_MLPS = version.parse(peft.__version__) < version.parse("0.22")
if PEFT_MOVES_DENSE_MLPS:
    PACA_ONLY["qwen3_moe"] = {
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    }
    PACA_ONLY["deepseek_v3"] = {
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.shared_experts.gate_proj",
        "model.layers.1.mlp.shared_experts.up_proj",
        "model.layers.1.mlp.shared_experts.down_proj",
    }
# PEFT refuses LoRA on Mamba's out_proj (its fused CUDA kernel reads the weight), so LoRA runs without it; PaCA tunes
# it and warns that the fused path would bypass it (tests/test_peft_integration_transformers.py).
LORA_TARGETS = {"mamba": ["in_proj", "x_proj", "dt_proj"]}  # all-linear but out_proj
PACA_ONLY["mamba"] = {"backbone.layers.0.mixer.out_proj", "backbone.layers.1.mixer.out_proj"}
# Where plain PEFT would load the exported LoRA wrong (the conversion above) or refuse it (Mamba's out_proj),
# export --to lora refuses, saying why.
LORA_EXPORT_REFUSED = {"mamba": "plain PEFT refuses LoRA on 'backbone.layers.0.mixer.out_proj'"}
if PEFT_MOVES_DENSE_MLPS:
    LORA_EXPORT_REFUSED.update(qwen3_moe="as fused expert parameters", deepseek_v3="as fused expert parameters")

ARCHITECTURES = [
    "llama",
    "qwen2",
    "mistral",
    "phi3",
    "gemma2",
    "olmo2",
    "gpt2",
    "opt",
    "gpt_neox",
    "mixtral",
    "qwen3_moe",
    "gpt_oss",
    "deepseek_v3",
    "mamba",
    "bert",
    "roberta_cls",
    "t5",
    "bart",
    "vit",
    "clip",
    "llava",
]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_all_linear_matches_lora_trains_round_trips_merges_and_exports(name, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Mamba's slow-path notice and the like: covered by their own tests
        lora_config = LoraConfig(r=4, target_modules=LORA_TARGETS.get(name, "all-linear"), task_type=build(name)[2])
        lora = get_peft_model(build(name)[0], lora_config)
        base, inputs, task = build(name)
        model = get_peft_model(base, PacaConfig(r=4, target_modules="all-linear", task_type=task))
    tuned = set(paca_layers(model))
    assert tuned and tuned - lora_targets(lora) == PACA_ONLY.get(name, set())
    assert lora_targets(lora) <= tuned

    with torch.no_grad():
        before = main_output(model(**inputs)).clone()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = main_output(model(**inputs)).float()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))  # a layer-normed output's mean
    (out * probe).sum().backward()  # square is constant: a fixed projection is not
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = main_output(model(**inputs))
    assert not torch.allclose(after, before, atol=1e-6), "a training step left the outputs unchanged"

    model.save_pretrained(tmp_path / "adapter")
    base_dir = tmp_path / "base"
    build(name)[0].save_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(build(name)[0], tmp_path / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(main_output(loaded(**inputs)), after, rtol=1e-5, atol=1e-5)
            merged = loaded.merge_and_unload()
            torch.testing.assert_close(main_output(merged(**inputs)), after, rtol=1e-4, atol=1e-5)

        if name in LORA_EXPORT_REFUSED:
            with pytest.raises(ValueError, match=LORA_EXPORT_REFUSED[name]):
                export_lora(str(tmp_path / "adapter"), str(tmp_path / "lora"), str(base_dir))
            return
        export_lora(str(tmp_path / "adapter"), str(tmp_path / "lora"), str(base_dir))
        plain = PeftModel.from_pretrained(load_model(str(base_dir), task), tmp_path / "lora").eval()
        with torch.no_grad():
            torch.testing.assert_close(main_output(plain(**inputs)), after, rtol=1e-4, atol=1e-5)
