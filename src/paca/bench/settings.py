"""What one `paca bench` run measures, checked before anything is built, and the device it runs on."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

import torch

from .errors import BenchError
from .presets import ModelSpec, device_memory_bytes

PARTS = ("fig2", "table4", "fig3", "profile")


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
    check_device(s)
    if s.max_seq < s.seq_granularity * 4:
        raise BenchError(f"--max-seq {s.max_seq} must be at least 4 x the search granularity {s.seq_granularity}.")
    config = s.model.config()  # an unknown preset or unreadable model fails here, before anything is built
    check_positions(config, s)


def check_device(s: Settings) -> None:
    """Raise BenchError for a device torch cannot use here, or a memory cap it cannot honour."""
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
    """The device as the results record it: a GPU's name, memory and capability, or the CPU's name and load."""
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
