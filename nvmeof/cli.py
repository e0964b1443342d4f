"""The ``gpucache`` command: run a target, talk to one, benchmark."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from nvmeof.units import format_size, parse_size

DEFAULT_NQN = "nqn.2024-01.io.gpucache:kv0"
DEFAULT_ADDRESS = "127.0.0.1:4420"

log = logging.getLogger("gpucache")


def _setup_logging(verbose: bool, *, client: bool) -> None:
    # The target logs its lifecycle; one-shot client commands only warnings, unless --verbose.
    quiet = logging.WARNING if client else logging.INFO
    logging.basicConfig(
        level=logging.DEBUG if verbose else quiet,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _backend_options(backend: str) -> dict[str, Any]:
    return {"backend": backend}


# --- target -----------------------------------------------------------------------------------
def build_target(args: argparse.Namespace) -> Any:
    from kvext.engine.base import EngineLimits
    from kvext.engine.memory import MemoryEngine
    from kvext.namespace import KeyValueNamespace
    from nvmeof.target.subsystem import Subsystem, Target, TargetLimits, transfer_size_for

    max_value = parse_size(args.max_value_size)
    target = Target(TargetLimits(max_transfer_size=transfer_size_for(max_value)))
    subsystem = Subsystem(
        nqn=args.nqn, allow_any_host=not args.allow_host, hosts=set(args.allow_host or ())
    )
    engine = MemoryEngine(
        EngineLimits(capacity_bytes=parse_size(args.capacity), max_value_length=max_value),
        policy=args.eviction,
    )
    subsystem.add_namespace(KeyValueNamespace(engine, name="kv0"))
    _add_block_namespaces(subsystem, args)
    target.add_subsystem(subsystem)
    return target


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


async def _run_target(args: argparse.Namespace) -> None:
    from nvmeof.initiator.controller import parse_address
    from nvmeof.target.server import TargetServer

    target = build_target(args)
    server = TargetServer(target, allow_digests=not args.no_digests)
    listeners = [server.listen(*parse_address(a)) for a in args.listen or [DEFAULT_ADDRESS]]
    async with anyio.create_task_group() as tg:
        for listener in listeners:
            await tg.start(functools.partial(server.serve_listener, listener))
        log.info(
            "serving %s: KV namespace 1, capacity %s, max value %s, eviction %s",
            args.nqn,
            format_size(parse_size(args.capacity)),
            format_size(parse_size(args.max_value_size)),
            args.eviction,
        )
        if args.ready_file:
            addresses = " ".join(f"{lst.host}:{lst.port}" for lst in server.listeners)
            await anyio.Path(args.ready_file).write_text(addresses + "\n")


def cmd_target(args: argparse.Namespace) -> int:
    try:
        anyio.run(_run_target, args, **_backend_options(args.backend))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as exc:
        log.error("cannot start the target: %s", exc)
        return 1
    return 0


# --- client commands --------------------------------------------------------------------------
def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "header_digest": args.header_digest,
        "data_digest": args.data_digest,
        "timeout": args.timeout,
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
            return int(anyio.run(_with_client, args, action, **_backend_options(args.backend)))
        except (NvmeofError, OSError, TimeoutError) as exc:
            log.error("%s failed: %s", action, exc)
            return 1

    return run


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.kv_throughput import main as bench_main

    return bench_main(args)


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
    target.set_defaults(func=cmd_target)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-a", "--address", default=DEFAULT_ADDRESS, help="target host:port")
        p.add_argument("-n", "--nqn", default=DEFAULT_NQN, help="subsystem NQN")
        p.add_argument("--header-digest", action="store_true")
        p.add_argument("--data-digest", action="store_true")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds per command")
        p.set_defaults(func=cmd_client(name))
        return p

    client_parser("put", "store a value").add_argument("key")
    sub.choices["put"].add_argument("value", help="the value, or - to read it from stdin")
    client_parser("get", "print a value").add_argument("key")
    client_parser("exists", "does a key exist").add_argument("key")
    client_parser("delete", "delete a key").add_argument("key")
    client_parser("list", "list keys").add_argument("--max-keys", type=int, default=1000)

    bench = sub.add_parser("bench", help="measure put/get throughput and latency on loopback")
    from bench.kv_throughput import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, client=args.command in ("put", "get", "exists", "delete", "list"))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
