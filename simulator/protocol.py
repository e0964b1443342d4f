"""The real NVMe/TCP target and initiator on simulated nodes, and protocol mode's cluster run."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.abc

from kvext.client import KVClient
from nvmeof.initiator.controller import Controller
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import Target
from nvmeof.testing import make_kv_target
from simulator.clock import run_virtual
from simulator.cluster import GpuPool, Lru, Port, Progress, requests_of, transfer
from simulator.fabric import Fabric, LinkSpec
from simulator.report import Metrics, Report
from simulator.scenario import Scenario
from simulator.stream import Signal, SimNetwork, serve_streams
from simulator.workload import Request, key_bytes

NVME_PORT = 4420
SIM_NQN = "nqn.2024-01.io.gpucache:sim"


async def serve_target_node(
    network: SimNetwork,
    node: str,
    make_target: Callable[[], Target],
    *,
    port: int = NVME_PORT,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a ``TargetServer`` on ``node:port`` over simulated TCP, until cancelled.

    Each connection goes to the real ``TargetServer.handle_connection``. When the node crashes its
    listener and connections go; after ``restart()`` a fresh target from ``make_target()`` serves
    (a DRAM target comes back empty, as a real one would).
    """
    fabric_node = network.fabric.node(node)
    changed = Signal()
    fabric_node.watch(changed.fire)
    started = False
    while True:
        while not fabric_node.up:
            await changed.wait()
        server = TargetServer(make_target())
        if started:
            await serve_streams(network, node, port, server.handle_connection)
        else:
            async with anyio.create_task_group() as tg:
                await tg.start(serve_streams, network, node, port, server.handle_connection)
                started = True
                task_status.started()


# --- protocol mode: the cluster what-if with the real stacks --------------------------------
class ProtocolCluster:
    """The scenario over simulated TCP: real ``TargetServer``s and ``KVClient``s, virtual time.

    Hosts are nodes ``h0..``, targets ``t0..`` (a DRAM ``MemoryEngine`` of the scenario's target
    DRAM size; there is no flash tier here). Every request runs the same steps as the analytic
    mode (``simulator.cluster``), but the lookup is a real Exist per chunk, the fetch a real
    Retrieve per chunk into a buffer, and the store a real Store, each over NVMe/TCP through the
    fabric's links and NICs. Prefill is a sleep in virtual time on the same ``GpuPool`` arithmetic.
    Erasure coding is not here yet (``ec`` must be 1 + 0); small clusters only.
    """

    def __init__(self, scenario: Scenario) -> None:
        s = scenario
        if s.ec_data != 1 or s.ec_parity != 0 or s.targets.failed:
            raise ValueError("protocol mode runs without erasure coding (ec data 1, parity 0)")
        if s.chunk_bytes > 16 << 20:
            raise ValueError(
                f"protocol mode moves every byte: chunks of {s.chunk_bytes} bytes are too big"
                " (give model.kv_bytes_per_token or fewer chunk_tokens for a small run)"
            )
        self.scenario = s
        self.fabric = Fabric(s.seed, LinkSpec(latency=s.rtt / 2, window=64 << 20))
        self.network = SimNetwork(self.fabric)
        self.metrics = Metrics()
        self.spt = s.model.gpu_seconds_per_token
        self.tp = s.model.tensor_parallel
        lru = s.eviction == "lru"
        self.caches = [Lru(s.hosts.local_cache, refresh_on_get=lru) for _ in range(s.hosts.count)]
        self.pcie = [Port(s.hosts.pcie) for _ in range(s.hosts.count)]
        self.gpus = [GpuPool(s.hosts.replicas) for _ in range(s.hosts.count)]
        self.gpus_base = [GpuPool(s.hosts.replicas) for _ in range(s.hosts.count)]
        self.clients: list[list[KVClient]] = []
        self.payload = memoryview(bytes(s.chunk_bytes))
        for i in range(s.hosts.count):
            self.fabric.node(f"h{i}").nic = s.hosts.nic
        for j in range(s.targets.count):
            self.fabric.node(f"t{j}").nic = s.targets.nic

    def _make_target(self) -> Target:
        s = self.scenario
        return make_kv_target(
            nqn=SIM_NQN,
            capacity=s.targets.dram,
            max_value_length=s.chunk_bytes + 4096,
            eviction=s.eviction,
        )

    async def run(self, progress: Progress | None = None) -> Report:
        s = self.scenario
        async with anyio.create_task_group() as servers:
            for j in range(s.targets.count):
                await servers.start(serve_target_node, self.network, f"t{j}", self._make_target)
            await self._connect()
            offset = anyio.current_time()  # connecting took virtual time: the workload starts now
            async with anyio.create_task_group() as tg:
                step = max(s.duration / 200, 1e-9)
                next_tick = step
                for request in requests_of(s):
                    await anyio.sleep_until(offset + request.time)
                    if progress is not None and request.time >= next_tick:
                        progress(min(request.time / s.duration, 1.0))
                        next_tick = request.time + step
                    tg.start_soon(self._serve, request)
            for clients in self.clients:
                for kv in clients:
                    await kv.controller.close()
            servers.cancel_scope.cancel()
        if progress is not None:
            progress(1.0)
        return Report.from_metrics(
            self.metrics, scenario=s.name, mode="protocol", seed=s.seed, duration=s.duration,
            hosts=s.hosts.count, targets=s.targets.count,
        )  # fmt: skip

    async def _connect(self) -> None:
        s = self.scenario
        for i in range(s.hosts.count):
            row = []
            for j in range(s.targets.count):
                ctrl = await Controller.connect(
                    (f"t{j}", NVME_PORT),
                    SIM_NQN,
                    hostnqn=f"nqn.2024-01.io.gpucache:sim-host-{i}",
                    hostid=i.to_bytes(16, "big"),
                    queue_depth=128,
                    kato_ms=0,
                    connector=self.network.connector(f"h{i}"),
                )
                row.append(KVClient(ctrl, timeout=None))
            self.clients.append(row)

    async def _serve(self, request: Request) -> None:
        s = self.scenario
        now = anyio.current_time()
        h = request.session % s.hosts.count
        cache = self.caches[h]
        clients = self.clients[h]
        keys = request.chunk_keys
        ct = s.chunk_tokens
        end_base = self.gpus_base[h].run(now, request.prompt_tokens * self.spt / self.tp)
        local = [cache.get(k) for k in keys]
        present = dict.fromkeys(range(len(keys)), True)
        remote = [i for i, hit in enumerate(local) if not hit]
        if remote:

            async def exists(i: int) -> None:
                kv = clients[keys[i] % len(clients)]
                present[i] = await kv.exists(key_bytes(keys[i]))

            async with anyio.create_task_group() as tg:
                for i in remote:
                    tg.start_soon(exists, i)
        hits = 0
        while hits < len(keys) and present[hits]:
            hits += 1
        start = anyio.current_time()
        done = start

        async def fetch(i: int) -> None:
            kv = clients[keys[i] % len(clients)]
            await kv.get(key_bytes(keys[i]), out=bytearray(s.chunk_bytes))

        async with anyio.create_task_group() as tg:
            for i in range(hits):
                if local[i]:
                    done = max(done, transfer(start, s.chunk_bytes, self.pcie[h], self.pcie[h]))
                else:
                    tg.start_soon(fetch, i)
        done = max(done, anyio.current_time())
        await anyio.sleep_until(done)
        hit_tokens = hits * ct
        miss_tokens = request.prompt_tokens - hit_tokens
        remote_hits = sum(1 for i in range(hits) if not local[i])
        counts = [hit_tokens - remote_hits * ct, remote_hits * ct, 0, miss_tokens]
        end = self.gpus[h].run(done, miss_tokens * self.spt / self.tp)
        await anyio.sleep_until(end)
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

        async def store(key: int) -> None:
            cache.put(key, s.chunk_bytes)
            await clients[key % len(clients)].put(key_bytes(key), self.payload)
            self.metrics.bytes_written += s.chunk_bytes

        async with anyio.create_task_group() as tg:
            for key in keys[hits:]:
                tg.start_soon(store, key)


def run_protocol(scenario: Scenario, progress: Progress | None = None) -> Report:
    """Run ``scenario`` in protocol mode, in virtual time, deterministically for its seed."""
    return run_virtual(ProtocolCluster(scenario).run, progress, seed=scenario.seed)
