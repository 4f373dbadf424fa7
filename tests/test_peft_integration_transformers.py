"""PaCA through transformers' own entry points: load_adapter, Trainer, and Mamba's fused path.

Pinned: transformers' model.load_adapter(dir) on a plain model gives the PeftModel's outputs; HF Trainer's
resume_from_checkpoint gives the delta of an uninterrupted run; the Mamba layers its fused CUDA kernel reads
directly are named in one warning and train on the slow path.
"""

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model
from test_peft_integration import randomize_deltas

from paca import PacaConfig, paca_layers


def test_transformers_load_adapter_on_plain_model_matches_peft_model(tmp_path, token_ids):
    """transformers' model.load_adapter(dir) on a plain model gives the PeftModel's outputs."""
    model = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    randomize_deltas(model)
    model.eval()
    expected = model(token_ids).logits
    model.save_pretrained(tmp_path / "adapter")

    plain = tiny_llama()
    plain.load_adapter(str(tmp_path / "adapter"))
    assert len(paca_layers(plain)) == 14
    plain.eval()
    torch.testing.assert_close(plain(token_ids).logits, expected, rtol=0, atol=0)


def _trainer(model, out_dir, max_steps):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 8), generator=g)]
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="linear",
        weight_decay=0.01,
    )
    return Trainer(model=model, args=args, train_dataset=data)


def test_trainer_resume_from_checkpoint_gives_same_delta_as_uninterrupted_run(tmp_path):
    """HF Trainer: save at step 2, resume_from_checkpoint to step 4 == an uninterrupted 4-step run."""
    cfg = PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    full = get_peft_model(tiny_llama(), cfg)
    _trainer(full, tmp_path / "full", max_steps=4).train()
    expected = {n: p.detach().clone() for n, p in full.named_parameters() if "paca_delta" in n}
    assert any(p.abs().sum() > 0 for p in expected.values())

    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    resumed = get_peft_model(tiny_llama(), PacaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    _trainer(resumed, tmp_path / "resumed", max_steps=4).train(resume_from_checkpoint=str(checkpoint))
    got = {n: p.detach() for n, p in resumed.named_parameters() if "paca_delta" in n}
    assert got.keys() == expected.keys()
    for n, d in expected.items():
        torch.testing.assert_close(got[n], d, rtol=1e-5, atol=1e-7, msg=n)


def test_mamba_layers_its_fused_kernel_reads_directly_are_named_and_train_on_the_slow_path():
    """Mamba's fused CUDA path reads x_proj / dt_proj / out_proj weights directly (their deltas would be ignored
    there): one warning names them; on the CPU path they are called and train."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    base = MambaForCausalLM(
        MambaConfig(
            hidden_size=32, state_size=4, num_hidden_layers=2, vocab_size=64, intermediate_size=64, time_step_rank=4
        )
    )
    with pytest.warns(
        UserWarning,
        match=r"Mamba's fused CUDA path .* 4 tuned layer\(s\) \(e\.g\. "
        r"'backbone\.layers\.0\.mixer\.x_proj'\)",
    ):
        model = get_peft_model(base, PacaConfig(r=2, target_modules=["in_proj", "x_proj", "out_proj"]))
    ids = torch.randint(0, 64, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
