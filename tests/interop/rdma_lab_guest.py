"""Run inside the lab guest (Python 3.11 + pyverbs, rdma_rxe): our NVMe/RDMA target and initiator.

    python3 -m tests.interop.rdma_lab_guest serve ADDR PORT NQN    target: KV ns 1, RAM block ns 2
    python3 -m tests.interop.rdma_lab_guest kv ADDR PORT NQN       our initiator: put/get figures
    python3 -m tests.interop.rdma_lab_guest block ADDR PORT NQN    our initiator: block write/read

Each client mode prints one JSON line (``RESULT {...}``).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time

import anyio


async def serve(addr: str, port: int, nqn: str) -> None:
    from nvmeof.target.bdev.malloc import MallocBdev
    from nvmeof.target.rdma_server import serve_rdma
    from nvmeof.target.server import TargetServer
    from nvmeof.testing import make_kv_target
    from nvmeof.transport.pyverbs_backend import PyverbsListener

    target = make_kv_target(nqn=nqn, capacity=256 << 20, max_value_length=4 << 20)
    target.subsystems[nqn].add_namespace(
        MallocBdev("Malloc0", (64 << 20) >> 9, 512).make_namespace(), 2
    )
    server = TargetServer(target)
    async with anyio.create_task_group() as tg:
        await tg.start(serve_rdma, server, PyverbsListener(addr, port))
        print("READY", flush=True)


async def kv(addr: str, port: int, nqn: str) -> None:
    from kvext.client import KVClient
    from nvmeof.initiator.controller import Controller

    result: dict[str, float] = {}
    async with Controller.connect((addr, port), nqn, transport="rdma", kato_ms=0) as ctrl:
        client = KVClient(ctrl, framing=False)
        # Bit-exact first: distinct values, in-capsule (4 KiB) and keyed (RDMA READ/WRITE) sizes.
        for size in (100, 4096, 65536, 1 << 20, 3 << 20):
            value = os.urandom(size)
            out = bytearray(size)
            await client.put(b"exact%d" % size, value)
            await client.get(b"exact%d" % size, out=out)
            assert out == value, f"{size}-byte value came back different"
        # Then throughput (TCG runs the guest slowly: a few seconds' worth of each).
        for size, count in ((4096, 256), (1 << 20, 16)):
            value = bytearray(os.urandom(size))
            out = bytearray(size)
            start = time.perf_counter()
            for i in range(count):
                await client.put(b"k%d" % (i % 16), value)
            put_s = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(count):
                await client.get(b"k%d" % (i % 16), out=out)
            get_s = time.perf_counter() - start
            assert out == value
            result[f"put_{size}_MBps"] = round(count * size / put_s / 1e6, 2)
            result[f"get_{size}_MBps"] = round(count * size / get_s / 1e6, 2)
    print("RESULT " + json.dumps(result), flush=True)


async def block(addr: str, port: int, nqn: str) -> None:
    from nvmeof.initiator.block import BlockNamespaceClient
    from nvmeof.initiator.controller import Controller

    async with Controller.connect((addr, port), nqn, transport="rdma", kato_ms=0) as ctrl:
        client = BlockNamespaceClient(ctrl)
        await client.identify()
        data = bytes(range(256)) * 512  # 128 KiB
        await client.write(64, data)
        back = await client.read(64, len(data) // 512)
        print(
            "RESULT "
            + json.dumps(
                {"ok": bytes(back) == data, "sgls": ctrl.identify.sgls if ctrl.identify else 0}
            ),
            flush=True,
        )


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: where every thread is
    mode, addr, port, nqn = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    fn = {"serve": serve, "kv": kv, "block": block}[mode]
    anyio.run(fn, addr, port, nqn)


if __name__ == "__main__":
    main()
