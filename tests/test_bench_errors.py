"""`paca bench` when something goes wrong: out of memory is a data point of a search, never a crash, and bad input
or a method this install cannot run is a one-line error while the other methods run."""

import json

import pytest
import torch
from test_bench import run_bench

from paca.bench import fitting
from paca.bench.methods import make_trainee
from paca.bench.presets import ModelSpec, build_model
from paca.bench.search import Probe, largest_fitting

# -- out of memory is a data point -------------------------------------------------------------------


def oom_above(threshold: int, seen: list):
    def measure(size: int) -> Probe:
        seen.append(size)
        if size > threshold:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} units")
        return Probe(size, fits=True, memory_bytes=size)

    return measure


def test_length_search_doubles_then_bisects_and_records_out_of_memory():
    seen = []
    fit = largest_fitting(oom_above(3000, seen), start=128, limit=65536, granularity=128)
    assert fit.largest == 2944 and not fit.reached_limit  # largest multiple of 128 not above 3000
    assert seen[:6] == [128, 256, 512, 1024, 2048, 4096]
    failed = [p for p in fit.probes if not p.fits]
    assert failed and all(p.note.startswith("out of memory") for p in failed)


def test_length_search_reports_the_limit_and_the_case_where_nothing_fits():
    assert largest_fitting(oom_above(10**9, []), start=128, limit=1000, granularity=8).reached_limit
    assert largest_fitting(oom_above(10**9, []), start=128, limit=1000, granularity=8).largest == 1000
    nothing = largest_fitting(oom_above(50, []), start=128, limit=1000, granularity=64)
    assert nothing.largest is None and len(nothing.probes) == 2  # 128 fails, then 64 fails


def test_batch_search_finds_the_exact_largest_batch():
    seen = []
    fit = largest_fitting(oom_above(11, seen), start=1, limit=64, granularity=1)
    assert fit.largest == 11 and seen == [1, 2, 4, 8, 16, 12, 10, 11]


def test_out_of_memory_during_a_run_ends_with_every_result_it_got(monkeypatch, tmp_path, capsys):
    real = fitting.accounting_step

    def accounting_that_runs_out_above_600_tokens(trainee, input_ids, dtype, count_flops=True):
        if input_ids.numel() > 600:
            raise torch.OutOfMemoryError("out of memory (simulated above 600 tokens)")
        return real(trainee, input_ids, dtype, count_flops)

    monkeypatch.setattr(fitting, "accounting_step", accounting_that_runs_out_above_600_tokens)
    path = tmp_path / "r.json"
    code, out, err = run_bench(
        [
            "--preset",
            "tiny",
            "--methods",
            "paca,lora",
            "--parts",
            "table4,fig3",
            "--threads",
            "1",
            "--memory-cap-gib",
            "1",
            "--seq-granularity",
            "32",
            "--max-seq",
            "4096",
            "--fig3-seq",
            "128",
            "--max-batch",
            "16",
            "--json",
            str(path),
        ],
        capsys,
    )
    assert code == 0, err
    results = {r["method"]: r for r in json.loads(path.read_text())["results"]}
    for r in results.values():
        assert r["max_seq_len"] == 576  # largest multiple of 32 up to 600
        assert [(p["size"], p["fits"]) for p in r["throughput"]] == [
            (1, True),
            (2, True),
            (4, True),
            (5, False),
            (6, False),
            (8, False),
        ]  # 5 x 128 > 600
        assert r["max_batch"] == 4 and r["best_batch"] in (1, 2, 4)


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--methods", "paca,bogus"],
            "unknown method(s) 'bogus'; choose from full, lora, dora, paca, peft-paca, floor, qlora, qpaca, "
            "qpeft-paca",
        ),
        (["--preset", "llama9"], "unknown preset 'llama9'"),
        (["--model", "./no-such-dir"], "unknown preset './no-such-dir' and no model directory of that name"),
        (["--preset", "cpu", "--layers", "0"], "--layers must be a positive integer"),
        (["--preset", "tiny", "--parts", "table4", "--memory-cap-gib", "100000"], "is more than the"),
        (["--preset", "tiny", "--parts", "fig3"], "need --memory-cap-gib"),
        (["--preset", "tiny", "--parts", "fig5"], "unknown part(s) fig5"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--preset", "llama3-8b", "--layers", "4000"], "for its weights alone"),
        (["--preset", "tiny", "--compile", "nonsense"], "--compile nonsense: not a torch.compile backend here"),
    ],
)
def test_bad_input_is_a_one_line_error_not_a_traceback(args, message, capsys):
    code, out, err = run_bench(args, capsys)
    assert code == 1
    assert message in err and "Traceback" not in err


def test_a_model_with_learned_positions_is_refused_beyond_them_and_a_rope_model_is_not(tmp_path, capsys):
    from conftest import tiny_gpt2, tiny_llama

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")  # 64 learned positions
    code, out, err = run_bench(["--model", str(tmp_path / "gpt2"), "--seq", "128", "--batch", "1"], capsys)
    assert code == 1 and "learned position embeddings for 64 tokens" in err and "--seq 128" in err
    assert "Traceback" not in err
    tiny_llama().save_pretrained(tmp_path / "llama")  # RoPE: 64 positions in its config, longer inputs run
    code, out, err = run_bench(
        ["--model", str(tmp_path / "llama"), "--seq", "128", "--batch", "1", "--repeats", "1", "--methods", "paca"],
        capsys,
    )
    assert code == 0, err


def test_a_model_directory_without_a_config_is_a_clear_error(tmp_path, capsys):
    code, out, err = run_bench(["--model", str(tmp_path)], capsys)
    assert code == 1 and f"cannot read the config of model '{tmp_path}'" in err and "Traceback" not in err


def test_qpaca_without_working_4bit_support_fails_clearly_while_the_other_methods_run(monkeypatch, tmp_path, capsys):
    from paca.bench import methods

    def no_4bit_support(model):
        raise methods.BenchError(
            methods.qpaca_unsupported("simulated: PaCA layer over Linear4bit does not reproduce it")
        )

    monkeypatch.setattr(methods, "check_quantized_paca", no_4bit_support)
    path = tmp_path / "r.json"
    code, out, err = run_bench(
        [
            "--preset",
            "tiny",
            "--methods",
            "paca,qpaca",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--batch",
            "1",
            "--seq",
            "32",
            "--json",
            str(path),
        ],
        capsys,
    )
    assert code == 1 and "Traceback" not in err
    results = {r["method"]: r for r in json.loads(path.read_text())["results"]}
    assert results["paca"]["step_time_s"] > 0
    assert "qpaca needs PaCA on bitsandbytes 4-bit layers" in results["qpaca"]["errors"][0]
    assert "qpaca needs PaCA on bitsandbytes 4-bit layers" in out


def test_quantized_paca_check_rejects_a_layer_that_does_not_reproduce_its_base(monkeypatch):
    from paca.bench import methods

    base = build_model(ModelSpec("tiny"), torch.float32, torch.device("cpu"), seed=0)
    trainee = make_trainee("qpaca", base, 8, 16, 0)  # the installed 4-bit PaCA passes the check
    layer = next(m for m in trainee.model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "paca_delta"))
    monkeypatch.setattr(type(layer), "forward", lambda self, x, *a, **k: torch.zeros(*x.shape[:-1], 64))
    with pytest.raises(methods.BenchError, match="does not reproduce it"):
        methods.check_quantized_paca(trainee.model)
