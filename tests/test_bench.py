"""`paca bench`: the smoke run end to end, and the byte, FLOP and operator accounting of a step (out of memory and
bad input: tests/test_bench_errors.py)."""

import json
import os

import pytest
import torch
from torch import nn

from paca.bench import suite
from paca.bench.measure import DispatchedOperators, SavedTensorBytes, accounting_step, train_step
from paca.bench.methods import make_trainee
from paca.bench.presets import ModelSpec, build_model
from paca.cli import main as paca_main
from paca.tuner.config import PEFT_HAS_PACA

TINY_TARGETS_D_OUT = {
    "q_proj": 64,
    "k_proj": 32,
    "v_proj": 32,
    "o_proj": 64,
    "gate_proj": 128,
    "up_proj": 128,
    "down_proj": 64,
}


def run_bench(args, capsys):
    code = paca_main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


# -- the smoke run -----------------------------------------------------------------------------------


def test_quick_run_writes_json_markdown_and_plots_with_every_method(tmp_path, capsys):
    json_path, md_path, plots = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "plots"
    code, out, err = run_bench(
        ["--quick", "--json", str(json_path), "--markdown", str(md_path), "--plots", str(plots)], capsys
    )
    assert code == 0, err
    doc = json.loads(json_path.read_text())
    assert {"device", "model", "settings", "results", "command"} <= set(doc)
    results = {r["method"]: r for r in doc["results"]}
    assert list(results) == ["full", "lora", "dora", "paca", "floor", "qlora"]
    for r in results.values():
        assert "errors" not in r
        for key in (
            "step_time_s",
            "forward_s",
            "backward_s",
            "tokens_per_s",
            "peak_memory_bytes",
            "activation_bytes",
            "flops_per_step",
            "tflops_per_s",
            "max_seq_len",
            "best_sentences_per_s",
        ):
            assert r[key] > 0, (r["method"], key)
        assert r["step_time_s"] == pytest.approx(r["forward_s"] + r["backward_s"] + r["optimizer_s"], rel=0.5)
    assert results["floor"]["optimizer_s"] < 1e-3 and results["floor"]["trainable_params"] == 0  # no optimizer
    assert results["lora"]["ratio_to_lora"]["step_time_s"] == 1.0
    # What PaCA does not keep: the linear layers' inputs (only r of d_in channels of them).
    assert results["paca"]["activation_bytes"] < results["lora"]["activation_bytes"]
    # 4-bit weights: fewer parameter bytes than the 32-bit base under plain LoRA.
    assert results["qlora"]["param_bytes"] < results["lora"]["param_bytes"]
    # The cap stops the length search inside its limit, so each method has a measured maximum.
    assert all(not r["max_seq_len_reached_limit"] for r in results.values())
    assert "| method |" in md_path.read_text() and "Max sequence length" in md_path.read_text()
    names = sorted(os.listdir(plots))
    assert names == ["tiny-float32-fig2-step-time.png", "tiny-float32-fig3-throughput.png"]
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert "Step time (Fig. 2)" in out and "paca" in out
    profiled = doc["profile"]["self_time_by_method"]
    assert set(profiled) == set(results) and "aten::mm" in profiled["lora"]
    assert "Profile: self CPU time per step by operator" in out


# -- accounting --------------------------------------------------------------------------------------


def test_saved_bytes_count_each_storage_once_and_leave_parameters_out():
    a = torch.randn(10, 10, requires_grad=True)  # 400 bytes
    weight = nn.Parameter(torch.randn(10, 10))
    with SavedTensorBytes(exclude=[weight]) as saved:
        b = a * weight  # saves a and weight (excluded)
        c = b.sin()  # saves b
        d = c * c  # saves c twice: one storage
        e = c.t().exp()  # saves its output, a new storage
        f = a[2:4].cos()  # saves a view of a: a's storage again
    assert saved.bytes == 4 * 400  # a, b, c, exp's output
    (d.sum() + e.sum() + f.sum()).backward()


def test_paca_flops_are_the_floor_plus_the_delta_gradient_matmuls():
    base = build_model(ModelSpec("tiny"), torch.float32, torch.device("cpu"), seed=0)
    ids = suite.random_tokens(512, 2, 16, seed=0, device=torch.device("cpu"))
    floor, paca = make_trainee("floor", base, 8, 16, 0), make_trainee("paca", base, 8, 16, 0)
    # As in the floor, let gradients flow to the embedding output, so both compute every input gradient.
    paca.model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    flops = {t.method: accounting_step(t, ids, torch.float32).flops for t in (floor, paca)}
    tokens, r, layers = 2 * 16, 8, 2
    delta_gradients = 2 * tokens * r * sum(TINY_TARGETS_D_OUT.values()) * layers  # g^T x[..., idx] per layer
    assert flops["paca"] - flops["floor"] == delta_gradients


def test_dispatched_operators_count_compute_ops_and_leave_views_out():
    weight = nn.Parameter(torch.randn(6, 4), requires_grad=False)
    bias = nn.Parameter(torch.randn(6), requires_grad=False)
    x = torch.randn(3, 4, requires_grad=True)
    with DispatchedOperators() as ops:
        y = torch.nn.functional.linear(x, weight, bias)  # addmm (the transpose of the weight is a view)
        y.reshape(18).sum().backward()  # sum, its expand (a view), then mm for dL/dx
    assert dict(ops.counts) == {"addmm": 1, "sum": 1, "ones_like": 1, "mm": 1}, dict(ops.counts)


# Dispatched aten operators of one steady forward + backward on the tiny preset (batch 2 x 16): deterministic, so
# held exactly. Per tuned layer beyond the floor's work, PaCA adds the column write (one index_add_ on CPU when the
# delta has the weight's dtype), x[..., idx], the delta-gradient addmm and the restore of W0 once its backward is
# done; it also skips the floor's input gradient below the first layer: 2.7 per layer. On CPU, above
# ONE_OPERATOR_MAX_CPU_GRAD_VALUES gradient values per layer, the delta gradient takes a transposing copy more (3.7
# per layer at batch 4 x 64). LoRA adds 8.3.
TINY_OPERATORS = {"floor": 225, "lora": 341, "paca": 263}
TINY_PACA_TWO_OPERATOR_DELTA_GRAD = 277  # batch 4 x 64: every layer's gradient is above the CPU threshold
TINY_PEFT_PACA_OPERATORS = 327  # peft 0.22's PaCA on the same model and batch
TINY_TUNED_LAYERS = 14  # 2 blocks x (q, k, v, o, gate, up, down)


def steady_operator_counts(method, base, ids) -> tuple[int, int]:
    trainee = make_trainee(method, base, 8, 16, 0)
    train_step(trainee, ids, torch.float32)  # PaCA's first step also copies each layer's pretrained columns
    return tuple(accounting_step(trainee, ids, torch.float32).dispatched_ops for _ in range(2))


def test_operators_per_step_are_counted_per_method_and_do_not_grow():
    base = build_model(ModelSpec("tiny"), torch.float32, torch.device("cpu"), seed=0)
    ids = suite.random_tokens(512, 2, 16, seed=0, device=torch.device("cpu"))
    counted = {}
    for method in TINY_OPERATORS:
        first, second = steady_operator_counts(method, base, ids)
        assert first == second, method  # the same count every step
        counted[method] = first
    assert counted == TINY_OPERATORS
    assert counted["paca"] <= counted["floor"] + 4 * TINY_TUNED_LAYERS  # the budget: 4 operators per tuned layer

    # Larger CPU gradients take the two-operator delta gradient (what CUDA never does): one copy more per layer.
    longer = suite.random_tokens(512, 4, 64, seed=0, device=torch.device("cpu"))
    assert steady_operator_counts("paca", base, longer)[0] == TINY_PACA_TWO_OPERATOR_DELTA_GRAD


def test_compile_times_compiled_steps_and_keeps_the_eager_operator_counts(tmp_path, capsys):
    """--compile: fig2's timed steps run each method's torch.compile'd model (dynamo captures graphs, no break, the
    floor's included); the ops/step column is still the eager step's count, which the title says."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    path = tmp_path / "bench.json"
    code, out, err = run_bench(
        [
            "--preset",
            "tiny",
            "--batch",
            "2",
            "--seq",
            "16",
            "--methods",
            "floor,paca",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--compile",
            "eager",
            "--json",
            str(path),
        ],
        capsys,
    )
    torch._dynamo.reset()
    assert code == 0, err
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert not torch._dynamo.utils.counters["graph_break"]
    results = {r["method"]: r for r in json.loads(path.read_text())["results"]}
    # The compiled floor's gradient source (an add of a zero leaf, its sum and accumulation in backward): 3 more.
    assert {m: results[m]["dispatched_ops_per_step"] for m in results} == {
        "floor": TINY_OPERATORS["floor"] + 3,
        "paca": TINY_OPERATORS["paca"],
    }
    assert "rounds of torch.compile'd models (eager; ops/step and memory of an eager step)" in out


def test_the_delta_gradient_is_one_operator_on_cuda_and_for_small_cpu_gradients():
    from paca.ops.linear import ONE_OPERATOR_MAX_CPU_GRAD_VALUES, delta_grad_in_one_operator

    assert delta_grad_in_one_operator(torch.empty(2, ONE_OPERATOR_MAX_CPU_GRAD_VALUES // 2))
    assert not delta_grad_in_one_operator(torch.empty(2, ONE_OPERATOR_MAX_CPU_GRAD_VALUES // 2 + 1))
    # CUDA, whatever the size: tests/test_cuda.py (it needs a GPU).


def test_kernels_per_step_are_a_column_where_a_device_counted_them_and_absent_on_cpu():
    """The profiler's device events of a step (tests/test_cuda.py counts them on a GPU) are counted by device, and
    the fig2 table shows them beside ops/step only when a run has them."""
    from torch.autograd import DeviceType

    from paca.bench.profile import count_device_events
    from paca.bench.report import tables

    class Event:
        def __init__(self, device_type):
            self.device_type = device_type

    assert count_device_events([Event(DeviceType.CPU), Event(DeviceType.CUDA), Event(DeviceType.CUDA)]) == 2
    row = dict(
        method="paca",
        step_time_s=1.0,
        forward_s=0.5,
        backward_s=0.4,
        optimizer_s=0.1,
        tokens_per_s=32.0,
        tflops_per_s=0.1,
        peak_memory_bytes=2**30,
        activation_bytes=2**20,
        dispatched_ops_per_step=262,
        trainable_params=8192,
    )
    doc = {"settings": {"batch": 1, "seq": 32, "repeats": 3}, "results": [row]}
    ((_, header, rows),) = tables(doc)
    assert "kernels f+b" not in header
    doc["results"] = [dict(row, device_kernels_per_step=301)]
    ((_, header, rows),) = tables(doc)
    assert header[header.index("ops/step") + 1] == "kernels f+b" and rows[0][header.index("kernels f+b")] == "301"


@pytest.mark.skipif(not PEFT_HAS_PACA, reason="peft < 0.22 has no PaCA of its own")
def test_paca_dispatches_fewer_operators_and_keeps_no_more_for_backward_than_peft_paca():
    """PEFT's own PaCA on the same columns swaps them in and out around each matmul (7.3 operators per tuned layer
    over the floor here) and keeps the original and adapted columns for backward; paca writes once per forward and
    restores once per backward, keeping only x[..., idx]."""
    base = build_model(ModelSpec("tiny"), torch.float32, torch.device("cpu"), seed=0)
    ids = suite.random_tokens(512, 2, 16, seed=0, device=torch.device("cpu"))
    accounts = {}
    for method in ("paca", "peft-paca"):
        trainee = make_trainee(method, base, 8, 16, 0)
        train_step(trainee, ids, torch.float32)
        accounts[method] = accounting_step(trainee, ids, torch.float32)
    assert accounts["paca"].dispatched_ops == TINY_OPERATORS["paca"]
    assert accounts["peft-paca"].dispatched_ops == TINY_PEFT_PACA_OPERATORS
    assert accounts["paca"].activation_bytes < accounts["peft-paca"].activation_bytes


MOE_TINY_OPERATORS = {"floor": 301, "paca": 351, "lora": 411}


def test_moe_preset_compares_paca_and_lora_on_the_same_experts_and_paca_keeps_fewer_activations():
    """On an MoE shape both methods tune attention, every fused experts projection and every router (LoRA through
    its target_parameters); PaCA keeps fewer bytes for backward (r channels per token-expert pair instead of
    LoRA's full expert inputs) and trains fewer parameters."""
    from peft.tuners.lora.layer import ParamWrapper

    from paca.tuner.experts import Experts
    from paca.tuner.router import Router

    base = build_model(ModelSpec("moe-tiny"), torch.float32, torch.device("cpu"), seed=0)
    ids = suite.random_tokens(512, 2, 16, seed=0, device=torch.device("cpu"))
    paca = make_trainee("paca", base, 8, 16, 0)
    lora = make_trainee("lora", base, 8, 16, 0)
    tuned_by_paca = {
        (m.layer_name, p) for m in paca.model.modules() if isinstance(m, Experts) for p in m.paca_delta["default"]
    }
    tuned_by_paca |= {(m.layer_name, "weight") for m in paca.model.modules() if isinstance(m, Router)}
    tuned_by_lora = {
        (name.removeprefix("base_model.model.").removesuffix(".base_layer"), m.parameter_name)
        for name, m in lora.model.named_modules()
        if isinstance(m, ParamWrapper)
    }
    assert tuned_by_paca == tuned_by_lora and len(tuned_by_paca) == 6  # 2 layers x (gate_up, down, router)
    accounts = {}
    for trainee in (paca, lora, make_trainee("floor", base, 8, 16, 0)):
        train_step(trainee, ids, torch.float32)
        accounts[trainee.method] = accounting_step(trainee, ids, torch.float32)
    assert accounts["paca"].activation_bytes < accounts["lora"].activation_bytes
    assert accounts["paca"].trainable_params < accounts["lora"].trainable_params
    # The frozen experts' grouped GEMMs are counted (forward and input gradient: 2 x 2 FLOPs per multiply-add
    # of gate_up (2I x H) and down (H x I) for each of the 32 tokens' 2 experts in each of the 2 layers).
    config = base.config
    expert_flops = 2 * 2 * 32 * 2 * 2 * 3 * config.hidden_size * config.intermediate_size
    assert accounts["floor"].flops > expert_flops
    assert accounts["floor"].flops < accounts["paca"].flops < accounts["floor"].flops * 1.2
    # Dispatched operators per step (deterministic): PaCA's experts add a handful per layer beyond the frozen
    # experts' own grouped GEMMs (the column scatter, the r-channel gather, the delta-gradient grouped GEMM), its
    # router what a linear layer adds.
    assert {m: a.dispatched_ops for m, a in accounts.items()} == MOE_TINY_OPERATORS
