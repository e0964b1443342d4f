"""CPU masks as SPDK's ``nvmf_tgt -m`` takes them: ``0x3`` (hex bits) or ``[0,2-3]`` (a list).

A target pinned to its own core keeps the scheduler from waking it on the core of the client that
sent it data (on loopback the kernel's wake-affine logic does, and the two then share one core
while the other idles), and keeps its caches warm.
"""

from __future__ import annotations

import os


def parse_cpumask(text: str) -> set[int]:
    """CPU numbers of ``0x...``/decimal bits or a ``[a,b-c]`` list; ValueError if empty/bad."""
    spec = text.strip()
    cpus: set[int] = set()
    if spec.startswith("[") and spec.endswith("]"):
        for part in spec[1:-1].split(","):
            part = part.strip()
            if not part:
                continue
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
            if first < 0 or last < first:
                raise ValueError(f"bad CPU range {part!r} in {text!r}")
            cpus.update(range(first, last + 1))
    else:
        bits = int(spec, 0)
        if bits < 0:
            raise ValueError(f"bad CPU mask {text!r}")
        cpus = {i for i in range(bits.bit_length()) if bits >> i & 1}
    if not cpus:
        raise ValueError(f"CPU mask {text!r} selects no CPU")
    return cpus


def pin_to(cpus: set[int], pid: int = 0) -> None:
    """Restrict process ``pid`` (0: this one) to ``cpus``; ValueError naming what is missing."""
    available = set(range(os.cpu_count() or 1))  # online; a parent's narrower mask is no limit
    missing = cpus - available
    if missing:
        raise ValueError(f"CPUs {sorted(missing)} are not available here ({sorted(available)})")
    os.sched_setaffinity(pid, cpus)
