"""A simulated deployment, as read from a JSON scenario file, and the prefill cost table.

Prefill cost: prefill is compute-bound, about ``2 x active parameters`` FLOPs per token (the
attention term, quadratic in context, is left out: at a few thousand tokens it is small next to
the weights' for these models). Seconds per token = ``2 x params / (peak dense BF16 FLOP/s x
MFU)``. Peaks are the vendors' datasheet figures (dense, without sparsity); the model FLOPs
utilisation of 0.475 is calibrated so Llama-3-70B on an H100 costs 0.30 s per 1,000 prefix tokens,
the figure this project started from (an assumption to replace with your own measurement).
Figures are GPU-seconds: with tensor parallelism over ``tp`` GPUs the wall
time is divided by ``tp`` (linear scaling: optimistic) and the GPU-seconds stay the same. A scenario
can give ``prefill_seconds_per_token`` outright from its own measurements.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs

from nvmeof.units import parse_size
from simulator.workload import CHUNK_TOKENS, Dtype, ModelSpec, SessionWorkload, model_named

# Peak dense BF16 tensor FLOP/s, from the vendors' datasheets.
GPU_PEAK_FLOPS: dict[str, float] = {
    "A100": 312e12,  # NVIDIA A100 datasheet (SXM, BF16 dense)
    "L40S": 362e12,  # NVIDIA L40S datasheet (BF16 dense)
    "H100": 989e12,  # NVIDIA H100 SXM datasheet (BF16 dense; 1,979 with sparsity)
    "H200": 989e12,  # NVIDIA H200 datasheet: the H100's compute, more HBM
    "B200": 2250e12,  # NVIDIA DGX B200 / HGX B200 datasheet (BF16 dense)
    "MI300X": 1307e12,  # AMD Instinct MI300X datasheet (BF16 dense)
}
MFU = 0.475


def prefill_seconds_per_token(model: ModelSpec, gpu: str) -> float:
    """GPU-seconds of prefill per prompt token."""
    try:
        peak = GPU_PEAK_FLOPS[gpu]
    except KeyError:
        known = ", ".join(sorted(GPU_PEAK_FLOPS))
        raise ValueError(f"unknown GPU {gpu!r} (known: {known})") from None
    return 2 * model.params / (peak * MFU)


def size(value: int | float | str) -> int:
    """Bytes from ``123``, ``"64MiB"``, ``"2TiB"`` or ``"3PiB"``."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(PiB|PB)\s*", value, re.IGNORECASE)
    if match:
        unit = 1 << 50 if match.group(2).lower() == "pib" else 1000**5
        return int(float(match.group(1)) * unit)
    return parse_size(value)


def _gbps(value: float) -> float:
    """Bytes per second from gigabits per second."""
    return value * 1e9 / 8


@attrs.frozen
class ModelConfig:
    name: str = "llama-3-70b"
    dtype: Dtype = Dtype.FP16
    gpu: str = "H100"
    tensor_parallel: int = 8
    kv_bytes_per_token: int | None = None  # override the architecture's figure
    prefill_seconds_per_token: float | None = None  # GPU-seconds; override the table

    @property
    def spec(self) -> ModelSpec:
        return model_named(self.name)

    @property
    def bytes_per_token(self) -> int:
        return self.kv_bytes_per_token or self.spec.kv_bytes_per_token(self.dtype)

    @property
    def gpu_seconds_per_token(self) -> float:
        if self.prefill_seconds_per_token is not None:
            return self.prefill_seconds_per_token
        return prefill_seconds_per_token(self.spec, self.gpu)


@attrs.frozen
class HostConfig:
    count: int = 4
    replicas: int = 1  # model replicas (each ``tensor_parallel`` GPUs) per host
    local_cache: int = 0  # host DRAM for KV chunks, bytes (0: none)
    nic: float = _gbps(400)  # bytes/s
    pcie: float = 50e9  # host DRAM -> GPU, bytes/s


@attrs.frozen
class TargetConfig:
    count: int = 2
    dram: int = 64 << 30
    flash: int = 8 << 40
    dram_bandwidth: float = 100e9
    flash_read_bandwidth: float = 12e9  # bytes/s, whole target (a few NVMe drives)
    flash_write_bandwidth: float = 6e9
    flash_latency: float = 80e-6
    nic: float = _gbps(400)
    failed: tuple[int, ...] = ()  # targets down for the whole run (EC degraded-read what-ifs)


@attrs.frozen
class Scenario:
    name: str = "scenario"
    seed: int = 1
    duration: float = 600.0
    model: ModelConfig = attrs.Factory(ModelConfig)
    hosts: HostConfig = attrs.Factory(HostConfig)
    targets: TargetConfig = attrs.Factory(TargetConfig)
    rtt: float = 20e-6  # seconds, host <-> target round trip
    ec_data: int = 1
    ec_parity: int = 0
    eviction: str = "lru"
    chunk_tokens: int = CHUNK_TOKENS
    workload: SessionWorkload = attrs.Factory(SessionWorkload)
    trace: Path | None = None

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_tokens * self.model.bytes_per_token

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        path = Path(path)
        scenario = cls.from_dict(json.loads(path.read_text()))
        if scenario.trace is not None and not scenario.trace.is_absolute():
            scenario = attrs.evolve(scenario, trace=path.parent / scenario.trace)
        return scenario

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Scenario:
        raw = dict(raw)
        known = {"description"}
        m = raw.pop("model", {})
        h = raw.pop("hosts", {})
        t = raw.pop("targets", {})
        net = raw.pop("network", {})
        ec = raw.pop("ec", {})
        w = raw.pop("workload", {})
        duration = float(raw.pop("duration", 600.0))
        chunk_tokens = int(raw.pop("chunk_tokens", CHUNK_TOKENS))
        model = ModelConfig(
            name=m.pop("name", "llama-3-70b"),
            dtype=Dtype(m.pop("dtype", "fp16")),
            gpu=m.pop("gpu", "H100"),
            tensor_parallel=int(m.pop("tensor_parallel", 8)),
            kv_bytes_per_token=m.pop("kv_bytes_per_token", None),
            prefill_seconds_per_token=m.pop("prefill_seconds_per_token", None),
        )
        hosts = HostConfig(
            count=int(h.pop("count", 4)),
            replicas=int(h.pop("replicas", 1)),
            local_cache=size(h.pop("local_cache", 0)),
            nic=_gbps(float(h.pop("nic_gbps", 400))),
            pcie=float(h.pop("pcie_gbytes_per_s", 50)) * 1e9,
        )
        targets = TargetConfig(
            count=int(t.pop("count", 2)),
            dram=size(t.pop("dram", "64GiB")),
            flash=size(t.pop("flash", "8TiB")),
            dram_bandwidth=float(t.pop("dram_gbytes_per_s", 100)) * 1e9,
            flash_read_bandwidth=float(t.pop("flash_read_gbytes_per_s", 12)) * 1e9,
            flash_write_bandwidth=float(t.pop("flash_write_gbytes_per_s", 6)) * 1e9,
            flash_latency=float(t.pop("flash_latency_us", 80)) * 1e-6,
            nic=_gbps(float(t.pop("nic_gbps", 400))),
            failed=tuple(int(i) for i in t.pop("failed", ())),
        )
        rtt = float(net.pop("rtt_us", 20)) * 1e-6
        workload = SessionWorkload(duration=duration, chunk_tokens=chunk_tokens, **w)
        scenario = cls(
            name=str(raw.pop("name", "scenario")),
            seed=int(raw.pop("seed", 1)),
            duration=duration,
            model=model,
            hosts=hosts,
            targets=targets,
            rtt=rtt,
            ec_data=int(ec.pop("data", 1)),
            ec_parity=int(ec.pop("parity", 0)),
            eviction=str(raw.pop("eviction", "lru")),
            chunk_tokens=chunk_tokens,
            workload=workload,
            trace=Path(raw.pop("trace")) if "trace" in raw else None,
        )
        for section, rest in (("", raw), ("model", m), ("hosts", h), ("targets", t)):
            extra = set(rest) - known
            if extra:
                raise ValueError(f"unknown scenario field(s) {sorted(extra)} in {section or 'top'}")
        for section, rest in (("network", net), ("ec", ec)):
            if rest:
                raise ValueError(f"unknown scenario field(s) {sorted(rest)} in {section}")
        if scenario.ec_data < 1 or scenario.ec_parity < 0:
            raise ValueError("ec needs data >= 1 and parity >= 0")
        if scenario.ec_data + scenario.ec_parity > targets.count:
            raise ValueError("ec data + parity needs at least that many targets")
        if scenario.eviction not in ("lru", "fifo"):
            raise ValueError(f"eviction must be lru or fifo, not {scenario.eviction!r}")
        return scenario
