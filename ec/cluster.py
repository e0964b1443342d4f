"""``ClusterKV``: ``KVClient``'s API over many targets, each value erasure-coded across them.

A value of ``key`` becomes k+m fragments (``ec.codec``; m+1 replicas when small), stored under the
16-byte ``object_id(key)`` on the top k+m targets of its rendezvous ranking (``ec.placement``),
one fragment per target, raw (the fragment carries its own header, checksum and the full key).

- put writes every fragment in parallel and succeeds once ``write_quorum`` (default k+1) are
  stored; a put that stored fewer than all is degraded (``PutResult.degraded``), and one below the
  quorum raises ``QuorumNotReached`` (the value may then read as the old one, the new one, or
  absent).
- get asks k targets, then more as answers fail or time out (``ec.readplan`` decides), checks
  every fragment's CRC32C and decodes the newest generation that has enough fragments.
- repair lists every target, and for each object rebuilds the fragments its placement set lacks
  (after a target was replaced, or joined) and deletes those that now live outside it; scrub does
  the same reading every fragment whole, so a fragment whose checksum fails is rebuilt too.
- A target that fails is marked down with backoff (``ec.link``); operations skip it meanwhile.

Limits (for now): no tombstones, so a delete that missed a down target can leave an old replica
to be read back when the target returns (``DeleteResult.degraded`` says so); no must-exist /
must-not-exist puts; list pages by object id, not by key order.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence

import anyio
import anyio.abc
import attrs

from ec.clustermap import ClusterMap
from ec.codec import (
    FRAGMENT_HEADER_LENGTH,
    CodecError,
    ErasureCode,
    Fragment,
    FragmentHeader,
    Scheme,
    parse_fragment,
    user_key,
)
from ec.link import LinkOptions, LinkState, TargetLink, TargetUnavailable
from ec.placement import OBJECT_ID_LENGTH, object_id, rank
from ec.readplan import ReadOutcome, ReadPlan
from kvext.client import gather_gets
from kvext.framing import ValueKind, header_length
from kvext.keys import KeyLike, key_bytes
from kvext.spec import KvStatus, kv_status
from kvext.tensor import Value, describe, materialize, writable_view
from nvmeof.errors import KeyNotFound, NvmeError, NvmeofError

log = logging.getLogger("ec.cluster")

_FIRST_READ = 64 * 1024  # a get without out= reads this much of each fragment first
_HEADER_READ = 4096  # a survey (exists, list, repair) reads this much: headers and key
_UNRECOVERED_ERROR = 0x88  # KV Unrecovered Error: a target found its copy corrupt


class ClusterError(NvmeofError):
    """The cluster cannot serve the request (too few targets up, or too few in the map)."""


class QuorumNotReached(ClusterError):
    """A put stored fewer fragments than its write quorum."""


@attrs.frozen
class PutResult:
    scheme: Scheme
    stored: int
    width: int
    failed: dict[str, str]

    @property
    def degraded(self) -> bool:
        return self.stored < self.width


@attrs.frozen
class DeleteResult:
    deleted: int
    failed: dict[str, str]

    @property
    def degraded(self) -> bool:
        return bool(self.failed)


@attrs.define
class RepairReport:
    objects: int = 0
    healthy: int = 0
    rebuilt: int = 0  # fragments reconstructed (or replicas copied) onto their targets
    moved: int = 0  # fragments copied from outside their placement set into it
    deleted: int = 0  # misplaced or stale fragments removed
    corrupt: int = 0  # fragments whose checksum failed (scrub) or that did not parse
    unrecoverable: list[str] = attrs.field(factory=builtins.list)  # object ids, hex
    skipped_targets: list[str] = attrs.field(factory=builtins.list)  # down during the survey
    incomplete: int = 0  # objects still short of fragments (their target is down)


@attrs.frozen
class TargetStatus:
    name: str
    address: str
    state: LinkState
    weight: float
    last_error: str
    retry_in: float


@attrs.frozen
class _Held:
    """What one target holds for one object, as a survey found it."""

    link: TargetLink
    fragment: Fragment | None  # None: corrupt or unreadable
    whole: bool  # the payload was read (and verified)


class ClusterKV:
    """Put and get values and tensors by key across the targets of a cluster map."""

    def __init__(
        self,
        cluster_map: ClusterMap,
        *,
        code: ErasureCode | None = None,
        options: LinkOptions | None = None,
    ) -> None:
        self.map = cluster_map
        self.code = code or ErasureCode(
            cluster_map.k, cluster_map.m, replicate_below=cluster_map.replicate_below
        )
        self.write_quorum = cluster_map.quorum
        self.options = options or LinkOptions()
        self.links: dict[str, TargetLink] = {
            t.name: TargetLink(t, self.options) for t in cluster_map.targets
        }
        self._last_generation = 0
        # Reads still in flight when a get has what it needs finish here: cancelling a command
        # on the wire would cost its whole connection (the NVMe/TCP core treats data for a
        # forgotten command as fatal), so they are never cancelled, only no longer awaited.
        self._stragglers: anyio.abc.TaskGroup | None = None
        if cluster_map.discovery:
            log.warning(
                "cluster map lists discovery controllers %s; discovery is not implemented yet,"
                " so only the listed targets are used",
                ", ".join(cluster_map.discovery),
            )

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, cluster_map: ClusterMap | str | os.PathLike[str], **kwargs: object
    ) -> AsyncIterator[ClusterKV]:
        """A cluster client that owns a task group for reads a get no longer waits for."""
        if not isinstance(cluster_map, ClusterMap):
            cluster_map = ClusterMap.load(cluster_map)
        cluster = cls(cluster_map, **kwargs)  # type: ignore[arg-type]
        try:
            async with anyio.create_task_group() as tg:
                cluster._stragglers = tg
                try:
                    yield cluster
                finally:
                    cluster._stragglers = None
        finally:
            await cluster.aclose()

    async def aclose(self) -> None:
        for link in self.links.values():
            await link.aclose()

    async def apply_map(self, cluster_map: ClusterMap) -> None:
        """Switch to ``cluster_map``: targets whose address changed are reconnected."""
        old = self.links
        new: dict[str, TargetLink] = {}
        for entry in cluster_map.targets:
            link = old.get(entry.name)
            if link is not None and link.entry == entry:
                new[entry.name] = link
            else:
                new[entry.name] = TargetLink(entry, self.options)
        for name, link in old.items():
            if new.get(name) is not link:
                await link.aclose()
        self.map = cluster_map
        self.links = new

    # --- placement --------------------------------------------------------------------------
    def placement(self, oid: bytes, n: int | None = None) -> list[TargetLink]:
        ranked = rank(oid, (t.member for t in self.map.targets))
        return [self.links[m.name] for m in ranked[: n or self.code.width]]

    def _generation(self) -> int:
        self._last_generation = max(time.time_ns(), self._last_generation + 1)
        return self._last_generation

    def status(self) -> list[TargetStatus]:
        return [
            TargetStatus(
                link.name,
                f"{link.entry.host}:{link.entry.port}",
                link.state,
                link.entry.weight,
                link.last_error,
                link.retry_in(),
            )
            for link in self.links.values()
        ]

    async def probe(self) -> list[TargetStatus]:
        """Connect to every target (that is not in backoff) and report each one's state."""

        async def one(link: TargetLink) -> None:
            with contextlib.suppress(TargetUnavailable):
                await link.connect()

        async with anyio.create_task_group() as tg:
            for link in self.links.values():
                tg.start_soon(one, link)
        return self.status()

    # --- put --------------------------------------------------------------------------------
    def _quorum(self, scheme: Scheme) -> int:
        if scheme is Scheme.CODED:
            return self.write_quorum
        return max(1, min(self.code.m + 1, self.write_quorum - self.code.k + 1))

    async def put(self, key: KeyLike, value: object) -> PutResult:
        """Store ``value`` (bytes-like, numpy array or torch CPU tensor) under ``key``."""
        layout, data = describe(value)
        oid = object_id(key)
        fragments = self.code.encode(key, layout, data, self._generation())
        scheme = fragments[0].header.scheme
        targets = self.placement(oid, len(fragments))
        if len(targets) < len(fragments):
            raise ClusterError(
                f"{len(fragments)} fragments need as many targets; the map has {len(targets)}"
            )
        failed = await self._write(oid, list(zip(targets, fragments, strict=True)))
        stored = len(fragments) - len(failed)
        if stored < self._quorum(scheme):
            raise QuorumNotReached(
                f"put {key!r}: {stored} of {len(fragments)} fragments stored, quorum is"
                f" {self._quorum(scheme)}: " + "; ".join(f"{n}: {e}" for n, e in failed.items())
            )
        if failed:
            log.warning("put %r degraded: %d of %d fragments", key, stored, len(fragments))
        return PutResult(scheme, stored, len(fragments), failed)

    async def _write(
        self, oid: bytes, jobs: Sequence[tuple[TargetLink, Fragment]]
    ) -> dict[str, str]:
        failed: dict[str, str] = {}

        async def one(link: TargetLink, fragment: Fragment) -> None:
            try:
                await link.store(oid, fragment.buffers())
            except (TargetUnavailable, NvmeError) as exc:
                failed[link.name] = str(exc)

        async with anyio.create_task_group() as tg:
            for link, fragment in jobs:
                tg.start_soon(one, link, fragment)
        return failed

    async def put_many(self, items: Sequence[tuple[KeyLike, object]]) -> list[PutResult]:
        results: list[PutResult | None] = [None] * len(items)

        async def one(i: int) -> None:
            results[i] = await self.put(*items[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(items)):
                tg.start_soon(one, i)
        return [r for r in results if r is not None]

    # --- get --------------------------------------------------------------------------------
    async def get(self, key: KeyLike, *, out: object = None) -> Value:
        """The value stored under ``key``; with ``out``, it lands in ``out`` and ``out`` returns.

        Raises ``KeyNotFound`` if there is no such key, ``ClusterError`` if too few targets answer.
        """
        full = key_bytes(key)
        dest = None if out is None else writable_view(out)
        if dest is None:
            first_read = _FIRST_READ
        else:
            layout, _ = describe(out)
            first_read = (
                FRAGMENT_HEADER_LENGTH
                + header_length(len(full), len(layout.shape))
                + self.code.payload_length(len(dest))
            )
        fragments = await self._gather(key, first_read, header_only=False)
        vh = fragments[0].value_header
        if dest is not None:
            if vh.payload_len != len(dest):
                raise ValueError(
                    f"value of {key!r} is {vh.payload_len} bytes"
                    f" ({vh.dtype}{list(vh.shape)}), out has {len(dest)}"
                )
            self.code.decode_into(fragments, dest)
            return out
        if vh.kind is ValueKind.BYTES:
            return self.code.decode_bytes(fragments)
        buf = bytearray(vh.payload_len)
        self.code.decode_into(fragments, memoryview(buf))
        return materialize(vh, memoryview(buf))

    async def get_many(
        self, keys: Sequence[KeyLike], *, outs: Sequence[object] | None = None
    ) -> builtins.list[Value]:
        return await gather_gets(self.get, keys, outs)

    async def _read_fragment(
        self, link: TargetLink, oid: bytes, full_key: bytes, size: int, *, header_only: bool
    ) -> Fragment:
        if header_only:
            buf, total = await link.retrieve_prefix(oid, size)
            if total > len(buf) and len(buf) >= FRAGMENT_HEADER_LENGTH:
                need = FRAGMENT_HEADER_LENGTH + FragmentHeader.unpack(buf).value_header_len
                if need > len(buf):
                    buf, total = await link.retrieve_prefix(oid, need)
            fragment = parse_fragment(buf, header_only=True)
            if fragment.header.record_length != total:
                raise CodecError(f"fragment is {total} bytes, its header says otherwise")
        else:
            fragment = parse_fragment(await link.retrieve(oid, size), verify=True)
        if fragment.value_header.key != full_key:
            raise KeyNotFound(kv_status(KvStatus.KEY_DOES_NOT_EXIST), "object id collision")
        return fragment

    async def _gather(self, key: KeyLike, first_read: int, *, header_only: bool) -> list[Fragment]:
        """Fragments of the newest decodable generation of ``key`` (``ec.readplan`` decides)."""
        oid = object_id(key)
        full = key_bytes(key)
        ranked = self.placement(oid)
        # Targets in backoff are asked last; the plan's ranks are positions in this order, and
        # the replica ranks must stay the first m+1 of the placement, so keep order when all up.
        order = [link for link in ranked if link.available]
        order += [link for link in ranked if not link.available]
        replica_ranks = {link.name for link in ranked[: self.code.m + 1]}
        plan = ReadPlan(self.code.k, self.code.m, self.write_quorum, len(order))
        errors: dict[str, str] = {}
        send, receive = anyio.create_memory_object_stream[tuple[int, Fragment | BaseException]](
            len(order)
        )

        async def read(position: int) -> None:
            link = order[position]
            result: Fragment | BaseException
            try:
                result = await self._read_fragment(
                    link, oid, full, first_read, header_only=header_only
                )
            except (TargetUnavailable, NvmeofError, ValueError) as exc:
                result = exc
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                send.send_nowait((position, result))

        def rank_of(position: int) -> int:
            # ReadPlan counts ranks <= m as replica ranks.
            return 0 if order[position].name in replica_ranks else self.code.m + 1

        async def decide(spawn: anyio.abc.TaskGroup) -> None:
            while True:
                for _ in range(plan.wanted()):
                    spawn.start_soon(read, plan.launch())
                if plan.outcome() is not ReadOutcome.PENDING:
                    return
                position, result = await receive.receive()
                name = order[position].name
                if isinstance(result, Fragment):
                    plan.on_fragment(rank_of(position), result)
                elif isinstance(result, KeyNotFound):
                    plan.on_missing(rank_of(position))
                else:
                    errors[name] = str(result)
                    if isinstance(result, CodecError):
                        log.warning("%r: fragment on %s is bad: %s", key, name, result)
                    plan.on_unavailable(rank_of(position))

        async with send, receive:
            if self._stragglers is not None:
                await decide(self._stragglers)
            else:
                async with anyio.create_task_group() as tg:
                    await decide(tg)  # and wait for the stragglers
        outcome = plan.outcome()
        best = plan.best()
        if outcome is ReadOutcome.FOUND and best is not None:
            return best
        if outcome is ReadOutcome.ABSENT:
            raise KeyNotFound(kv_status(KvStatus.KEY_DOES_NOT_EXIST), f"get {key!r}")
        raise ClusterError(
            f"{key!r}: too few fragments readable: "
            + ("; ".join(f"{n}: {e}" for n, e in errors.items()) or "no answers")
        )

    # --- exists, delete, list ---------------------------------------------------------------
    async def exists(self, key: KeyLike) -> bool:
        try:
            await self._gather(key, _HEADER_READ, header_only=True)
        except KeyNotFound:
            return False
        return True

    async def delete(self, key: KeyLike) -> DeleteResult:
        """Delete ``key``'s fragments from its placement set (absent keys delete fine)."""
        oid = object_id(key)
        failed: dict[str, str] = {}
        targets = self.placement(oid)

        async def one(link: TargetLink) -> None:
            try:
                await link.delete(oid)
            except (TargetUnavailable, NvmeError) as exc:
                failed[link.name] = str(exc)

        async with anyio.create_task_group() as tg:
            for link in targets:
                tg.start_soon(one, link)
        if failed:
            log.warning("delete %r missed %s", key, ", ".join(failed))
        return DeleteResult(len(targets) - len(failed), failed)

    async def _survey_ids(self, report: RepairReport | None = None) -> dict[bytes, list[str]]:
        """Every object id on every reachable target, with the targets that hold it."""
        holders: dict[bytes, list[str]] = {}

        async def one(link: TargetLink) -> None:
            try:
                keys = await link.list_all()
            except (TargetUnavailable, NvmeError) as exc:
                if report is not None:
                    report.skipped_targets.append(link.name)
                log.warning("survey skips %s: %s", link.name, exc)
                return
            for k in keys:
                if len(k) == OBJECT_ID_LENGTH:
                    holders.setdefault(k, []).append(link.name)

        async with anyio.create_task_group() as tg:
            for link in self.links.values():
                tg.start_soon(one, link)
        return holders

    async def list(
        self, start: KeyLike | None = None, *, max_keys: int = 1024
    ) -> builtins.list[bytes | str]:
        """Up to ``max_keys`` user keys, in object-id order from ``start``'s id (inclusive)."""
        holders = await self._survey_ids()
        first = object_id(start) if start is not None else b""
        keys: builtins.list[bytes | str] = []
        for oid in sorted(holders):
            if oid < first:
                continue
            if len(keys) >= max_keys:
                break
            for name in holders[oid]:
                link = self.links[name]
                try:
                    buf, _ = await link.retrieve_prefix(oid, _HEADER_READ)
                    fragment = parse_fragment(buf, header_only=True)
                except (TargetUnavailable, NvmeofError):
                    continue
                keys.append(user_key(fragment.value_header))
                break
        return keys

    # --- repair and scrub -------------------------------------------------------------------
    async def repair(self, *, verify: bool = False, concurrency: int = 8) -> RepairReport:
        """Put every object's fragments back on its placement set; with ``verify`` (scrub), read
        every fragment whole and treat one whose checksum fails as missing."""
        report = RepairReport()
        holders = await self._survey_ids(report)
        limiter = anyio.Semaphore(concurrency)

        async def one(oid: bytes, names: builtins.list[str]) -> None:
            async with limiter:
                await self._heal(oid, [self.links[n] for n in names], report, verify=verify)

        async with anyio.create_task_group() as tg:
            for oid, names in holders.items():
                tg.start_soon(one, oid, names)
        return report

    async def scrub(self, *, concurrency: int = 8) -> RepairReport:
        return await self.repair(verify=True, concurrency=concurrency)

    async def _survey_one(self, link: TargetLink, oid: bytes, *, whole: bool) -> _Held | None:
        try:
            if whole:
                fragment = parse_fragment(await link.retrieve(oid, _FIRST_READ), verify=True)
            else:
                buf, total = await link.retrieve_prefix(oid, _HEADER_READ)
                fragment = parse_fragment(buf, header_only=True)
                if fragment.header.record_length != total:
                    raise CodecError("fragment length disagrees with its header")
        except CodecError:
            return _Held(link, None, whole)
        except NvmeError as exc:
            if exc.status.sct == 0 and exc.status.sc == _UNRECOVERED_ERROR:
                return _Held(link, None, whole)  # the target's own check failed: corrupt
            return None
        except TargetUnavailable:
            return None
        return _Held(link, fragment, whole)

    async def _whole(self, held: _Held, oid: bytes) -> Fragment | None:
        if held.whole:
            return held.fragment
        fresh = await self._survey_one(held.link, oid, whole=True)
        return None if fresh is None else fresh.fragment

    async def _heal(
        self, oid: bytes, holders: Sequence[TargetLink], report: RepairReport, *, verify: bool
    ) -> None:
        report.objects += 1
        found: list[_Held] = []
        for link in holders:
            held = await self._survey_one(link, oid, whole=verify)
            if held is not None:
                found.append(held)
        report.corrupt += sum(1 for h in found if h.fragment is None)
        # The newest generation with enough fragments to decode.
        groups: dict[int, list[_Held]] = {}
        for h in found:
            if h.fragment is not None:
                groups.setdefault(h.fragment.header.generation, []).append(h)
        chosen: list[_Held] | None = None
        for generation in sorted(groups, reverse=True):
            group = groups[generation]
            head = group[0].fragment
            assert head is not None
            indices = {h.fragment.index for h in group if h.fragment is not None}
            if head.header.scheme is Scheme.REPLICA or len(indices) >= head.header.k:
                chosen = group
                break
        if chosen is None:
            report.unrecoverable.append(oid.hex())
            return
        head = chosen[0].fragment
        assert head is not None
        n = self.code.fragment_count(head.header.scheme)
        wanted = self.placement(oid, n)
        wanted_names = {link.name for link in wanted}
        in_set: dict[str, _Held] = {}
        used: set[int] = set()
        for h in chosen:
            assert h.fragment is not None
            if h.link.name in wanted_names and h.fragment.index not in used:
                in_set[h.link.name] = h
                used.add(h.fragment.index)
        needing = [link for link in wanted if link.name not in in_set]
        missing = [i for i in range(n) if i not in used]
        if not needing:
            report.healthy += 1
        else:
            written = await self._rebuild(oid, chosen, needing, missing, report)
            if written < len(needing):
                report.incomplete += 1
                return  # keep every copy until the set is whole again
        # The set is whole: whatever else holds this object is misplaced or stale.
        for h in found:
            if h.link.name not in wanted_names:
                try:
                    await h.link.delete(oid)
                    report.deleted += 1
                except (TargetUnavailable, NvmeError) as exc:
                    log.warning("cannot delete misplaced %s on %s: %s", oid.hex(), h.link.name, exc)

    async def _rebuild(
        self,
        oid: bytes,
        chosen: Sequence[_Held],
        needing: Sequence[TargetLink],
        missing: Sequence[int],
        report: RepairReport,
    ) -> int:
        """Write fragments ``missing`` onto ``needing`` targets; returns how many were stored."""
        by_index = {h.fragment.index: h for h in chosen if h.fragment is not None}
        jobs: list[tuple[TargetLink, Fragment]] = []
        to_rebuild: list[tuple[TargetLink, int]] = []
        wanted_names = {link.name for link in needing}
        for link, index in zip(needing, missing, strict=False):
            source = by_index.get(index)
            if source is not None and source.link.name not in wanted_names:
                whole = await self._whole(source, oid)  # a misplaced fragment: move it as is
                if whole is not None:
                    jobs.append((link, whole))
                    report.moved += 1
                    continue
            to_rebuild.append((link, index))
        if to_rebuild:
            sources: list[Fragment] = []
            head = chosen[0].fragment
            assert head is not None
            enough = 1 if head.header.scheme is Scheme.REPLICA else head.header.k
            for h in chosen:
                if len(sources) >= enough:
                    break
                whole = await self._whole(h, oid)
                if whole is not None:
                    sources.append(whole)
            if len(sources) < enough:
                report.unrecoverable.append(oid.hex())
                return 0
            rebuilt = self.code.reconstruct(sources, [i for _, i in to_rebuild])
            jobs += [(link, f) for (link, _), f in zip(to_rebuild, rebuilt, strict=True)]
            report.rebuilt += len(rebuilt)
        failed = await self._write(oid, jobs)
        return len(jobs) - len(failed)
