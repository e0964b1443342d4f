"""``gpucache target --workers N``: one KV target served by N worker processes.

The supervisor (``nvmeof.target.workers.WorkerSupervisor``) owns the listeners and places each
connection on a worker; each worker serves the command line's subsystem with its KV namespace
sharded by key (``kvext.sharding``), a 1/N share of ``--capacity``, on:

- the connections the supervisor hands over (any initiator, through the public port);
- its own TCP port (same host, a port the system picks; the KV Identify page's shard map lists
  them), for initiators that route keys themselves (``RoutedKVClient``);
- a private Unix socket, where the other workers forward the commands for its keys.

See docs/workers.md for the design and its limits.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable

import anyio
import anyio.abc

from kvext.namespace import KeyValueNamespace
from kvext.sharding import PeerLinks, ShardedNamespace, ShardMap
from nvmeof.eventloop import run_options
from nvmeof.initiator.controller import parse_address
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import Subsystem, Target, TargetLimits
from nvmeof.target.workers import WorkerContext, WorkerExited, WorkerLink, WorkerSupervisor
from nvmeof.transport.sockets import TcpListener
from nvmeof.transport.unix import UnixListener
from nvmeof.units import parse_size

log = logging.getLogger("gpucache.workers")

BuildTarget = Callable[[argparse.Namespace], Target]

_UNSUPPORTED = {
    "json": "--json",
    "malloc": "--malloc",
    "aio": "--aio",
    "flash": "--flash",
    "wait_for_rpc": "--wait-for-rpc",
}


def run_sharded_target(args: argparse.Namespace, build_target: BuildTarget, address: str) -> int:
    """Run the supervisor and ``args.workers`` workers until a signal (0) or a worker dies (1).
    ``address``: where to listen when the command line gives no ``--listen``."""
    for attr, flag in _UNSUPPORTED.items():
        if getattr(args, attr, None):
            log.error("cannot start the target: %s is not supported with --workers > 1", flag)
            return 1
    count = int(args.workers)
    listen = [parse_address(a) for a in args.listen or [address]]
    runtime_dir = tempfile.mkdtemp(prefix="gpucache-workers-")
    ns_uuid = uuid.uuid4()  # one namespace, one NGUID, whichever worker answers
    worker_main = functools.partial(_worker_process, args, build_target, listen[0][0], ns_uuid)
    supervisor = WorkerSupervisor(
        count,
        worker_main,
        runtime_dir,
        maxh2cdata=TargetLimits().maxh2cdata,
        allow_digests=not args.no_digests,
    )
    try:
        supervisor.start()
        anyio.run(_supervise, supervisor, args, listen, **run_options(args.backend))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # sorted out just below
        first = _first_leaf(exc)
        if isinstance(first, WorkerExited):
            log.error("%s: the target stops (workers are not restarted)", first)
            return 1
        if isinstance(first, OSError):
            log.error("cannot start the target: %s", first)
            return 1
        raise
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
    return 0


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _supervise(
    supervisor: WorkerSupervisor, args: argparse.Namespace, listen: list[tuple[str, int]]
) -> None:
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg.cancel_scope)
            table = await supervisor.wait_ready()
            tg.start_soon(supervisor.watch)
            listeners = [TcpListener(host, port) for host, port in listen]
            for listener in listeners:
                await tg.start(supervisor.serve_listener, listener)
            log.info(
                "serving %s with %d workers (own ports %s), %s of capacity each",
                args.nqn,
                supervisor.count,
                [w["port"] for w in table],
                parse_size(args.capacity) // supervisor.count,
            )
            if args.ready_file:
                text = " ".join(f"{lst.host}:{lst.port}" for lst in listeners)
                await anyio.Path(args.ready_file).write_text(text + "\n")
    finally:
        with anyio.CancelScope(shield=True):
            await supervisor.stop()


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: stopping the workers", signal.Signals(signum).name)
            scope.cancel()
            return


# --- a worker ----------------------------------------------------------------------------------
def _worker_process(
    args: argparse.Namespace,
    build_target: BuildTarget,
    host: str,
    ns_uuid: uuid.UUID,
    ctx: WorkerContext,
) -> None:
    share = copy.copy(args)
    share.capacity = str(max(1, parse_size(args.capacity) // ctx.count))
    target = build_target(share)
    target.restrict_cntlids(ctx.index, ctx.count)
    try:
        anyio.run(
            serve_worker, ctx, target, args.nqn, host, ns_uuid, not args.no_digests,
            **run_options(args.backend),
        )  # fmt: skip
    finally:
        for subsystem in target.subsystems.values():
            for namespace in subsystem.namespaces.values():
                engine = getattr(namespace, "engine", None)
                if engine is not None:
                    engine.close()


async def serve_worker(
    ctx: WorkerContext,
    target: Target,
    nqn: str,
    host: str,
    ns_uuid: uuid.UUID,
    allow_digests: bool = True,
) -> None:
    """Serve worker ``ctx.index``'s share of ``target``'s KV namespace until the supervisor goes."""
    subsystem = target.subsystems[nqn]
    nsid, plain = next(
        (n, ns) for n, ns in subsystem.namespaces.items() if isinstance(ns, KeyValueNamespace)
    )
    engine = plain.engine
    # The private face: the same engine, never forwarding; only the other workers reach it.
    private = Target(target.limits)
    private_ns = KeyValueNamespace(engine, name=f"{plain.name}-w{ctx.index}", ns_uuid=ns_uuid)
    private_ns.error_on_delete_of_missing_key = True  # the forwarder needs to know
    private_subsystem = Subsystem(nqn=nqn)
    private_subsystem.add_namespace(private_ns, nsid)
    private.add_subsystem(private_subsystem)
    # The public face: this worker's keys here, the others' forwarded.
    peers = PeerLinks(ctx.index, ctx.count, nsid=nsid)
    unknown = ShardMap(ctx.count, ctx.index, (0,) * ctx.count)
    sharded = ShardedNamespace(engine, unknown, peers, name=plain.name, ns_uuid=ns_uuid)
    sharded.nsid = nsid
    subsystem.namespaces[nsid] = sharded  # no controller exists yet: nothing to notify

    path = os.path.join(ctx.runtime_dir, f"worker-{ctx.index}.sock")
    unix = UnixListener(path)
    direct = TcpListener(host, 0)
    public = TargetServer(target, allow_digests=allow_digests)
    link = WorkerLink(ctx.control)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve_unix, unix, TargetServer(private))
        await tg.start(public.serve_listener, direct)
        table = await link.exchange({"port": direct.port, "unix": path, "pid": os.getpid()})
        sharded.shard_map = ShardMap(ctx.count, ctx.index, tuple(w["port"] for w in table))
        async with peers.connected([w["unix"] for w in table], nqn):
            log.info("worker %d serving (own port %d)", ctx.index, direct.port)
            await link.serve_handoffs(public, None)
        tg.cancel_scope.cancel()


async def _serve_unix(listener: UnixListener, server: TargetServer) -> None:
    try:
        async with anyio.create_task_group() as tg:
            while True:
                sock = await listener.accept()
                tg.start_soon(server.handle_connection, sock)
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()


__all__ = ["run_sharded_target", "serve_worker"]
