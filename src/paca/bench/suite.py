"""The three measurements of `paca bench`, over every requested method:

    fig2    step time split forward | backward | optimizer, FLOPs, tokens/s, memory (paper Fig. 2)
            all methods resident, interleaved: warm-up, then ``repeats`` rounds of one step per method in
            rotating order; medians of the rounds, ratios as medians of per-round pairs
    table4  longest sequence at batch 1 before out-of-memory (Table 4), one method on the device at a time
    fig3    sentences/s at a fixed length as the batch doubles until out-of-memory, then bisected to the
            largest batch that fits (Fig. 3)
    profile self time per operator and method at the fig2 batch (torch.profiler), to explain a ratio

On CUDA ``--memory-cap-gib`` limits the allocator during table4 and fig3 (set_per_process_memory_fraction).
The CPU has no allocator to cap: there a size is out of memory when its accounted bytes (parameters,
gradients, optimizer state, activations) exceed the cap.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from .errors import BenchError
from .measure import Accounting, accounting_step, train_step
from .methods import QUANTIZED, Trainee, make_trainee, quantized_copy
from .presets import ModelSpec, build_model, device_memory_bytes
from .profile import PROFILED_STEPS, device_kernels_per_step, profile_steps
from .search import Probe, free_memory, largest_fitting

PARTS = ("fig2", "table4", "fig3", "profile")
THROUGHPUT_STEPS = 3  # timed steps per batch size in fig3, after one untimed step
COMPILED_WARMUP = 2  # --compile: the first step compiles forward and backward, the second may recompile


@dataclass
class Settings:
    """Everything one run measures; the CLI fills it from flags and suites."""

    model: ModelSpec
    methods: list[str]
    device: torch.device
    dtype: torch.dtype
    batch: int = 4
    seq: int = 256
    r: int = 8
    alpha: float = 16.0
    repeats: int = 7
    warmup: int = 1
    seed: int = 0
    parts: tuple[str, ...] = ("fig2",)
    memory_cap_bytes: int | None = None
    max_seq: int = 65536
    seq_granularity: int = 128
    fig3_seq: int = 512
    max_batch: int = 64
    compile_backend: str | None = None  # fig2 times torch.compile'd models (this backend) when given

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            model=self.model.name,
            layers=self.model.layers,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            parts=list(self.parts),
        )
        return d


class Progress:
    """One dense status line on stderr: rewritten in place on a terminal, one line per update otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = 0

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.width = 0


def validate(settings: Settings) -> None:
    """Raise BenchError for settings that cannot run (bad sizes, a cap larger than the device...)."""
    s = settings
    for name in ("batch", "seq", "r", "repeats", "fig3_seq", "max_batch", "seq_granularity"):
        if getattr(s, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}.")
    if s.warmup < 0:
        raise BenchError(f"--warmup must be at least 0, got {s.warmup}.")
    if s.compile_backend is not None and s.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise BenchError(
            f"--compile {s.compile_backend}: not a torch.compile backend here; choose from "
            f"{', '.join(torch._dynamo.list_backends())}."
        )
    unknown = [p for p in s.parts if p not in PARTS]
    if unknown:
        raise BenchError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}.")
    if s.device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but no CUDA device is available to torch here; use --device cpu.")
    if s.device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {s.device} is not supported; use cpu or cuda.")
    total = device_memory_bytes(s.device)
    if s.memory_cap_bytes is not None:
        if s.memory_cap_bytes <= 0:
            raise BenchError("--memory-cap-gib must be positive.")
        if s.memory_cap_bytes > total:
            raise BenchError(
                f"--memory-cap-gib {s.memory_cap_bytes / 2**30:g} is more than the "
                f"{total / 2**30:.1f} GiB of {describe_device(s.device)['name']}; give a smaller cap."
            )
    searches = [p for p in s.parts if p in ("table4", "fig3")]
    if searches and s.device.type == "cpu" and s.memory_cap_bytes is None:
        raise BenchError(
            f"{' and '.join(searches)} on CPU need --memory-cap-gib: the searches stop where the "
            "accounted bytes exceed it (a real out-of-memory on CPU kills the process)."
        )
    if s.max_seq < s.seq_granularity * 4:
        raise BenchError(f"--max-seq {s.max_seq} must be at least 4 x the search granularity {s.seq_granularity}.")
    config = s.model.config()  # an unknown preset or unreadable model fails here, before anything is built
    check_positions(config, s)


def check_positions(config, s: Settings) -> None:
    """A model with learned position embeddings (GPT-2, BERT) cannot run past them: say so before building it."""
    positions = getattr(config, "max_position_embeddings", None)
    rope = any(getattr(config, name, None) for name in ("rope_parameters", "rope_theta", "rope_scaling"))
    if rope or not isinstance(positions, int):
        return
    asked = [("--seq", s.seq)] if {"fig2", "profile"} & set(s.parts) else []
    asked += [("--fig3-seq", s.fig3_seq)] if "fig3" in s.parts else []
    asked += [("--max-seq", s.max_seq)] if "table4" in s.parts else []
    over = [f"{flag} {value}" for flag, value in asked if value > positions]
    if over:
        raise BenchError(
            f"model '{s.model.name}' has learned position embeddings for {positions} tokens "
            f"(max_position_embeddings); {', '.join(over)} asks for more: use at most {positions}."
        )


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "torch": torch.__version__,
        }
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    # Load average: other processes on the cores make CPU timings noisy; the reader should know.
    return {
        "type": "cpu",
        "name": name,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "memory_bytes": device_memory_bytes(device),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }


def graph_breaks() -> int:
    """Graph breaks torch.compile has met in this process so far."""
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def random_tokens(vocab: int, batch: int, seq: int, seed: int, device: torch.device) -> torch.Tensor:
    """The same token batch for every method (seeded, independent of the global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


def median(values) -> float:
    return statistics.median(values)


def clear_grads(trainee: Trainee) -> None:
    for p in trainee.trainable_parameters:
        p.grad = None


@dataclass
class Run:
    """Results by method, as they accumulate; a method that cannot be built is skipped by later parts."""

    settings: Settings
    progress: Progress
    results: dict[str, dict] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)
    profiles: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.results = {m: {"method": m} for m in self.settings.methods}
        self.vocab = self.settings.model.config().vocab_size

    def fail(self, method: str, message: str) -> None:
        self.results[method].setdefault("errors", []).append(message)
        self.progress.update(f"{method}: {message}")

    def tokens(self, batch: int, seq: int) -> torch.Tensor:
        s = self.settings
        return random_tokens(self.vocab, batch, seq, s.seed, s.device)

    def peak_memory(self, accounting: Accounting, transient: int | None) -> int:
        """The memory one method needs, though others are resident beside it (fig2).

        CUDA: its parameters and optimizer state plus the allocator's peak during a step on top of what the
        step found allocated (the same as max_memory_allocated with the method alone); CPU: accounted bytes.
        """
        if self.settings.device.type == "cuda":
            return accounting.param_bytes + accounting.optimizer_state_bytes + transient
        return accounting.accounted_bytes

    # -- fig2 ---------------------------------------------------------------------------------------
    def step_time(self) -> None:
        s = self.settings
        trainees = self._build_all()
        input_ids = self.tokens(s.batch, s.seq)
        warmup = s.warmup
        if s.compile_backend is not None:
            for trainee in trainees.values():
                trainee.compiled = torch.compile(trainee.model, backend=s.compile_backend)
            warmup = max(warmup, COMPILED_WARMUP)
        accounts: dict[str, Accounting] = {}
        for m in list(trainees):
            # Warm-up first: the accounting step then counts a steady step (PaCA copies each layer's pretrained
            # columns once, in its first step).
            self.progress.update(f"fig2 {m}: {warmup} warm-up, then an accounting step (FLOPs, saved bytes)")
            breaks = graph_breaks()
            for _ in range(warmup):
                self._guarded(trainees, m, lambda t: train_step(t, input_ids, s.dtype))
            if s.compile_backend is not None and m in self.results:
                self.results[m]["compile_graph_breaks"] = graph_breaks() - breaks
            account = self._guarded(trainees, m, lambda t: accounting_step(t, input_ids, s.dtype))
            if account is not None:
                accounts[m] = account
                if s.device.type == "cuda":  # a step of its own: the profiler's overhead stays off the timed ones
                    account.device_kernels = self._guarded(
                        trainees, m, lambda t: device_kernels_per_step(t, input_ids, s.dtype)
                    )
        records = {m: [] for m in trainees}
        started = time.perf_counter()
        for k in range(s.repeats):
            order = list(trainees)[k % max(len(trainees), 1) :] + list(trainees)[: k % max(len(trainees), 1)]
            for m in order:
                if m in trainees:
                    record = self._guarded(trainees, m, lambda t: train_step(t, input_ids, s.dtype))
                    if record is not None:
                        records[m].append(record)
            self.progress.update(self._round_line(k, records, started))
        self.progress.done()
        del trainees
        free_memory()
        self._summarise_step_time({m: r for m, r in records.items() if r and m in accounts}, accounts)

    def _build_all(self) -> dict[str, Trainee]:
        s = self.settings
        self.progress.update(f"building {s.model.name} on {s.device} in {str(s.dtype).removeprefix('torch.')}")
        base = build_model(s.model, s.dtype, s.device, s.seed)
        quantized = None
        trainees = {}
        for m in s.methods:
            if m in QUANTIZED and quantized is None:
                quantized = self._attempt(m, "quantizing the base model", lambda: quantized_copy(base, s.dtype))
                if quantized is None:
                    continue
            trainee = self._attempt(
                m,
                "building it beside the other methods (fig2 keeps them all resident)",
                lambda: make_trainee(
                    m, base, s.r, s.alpha, s.seed, quantized, for_compile=s.compile_backend is not None
                ),
            )
            if trainee is not None:
                trainees[m] = trainee
        return trainees

    def _guarded(self, trainees: dict[str, Trainee], method: str, step):
        """``step(trainee)``; a failure (out of memory included) drops the method from fig2, recorded."""
        if method not in trainees:
            return None
        s = self.settings
        result = self._attempt(
            method, f"at batch {s.batch} x {s.seq} tokens during fig2", lambda: step(trainees[method])
        )
        if result is None:
            clear_grads(trainees.pop(method))
            free_memory()
        return result

    def _attempt(self, method: str, what: str, action):
        """``action()``, or None when it failed, recorded: an unavailable method, an out-of-memory, or any
        other error (one method's failure must not lose the others' results)."""
        try:
            return action()
        except BenchError as err:
            self.unavailable.add(method)
            self.fail(method, str(err))
        except torch.OutOfMemoryError:
            self.fail(method, f"out of memory {what}")
        except Exception as err:  # noqa: BLE001  (reported with its place, the run goes on)
            frame = traceback.extract_tb(err.__traceback__)[-1]
            self.fail(
                method, f"{type(err).__name__} {what}: {err} ({os.path.basename(frame.filename)}:{frame.lineno})"
            )
        free_memory()
        return None

    def _round_line(self, k: int, records: dict, started: float) -> str:
        s = self.settings
        latest = " ".join(f"{m} {r[-1].step_s:.3f}s" for m, r in records.items() if r)
        line = f"fig2 round {k + 1}/{s.repeats} | {latest}"
        if records.get("paca") and records.get("lora"):
            line += f" | paca/lora {median(self._paired(records, 'paca', 'lora', 'step_s')):.3f}"
        elapsed = time.perf_counter() - started
        eta = elapsed / (k + 1) * (s.repeats - k - 1)
        return line + f" | eta {int(eta // 60)}m{int(eta % 60):02d}s"

    @staticmethod
    def _paired(records: dict, method: str, reference: str, phase: str) -> list[float]:
        """Per-round ratios method/reference of one phase (rounds in which both ran)."""
        pairs = zip(records[method], records[reference])
        return [getattr(a, phase) / getattr(b, phase) for a, b in pairs if getattr(b, phase) > 0]

    def _summarise_step_time(self, records: dict, accounts: dict[str, Accounting]) -> None:
        s = self.settings
        tokens = s.batch * s.seq
        for m, recs in records.items():
            a = accounts[m]
            step = median(r.step_s for r in recs)
            transients = [r.transient_peak_bytes for r in recs if r.transient_peak_bytes is not None]
            self.results[m].update(
                step_time_s=step,
                forward_s=median(r.forward_s for r in recs),
                backward_s=median(r.backward_s for r in recs),
                optimizer_s=median(r.optimizer_s for r in recs),
                tokens_per_s=tokens / step,
                flops_per_step=a.flops,
                tflops_per_s=a.flops / step / 1e12,
                peak_memory_bytes=self.peak_memory(a, max(transients) if transients else None),
                activation_bytes=a.activation_bytes,
                param_bytes=a.param_bytes,
                grad_bytes=a.grad_bytes,
                optimizer_state_bytes=a.optimizer_state_bytes,
                trainable_params=a.trainable_params,
                dispatched_ops_per_step=a.dispatched_ops,
                device_kernels_per_step=a.device_kernels,
                process_peak_rss_bytes=a.process_peak_rss_bytes,
                step_times_s=[r.step_s for r in recs],
            )
        for reference in ("lora", "floor", "peft-paca", "qlora", "qpeft-paca"):
            if reference not in records:
                continue
            for m in records:
                ratios = {
                    phase: median(self._paired(records, m, reference, phase))
                    for phase in ("step_s", "forward_s", "backward_s", "forward_backward_s")
                    if self._paired(records, m, reference, phase)
                }
                ratios = {("step_time_s" if k == "step_s" else k): v for k, v in ratios.items()}
                paired = self._paired(records, m, reference, "step_s")
                if len(paired) >= 2:  # how much the per-round ratios scatter: the noise behind the median
                    q1, _, q3 = statistics.quantiles(paired, n=4, method="inclusive")
                    self.results[m].setdefault("step_time_ratio_quartiles", {})[reference] = [q1, q3]
                if reference == "lora":
                    for key in ("peak_memory_bytes", "activation_bytes", "tokens_per_s"):
                        if self.results["lora"].get(key):
                            ratios[key] = self.results[m][key] / self.results["lora"][key]
                self.results[m].setdefault(f"ratio_to_{reference}", {}).update(ratios)

    # -- profile ------------------------------------------------------------------------------------
    def profile(self) -> None:
        s = self.settings
        trainees = self._build_all()
        input_ids = self.tokens(s.batch, s.seq)
        for m in list(trainees):
            self.progress.update(f"profile {m}: 1 warm-up step, {PROFILED_STEPS} profiled")
            if self._guarded(trainees, m, lambda t: train_step(t, input_ids, s.dtype)) is None:
                continue
            table = self._guarded(trainees, m, lambda t: profile_steps(t, input_ids, s.dtype))
            if table is not None:
                self.profiles[m] = dict(sorted(table.items(), key=lambda kv: -kv[1]["self_s"])[:40])
        self.progress.done()
        del trainees
        free_memory()

    # -- table4 and fig3 ----------------------------------------------------------------------------
    def _alone(self, method: str, part: str) -> Trainee | None:
        """``method`` built on a fresh base, with nothing else resident; None (recorded) if it cannot be."""
        s = self.settings

        def build() -> Trainee:
            base = build_model(s.model, s.dtype, s.device, s.seed)
            return make_trainee(method, base, s.r, s.alpha, s.seed)

        return self._attempt(method, f"building the model alone for {part}", build)

    def _fits(self, trainee: Trainee, batch: int, seq: int, size: int) -> Probe:
        """One step at ``batch x seq`` (``size`` is the one searched); on CPU a step whose accounted bytes
        exceed the cap does not fit."""
        s = self.settings
        try:
            account = accounting_step(trainee, self.tokens(batch, seq), s.dtype, count_flops=False)
        finally:
            clear_grads(trainee)
        # Alone on the device, the allocator's peak is the method's whole footprint (CPU: accounted bytes).
        memory = account.peak_allocated_bytes if s.device.type == "cuda" else account.accounted_bytes
        if s.device.type == "cpu" and memory > s.memory_cap_bytes:
            return Probe(size, fits=False, memory_bytes=memory, note="accounted bytes over the cap")
        return Probe(size, fits=True, memory_bytes=memory)

    def apply_memory_cap(self) -> None:
        s = self.settings
        if s.memory_cap_bytes is not None and s.device.type == "cuda":
            fraction = s.memory_cap_bytes / device_memory_bytes(s.device)
            torch.cuda.set_per_process_memory_fraction(fraction, s.device)

    def max_seq_len(self) -> None:
        s = self.settings
        for m in s.methods:
            if m in self.unavailable:
                continue
            self.progress.update(f"table4 {m}: building")
            trainee = self._alone(m, "table4")
            if trainee is None:
                continue

            def measure(seq: int) -> Probe:
                return self._fits(trainee, 1, seq, size=seq)

            def show(p: Probe, m=m) -> None:
                memory = f", {p.memory_bytes / 2**30:.2f} GiB" if p.memory_bytes else ""
                self.progress.update(f"table4 {m} | seq {p.size}: {'fits' if p.fits else p.note}{memory}")

            fit = self._attempt(
                m,
                "during table4",
                lambda: largest_fitting(
                    measure, start=s.seq_granularity * 4, limit=s.max_seq, granularity=s.seq_granularity, on_probe=show
                ),
            )
            del trainee
            if fit is None:
                continue
            self.results[m].update(
                max_seq_len=fit.largest,
                max_seq_len_reached_limit=fit.reached_limit,
                max_seq_probes=[p.as_dict() for p in fit.probes],
            )
            free_memory()
        self.progress.done()
        self._ratio_to_lora("max_seq_len")

    def throughput(self) -> None:
        s = self.settings
        for m in s.methods:
            if m in self.unavailable:
                continue
            self.progress.update(f"fig3 {m}: building")
            trainee = self._alone(m, "fig3")
            if trainee is None:
                continue

            def measure(batch: int) -> Probe:
                probe = self._fits(trainee, batch, s.fig3_seq, size=batch)
                if probe.fits:
                    ids = self.tokens(batch, s.fig3_seq)
                    step = median(train_step(trainee, ids, s.dtype).step_s for _ in range(THROUGHPUT_STEPS))
                    probe.sentences_per_s = batch / step
                return probe

            def show(p: Probe, m=m) -> None:
                rate = f"{p.sentences_per_s:.2f} sentences/s" if p.sentences_per_s else p.note
                self.progress.update(f"fig3 {m} | batch {p.size} x {s.fig3_seq}: {rate}")

            search = self._attempt(
                m,
                "during fig3",
                lambda: largest_fitting(measure, start=1, limit=s.max_batch, granularity=1, on_probe=show),
            )
            del trainee
            if search is None:
                continue
            curve = sorted(search.probes, key=lambda p: p.size)
            fitting = [p for p in curve if p.fits]
            best = max(fitting, key=lambda p: p.sentences_per_s) if fitting else None
            self.results[m].update(
                throughput=[p.as_dict() for p in curve],
                max_batch=search.largest,
                max_batch_reached_limit=search.reached_limit,
                best_sentences_per_s=best.sentences_per_s if best else None,
                best_batch=best.size if best else None,
            )
            free_memory()
        self.progress.done()
        self._ratio_to_lora("best_sentences_per_s")

    def _ratio_to_lora(self, key: str) -> None:
        reference = self.results.get("lora", {}).get(key)
        if not reference:
            return
        for result in self.results.values():
            if result.get(key) is not None:
                result.setdefault("ratio_to_lora", {})[key] = result[key] / reference


def run(settings: Settings, progress: Progress | None = None) -> dict:
    """Measure every requested part; the document ``--json`` writes."""
    validate(settings)
    device_at_start = describe_device(settings.device)
    current = Run(settings, progress or Progress())
    if "fig2" in settings.parts:
        current.step_time()
    if "profile" in settings.parts:
        current.profile()
    current.apply_memory_cap()
    if "table4" in settings.parts:
        current.max_seq_len()
    if "fig3" in settings.parts:
        current.throughput()
    model = settings.model.describe()
    model["dtype"] = str(settings.dtype).removeprefix("torch.")
    device = describe_device(settings.device)
    if "load_average_1m" in device:
        device["load_average_1m"] = [device_at_start["load_average_1m"], device["load_average_1m"]]  # start, end
    doc = {"device": device, "model": model, "settings": settings.as_dict(), "results": list(current.results.values())}
    if current.profiles:
        doc["profile"] = {"steps": PROFILED_STEPS, "self_time_by_method": current.profiles}
    return doc
