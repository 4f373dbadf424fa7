"""The methods compared by the quality study and one training run: fit at one learning rate, score validation and test.

Every method starts from the same pretrained encoder and the same freshly drawn classification head (seeded by the
split's seed), sees the same batches in the same order, and trains with AdamW (no weight decay), gradient clipping
at 1.0 and a linear schedule (10% warm-up, then down to zero). Adapters sit on PEFT's ``all-linear`` layers (query,
key, value, the attention output, both MLP layers and the pooler); the head is trained in full by every method.
Adapters use alpha = 2r (scale 2): the scale only moves the best learning rate, which the grid search absorbs.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass

import torch
from quality_protocol import Split, ValidationScore
from torch import nn


@dataclass(frozen=True)
class Method:
    """A way to fine-tune: ``kind`` (head, paca, lora, dora, full), rank ``r`` for adapters, and the centre of its
    learning-rate grid as a half-decade step (``quality_protocol.grid_learning_rate``)."""

    name: str
    kind: str
    r: int
    centre_step: int


# Grid centres: 1e-2 for the head alone, 1e-3 for every adapter (PaCA, LoRA and DoRA alike), 1e-4 for full fine-tuning.
METHODS = {
    m.name: m
    for m in (
        Method("head", "head", 0, -4),
        Method("paca-r8", "paca", 8, -6),
        Method("paca-r16", "paca", 16, -6),
        Method("lora-r8", "lora", 8, -6),
        Method("dora-r8", "dora", 8, -6),
        Method("full", "full", 0, -8),
    )
}


@dataclass(frozen=True)
class TrainSettings:
    """What every method shares: epochs, batch size, and the clipping and warm-up of the schedule."""

    epochs: int = 3
    batch_size: int = 8
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class Run:
    """One training run at one learning rate. ``validation`` is all the learning-rate choice is shown."""

    learning_rate: float
    validation: ValidationScore
    test_accuracy: float
    epoch_seconds: float  # mean wall time of one training epoch (forward, backward, optimizer), evaluation excluded
    steps_per_epoch: int

    @property
    def step_seconds(self) -> float:
        return self.epoch_seconds / self.steps_per_epoch


def reset_head(model: nn.Module, seed: int) -> None:
    """Draw the classification head afresh as BERT initialises it (normal(0, initializer_range), zero bias), seeded,
    so that every method of one split starts from the same head."""
    generator = torch.Generator().manual_seed(seed)
    head = model.classifier
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * model.config.initializer_range)
        head.bias.zero_()


def build_model(method: Method, base: nn.Module, seed: int) -> nn.Module:
    """A fresh copy of ``base`` (a ``*ForSequenceClassification`` with a ``classifier``) prepared for ``method``."""
    import peft

    import paca

    torch.manual_seed(seed)  # LoRA's A matrices and dropout draw from the global generator
    model = copy.deepcopy(base)
    reset_head(model, seed)
    if method.kind == "full":
        return model.requires_grad_(True)
    if method.kind == "head":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model
    if method.kind == "paca":
        config = paca.PacaConfig(
            r=method.r,
            paca_alpha=2 * method.r,
            target_modules="all-linear",
            modules_to_save=["classifier"],
            random_seed=seed,
            task_type="SEQ_CLS",
        )
    elif method.kind in ("lora", "dora"):
        config = peft.LoraConfig(
            r=method.r,
            lora_alpha=2 * method.r,
            target_modules="all-linear",
            lora_dropout=0.0,
            use_dora=method.kind == "dora",
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )
    else:
        raise ValueError(f"method '{method.name}': unknown kind '{method.kind}' (head, paca, lora, dora, full)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batches(
    input_ids: list[list[int]],
    labels: list[int],
    indices: list[int],
    batch_size: int,
    pad_id: int,
    generator: torch.Generator | None = None,
):
    """``(input_ids, attention_mask, labels)`` batches of ``indices``, shuffled by ``generator`` when given, each
    padded to its longest example."""
    order = list(indices)
    if generator is not None:
        order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(input_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(input_ids[i])] = torch.tensor(input_ids[i])
            mask[row, : len(input_ids[i])] = 1
        yield ids, mask, torch.tensor([labels[i] for i in chunk])


@torch.inference_mode()
def evaluate(model: nn.Module, input_ids, labels, indices, batch_size: int, pad_id: int) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``indices``, in eval mode (no dropout)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for ids, mask, y in batches(input_ids, labels, indices, batch_size, pad_id):
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, classes)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    loss = loss_sum / len(indices)
    return correct / len(indices), loss if math.isfinite(loss) else math.inf  # a diverged run ranks last, not NaN


def linear_schedule(optimizer, total_steps: int, warmup_fraction: float):
    warmup = max(1, round(total_steps * warmup_fraction))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    )


def train_run(
    model: nn.Module,
    input_ids: list[list[int]],
    labels: list[int],
    split: Split,
    learning_rate: float,
    settings: TrainSettings,
    pad_id: int,
) -> Run:
    """Train ``model`` on ``split.fit`` only, then score it on ``split.validation`` and ``split.test``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(split.fit) / settings.batch_size)
    schedule = linear_schedule(optimizer, steps_per_epoch * settings.epochs, settings.warmup_fraction)
    # The batch order depends on the split and the epoch only: every method and learning rate sees the same batches.
    generator = torch.Generator().manual_seed(split.seed * 1000 + split.fold)
    epoch_seconds = []
    for _ in range(settings.epochs):
        model.train()
        start = time.perf_counter()
        for ids, mask, y in batches(input_ids, labels, split.fit, settings.batch_size, pad_id, generator):
            loss = model(input_ids=ids, attention_mask=mask, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        epoch_seconds.append(time.perf_counter() - start)
    val_accuracy, val_loss = evaluate(model, input_ids, labels, split.validation, 64, pad_id)
    test_accuracy, _ = evaluate(model, input_ids, labels, split.test, 64, pad_id)
    return Run(
        learning_rate,
        ValidationScore(val_accuracy, val_loss),
        test_accuracy,
        sum(epoch_seconds) / len(epoch_seconds),
        steps_per_epoch,
    )
