"""Shared fixtures: small models built from configs (no download), seeded."""

import warnings

import pytest
import torch

# peft and transformers emit deprecation noise on import; real warnings from our code still show.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(peft|transformers|torch)\b")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(peft|transformers)\b")

import paca  # noqa: E402,F401  (registers PaCA with PEFT)
from paca.tuner.config import _peft_saves_paca_biases  # noqa: E402

# peft 0.20 (axolotl 0.19's pin, `make test-axolotl`) saves no PaCA bias and has no hook to check an adapter file
# before injecting it; paca refuses the first and checks at load_state_dict instead, without the rollback.
needs_peft_0_21 = pytest.mark.skipif(not _peft_saves_paca_biases(), reason="peft < 0.21: behaviour of peft >= 0.21")

# Tiny models gain nothing from a second thread, and on a shared 2-core machine threads wait on each other.
torch.set_num_threads(1)


def tiny_llama(seed: int = 0, dtype=torch.float32, layers: int = 2, hidden: int = 32):
    """A Llama-shaped causal LM: hidden 32 (intermediate twice that), 2 layers, GQA (4 heads, 2 kv heads), vocab 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0):
    """A GPT-2 causal LM (transformers Conv1D layers: weight stored d_in x d_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs single-threaded and leaves the thread count as it found it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def token_ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def task_file(tmp_path_factory):
    """72 examples of `paca train`'s demo task (prompt/response JSONL), for end-to-end runs."""
    import json

    from paca.train import demo

    path = tmp_path_factory.mktemp("data") / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.new_task_records()[:72]))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    """The demo's tokenizer (chat template with user / assistant turns), one per test module."""
    from paca.train import demo

    return demo.build_tokenizer()
