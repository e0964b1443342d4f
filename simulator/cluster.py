"""Fleet-scale what-ifs: N GPU hosts and M KV targets, in analytic mode (no per-PDU events).

Each request, at its arrival time on its session's host (sessions stick to a host):

1. *Lookup*, LMCache style: walk the prompt's chunk keys in prefix order, and stop at the first
   chunk that no tier holds. Tiers: the host's own DRAM cache, then the targets (their DRAM in
   front of their flash). A lookup that goes past the host costs one round trip.
2. *Fetch* every hit chunk. A chunk lives as ``ec_data + ec_parity`` fragments of
   ``chunk_bytes / ec_data`` on one placement group of that many targets (groups are fixed sets of
   consecutive targets, so every target of a group holds the same chunks and one LRU per group is
   exact); a read takes ``ec_data`` fragments (the data ones when present: otherwise a degraded
   read). Every fragment reserves, in turn, the target's media (DRAM or flash: FIFO at its
   bandwidth, plus flash latency), then the target NIC's transmit side and the host NIC's receive
   side (each a FIFO at its own bandwidth, passed at once: cut-through) and arrives half a round
   trip after the slower is through. Those are the rules the protocol mode's links follow
   (``simulator.fabric``), so the two modes agree (``tests/sim``).
3. *Prefill* the rest on the host's least busy model replica: ``tokens x GPU-seconds per token /
   tensor_parallel``, after the fetch and after the replica's previous prefill. The same request
   also runs on a twin fleet with no tier, which recomputes every prompt in full: that gives TTFT
   and GPU-seconds *without* the tier from the same arrivals.
4. *Store* the chunks it had to compute once its prefill ends (an event on the ``(time, seq)``
   heap): into the host cache and on the targets (both DRAM and flash, inclusive), reserving the
   NICs and flash write bandwidth. Flash hits are promoted to target DRAM.

Simplifications: prefill only (decode does not occupy the simulated GPUs); no batching of prefills
across requests; a hit is always fetched (``fetches_slower_than_recompute`` counts where recomputing
would have been quicker); the lookup's round trip is paid whenever a prompt has a full chunk the
host does not hold.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable, Iterator

from simulator.clock import EventQueue
from simulator.report import Metrics, Report
from simulator.scenario import Scenario
from simulator.workload import Request, replay

Progress = Callable[[float], None]


class Tier(enum.IntEnum):
    HOST = 0
    TARGET_DRAM = 1
    TARGET_FLASH = 2
    MISS = 3


class Lru:
    """A byte-bounded cache of keys; ``refresh_on_get`` False makes it FIFO."""

    def __init__(self, capacity: int, *, refresh_on_get: bool = True) -> None:
        self.capacity = capacity
        self.used = 0
        self.refresh_on_get = refresh_on_get
        self.entries: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.evictions = 0

    def __contains__(self, key: int) -> bool:
        return key in self.entries

    def get(self, key: int) -> bool:
        if key not in self.entries:
            return False
        if self.refresh_on_get:
            self.entries.move_to_end(key)
        return True

    def put(self, key: int, size: int) -> None:
        if size > self.capacity:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.used -= old
        while self.used + size > self.capacity:
            _, evicted = self.entries.popitem(last=False)
            self.used -= evicted
            self.evictions += 1
        self.entries[key] = size
        self.used += size


class Port:
    """A FIFO resource with a bandwidth: a NIC side, a flash device, DRAM."""

    __slots__ = ("bandwidth", "free_at")

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth
        self.free_at = 0.0


def transfer(now: float, size: int, tx: Port, rx: Port) -> float:
    """Send ``size`` bytes from ``tx`` to ``rx``; when the last byte has left.

    Each side is its own FIFO (cut-through: the bytes pass both at once, so neither waits for
    the other to be free, and neither is held idle); the transfer ends when the slower side is done.
    """
    tx_end = max(now, tx.free_at) + size / tx.bandwidth
    tx.free_at = tx_end
    if rx is tx:
        return tx_end
    rx_end = max(now, rx.free_at) + size / rx.bandwidth
    rx.free_at = rx_end
    return max(tx_end, rx_end)


class GpuPool:
    """The model replicas of one host; a prefill runs on the one free first."""

    def __init__(self, replicas: int) -> None:
        self.free_at = [0.0] * replicas

    def run(self, ready: float, seconds: float) -> float:
        """Start at ``ready`` or when a replica frees up; the time the prefill ends."""
        i = min(range(len(self.free_at)), key=self.free_at.__getitem__)
        end = max(ready, self.free_at[i]) + seconds
        self.free_at[i] = end
        return end


class _Host:
    def __init__(self, scenario: Scenario) -> None:
        h = scenario.hosts
        self.cache = Lru(h.local_cache, refresh_on_get=scenario.eviction == "lru")
        self.tx = Port(h.nic)
        self.rx = Port(h.nic)
        self.pcie = Port(h.pcie)
        self.gpus = GpuPool(h.replicas)
        self.gpus_base = GpuPool(h.replicas)


class _Target:
    def __init__(self, scenario: Scenario) -> None:
        t = scenario.targets
        self.tx = Port(t.nic)
        self.rx = Port(t.nic)
        self.dram = Port(t.dram_bandwidth)
        self.flash_read = Port(t.flash_read_bandwidth)
        self.flash_write = Port(t.flash_write_bandwidth)


class _Group:
    """A placement group: ``width`` targets holding the same chunks' fragments."""

    def __init__(self, scenario: Scenario, members: list[_Target]) -> None:
        lru = scenario.eviction == "lru"
        self.members = members
        self.dram = Lru(scenario.targets.dram, refresh_on_get=lru)
        self.flash = Lru(scenario.targets.flash, refresh_on_get=lru)
        self.lost: set[int] = set()  # member indexes whose fragments are gone (failure what-ifs)


def requests_of(scenario: Scenario) -> Iterator[Request]:
    if scenario.trace is not None:
        return replay(scenario.trace, chunk_tokens=scenario.chunk_tokens)
    return scenario.workload.requests(scenario.seed)


class AnalyticCluster:
    """The fleet's state; ``run()`` plays the scenario's requests through it."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        s = scenario
        self.hosts = [_Host(s) for _ in range(s.hosts.count)]
        self.targets = [_Target(s) for _ in range(s.targets.count)]
        width = s.ec_data + s.ec_parity
        self.groups = [
            _Group(s, self.targets[g * width : (g + 1) * width])
            for g in range(s.targets.count // width)
        ]
        for index in s.targets.failed:
            if index // width < len(self.groups):
                self.groups[index // width].lost.add(index % width)
        self.readable = [len(g.members) - len(g.lost) >= s.ec_data for g in self.groups]
        self.metrics = Metrics()
        self.events: EventQueue[tuple[_Host, tuple[int, ...]]] = EventQueue()
        self.fragment = -(-s.chunk_bytes // s.ec_data)
        self.spt = s.model.gpu_seconds_per_token
        self.tp = s.model.tensor_parallel

    def run(self, progress: Progress | None = None) -> Report:
        s = self.scenario
        step = max(s.duration / 200, 1e-9)
        next_tick = step
        for request in requests_of(s):
            while (due := self.events.peek_time()) is not None and due <= request.time:
                _, (host, keys) = self.events.pop()
                self._store(due, host, keys)
            if progress is not None and request.time >= next_tick:
                progress(min(request.time / s.duration, 1.0))
                next_tick = request.time + step
            self.serve(request)
        while len(self.events):
            time, (host, keys) = self.events.pop()
            self._store(time, host, keys)
        if progress is not None:
            progress(1.0)
        self.metrics.evictions = sum(h.cache.evictions for h in self.hosts) + sum(
            g.dram.evictions + g.flash.evictions for g in self.groups
        )
        return Report.from_metrics(
            self.metrics, scenario=s.name, mode="analytic", seed=s.seed, duration=s.duration,
            hosts=s.hosts.count, targets=s.targets.count,
        )  # fmt: skip

    def serve(self, request: Request) -> None:
        s = self.scenario
        now = request.time
        host = self.hosts[request.session % len(self.hosts)]
        ct = s.chunk_tokens
        tiers: list[Tier] = []
        for key in request.chunk_keys:
            if host.cache.get(key):
                tiers.append(Tier.HOST)
                continue
            g = key % len(self.groups)
            group = self.groups[g]
            if not self.readable[g]:
                break
            if group.dram.get(key):
                tiers.append(Tier.TARGET_DRAM)
            elif group.flash.get(key):
                tiers.append(Tier.TARGET_FLASH)
            else:
                break
        hits = len(tiers)
        remote = any(t is not Tier.HOST for t in tiers)
        lookup = s.rtt if hits < len(request.chunk_keys) or remote else 0.0
        start = now + lookup
        done = start
        for key, tier in zip(request.chunk_keys, tiers, strict=False):
            if tier is Tier.HOST:
                done = max(done, transfer(start, s.chunk_bytes, host.pcie, host.pcie))
            else:
                done = max(done, self._fetch(start, host, key, tier))
        counts = [0, 0, 0, 0]
        for tier in tiers:
            counts[tier] += ct
        hit_tokens = hits * ct
        miss_tokens = request.prompt_tokens - hit_tokens
        counts[Tier.MISS] = miss_tokens
        end = host.gpus.run(done, miss_tokens * self.spt / self.tp)
        end_base = host.gpus_base.run(now, request.prompt_tokens * self.spt / self.tp)
        self.metrics.record(
            tokens=counts,
            fetch=done - now if hits else None,
            recompute_hit=hit_tokens * self.spt / self.tp,
            ttft=end - now,
            ttft_base=end_base - now,
            gpu_seconds=miss_tokens * self.spt,
            gpu_seconds_base=request.prompt_tokens * self.spt,
        )
        self.metrics.bytes_read += hits * s.chunk_bytes
        if hits < len(request.chunk_keys):
            self.events.schedule(end, (host, request.chunk_keys[hits:]))

    def _fetch(self, start: float, host: _Host, key: int, tier: Tier) -> float:
        s = self.scenario
        group = self.groups[key % len(self.groups)]
        if group.lost:
            members = [m for i, m in enumerate(group.members) if i not in group.lost]
            self.metrics.degraded_reads += any(i < s.ec_data for i in group.lost)
        else:
            members = group.members
        half_rtt = s.rtt / 2
        arrive = start + half_rtt  # the read command reaches the targets
        size = self.fragment
        flash = tier is Tier.TARGET_FLASH
        latency = s.targets.flash_latency if flash else 0.0
        rx = host.rx
        done = 0.0
        for target in members[: s.ec_data]:
            media = target.flash_read if flash else target.dram
            ready = max(arrive, media.free_at) + size / media.bandwidth
            media.free_at = ready
            ready += latency
            tx = target.tx
            tx_end = max(ready, tx.free_at) + size / tx.bandwidth
            tx.free_at = tx_end
            rx_end = max(ready, rx.free_at) + size / rx.bandwidth
            rx.free_at = rx_end
            end = tx_end if tx_end > rx_end else rx_end
            if end > done:
                done = end
        if flash:
            group.dram.put(key, self.fragment)
        return done + half_rtt

    def _store(self, now: float, host: _Host, keys: tuple[int, ...]) -> None:
        s = self.scenario
        size = self.fragment
        for key in keys:
            host.cache.put(key, s.chunk_bytes)
            group = self.groups[key % len(self.groups)]
            for target in group.members:
                sent = transfer(now, size, host.tx, target.rx)
                flash = target.flash_write
                flash.free_at = max(sent, flash.free_at) + size / flash.bandwidth
            group.dram.put(key, size)
            group.flash.put(key, size)
            self.metrics.bytes_written += size * len(group.members)


def run_analytic(scenario: Scenario, progress: Progress | None = None) -> Report:
    return AnalyticCluster(scenario).run(progress)
