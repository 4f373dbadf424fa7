"""The protocol of the quality study (benchmarks/quality.py), pinned on tiny models and slices: folds partition the
data and never leak, the learning rate is chosen on validation only, every method starts alike, the command runs.
The study's figures themselves live in docs/QUALITY.md, not here."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from quality_protocol import (
    ValidationScore,
    choose_learning_rate,
    grid_learning_rate,
    search_learning_rate,
    stratified_splits,
    tune_and_test,
)
from quality_train import METHODS, TrainSettings, build_model, train_run, trainable_parameters

torch.set_num_threads(1)

WORDS = (
    "good great fine bad awful dull film plot actor scene space orbit god faith moon belief the a is and of it"
).split()


def tiny_bert(vocab_size: int = 5 + len(WORDS), seed: int = 0):
    """A randomly initialised two-way BERT classifier: hidden 32, one layer, two heads (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def generated_examples(n: int = 24):
    """``n`` distinct token sequences whose label is whether token 6 or 7 starts them (learnable, and each example
    identifiable by its tokens)."""
    input_ids, labels = [], []
    for i in range(n):
        label = i % 2
        input_ids.append([2, 6 + label, 8 + i % 5, 13 + i // 5, 3])
        labels.append(label)
    return input_ids, labels


@pytest.mark.parametrize("labels", [[0, 1] * 100, [0] * 30 + [1] * 12 + [2] * 7], ids=["balanced", "unbalanced"])
def test_folds_partition_the_data_and_never_leak(labels):
    splits = stratified_splits(labels, seeds=[0, 1], folds=3, validation_fraction=0.2)
    assert len(splits) == 6
    everything = set(range(len(labels)))
    for split in splits:
        fit, validation, test = set(split.fit), set(split.validation), set(split.test)
        assert not fit & validation and not fit & test and not validation & test
        assert fit | validation | test == everything
        assert abs(len(validation) - 0.2 * (len(fit) + len(validation))) <= len(set(labels))
    for seed in (0, 1):
        tests = [set(s.test) for s in splits if s.seed == seed]
        assert set().union(*tests) == everything and sum(map(len, tests)) == len(labels)  # each example tested once
        for test in tests:  # stratified: each class in each fold within one of its fair share
            for label in set(labels):
                share = sum(1 for i in test if labels[i] == label)
                assert abs(share - labels.count(label) / 3) <= 1
    assert [s.test for s in splits if s.seed == 0] != [s.test for s in splits if s.seed == 1]


def test_splits_are_the_same_for_the_same_seed():
    labels = [0, 1] * 20
    assert stratified_splits(labels, [3], 4, 0.25) == stratified_splits(labels, [3], 4, 0.25)


def test_learning_rate_is_chosen_on_validation_only():
    """The run with the best test score has the worst validation score: the choice must not follow the test."""

    class FakeRun:
        def __init__(self, learning_rate):
            self.validation = ValidationScore(accuracy=1.0 - abs(math.log10(learning_rate) + 3), loss=0.5)
            self.test_accuracy = abs(math.log10(learning_rate) + 3)  # best far from 1e-3

    search, runs = tune_and_test(centre_step=-6, train_at=FakeRun)
    assert search.learning_rate == 1e-3 and not search.on_edge
    assert set(vars(ValidationScore(0.0, 0.0))) == {"accuracy", "loss"}  # all the choice is shown of a run
    assert max(runs, key=lambda lr: runs[lr].test_accuracy) != search.learning_rate


def test_ties_in_validation_accuracy_go_to_the_lower_validation_loss():
    scores = {1e-4: ValidationScore(0.8, 0.40), 1e-3: ValidationScore(0.8, 0.30), 1e-2: ValidationScore(0.7, 0.1)}
    assert choose_learning_rate(scores) == 1e-3


@pytest.mark.parametrize(
    "best_step, tried, on_edge",
    [
        (-6, (-7, -6, -5), False),  # interior at once: three runs
        (-8, (-9, -8, -7, -6, -5), False),  # below the grid: extended until interior
        (-10, (-9, -8, -7, -6, -5), True),  # past the extension limit: reported as on the edge
        (-3, (-7, -6, -5, -4, -3), True),
    ],
)
def test_grid_extends_past_an_edge_choice_and_flags_what_stays_there(best_step, tried, on_edge):
    best = grid_learning_rate(best_step)
    search = search_learning_rate(-6, lambda lr: ValidationScore(1 - abs(math.log10(lr / best)), 0.0))
    assert search.steps_tried == tried and search.on_edge is on_edge
    assert search.learning_rate == grid_learning_rate(min(max(best_step, -9), -3))


def test_grid_points_are_half_decades():
    assert [grid_learning_rate(s) for s in (-8, -7, -6, -5)] == [1e-4, 3.16e-4, 1e-3, 3.16e-3]


def test_training_sees_only_the_fit_examples():
    input_ids, labels = generated_examples()
    split = stratified_splits(labels, [0], 3, 0.25)[0]
    model = build_model(METHODS["lora-r8"], tiny_bert(), seed=0)
    seen = set()

    def record(module, args):
        if module.training:
            seen.update(tuple(row[row != 0].tolist()) for row in args[0])

    model.base_model.model.bert.embeddings.word_embeddings.register_forward_pre_hook(record)
    run = train_run(model, input_ids, labels, split, 1e-3, TrainSettings(epochs=2, batch_size=4), pad_id=0)
    assert seen == {tuple(input_ids[i]) for i in split.fit}
    assert run.steps_per_epoch == math.ceil(len(split.fit) / 4) and run.epoch_seconds > 0


def test_every_method_starts_from_the_same_head_and_adapters_tune_the_same_layers():
    base = tiny_bert()
    heads, tuned = {}, {}
    for name, method in METHODS.items():
        model = build_model(method, base, seed=5)
        heads[name] = (
            next(
                p
                for n, p in model.named_parameters()
                if n.endswith("classifier.weight") or n.endswith("classifier.modules_to_save.default.weight")
            )
            .detach()
            .clone()
        )
        if method.kind in ("paca", "lora", "dora"):
            tuned[name] = sorted(
                {
                    n.split(".paca_")[0].split(".lora_")[0]
                    for n, _ in model.named_parameters()
                    if ".paca_" in n or ".lora_" in n
                }
            )
    assert all(torch.equal(h, heads["head"]) for h in heads.values())
    assert not torch.equal(build_model(METHODS["head"], base, seed=6).classifier.weight, heads["head"])
    layers = list(tuned.values())
    assert all(t == layers[0] for t in layers) and len(layers[0]) == 7  # q, k, v, attn out, MLP in/out, pooler
    assert all(not n.endswith("classifier") for n in layers[0])
    assert torch.equal(base.classifier.weight, tiny_bert().classifier.weight)  # the base is copied, never changed


def test_paca_r16_trains_as_many_parameters_as_lora_r8():
    base = tiny_bert()
    counts = {name: trainable_parameters(build_model(METHODS[name], base, 0)) for name in METHODS}
    assert counts["paca-r16"] == counts["lora-r8"]
    assert counts["head"] == 32 * 2 + 2 < counts["paca-r8"] < counts["paca-r16"] < counts["dora-r8"] < counts["full"]


def _save_tiny_model(folder):
    """A tiny BERT and a word-level BERT tokenizer saved as ``from_pretrained`` reads them."""
    from transformers import BertTokenizer

    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(vocab).save_pretrained(folder)
    tiny_bert().save_pretrained(folder)


def test_the_command_runs_end_to_end_on_real_text_and_writes_its_report(tmp_path, capsys):
    pytest.importorskip("gensim")  # the study's text ships in gensim's wheel
    import quality

    _save_tiny_model(str(tmp_path))
    out = tmp_path / "out"
    quality.main(
        [
            "--model",
            str(tmp_path),
            "--per-class",
            "6",
            "--epochs",
            "1",
            "--folds",
            "2",
            "--seeds",
            "0",
            "--methods",
            "head",
            "paca-r16",
            "lora-r8",
            "--max-length",
            "16",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    records = json.loads((out / "records.json").read_text())["records"]
    assert len(records) == 2 * 2 * 3  # folds x tasks x methods
    assert all(r["sizes"]["fit"] + r["sizes"]["validation"] + r["sizes"]["test"] == 12 for r in records)
    assert "| paca-r16 |" in printed and "PARTIAL" not in printed and (out / "quality.png").stat().st_size > 0
    quality.main(["--out", str(out), "--report-only"])
    assert "| lora-r8 |" in capsys.readouterr().out


def test_a_report_of_an_interrupted_study_says_it_is_partial(tmp_path):
    import quality

    record = {
        "task": "polarity",
        "seed": 0,
        "fold": 0,
        "method": "lora-r8",
        "learning_rate": 1e-3,
        "on_edge": False,
        "test_accuracy": 0.8,
        "trainable": 10,
        "runs": [
            {
                "learning_rate": 1e-3,
                "validation_accuracy": 0.7,
                "validation_loss": 0.5,
                "test_accuracy": 0.8,
                "epoch_seconds": 1.0,
                "step_seconds": 0.1,
            }
        ],
    }
    assert quality.report(str(tmp_path), [record], planned_records=4).startswith("PARTIAL: 1 of 4")


def test_real_text_loads_balanced_and_without_the_headers_that_name_the_group():
    pytest.importorskip("gensim")
    import quality_data

    polarity, newsgroups = quality_data.polarity(), quality_data.newsgroups()
    assert polarity.classes == ("neg", "pos") and polarity.labels.count(0) == polarity.labels.count(1) == 100
    assert newsgroups.classes == ("alt.atheism", "sci.space") and len(newsgroups.texts) == 200
    assert not any("Newsgroups:" in t or "Path:" in t or t.startswith(">") for t in newsgroups.texts)


def test_post_body_keeps_the_authors_words_only():
    import quality_data

    post = (
        "From: a@b\nNewsgroups: sci.space\nSubject: orbits\n\nIn article <1@x> c@d writes:\n> quoted text\n"
        "My own words\nabout orbits.\n"
    )
    assert quality_data.post_body(post) == "My own words about orbits."
