"""One target, several worker processes: a supervisor that places connections, workers that serve.

The supervisor owns the listening sockets. For each connection it answers the ICReq itself (the
sans-IO ``ControllerConnection``), then *peeks* (``MSG_PEEK``) at the first command capsule, which
must be a Connect, and picks the worker from it:

- an admin queue (QID 0) goes to the next worker, round robin;
- an I/O queue goes to the worker that holds its controller: each worker allocates controller IDs
  in its own residue class (``cntlid % workers == index``, ``Target.restrict_cntlids``), so the
  CNTLID in the Connect data names the worker.

It hands the socket over with ``SCM_RIGHTS`` on a ``SOCK_SEQPACKET`` pair, with the negotiated
parameters; nothing of the Connect was consumed, so the worker's channel starts READY
(``ControllerConnection.resumed``) and reads the Connect itself. Every queue of a controller so
lives in one worker, which keeps controller-wide state (keep alive, CC.SHN, AENs) process-local.

Control messages (JSON, one per datagram): the worker says ``{"info": {...}}`` once it serves
(whatever its caller wants the others to know: its ports, its socket path); when every worker
has, the supervisor sends each ``{"workers": [info, ...]}``; then ``{"params": {...}}`` + an fd for
every connection handed over. A worker whose control socket reaches EOF (the supervisor is gone)
stops; a worker that exits makes the supervisor stop every worker and raise ``WorkerExited``:
the target exits loudly rather than limp on without a worker's share of the keys and controllers.

Workers are forked before any event loop runs (``WorkerSupervisor.start``), so the fork copies
no loop, thread or listening socket.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs

from nvmeof.errors import ConnectionLost, PduError
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import ListenAddress
from nvmeof.tcp.connection import ControllerConnection
from nvmeof.tcp.events import ConnectionClosed, ConnectionParams, ICReqReceived
from nvmeof.tcp.pdu import COMMON_HEADER_SIZE, DIGEST_SIZE, IC_PDU_SIZE, SQE_SIZE, PduType
from nvmeof.transport.sockets import AsyncSocket, TcpListener

log = logging.getLogger("nvmeof.target.workers")

HANDSHAKE_TIMEOUT = 10.0  # ICReq and the Connect capsule must arrive within this
_FABRICS_OPCODE = 0x7F
_CONNECT_FCTYPE = 0x01
_CNTLID_IN_DATA = 16  # Connect data: HOSTID (16 bytes), then CNTLID (u16)
_MAX_MESSAGE = 65536


class WorkerExited(RuntimeError):
    """A worker process ended while the target was serving."""


@attrs.frozen
class WorkerContext:
    """What a worker process is given: its index, the count, and its end of the control pair."""

    index: int
    count: int
    control: socket.socket
    runtime_dir: str  # a private (0700) directory for the workers' own sockets


def _params_json(params: ConnectionParams) -> dict[str, Any]:
    return attrs.asdict(params)


def _params_from_json(data: dict[str, Any]) -> ConnectionParams:
    return ConnectionParams(**data)


# --- the worker's side --------------------------------------------------------------------------
class WorkerLink:
    """A worker's end of its control pair: say hello, learn the others, take connections."""

    def __init__(self, control: socket.socket) -> None:
        control.setblocking(False)
        self._sock = control

    async def _send(self, message: dict[str, Any]) -> None:
        await _send_message(self._sock, message)

    async def _receive(self) -> tuple[dict[str, Any] | None, list[int]]:
        return await _receive_message(self._sock)

    async def exchange(self, info: dict[str, Any]) -> list[dict[str, Any]]:
        """Announce ``info``; give every worker's info, in index order, once all have said."""
        await self._send({"info": info})
        message, fds = await self._receive()
        _close_fds(fds)
        if message is None or "workers" not in message:
            raise ConnectionLost("the supervisor went away before the workers were all up")
        workers: list[dict[str, Any]] = message["workers"]
        return workers

    async def serve_handoffs(self, server: TargetServer, address: ListenAddress | None) -> None:
        """Serve every connection the supervisor hands over, until it goes away."""
        async with anyio.create_task_group() as tg:
            while True:
                message, fds = await self._receive()
                if message is None:
                    tg.cancel_scope.cancel()
                    return
                if len(fds) != 1 or "params" not in message:
                    _close_fds(fds)
                    log.error("malformed hand-over from the supervisor: %r", message)
                    continue
                sock = socket.socket(fileno=fds[0])
                params = _params_from_json(message["params"])
                tg.start_soon(self._serve_one, server, AsyncSocket(sock), address, params)

    @staticmethod
    async def _serve_one(
        server: TargetServer,
        sock: AsyncSocket,
        address: ListenAddress | None,
        params: ConnectionParams,
    ) -> None:
        await server.handle_connection(sock, address, negotiated=params)


# --- the supervisor -----------------------------------------------------------------------------
@attrs.define
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    control: socket.socket
    info: dict[str, Any] = attrs.Factory(dict)
    handed: int = 0


class WorkerSupervisor:
    """Forks ``count`` workers running ``worker_main(context)``, then places connections on them."""

    def __init__(
        self,
        count: int,
        worker_main: Callable[[WorkerContext], None],
        runtime_dir: str,
        *,
        maxh2cdata: int = 1 << 20,
        allow_digests: bool = True,
    ) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        self.count = count
        self.runtime_dir = runtime_dir
        self.maxh2cdata = maxh2cdata
        self.allow_digests = allow_digests
        self._worker_main = worker_main
        self.workers: list[_Worker] = []
        self._next_admin = itertools.cycle(range(count))
        self.connections = 0

    def start(self) -> None:
        """Fork the workers (call before any event loop runs in this process)."""
        context = multiprocessing.get_context("fork")
        for index in range(self.count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            inherited = [w.control.fileno() for w in self.workers] + [ours.fileno()]
            ctx = WorkerContext(index, self.count, theirs, self.runtime_dir)
            process = context.Process(
                target=_run_worker,
                args=(self._worker_main, ctx, inherited),
                name=f"gpucache-worker-{index}",
                daemon=False,
            )
            process.start()
            theirs.close()
            ours.setblocking(False)
            self.workers.append(_Worker(index, process, ours))
        log.info("started %d workers: pids %s", self.count, [w.process.pid for w in self.workers])

    async def wait_ready(self) -> list[dict[str, Any]]:
        """Collect every worker's hello, then tell each the whole table."""
        for worker in self.workers:
            message, fds = await _receive_message(worker.control)
            _close_fds(fds)
            if message is None or "info" not in message:
                raise WorkerExited(f"worker {worker.index} exited while starting")
            worker.info = message["info"]
        table = [w.info for w in self.workers]
        for worker in self.workers:
            await _send_message(worker.control, {"workers": table})
        return table

    async def watch(self) -> None:
        """Return never; raise ``WorkerExited`` when a worker's control socket closes."""
        async with anyio.create_task_group() as tg:
            for worker in self.workers:
                tg.start_soon(self._watch_one, worker)

    async def _watch_one(self, worker: _Worker) -> None:
        while True:
            message, fds = await _receive_message(worker.control)
            _close_fds(fds)
            if message is None:
                await anyio.to_thread.run_sync(worker.process.join, 1.0)
                raise WorkerExited(
                    f"worker {worker.index} (pid {worker.process.pid}) exited"
                    f" (exit code {worker.process.exitcode})"
                )

    async def serve_listener(
        self,
        listener: TcpListener,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        log.info(
            "listening on %s:%d (NVMe/TCP, %d workers)", listener.host, listener.port, self.count
        )
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                while True:
                    sock = await listener.accept()
                    tg.start_soon(self._place, sock)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    async def _place(self, sock: AsyncSocket) -> None:
        self.connections += 1
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                params = await self._answer_icreq(sock)
                if params is None:
                    return
                qid, cntlid = await _peek_connect(sock.sock, params)
            # Admin queues round robin; an I/O queue to its controller's worker.
            index = next(self._next_admin) if qid == 0 or cntlid is None else cntlid % self.count
            worker = self.workers[index]
            await _send_message(
                worker.control, {"params": _params_json(params)}, fds=[sock.sock.fileno()]
            )
            worker.handed += 1
            log.debug("connection from %s (qid %d) to worker %d", sock.peer, qid, index)
        except (TimeoutError, ConnectionLost, PduError, OSError, ValueError) as exc:
            log.info("connection from %s dropped before placement: %s", sock.peer, exc)
        finally:
            self.connections -= 1
            # Our copy only: the worker's descriptor keeps the connection open.
            await sock.aclose()

    async def _answer_icreq(self, sock: AsyncSocket) -> ConnectionParams | None:
        conn = ControllerConnection(maxh2cdata=self.maxh2cdata, allow_digests=self.allow_digests)
        got = 0
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, ICReqReceived):
                    await sock.send_all(conn.data_to_send())
                    return event.params
                if isinstance(event, ConnectionClosed):
                    return None
                # Exactly the ICReq: whatever follows is the worker's to read.
                view = conn.wants()[: max(1, IC_PDU_SIZE - got)]
                n = await sock.recv_into(view)
                got += n
                conn.received(n)
        except PduError:
            with contextlib.suppress(ConnectionLost):
                await sock.send_all(conn.data_to_send())
            raise

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the control sockets (workers stop on EOF); terminate stragglers."""
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.control.close()
        deadline = anyio.current_time() + timeout
        for worker in self.workers:
            remaining = max(0.0, deadline - anyio.current_time())
            await anyio.to_thread.run_sync(worker.process.join, remaining)
            if worker.process.is_alive():
                log.warning("worker %d did not stop; terminating it", worker.index)
                worker.process.terminate()
                await anyio.to_thread.run_sync(worker.process.join, 2.0)
            if worker.process.is_alive():
                worker.process.kill()
            await anyio.to_thread.run_sync(worker.process.join, 2.0)


def _run_worker(
    worker_main: Callable[[WorkerContext], None], ctx: WorkerContext, inherited: Sequence[int]
) -> None:
    # Ctrl-C reaches the whole process group: the supervisor alone decides; workers stop on EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    worker_main(ctx)


async def _peek_connect(sock: socket.socket, params: ConnectionParams) -> tuple[int, int | None]:
    """QID and (for in-capsule Connect data) CNTLID of the Connect capsule, without reading it."""
    hdgst = DIGEST_SIZE if params.header_digest else 0
    head = COMMON_HEADER_SIZE + SQE_SIZE + hdgst
    data = await _peek(sock, head)
    if data[0] != PduType.CAPSULE_CMD:
        raise ValueError(f"first PDU after ICReq is type {data[0]:#x}, not a command capsule")
    pdo = data[3]
    plen = int.from_bytes(data[4:8], "little")
    sqe = data[COMMON_HEADER_SIZE : COMMON_HEADER_SIZE + SQE_SIZE]
    if sqe[0] != _FABRICS_OPCODE or sqe[4] != _CONNECT_FCTYPE:
        raise ValueError("first command is not a Connect")
    qid = int.from_bytes(sqe[42:44], "little")
    if qid == 0 or pdo == 0 or plen < pdo + _CNTLID_IN_DATA + 2:
        return qid, None  # admin queue, or Connect data not in the capsule
    data = await _peek(sock, pdo + _CNTLID_IN_DATA + 2)
    return qid, int.from_bytes(data[pdo + _CNTLID_IN_DATA : pdo + _CNTLID_IN_DATA + 2], "little")


async def _peek(sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            data = sock.recv(size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError as exc:
            raise ConnectionLost(f"peek failed: {exc}") from exc
        if data is not None:
            if not data:
                raise ConnectionLost("peer closed before its Connect")
            if len(data) >= size:
                return data
            await anyio.sleep(0.001)  # part of it is here: readable at once, so do not spin
            continue
        await anyio.wait_readable(sock)


# --- control messages ---------------------------------------------------------------------------
async def _send_message(
    sock: socket.socket, message: dict[str, Any], *, fds: Sequence[int] = ()
) -> None:
    payload = json.dumps(message).encode()
    while True:
        try:
            if fds:
                socket.send_fds(sock, [payload], list(fds))
            else:
                sock.send(payload)
            return
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)
        except OSError as exc:
            raise ConnectionLost(f"control socket: {exc}") from exc


async def _receive_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors it carried; (None, []) at EOF."""
    while True:
        try:
            payload, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 4)
        except (BlockingIOError, InterruptedError):
            try:
                await anyio.wait_readable(sock)
            except (anyio.ClosedResourceError, OSError):
                return None, []
            continue
        except OSError:
            return None, []
        if not payload:
            _close_fds(fds)
            return None, []
        message: dict[str, Any] = json.loads(payload)
        return message, list(fds)


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
