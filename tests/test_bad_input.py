"""Bad input: each gives a clear error naming the module or file, and leaves the model exactly as it was.

"Exactly as it was": the same module type at every name and every state_dict tensor torch.equal.
"""

import json
import os
import struct

import pytest
import torch
from conftest import needs_peft_0_21, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from paca import PacaConfig, paca_layers
from paca.tuner.config import _peft_saves_paca_biases

WEIGHTS = "adapter_model.safetensors"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def snapshot(model):
    return (
        {n: type(m) for n, m in model.named_modules()},
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(before, model):
    types, state, grads = before
    now_types, now_state, now_grads = snapshot(model)
    assert now_types == types, "module types changed"
    assert now_state.keys() == state.keys(), "state_dict keys changed"
    for k, v in state.items():
        assert v.dtype == now_state[k].dtype and torch.equal(v, now_state[k]), f"{k} changed"
    assert now_grads == grads, "requires_grad flags changed"


@pytest.fixture
def adapter_dir(tmp_path):
    """A saved PaCA adapter (all-linear, r=4, random nonzero deltas) for tiny_llama()."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def rewrite_tensors(directory, edit):
    path = os.path.join(directory, WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


# ----------------------------------------------------------------------------------------------------
# configuration and injection
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -3, 2.5, True])
def test_non_positive_or_non_integer_r_is_rejected_by_the_config(r):
    """PacaConfig(r<=0 or not an int) raises ValueError naming r before any model is touched."""
    with pytest.raises(ValueError, match=r"PacaConfig\.r must be a positive integer"):
        PacaConfig(r=r, target_modules=["q_proj"])


def test_r_larger_than_a_linear_layers_input_is_refused_as_peft_does():
    """r > d_in on a linear layer: PEFT's PaCA's ValueError, naming the module; the model is left as it was."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"module 'model\.layers\.1\.self_attn\.q_proj': r \(40\) cannot be larger "
        r"than in_features \(32\)",
    ):
        get_peft_model(
            model, PacaConfig(r=40, target_modules=r"model\.layers\.(0\.mlp\.down_proj|1\.self_attn\.q_proj)")
        )
    assert_unchanged(before, model)


class _ConvNet(torch.nn.Module):
    """An image stem (3 input channels) and a wider convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.body = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.body(self.stem(x).relu())


def test_r_larger_than_a_convolutions_input_tunes_all_its_channels_and_says_so_once(tmp_path):
    """r > C_in on a convolution (an image stem's 3 channels; a layer type PEFT's PaCA does not tune) never fails the
    model: it tunes all its input channels at the adapter's scale, one warning names it, and it saves and loads."""
    cfg = PacaConfig(r=8, target_modules=["stem", "body"])
    with pytest.warns(
        UserWarning, match=r"r exceeds the input dimension of 1 layer\(s\): stem \(r=8, d_in=3\)"
    ) as caught:
        model = get_peft_model(_ConvNet(), cfg)
    assert len([w for w in caught if "exceeds the input dimension" in str(w.message)]) == 1
    layers = paca_layers(model)
    narrow, wide = layers["stem"], layers["body"]
    assert narrow.r["default"] == 3 and torch.equal(narrow.paca_indices["default"], torch.arange(3))
    assert narrow.scaling["default"] == wide.scaling["default"] == cfg.paca_alpha / 8
    with torch.no_grad():
        narrow.paca_delta["default"].normal_()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model(x)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="exceeds the input dimension"):
        loaded = PeftModel.from_pretrained(_ConvNet(), tmp_path)
    assert torch.equal(loaded(x), out)


def test_no_matching_target_module_is_an_error_naming_the_targets():
    """target_modules matching nothing: ValueError naming the requested targets; model untouched."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no_such_proj"):
        get_peft_model(model, PacaConfig(r=2, target_modules=["no_such_proj"]))
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    "target,type_name", [("post_attention_layernorm", "LlamaRMSNorm"), ("embed_tokens", "Embedding")]
)
def test_unsupported_layer_type_is_a_type_error_naming_module_and_type(target, type_name):
    """Targeting a norm or an embedding: TypeError naming the module and its type; earlier injections undone."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"'model\.(layers\.0\.)?{target}'.*{type_name}"):
        get_peft_model(model, PacaConfig(r=2, target_modules=["q_proj", target]))
    assert_unchanged(before, model)


def test_bad_second_adapter_leaves_existing_paca_model_unchanged(token_ids):
    """add_adapter failing on a later module (a norm): error names the module; the first adapter is intact."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules=["q_proj", "down_proj"]))
    logits = model(token_ids).logits
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"model\.layers\.\d\.post_attention_layernorm"):
        model.add_adapter("big", PacaConfig(r=4, target_modules=["down_proj", "post_attention_layernorm"]))
    assert_unchanged(before, model)
    assert set(model.peft_config) == {"default"}
    assert torch.equal(model(token_ids).logits, logits)


# ----------------------------------------------------------------------------------------------------
# loading an adapter that does not fit, or a damaged file
# ----------------------------------------------------------------------------------------------------


def _other_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@needs_peft_0_21
def test_adapter_for_a_differently_sized_model_names_the_module(adapter_dir):
    """Loading onto a wider model: ValueError naming a module and the shapes; the base model is untouched."""
    model = _other_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.\w+\.\w+_proj'.*shape"):
        PeftModel.from_pretrained(model, adapter_dir)
    assert_unchanged(before, model)


@needs_peft_0_21
def test_bad_adapter_loaded_into_existing_peft_model_leaves_it_unchanged(adapter_dir, tmp_path, token_ids):
    """PeftModel.load_adapter of an adapter that does not fit: error, and the loaded adapters are as before."""
    model = get_peft_model(_other_llama(), PacaConfig(r=2, target_modules=["q_proj"]))
    logits = model(token_ids).logits
    before = snapshot(model)
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(adapter_dir, adapter_name="other")
    assert_unchanged(before, model)
    assert set(model.peft_config) == {"default"}
    assert torch.equal(model(token_ids).logits, logits)


@pytest.mark.skipif(_peft_saves_paca_biases(), reason="peft >= 0.21 saves PaCA's biases and checks files itself")
def test_under_peft_0_20_biases_are_refused_and_a_misfit_adapter_is_a_value_error_naming_the_module(adapter_dir):
    """axolotl 0.19 pins peft 0.20 (`make test-axolotl`): nothing that peft would lose or take silently passes."""
    with pytest.raises(ValueError, match=r"bias='all' needs peft >= 0.21.*saves no bias"):
        PacaConfig(r=2, target_modules=["q_proj"], bias="all")
    with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.\w+\.\w+_proj'.*shape"):
        PeftModel.from_pretrained(_other_llama(), adapter_dir)


def _load_fails(directory, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(model, directory)
    assert_unchanged(before, model)


def test_missing_weights_file_names_the_file(adapter_dir):
    """No adapter_model.safetensors: error naming the missing file path."""
    os.remove(adapter_dir / WEIGHTS)
    _load_fails(adapter_dir, rf"{adapter_dir / WEIGHTS}.*not found")


@pytest.mark.parametrize("keep", [4, 100, -16], ids=["no_header", "cut_header", "cut_data"])
def test_truncated_weights_file_names_the_file(adapter_dir, keep):
    """A truncated adapter_model.safetensors (inside the header or the data): error naming the file."""
    path = adapter_dir / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    _load_fails(adapter_dir, rf"{path}.*truncated")


@pytest.mark.parametrize(
    "garbage", ["all", "header_json", "header_length", "header_not_a_table", "entry_without_offsets"]
)
def test_corrupted_weights_file_names_the_file(adapter_dir, garbage):
    """Garbage bytes in place of the file, its JSON header or its header length, or a well-formed JSON header
    of the wrong structure: error naming the file."""
    path = adapter_dir / WEIGHTS
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    if garbage in ("header_not_a_table", "entry_without_offsets"):
        header = b"[1, 2, 3]" if garbage == "header_not_a_table" else b'{"x": {"dtype": "F32", "shape": [1]}}'
        data[8 : 8 + header_len] = header.ljust(header_len)
    elif garbage == "all":
        data = bytearray(os.urandom(len(data)))
        data[:8] = struct.pack("<Q", 200)  # a plausible length so the header itself is the garbage
    elif garbage == "header_json":
        data[8:40] = b"\xff\xfe garbage, not json \x00\x01\x02\x03\x04\x05"[:32]
    else:
        data[:8] = struct.pack("<Q", 2**62)
    path.write_bytes(bytes(data))
    _load_fails(adapter_dir, rf"{path}.*(corrupted|truncated)")


@pytest.mark.parametrize(
    "defect,match",
    [
        ("duplicate", "sorted and unique"),
        ("unsorted", "sorted and unique"),
        ("negative", "out of range"),
        ("too_large", "out of range"),
        ("wrong_count", "paca_indices for r="),
        ("float_indices", "integer"),
    ],
)
@needs_peft_0_21
def test_bad_indices_in_file_are_rejected_naming_file_or_module(adapter_dir, defect, match):
    """Duplicate, unsorted, out-of-range, miscounted or non-integer paca_indices: error naming where."""

    def edit(tensors):
        idx = tensors[f"{Q0}.paca_indices"]
        if defect == "duplicate":
            idx[1] = idx[0]
        elif defect == "unsorted":
            idx[:] = idx.flip(0)
        elif defect == "negative":
            idx[0] = -1
        elif defect == "too_large":
            idx[-1] = 32  # q_proj has d_in 32
        elif defect == "wrong_count":
            tensors[f"{Q0}.paca_indices"] = idx[:3]
        else:
            tensors[f"{Q0}.paca_indices"] = idx.float()

    rewrite_tensors(adapter_dir, edit)
    _load_fails(adapter_dir, rf"(layers\.0\.self_attn\.q_proj|{adapter_dir / WEIGHTS}).*{match}")


@needs_peft_0_21
@pytest.mark.parametrize("defect", ["nan", "missing_indices", "r_in_config"])
def test_inconsistent_adapter_is_rejected(adapter_dir, defect):
    """NaN delta, a delta without its indices, or a config r that disagrees with the file: clear error."""
    if defect == "r_in_config":
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        config["r"] = 3
        (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
        match = r"q_proj.*shape.*r=3"
    else:

        def edit(tensors):
            if defect == "nan":
                tensors[f"{Q0}.paca_delta"][0, 0] = float("nan")
            else:
                del tensors[f"{Q0}.paca_indices"]

        rewrite_tensors(adapter_dir, edit)
        match = "NaN" if defect == "nan" else "paca_indices"
    _load_fails(adapter_dir, rf"q_proj.*{match}|{match}.*q_proj" if defect != "r_in_config" else match)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation noise during the load
def test_adapter_file_missing_a_layer_warns_naming_its_keys(adapter_dir):
    """A file lacking one targeted layer's entries loads (PEFT's contract) with a warning naming the keys."""
    rewrite_tensors(adapter_dir, lambda t: [t.pop(f"{Q0}.paca_delta"), t.pop(f"{Q0}.paca_indices")])
    with pytest.warns(UserWarning, match=r"missing adapter keys.*layers\.0\.self_attn\.q_proj\.paca_delta"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)
