"""`paca train` on 2 CPU processes (torchrun, gloo): DDP and FSDP2 reach the single-process result.

The single-process reference uses batch_size 8; the 2-process runs use 4 per process (the same global batch
of 8, the same examples per step). FSDP2 must shard the frozen weights and the PaCA deltas alike, and a
run resumed from an FSDP2 checkpoint must land on the same weights.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from paca.train import demo, run
from paca.train.config import load_config

STEPS = ["max_steps=4", "save_steps=2", "logging_steps=1", "eval_split=8", "lr=0.02"]  # the demo task's lr

# Runs `paca train` with two extra callbacks: one records, at step 1, the local (per-process) shape of a
# frozen weight and of its PaCA delta; the other stands for a kill after a given step.
DRIVER = """
import json, os, sys
from transformers import TrainerCallback
from paca.train import run
from paca.train.config import load_config

class RecordShards(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != 1:
            return
        shapes = {}
        for name, p in model.named_parameters():
            if "layers.0.self_attn.q_proj" in name:
                local = p.to_local() if hasattr(p, "to_local") else p
                shapes[name.split("q_proj.")[1]] = [list(p.shape), list(local.shape)]
        with open(os.path.join(args.output_dir, f"shards-{os.environ['RANK']}.json"), "w") as f:
            json.dump(shapes, f)

class KillAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SystemExit(f"killed after step {self.step}")

argv = sys.argv[1:]
kill = [int(a.split("=")[1]) for a in argv if a.startswith("kill_after=")]
argv = [a for a in argv if not a.startswith("kill_after=")]
run(load_config(argv), callbacks=[RecordShards()] + [KillAfter(k) for k in kill])
"""


def single_process_run(task_file, out, *extra):
    run(
        load_config(
            [f"data={task_file}", "model=paca-demo-random", f"output_dir={out}", "batch_size=8", *STEPS, *extra]
        )
    )
    return load_file(os.path.join(out, "adapter_model.safetensors"))  # later keys win: extra may set model


@pytest.fixture(scope="module")
def single_process(task_file, tmp_path_factory):
    return single_process_run(task_file, tmp_path_factory.mktemp("single") / "run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(target: list[str], args: list[str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *target,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def two_process_args(task_file, out, *extra):
    return [f"data={task_file}", "model=paca-demo-random", f"output_dir={out}", "batch_size=4", *STEPS, *extra]


def assert_close_to(reference, output_dir, atol):
    result = load_file(os.path.join(output_dir, "adapter_model.safetensors"))
    assert sorted(result) == sorted(reference)
    for name in reference:
        torch.testing.assert_close(result[name], reference[name], atol=atol, rtol=0, msg=name)
    assert any(t.abs().max() > 1e-3 for n, t in reference.items() if "delta" in n)  # it did train


def test_ddp_on_two_processes_equals_one_process(task_file, single_process, tmp_path):
    out = tmp_path / "ddp"
    done = torchrun(["-m", "paca", "train"], two_process_args(task_file, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 8 (4 x 1 accumulation x 2 processes)" in done.stdout
    assert_close_to(single_process, out, atol=1e-6)


def test_ddp_with_packed_rows_equals_one_process(task_file, tmp_path):
    """Packed training rows split across processes as plain rows do; evaluation stays one example per row, so
    both processes score the same count (packed eval rows would differ per process and break the gather)."""
    reference = single_process_run(task_file, tmp_path / "single", "packing=true", "max_length=64")
    out = tmp_path / "ddp"
    done = torchrun(["-m", "paca", "train"], two_process_args(task_file, out, "packing=true", "max_length=64"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close_to(reference, out, atol=1e-6)


def test_fsdp2_shards_frozen_and_tuned_weights_and_a_resumed_run_equals_one_process(task_file, tmp_path):
    """With selection=gradient: rank 0 scores the same global batches as the single process, split in two."""
    gradient = ("selection=gradient", "selection_steps=2")
    single_process = single_process_run(task_file, tmp_path / "single", *gradient)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "fsdp"
    killed = torchrun([str(driver)], two_process_args(task_file, out, "fsdp=true", *gradient, "kill_after=3"))
    assert killed.returncode != 0 and "killed after step 3" in killed.stderr, killed.stderr[-3000:]
    assert "FSDP2" in killed.stdout
    for rank in (0, 1):
        shapes = json.loads((out / f"shards-{rank}.json").read_text())
        for name in ("base_layer.weight", "paca_delta.default"):
            (rows, cols), (local_rows, local_cols) = shapes[name]
            assert (local_rows, local_cols) == (rows // 2, cols), (rank, name, shapes)  # half of the rows each
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # saved through the FSDP2 path

    resumed = torchrun([str(driver)], two_process_args(task_file, out, "fsdp=true", *gradient, "resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    assert_close_to(single_process, out, atol=1e-6)


def test_qpaca_under_fsdp2_equals_one_process(task_file, tmp_path):
    """PaCA on a 4-bit NF4 base: FSDP2 on 2 processes reaches the single-process adapter."""
    pytest.importorskip("bitsandbytes")
    base = tmp_path / "base"
    demo.random_model(0).save_pretrained(base)
    demo.build_tokenizer().save_pretrained(base)
    quantized = (f"model={base}", "method=qpaca")
    reference = single_process_run(task_file, tmp_path / "single", *quantized)
    out = tmp_path / "fsdp"
    done = torchrun(["-m", "paca", "train"], two_process_args(task_file, out, "fsdp=true", *quantized))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2" in done.stdout
    assert_close_to(reference, out, atol=1e-6)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_equals_one_process(task_file, single_process, tmp_path, stage, monkeypatch):
    """Runs only where deepspeed is installed (it is not part of the test install: `pip install deepspeed`)."""
    pytest.importorskip("deepspeed")
    if not torch.cuda.is_available():
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / stage
    done = torchrun(["-m", "paca", "train"], two_process_args(task_file, out, f"deepspeed={stage}"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close_to(single_process, out, atol=1e-6)


def test_moe_experts_under_fsdp2_equal_one_process(task_file, tmp_path):
    """PaCA on fused MoE experts (a tiny Mixtral): FSDP2 shards the 3-D expert weights and deltas along the expert
    dimension and re-gathers them for every forward and backward; 2 processes reach the single-process adapter.

    The load-balancing loss is off here: it is a mean over each process's own micro-batch (as under DDP), so 2 x 4
    examples give a different value than 1 x 8 by design."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = demo.build_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    base = tmp_path / "base"
    MixtralForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    moe = (f"model={base}", "target_modules=experts,q_proj", "router_aux_loss_coef=0")
    reference = single_process_run(task_file, tmp_path / "single", *moe)
    assert any(".experts.paca_delta." in name for name in reference)
    out = tmp_path / "fsdp"
    done = torchrun(["-m", "paca", "train"], two_process_args(task_file, out, "fsdp=true", *moe))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2" in done.stdout
    assert_close_to(reference, out, atol=1e-6)
