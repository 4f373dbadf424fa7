"""paca's Trainer classes: TRL's SFTTrainer and DPOTrainer (on transformers' Trainer) with atomic checkpoints, a
stop on the first non-finite loss or gradient norm, and exact match measured from TRL's fused LM head.

TRL and the Trainer do the batching, the loss, the training loop, mixed precision, gradient accumulation,
DDP / FSDP2 / DeepSpeed (through accelerate), checkpoint contents and resumption; these classes only add what
they lack.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from transformers.trainer_utils import rotate_checkpoints

from . import checkpoints


class NotFinite(Exception):
    """The loss or the gradient norm of a step is NaN or Inf (raised before that step's optimizer update)."""

    def __init__(self, what: str, step: int, value: float):
        super().__init__(f"{what} {value} at step {step}")
        self.what, self.step, self.value = what, step, value


class _PacaTrainerMixin:
    """What paca adds to a transformers Trainer (or a TRL trainer built on it): checkpoints published atomically,
    a stop on the first non-finite loss or gradient norm, FSDP2 on CPU processes."""

    _staging_root: str | None = None

    def __init__(self, *args, **kwargs):
        model = kwargs["model"] if "model" in kwargs else args[0]
        # TRL casts a 4-bit base's trainable parameters to bfloat16 (QLoRA's recipe), in SFT and DPO alike; paca
        # keeps the dtype its method chose (QPaCA's deltas: float32 in a float32 run), so no optimizer step is
        # rounded away.
        dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, **kwargs)
        for name, p in model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if (
            self.args.fsdp
            and getattr(state, "fsdp_plugin", None) is None
            and state.distributed_type == DistributedType.MULTI_CPU
        ):
            # accelerate switches FSDP on for accelerator back-ends only and silently trains CPU processes
            # (gloo) with DDP instead. FSDP2 itself runs there: enable the same FSDP2 path by hand.
            from accelerate import PartialState
            from accelerate.utils import FullyShardedDataParallelPlugin

            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            # Both shared states: each AcceleratorState() re-reads PartialState's distributed type.
            PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.is_fsdp_enabled and self.args.device.type == "cpu"):
            return super().save_model(output_dir, _internal_call)
        # FSDP2 on CPU: accelerate's full state dict (cpu_offload=True) returns views of the unsharded
        # parameters' storage, freed again at reshard, which the save then reads. Gather into fresh tensors.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        state_dict = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
        self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all().to(torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every process stops at the same micro-step
        if not bool(finite):
            # Raised after backward but before the optimizer step: the weights still hold the last good update.
            raise NotFinite("loss", self.state.global_step + 1, float(loss.detach().float().mean()))
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # The norm over every process's gradients, before the optimizer step: a finite loss can still give
        # infinite gradients (an overflow in backward), which the step would write into the weights.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NotFinite("gradient norm", self.state.global_step + 1, float(grad_norm))
        return grad_norm

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, checkpoints.STAGING)
        if self.args.should_save:
            checkpoints.remove_staging(run_dir)
            os.makedirs(staging)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N (all processes, for FSDP)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.publish_directory(os.path.join(staging, name), os.path.join(run_dir, name))
            checkpoints.remove_staging(run_dir)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


@functools.cache
def sft_trainer_class():
    """TRL's SFTTrainer with paca's additions (``stage=sft``); imported on demand, like TRL's own CLI does."""
    from trl import SFTTrainer

    class PacaSFTTrainer(_PacaTrainerMixin, SFTTrainer):
        """TRL's SFTTrainer with paca's additions, and exact match measured from its fused LM head's outputs."""

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if prediction_loss_only:
                return super().prediction_step(model, inputs, True, ignore_keys)
            # TRL's loss runs the model once with its fused head, which already says per token whether the label
            # is the top prediction: keep that output (asking TRL for outputs would run a second, full-logits
            # forward).
            seen = []
            handle = model.register_forward_hook(lambda module, args, output: seen.append(output))
            try:
                loss, _, _ = super().prediction_step(model, inputs, True, ignore_keys)
            finally:
                handle.remove()
            verdicts = exact_match_verdicts(seen[-1].is_top1, seen[-1].label_mask, inputs.get("position_ids"))
            return loss, verdicts, verdicts

    return PacaSFTTrainer


def exact_match_verdicts(
    is_top1: torch.Tensor, label_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """``(examples, 2)``: whether each example's every learned token is the top prediction, and whether it has one.

    ``is_top1`` and ``label_mask`` are per next-token label, ``(rows, length - 1)``. A padding-free or packed row
    holds several examples, each starting where ``position_ids`` restarts at 0; otherwise a row is one example.
    """
    wrong = (label_mask.bool() & ~is_top1.bool()).long()
    if position_ids is None:
        return torch.stack([1 - wrong.amax(1), label_mask.long().amax(1)], dim=1)
    starts = (position_ids == 0).long()
    starts[:, 0] = 1  # a row always starts an example, whatever its first position id
    example = (starts.flatten().cumsum(0) - 1).view_as(starts)[:, 1:]  # example of each label (token t + 1)
    count = int(starts.sum())
    per_example = torch.zeros(2, count, dtype=torch.long, device=wrong.device)
    per_example[0].scatter_reduce_(0, example.flatten(), wrong.flatten(), "amax")
    per_example[1].scatter_reduce_(0, example.flatten(), label_mask.long().flatten(), "amax")
    return torch.stack([1 - per_example[0], per_example[1]], dim=1)


@functools.cache
def preference_trainer_class():
    """TRL's DPOTrainer with paca's additions (``stage=dpo``); imported on demand, like the SFTTrainer."""
    from trl import DPOTrainer

    class PacaDPOTrainer(_PacaTrainerMixin, DPOTrainer):
        """TRL's DPOTrainer with paca's additions: a PaCA model's reference is the model with its adapter disabled."""

    return PacaDPOTrainer


def exact_match(prediction) -> dict:
    """Fraction of examples whose every response token is the model's top prediction.

    Teacher-forced argmax over the response equals greedy decoding's output exactly (ties aside): greedy
    reproduces the response iff each next-token argmax along the true prefix is the true token. The predictions are
    :func:`exact_match_verdicts` rows.
    """
    verdicts = prediction.predictions
    correct, has_response = verdicts[:, 0] == 1, verdicts[:, 1] == 1
    return {"exact_match": float(correct[has_response].mean()) if has_response.any() else 0.0}


def sft_collator(tokenizer):
    """The SFTTrainer's own collator: pads input_ids with the pad token, labels with -100 (ignored), builds the
    attention mask."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
