"""The ``gpucache`` command: run a target, talk to one, benchmark."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio

from nvmeof.eventloop import run_options
from nvmeof.units import format_size, parse_size

DEFAULT_NQN = "nqn.2024-01.io.gpucache:kv0"
DEFAULT_ADDRESS = "127.0.0.1:4420"

log = logging.getLogger("gpucache")
_T = TypeVar("_T")


def _setup_logging(verbose: bool, *, client: bool) -> None:
    # The target logs its lifecycle; one-shot client commands only warnings, unless --verbose.
    quiet = logging.WARNING if client else logging.INFO
    logging.basicConfig(
        level=logging.DEBUG if verbose else quiet,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


# --- target -----------------------------------------------------------------------------------
DEFAULT_IN_CAPSULE = "8196KiB"


def build_target(args: argparse.Namespace) -> Any:
    from kvext.engine.base import EngineLimits
    from kvext.engine.memory import MemoryEngine
    from kvext.namespace import KeyValueNamespace
    from nvmeof.target.subsystem import Subsystem, Target, TargetLimits, transfer_size_for

    max_value = parse_size(args.max_value_size)
    transfer = transfer_size_for(max_value)
    in_capsule = min(parse_size(args.in_capsule_data_size), transfer)
    target = Target(TargetLimits(max_transfer_size=transfer, in_capsule_data_size=in_capsule))
    subsystem = Subsystem(
        nqn=args.nqn, allow_any_host=not args.allow_host, hosts=set(args.allow_host or ())
    )
    engine: Any
    if getattr(args, "flash", None):
        engine = _flash_engine(args, max_value)
    else:
        engine = MemoryEngine(
            EngineLimits(capacity_bytes=parse_size(args.capacity), max_value_length=max_value),
            policy=args.eviction,
        )
    subsystem.add_namespace(KeyValueNamespace(engine, name="kv0"))
    _add_dhchap_hosts(subsystem, getattr(args, "dhchap_host", None) or ())
    _add_block_namespaces(subsystem, args)
    target.add_subsystem(subsystem)
    return target


def _add_dhchap_hosts(subsystem: Any, specs: Sequence[str]) -> None:
    """``--dhchap-host HOSTNQN=SECRET[,CTRL_SECRET]``: that host must authenticate."""
    from nvmeof.spec.dhchap import DhchapSecret, SecretFormatError
    from nvmeof.target.auth import HostAuthConfig

    for spec in specs:
        hostnqn, sep, secrets = spec.partition("=")
        host_secret, _, ctrl_secret = secrets.partition(",")
        try:
            if not sep or not hostnqn or not host_secret:
                raise SecretFormatError("expected HOSTNQN=SECRET[,CTRL_SECRET]")
            config = HostAuthConfig(
                host_key=DhchapSecret.parse(host_secret),
                ctrl_key=DhchapSecret.parse(ctrl_secret) if ctrl_secret else None,
            )
        except SecretFormatError as exc:
            raise SystemExit(f"--dhchap-host {hostnqn or spec!r}: {exc}") from None
        subsystem.host_auth[hostnqn] = config
        subsystem.hosts.add(hostnqn)


def cmd_gen_dhchap_key(args: argparse.Namespace) -> int:
    from nvmeof.spec.dhchap import DhchapSecret

    print(DhchapSecret.generate(args.key_length, transform=args.hmac))
    return 0


def _add_block_namespaces(subsystem: Any, args: argparse.Namespace) -> None:
    """``--malloc SIZE`` and ``--aio FILE`` namespaces, after the KV one (nsid 1)."""
    from nvmeof.target.bdev.aio import AioBdev
    from nvmeof.target.bdev.malloc import MallocBdev

    block_size = args.block_size
    for i, size in enumerate(args.malloc or ()):
        num_blocks = parse_size(size) // block_size
        if num_blocks < 1:
            raise ValueError(f"--malloc {size} holds no {block_size}-byte block")
        bdev = MallocBdev(f"Malloc{i}", num_blocks, block_size)
        nsid = subsystem.add_namespace(bdev.make_namespace())
        log.info("namespace %d: malloc bdev %s, %s", nsid, bdev.name, format_size(bdev.size))
    for i, filename in enumerate(args.aio or ()):
        aio = AioBdev(f"AIO{i}", filename, block_size)
        nsid = subsystem.add_namespace(aio.make_namespace())
        mode = aio.io_mode.value
        log.info("namespace %d: aio bdev %s on %s (%s)", nsid, aio.name, filename, mode)


async def _to_thread(func: Callable[[], _T]) -> _T:
    return await anyio.to_thread.run_sync(func)


def _flash_engine(args: argparse.Namespace, max_value: int) -> Any:
    """A flash engine on ``--flash``, behind a DRAM tier of ``--dram`` bytes unless that is 0."""
    from kvext.engine.base import EngineLimits
    from kvext.engine.flash import FlashEngine
    from kvext.engine.memory import MemoryEngine
    from kvext.engine.tiered import TieredEngine

    flash = FlashEngine.open(
        args.flash,
        max_value_length=max_value,
        size=parse_size(args.flash_size) if args.flash_size else None,
        format=args.flash_format,
        offload=_to_thread,
    )
    dram = parse_size(args.dram)
    if not dram:
        return flash
    limits = EngineLimits(capacity_bytes=dram, max_value_length=max_value)
    return TieredEngine(MemoryEngine(limits, policy="lru"), flash)


def _close_engines(target: Any) -> None:
    # A flash engine checkpoints its index here, so the next start need not scan the device.
    for subsystem in target.subsystems.values():
        for namespace in subsystem.namespaces.values():
            engine = getattr(namespace, "engine", None)
            if engine is not None:
                engine.close()


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


async def _run_target(args: argparse.Namespace) -> None:
    if args.json is not None:
        await _serve_target(args, None)  # bdevs, and their engines, close with the app
        return
    target = build_target(args)
    try:
        await _serve_target(args, target)
    finally:
        _close_engines(target)


async def _serve_target(args: argparse.Namespace, target: Any) -> None:
    """Serve ``target`` (the default subsystem), or what ``--json`` configures when None; both
    changed live over SPDK's JSON-RPC (``nvmeof.target.app``)."""
    from kvext.rpc import register_kv_methods
    from nvmeof.initiator.controller import parse_address
    from nvmeof.target.app import TargetApp
    from nvmeof.target.config import apply_config, load_config_file
    from nvmeof.target.rpc import DEFAULT_RPC_SOCKET, RpcSocketInUse
    from nvmeof.target.rpc_methods import core_methods
    from nvmeof.target.subsystem import ListenAddress

    config = load_config_file(args.json) if args.json is not None else None
    methods = register_kv_methods(core_methods())
    app = TargetApp(target, methods=methods, allow_digests=not args.no_digests)
    server = app.server
    addresses = [parse_address(a) for a in args.listen or ([] if config else [DEFAULT_ADDRESS])]
    async with app.running():
        tg = app.task_group
        tg.start_soon(_stop_on_signal, tg.cancel_scope)
        for host, port in addresses:
            await app.listen(ListenAddress(traddr=host, trsvcid=str(port)), own=True)
        discovery = _discovery_listener(server, addresses[0][0] if addresses else "127.0.0.1", args)
        if discovery is not None:
            await tg.start(functools.partial(server.serve_listener, discovery, discovery=True))
        try:
            await app.serve_rpc(args.rpc_socket or DEFAULT_RPC_SOCKET)
        except RpcSocketInUse as exc:
            if args.rpc_socket:
                raise
            log.warning("%s; no JSON-RPC server (give -r PATH for one)", exc.strerror)
        if config is not None:
            app.init_steps.append(functools.partial(apply_config, app, config))
        else:
            tcp = {"trtype": "TCP"}
            create = functools.partial(app.call, "nvmf_create_transport", tcp, check_state=False)
            app.init_steps.append(create)
        if args.wait_for_rpc:
            log.info("waiting for framework_start_init over JSON-RPC")
            await app.wait_initialized()
        else:
            await app.start()
        if config is None:
            where = (
                f"flash {args.flash} (DRAM tier {format_size(parse_size(args.dram))})"
                if args.flash
                else f"DRAM, capacity {format_size(parse_size(args.capacity))}, {args.eviction}"
            )
            log.info(
                "serving %s: KV namespace 1 on %s, max value %s",
                args.nqn,
                where,
                format_size(parse_size(args.max_value_size)),
            )
        if args.ready_file:
            addresses_text = " ".join(f"{lst.host}:{lst.port}" for lst in server.listeners)
            await anyio.Path(args.ready_file).write_text(addresses_text + "\n")
        await anyio.sleep_forever()


def _discovery_listener(server: Any, host: str, args: argparse.Namespace) -> Any:
    """The dedicated discovery port: 8009 by default (skipped with a warning when busy), or
    ``--discovery-port`` (which must bind); none with ``--no-discovery``."""
    from nvmeof.target.discovery import DEFAULT_DISCOVERY_PORT

    if args.no_discovery:
        return None
    port = DEFAULT_DISCOVERY_PORT if args.discovery_port is None else args.discovery_port
    try:
        return server.listen(host, port)
    except OSError as exc:
        if args.discovery_port is not None:
            raise
        log.warning("no discovery port %s:%d (%s); discovery stays on the I/O ports", host, port,
                    exc.strerror)  # fmt: skip
        return None


async def _run_discover(args: argparse.Namespace) -> int:
    from nvmeof.initiator.discovery import discover
    from nvmeof.spec.discovery import SubsystemType, TransportType

    def name(enum_type: type[SubsystemType] | type[TransportType], value: int) -> str:
        try:
            return enum_type(value).name.lower().replace("_", " ")
        except ValueError:
            return str(value)

    entries = await discover(
        args.address,
        hostnqn=args.hostnqn,
        header_digest=args.header_digest,
        data_digest=args.data_digest,
        timeout=args.timeout,
    )
    if args.json:
        import json

        records = [
            {
                "trtype": name(TransportType, e.trtype),
                "adrfam": e.adrfam,
                "subtype": name(SubsystemType, e.subtype),
                "treq": e.treq,
                "portid": e.portid,
                "trsvcid": e.trsvcid,
                "subnqn": e.subnqn,
                "traddr": e.traddr,
            }
            for e in entries
        ]
        print(json.dumps({"records": records}, indent=2))
        return 0
    for i, e in enumerate(entries):
        print(f"=====Discovery Log Entry {i}======")
        print(f"trtype:  {name(TransportType, e.trtype)}")
        print(f"subtype: {name(SubsystemType, e.subtype)}")
        print(f"portid:  {e.portid}")
        print(f"trsvcid: {e.trsvcid}")
        print(f"subnqn:  {e.subnqn}")
        print(f"traddr:  {e.traddr}")
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from nvmeof.errors import NvmeofError

    try:
        return int(anyio.run(_run_discover, args, **run_options(args.backend)))
    except (NvmeofError, OSError, TimeoutError) as exc:
        log.error("discover failed: %s", exc)
        return 1


def cmd_target(args: argparse.Namespace) -> int:
    from kvext.engine.flash import FlashOpenError

    if args.cpumask:
        from nvmeof.cpumask import parse_cpumask, pin_to

        try:
            cpus = parse_cpumask(args.cpumask)
            pin_to(cpus)  # worker processes inherit it
        except (ValueError, OSError) as exc:
            log.error("cannot start the target: --cpumask %s: %s", args.cpumask, exc)
            return 1
        log.info("pinned to CPUs %s", sorted(cpus))
    if args.poll_us is not None:
        from nvmeof.transport.sockets import set_default_poll

        if args.poll_us < 0:
            log.error("cannot start the target: --poll-us %s is negative", args.poll_us)
            return 1
        set_default_poll(args.poll_us / 1e6)  # forked workers inherit it
    if args.workers > 1:
        from kvext.sharded_target import run_sharded_target

        return run_sharded_target(args, build_target, DEFAULT_ADDRESS)
    try:
        anyio.run(_run_target, args, **run_options(args.backend))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError, FlashOpenError) as exc:
        log.error("cannot start the target: %s", exc)
        return 1
    return 0


def cmd_check_flash(args: argparse.Namespace) -> int:
    from kvext.engine.check import check

    report = check(args.path, fix=args.fix)
    print(report.summary())
    return 0 if report.ok else 1


# --- client commands --------------------------------------------------------------------------
def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "header_digest": args.header_digest,
        "data_digest": args.data_digest,
        "timeout": args.timeout,
        **({"hostnqn": args.hostnqn} if getattr(args, "hostnqn", None) else {}),
        **({"dhchap_secret": args.dhchap_secret} if getattr(args, "dhchap_secret", None) else {}),
        **(
            {"dhchap_ctrl_secret": args.dhchap_ctrl_secret}
            if getattr(args, "dhchap_ctrl_secret", None)
            else {}
        ),
    }


async def _with_client(args: argparse.Namespace, action: str) -> int:
    from kvext.client import KVClient
    from nvmeof.errors import KeyNotFound

    async with KVClient.connect(args.address, args.nqn, **_client_options(args)) as kv:
        key: bytes | str = args.key.encode() if getattr(args, "key", None) else b""
        if action == "put":
            data = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()
            await kv.put(key, data)
            print(f"stored {len(data)} bytes under {args.key!r}")
        elif action == "get":
            try:
                value = await kv.get(key)
            except KeyNotFound:
                print(f"{args.key!r}: not found", file=sys.stderr)
                return 1
            if isinstance(value, bytes):
                sys.stdout.buffer.write(value)
                if sys.stdout.isatty():
                    sys.stdout.write("\n")
            else:
                print(repr(value))
        elif action == "exists":
            found = await kv.exists(key)
            print("yes" if found else "no")
            return 0 if found else 1
        elif action == "delete":
            await kv.delete(key)
            print(f"deleted {args.key!r}")
        elif action == "list":
            for k in await kv.list(max_keys=args.max_keys):
                print(k.decode("utf-8", "backslashreplace") if k.isascii() else k.hex())
    return 0


def cmd_client(action: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from nvmeof.errors import NvmeofError

        try:
            return int(anyio.run(_with_client, args, action, **run_options(args.backend)))
        except (NvmeofError, OSError, TimeoutError) as exc:
            log.error("%s failed: %s", action, exc)
            return 1

    return run


def cmd_stats(args: argparse.Namespace) -> int:
    """Ask a running target (over its JSON-RPC socket) for its KV namespaces' counters."""
    import json

    from kvext.stats import format_stats
    from nvmeof.target.rpc import DEFAULT_RPC_SOCKET
    from nvmeof.target.rpc_client import RpcCallError, rpc_call

    path = args.rpc_socket or DEFAULT_RPC_SOCKET
    params = {"name": args.name} if args.name else None
    try:
        entries = rpc_call(path, "bdev_kv_get_stats", params, timeout=args.timeout)
    except RpcCallError as exc:
        log.error("stats: %s: %s", path, exc)
        return 1
    except OSError as exc:
        log.error("stats: cannot reach a target at %s: %s", path, exc.strerror or exc)
        return 1
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not isinstance(entries, list):
        log.error("stats: %s answered %r, not a list", path, entries)
        return 1
    print(format_stats(entries))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.kv_throughput import main as bench_main

    return bench_main(args)


def cmd_sim(args: argparse.Namespace) -> int:
    from simulator.cli import main as sim_main

    return sim_main(args)


def cmd_cluster(args: argparse.Namespace) -> int:
    from ec.cli import main as cluster_main

    return cluster_main(args)


# --- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpucache", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="trace every command")
    parser.add_argument(
        "--backend", choices=["asyncio", "trio"], default="asyncio", help="async event loop"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    target = sub.add_parser("target", help="run an NVMe/TCP target with a KV namespace")
    target.add_argument(
        "-l",
        "--listen",
        action="append",
        help=f"host:port to listen on (default {DEFAULT_ADDRESS})",
    )
    target.add_argument("-n", "--nqn", default=DEFAULT_NQN, help="subsystem NQN")
    target.add_argument("--capacity", default="1GiB", help="DRAM capacity of the KV namespace")
    target.add_argument(
        "--max-value-size", default="128MiB", help="largest value a Store may carry"
    )
    target.add_argument(
        "--in-capsule-data-size",
        default=DEFAULT_IN_CAPSULE,
        help="data a TCP command may carry in its capsule (IOCCSZ; SPDK's in_capsule_data_size):"
        " a KV Store up to this size goes out with its command, no R2T round trip (default 8 MiB"
        " + 4 KiB for a key and value header; a connection holds at most max_in_flight_bytes"
        " of it at once)",
    )
    target.add_argument(
        "--poll-us",
        type=float,
        default=None,
        help="microseconds a connection that finds nothing to read keeps trying before it sleeps"
        " (default: GPUCACHE_POLL_US, else 200): a host that answers within it costs no wake-up,"
        " which halves a 4 KiB get's round trip at 1 in flight here; 0 never polls, for a target"
        " that shares its cores with busy processes (polling takes CPU from them)",
    )
    target.add_argument("--eviction", choices=["lru", "fifo", "none"], default="lru")
    target.add_argument(
        "--allow-host", action="append", help="host NQN allowed to connect (default: any host)"
    )
    target.add_argument(
        "--no-digests", action="store_true", help="refuse header/data digests in ICReq"
    )
    target.add_argument(
        "--malloc", action="append", metavar="SIZE", help="add a RAM block namespace of SIZE"
    )
    target.add_argument(
        "--aio", action="append", metavar="FILE", help="add a block namespace on an existing file"
    )
    target.add_argument(
        "--block-size", type=int, choices=[512, 4096], default=512, help="of --malloc/--aio"
    )
    target.add_argument("--ready-file", help="write the listening addresses here once serving")
    target.add_argument(
        "-c",
        "--json",
        metavar="FILE",
        help="configure from an SPDK JSON config (save_config's output) instead of the default"
        " KV subsystem; listen only where it says, plus any --listen",
    )
    target.add_argument(
        "-r",
        "--rpc-socket",
        metavar="PATH",
        help="SPDK JSON-RPC Unix socket (default /var/tmp/spdk.sock, skipped when another"
        " target holds it)",
    )
    target.add_argument(
        "--wait-for-rpc",
        action="store_true",
        help="apply --json and start only on the framework_start_init RPC",
    )
    target.add_argument(
        "--discovery-port",
        type=int,
        help="discovery service port on the first listener's host (default 8009, skipped if busy)",
    )
    target.add_argument("--no-discovery", action="store_true", help="no dedicated discovery port")
    target.add_argument(
        "--flash", metavar="PATH", help="serve the KV namespace from this file or block device"
    )
    target.add_argument(
        "--flash-size", metavar="SIZE", help="create (or grow) the --flash file to this size"
    )
    target.add_argument(
        "--flash-format",
        action="store_true",
        help="allow formatting a --flash device that holds something else (destroys it)",
    )
    target.add_argument("--dram", default="1GiB", help="DRAM tier in front of --flash (0: none)")
    target.add_argument(
        "-m",
        "--cpumask",
        help="CPUs the target runs on, as nvmf_tgt -m: a hex mask (0x2) or a list ([1,3-4])",
    )
    target.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the KV namespace, each with capacity/N (docs/workers.md)",
    )
    target.add_argument(
        "--dhchap-host",
        action="append",
        metavar="HOSTNQN=SECRET[,CTRL_SECRET]",
        help="this host must authenticate with DH-HMAC-CHAP (CTRL_SECRET: bidirectional)",
    )
    target.set_defaults(func=cmd_target)

    gen_key = sub.add_parser(
        "gen-dhchap-key", help="print a new DH-HMAC-CHAP secret (as nvme gen-dhchap-key)"
    )
    gen_key.add_argument(
        "-m", "--hmac", type=int, choices=[0, 1, 2, 3], default=1,
        help="key transformation hash: 0 none, 1 SHA-256, 2 SHA-384, 3 SHA-512",
    )  # fmt: skip
    gen_key.add_argument("-l", "--key-length", type=int, choices=[32, 48, 64], default=32)
    gen_key.set_defaults(func=cmd_gen_dhchap_key)

    check_flash = sub.add_parser("check-flash", help="verify a flash device's records")
    check_flash.add_argument("path")
    check_flash.add_argument(
        "--fix", action="store_true", help="rewrite the index checkpoint from what is intact"
    )
    check_flash.set_defaults(func=cmd_check_flash)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-a", "--address", default=DEFAULT_ADDRESS, help="target host:port")
        p.add_argument("-n", "--nqn", default=DEFAULT_NQN, help="subsystem NQN")
        p.add_argument("--header-digest", action="store_true")
        p.add_argument("--data-digest", action="store_true")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds per command")
        p.add_argument("--hostnqn", help="host NQN (default: /etc/nvme/hostnqn or derived)")
        p.add_argument("--dhchap-secret", help="DH-HMAC-CHAP host secret (DHHC-1:hh:...:)")
        p.add_argument(
            "--dhchap-ctrl-secret", help="controller secret: authenticate the target too"
        )
        p.set_defaults(func=cmd_client(name))
        return p

    client_parser("put", "store a value").add_argument("key")
    sub.choices["put"].add_argument("value", help="the value, or - to read it from stdin")
    client_parser("get", "print a value").add_argument("key")
    client_parser("exists", "does a key exist").add_argument("key")
    client_parser("delete", "delete a key").add_argument("key")
    client_parser("list", "list keys").add_argument("--max-keys", type=int, default=1000)

    disc = sub.add_parser("discover", help="list the subsystems a discovery service offers")
    disc.add_argument("-a", "--address", default="127.0.0.1:8009", help="discovery host[:port]")
    disc.add_argument("--hostnqn", help="host NQN (default: /etc/nvme/hostnqn or derived)")
    disc.add_argument("--header-digest", action="store_true")
    disc.add_argument("--data-digest", action="store_true")
    disc.add_argument("--timeout", type=float, default=10.0, help="seconds per command")
    disc.add_argument("--json", action="store_true", help="print JSON (as nvme-cli -o json)")
    disc.set_defaults(func=cmd_discover)

    stats = sub.add_parser(
        "stats", help="a running target's KV counters per namespace and tier (over JSON-RPC)"
    )
    stats.add_argument(
        "-r",
        "--rpc-socket",
        metavar="PATH",
        help="the target's JSON-RPC Unix socket (default /var/tmp/spdk.sock)",
    )
    stats.add_argument("-b", "--name", help="only this namespace or bdev")
    stats.add_argument("--json", action="store_true", help="print bdev_kv_get_stats' JSON")
    stats.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for it")
    stats.set_defaults(func=cmd_stats)

    bench = sub.add_parser("bench", help="measure put/get throughput and latency on loopback")
    from bench.kv_throughput import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    cluster = sub.add_parser("cluster", help="erasure-coded KV across the targets of a map")
    from ec.cli import add_arguments as add_cluster_arguments

    add_cluster_arguments(cluster)
    cluster.set_defaults(func=cmd_cluster)

    sim = sub.add_parser("sim", help="simulate a fleet: does a flash tier beat recomputing?")
    from simulator.cli import add_arguments as add_sim_arguments

    add_sim_arguments(sim)
    sim.set_defaults(func=cmd_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    client = ("put", "get", "exists", "delete", "list", "discover", "stats")
    _setup_logging(args.verbose, client=args.command in client)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
