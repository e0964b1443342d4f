"""``gpucache cluster``: status, put, get, repair, scrub (and bench) against a cluster map file."""

from __future__ import annotations

import argparse
import logging
import sys

import anyio
import attrs

from ec.cluster import ClusterKV, RepairReport
from ec.clustermap import ClusterMap
from ec.link import LinkOptions
from nvmeof.errors import KeyNotFound, NvmeofError

log = logging.getLogger("gpucache.cluster")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--cluster", help="cluster map (JSON file)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per command")
    parser.add_argument("--connect-timeout", type=float, default=2.0, help="seconds to connect")
    sub = parser.add_subparsers(dest="cluster_command", required=True)
    sub.add_parser("status", help="connect to every target and show its state")
    put = sub.add_parser("put", help="store a value across the cluster")
    put.add_argument("key")
    put.add_argument("value", help="the value, or - to read it from stdin")
    get = sub.add_parser("get", help="print a value")
    get.add_argument("key")
    sub.add_parser("repair", help="rebuild missing fragments and move misplaced ones")
    sub.add_parser("scrub", help="read every fragment, rebuild those whose checksum fails")
    from bench.ec_throughput import add_arguments as add_bench_arguments

    add_bench_arguments(
        sub.add_parser("bench", help="EC put/get throughput on spawned targets vs a single one")
    )


def _print_report(what: str, report: RepairReport) -> None:
    fields = attrs.asdict(report)
    print(
        f"{what}: "
        + ", ".join(f"{k} {v if not isinstance(v, list) else len(v)}" for k, v in fields.items())
    )
    for oid in report.unrecoverable:
        print(f"unrecoverable: {oid}")


async def _run(args: argparse.Namespace) -> int:
    cluster_map = ClusterMap.load(args.cluster)
    options = LinkOptions(connect_timeout=args.connect_timeout, command_timeout=args.timeout)
    async with ClusterKV.open(cluster_map, options=options) as cluster:
        action = args.cluster_command
        if action == "status":
            statuses = await cluster.probe()
            print(
                f"k={cluster.code.k} m={cluster.code.m}"
                f" backend {cluster.code.backend.pyeclib_name}"
                f" write quorum {cluster.write_quorum}"
                f" replicate below {cluster.code.replicate_below}"
            )
            for s in statuses:
                extra = f"  ({s.last_error})" if s.state.value == "down" else ""
                print(f"{s.name:<12} {s.address:<22} weight {s.weight:<6g} {s.state.value}{extra}")
            up = sum(1 for s in statuses if s.state.value == "up")
            print(f"{up} of {len(statuses)} targets up")
            return 0 if up >= cluster.code.k else 1
        key: bytes = args.key.encode() if hasattr(args, "key") else b""
        if action == "put":
            data = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()
            result = await cluster.put(key, data)
            note = f" (degraded: {', '.join(result.failed)})" if result.degraded else ""
            print(
                f"stored {len(data)} bytes under {args.key!r} as {result.stored} of"
                f" {result.width} {result.scheme.name.lower()} fragments{note}"
            )
        elif action == "get":
            try:
                value = await cluster.get(key)
            except KeyNotFound:
                print(f"{args.key!r}: not found", file=sys.stderr)
                return 1
            if isinstance(value, bytes):
                sys.stdout.buffer.write(value)
                if sys.stdout.isatty():
                    sys.stdout.write("\n")
            else:
                print(repr(value))
        elif action in ("repair", "scrub"):
            report = await (cluster.repair() if action == "repair" else cluster.scrub())
            _print_report(action, report)
            return 1 if report.unrecoverable else 0
    return 0


def main(args: argparse.Namespace) -> int:
    if args.cluster_command == "bench":
        from bench.ec_throughput import main as bench_main

        return bench_main(args)
    if not args.cluster:
        log.error("cluster %s needs --cluster FILE", args.cluster_command)
        return 2
    try:
        return int(anyio.run(_run, args, backend=args.backend))
    except (NvmeofError, OSError, TimeoutError) as exc:
        log.error("cluster %s failed: %s", args.cluster_command, exc)
        return 1
