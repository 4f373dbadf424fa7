"""The built-in demo: a tiny model is taught something general, then adapted to something new.

Words are 5 random letters a-z. The *general skill* (stage 1, data ``paca-demo-pretrain``) is four string
operations, named in the prompt:

    copy hello -> hello     upper hello -> HELLO     next hello -> ifmmp     prev hello -> gdkkn

(``next``/``prev`` move each letter one step along the alphabet, z->a and a->z). Stage 1 fully trains a
randomly initialised Llama-shaped model (2 layers, hidden 64, character tokenizer with a chat template)
on it to a held-out exact match the tests hold at 99% or more: the *base model* ``paca-demo``, built on first
use and cached under a key derived from the recipe, its code and the library versions (:func:`base_key`).

The *new task* (stage 2, data ``paca-demo``) chains two of the operations, which the base never saw:

    next upper hello -> IFMMP    prev upper hello -> GDKKN    next next hello -> jgnnq    prev prev hello -> fcjjm

Adapting the base with PaCA (150 steps) must reach 95% exact match on held-out words (never seen in either
stage), while the same budget from a random initialisation (``model=paca-demo-random``) does not learn it,
even with full fine-tuning: the adaptation reuses what stage 1 taught (the alphabet, the case mapping, where
each output letter comes from). Any one chain alone is learnable from scratch in this budget; the family of
four is not. docs/TRAINING.md has the figures and the commands that measure them.

The demo is a client of the run: :data:`BUILTINS` tells :func:`paca.train.pipeline.run` what the names
``paca-demo``, ``paca-demo-random`` and the two tasks stand for, and stage 1 is itself such a run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string

from .builtin import BuiltinModel, BuiltinSources
from .config import DEMO, DEMO_PRETRAIN, DEMO_RANDOM, DEMO_SETTINGS, TrainConfig

LETTERS = string.ascii_lowercase
WORD_LENGTH = 5
PRETRAIN_OPERATIONS = ("copy", "upper", "next", "prev")
NEW_TASK = (("next", "upper"), ("prev", "upper"), ("next", "next"), ("prev", "prev"))  # left to right
NEW_TASK_EXAMPLES = 4800 + 256  # 150 steps of 32, and the held-out set (eval_split=256)

# Stage 1. The cached base's key is derived from all of it, the code that trains it and the versions that
# change its numbers (base_key), so an edit here rebuilds the base instead of reusing a stale one.
BASE_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# A rate at which the base learns all four operations to full held-out exact match (docs/TRAINING.md says how it
# was chosen); 256 examples held out, as in stage 2.
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR, PRETRAIN_SEED = 800, 32, 3e-3, 0
PRETRAIN_EXAMPLES = PRETRAIN_STEPS * PRETRAIN_BATCH + 256

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = string.ascii_letters + string.digits + " .,:;!?'\"-+*/=()\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ----------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------


def apply_operation(name: str, word: str) -> str:
    if name == "copy":
        return word
    if name == "upper":
        return word.upper()
    if name in ("next", "prev"):
        step = 1 if name == "next" else -1
        return "".join(LETTERS[(LETTERS.index(c.lower()) + step) % 26] for c in word)
    raise ValueError(f"unknown demo operation '{name}'.")


def answer(operations: tuple[str, ...], word: str) -> str:
    for name in operations:
        word = apply_operation(name, word)
    return word


def _words(rng: random.Random, count: int, exclude: set[str] = frozenset()) -> list[str]:
    words: list[str] = []
    seen = set(exclude)
    while len(words) < count:
        word = "".join(rng.choice(LETTERS) for _ in range(WORD_LENGTH))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _record(operations: tuple[str, ...], word: str) -> dict:
    return {"prompt": f"{' '.join(operations)} {word}", "response": answer(operations, word)}


def new_task_records() -> list[dict]:
    """Stage 2, ``paca-demo``: one of the chains of :data:`NEW_TASK` per word, on distinct words."""
    rng = random.Random(2)
    return [_record(rng.choice(NEW_TASK), w) for w in _words(rng, NEW_TASK_EXAMPLES)]


def pretrain_records() -> list[dict]:
    """Stage 1, ``paca-demo-pretrain``: one of the four operations on words that stage 2 never uses."""
    rng = random.Random(1)
    stage2_words = {r["prompt"].split()[-1] for r in new_task_records()}
    return [_record((rng.choice(PRETRAIN_OPERATIONS),), w) for w in _words(rng, PRETRAIN_EXAMPLES, stage2_words)]


TASKS = {DEMO: new_task_records, DEMO_PRETRAIN: pretrain_records}


# ----------------------------------------------------------------------------------------------------
# Tokenizer and models
# ----------------------------------------------------------------------------------------------------


def build_tokenizer():
    """A character-level tokenizer (one token per character) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_model(seed: int):
    """The demo architecture with random weights (``paca-demo-random``), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **BASE_SHAPE,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def cache_root() -> str:
    return os.environ.get("PACA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "paca")


# What the base's numbers depend on besides the recipe: the training code (every module of paca.train, so a new
# or moved module cannot be left out) and these distributions.
BASE_DISTRIBUTIONS = ("torch", "transformers", "accelerate", "tokenizers", "safetensors")


def _training_code() -> list[str]:
    """The source files of paca.train, relative to it, in a fixed order."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = []
    for root, folders, names in os.walk(here):
        folders[:] = sorted(f for f in folders if f != "__pycache__")
        found += [os.path.relpath(os.path.join(root, n), here) for n in names if n.endswith(".py")]
    return sorted(found)


def base_recipe() -> dict:
    """Everything that determines the stage-1 base: recipe, training code (hashed) and library versions."""
    import hashlib
    import platform
    from importlib import metadata

    here = os.path.dirname(os.path.abspath(__file__))
    code = hashlib.sha256()
    for name in _training_code():
        code.update(name.encode())
        with open(os.path.join(here, name), "rb") as f:
            code.update(f.read())
    return {
        "shape": BASE_SHAPE,
        "steps": PRETRAIN_STEPS,
        "batch": PRETRAIN_BATCH,
        "lr": PRETRAIN_LR,
        "seed": PRETRAIN_SEED,
        "examples": PRETRAIN_EXAMPLES,
        "operations": PRETRAIN_OPERATIONS,
        "word_length": WORD_LENGTH,
        "tokens": SPECIAL_TOKENS + list(CHARACTERS),
        "chat_template": CHAT_TEMPLATE,
        "code_sha256": code.hexdigest(),
        "python": platform.python_version(),
        "versions": {name: metadata.version(name) for name in BASE_DISTRIBUTIONS},
    }


def base_key(recipe: dict | None = None) -> str:
    """12 hex digits of the hash of :func:`base_recipe`: the cache key of the stage-1 base."""
    import hashlib

    text = json.dumps(recipe or base_recipe(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_dir() -> str:
    return os.path.join(cache_root(), f"demo-base-{base_key()}")


def base_summary() -> dict:
    """What stage 1 reached (its summary.json), read from the cached base."""
    with open(os.path.join(base_dir(), "summary.json")) as f:
        return json.load(f)


def ensure_base() -> str:
    """The directory of the stage-1 base model, building and caching it first if needed."""
    path = base_dir()
    if os.path.isfile(os.path.join(path, "summary.json")):
        return path
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"the demo base model is not built yet (expected in {path}); run `paca train` once in a "
            "single process to build it, then launch several processes."
        )
    from .pipeline import run

    os.makedirs(cache_root(), exist_ok=True)
    building = f"{path}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    print(
        f"stage 1: building the demo base model once (cached in {path}): full training of a random "
        f"{BASE_SHAPE['num_hidden_layers']}-layer model on {', '.join(PRETRAIN_OPERATIONS)}",
        flush=True,
    )
    run(_pretrain_config(building), evaluate_before=False, builtins=BUILTINS)
    with open(os.path.join(building, "recipe.json"), "w") as f:  # what the cache key was derived from, for people
        json.dump(base_recipe(), f, indent=1, sort_keys=True)
    try:
        os.replace(building, path)  # atomic: the cache holds a complete base or none
    except OSError:
        if not os.path.isfile(os.path.join(path, "summary.json")):
            raise
        shutil.rmtree(building, ignore_errors=True)  # another process finished first
    print(f"stage 1: done; base model cached in {path}\n", flush=True)
    return path


def _pretrain_config(output_dir: str) -> TrainConfig:
    """Stage 1's run: full fine-tuning of the random model on the four operations, into ``output_dir``."""
    return TrainConfig(
        **{
            **DEMO_SETTINGS,
            "model": DEMO_RANDOM,
            "method": "full",
            "data": DEMO_PRETRAIN,
            "max_steps": PRETRAIN_STEPS,
            "batch_size": PRETRAIN_BATCH,
            "lr": PRETRAIN_LR,
            "eval_split": 256,
            "output_dir": output_dir,
            "save_steps": 0,
            "logging_steps": 100,
            "seed": PRETRAIN_SEED,
        }
    )


def header_line() -> str:
    """The line a run on the cached base prints first: what the base knows, and the new task."""
    stage1 = base_summary().get("eval_after") or {}
    return (
        f"demo: the base knows {', '.join(PRETRAIN_OPERATIONS)} (held-out exact match "
        f"{100 * stage1.get('eval_exact_match', 0):.1f}%); new task: chains of two, "
        + ", ".join(f"'{' '.join(chain)}'" for chain in NEW_TASK)
    )


# What a run is told the demo's names stand for. The demo's matmuls are so small that a second torch thread costs
# more in synchronisation than it gains, the more so when another process keeps a core busy: they train on one.
BUILTINS = BuiltinSources(
    models={
        DEMO: BuiltinModel(tokenizer=build_tokenizer, directory=ensure_base, header=header_line, threads=1),
        DEMO_RANDOM: BuiltinModel(tokenizer=build_tokenizer, build=random_model, threads=1),
    },
    records=TASKS,
)
