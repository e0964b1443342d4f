"""A fragment corrupted on disk: six real targets keep their values in flash files (``--dram 0``,
so every read comes from the file), and bytes inside one fragment's record are flipped in the file
under a running target.

The target's flash engine notices on the next read (the record's CRC32C fails), drops the record
and answers "key not found"; ``ClusterKV.get`` still returns the right value from the other
fragments; ``scrub`` rebuilds the fragment (also one nobody had read since it was corrupted); a
second scrub finds every object healthy; and with two other targets killed, get must read the
rebuilt fragments, and returns the right values.

(``test_ec_scrub`` corrupts a fragment through the KV API instead, on DRAM targets.)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import attrs
import pytest

from ec.cluster import ClusterKV
from ec.clustermap import ClusterMap, TargetEntry
from ec.codec import Scheme, parse_fragment
from ec.link import LinkOptions, LinkState
from ec.placement import object_id
from kvext.engine.check import check
from kvext.engine.record import ALIGN, RecordKind, unpack_header
from nvmeof.errors import KeyNotFound
from nvmeof.testing import TEST_NQN, RunningTarget, spawn_target

pytestmark = pytest.mark.anyio

K, M = 4, 2
FLASH_ARGS = ("--flash-size", "64MiB", "--dram", "0", "--max-value-size", "4MiB")
DROPPED = "failed its check; dropped"  # what the flash engine logs when a record's CRC fails
FRAGMENT_READ = 1 << 20  # more than any fragment here


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # real target processes: one backend is enough


@attrs.frozen
class FlashTarget:
    running: RunningTarget
    flash: Path
    log: Path


@attrs.frozen
class Victim:
    key: str
    target: str
    fragment: bytes  # the fragment as stored, before it was corrupted


def _map(targets: dict[str, FlashTarget]) -> ClusterMap:
    return ClusterMap(
        targets=tuple(
            TargetEntry(name, t.running.host, t.running.port, subnqn=TEST_NQN)
            for name, t in targets.items()
        ),
        k=K,
        m=M,
    )


def _records(flash: Path, key: bytes) -> list[tuple[int, int, int]]:
    """(seq, file offset of the value, value length) of every record of ``key`` in the flash
    file, oldest first, found by walking its ``ALIGN`` boundaries with the record codec."""
    data = memoryview(flash.read_bytes())
    found = []
    for pos in range(0, len(data), ALIGN):
        header = unpack_header(data[pos:])
        if header is not None and header.kind is RecordKind.VALUE and header.key == key:
            found.append((header.seq, pos + header.value_offset, header.value_len))
    return sorted(found)


def _value_at(flash: Path, offset: int, length: int) -> bytes:
    with flash.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def _corrupt_on_disk(flash: Path, key: bytes, fragment: bytes) -> None:
    """Flip 16 bytes in the middle of the value of ``key``'s newest record, in place."""
    records = _records(flash, key)
    assert records, f"no record of {key.hex()} in {flash}"
    _, offset, length = records[-1]
    assert length == len(fragment)
    assert _value_at(flash, offset, length) == fragment  # the record holds this very fragment
    at = offset + length // 2
    fd = os.open(flash, os.O_RDWR)
    try:
        old = os.pread(fd, 16, at)
        assert os.pwrite(fd, bytes(b ^ 0xFF for b in old), at) == 16
        os.fsync(fd)  # the target reads with O_DIRECT where it can: put the bytes on the disk
    finally:
        os.close(fd)


async def _fragment(cluster: ClusterKV, target: str, key: str) -> bytes:
    return bytes(await cluster.links[target].retrieve(object_id(key), FRAGMENT_READ))


async def test_fragment_corrupted_on_flash_reads_right_and_scrub_rebuilds_it(
    tmp_path: Path,
) -> None:
    values = {f"coded-{i}": os.urandom(256 << 10) for i in range(4)}
    values["small"] = os.urandom(1000)  # below replicate_below: m+1 replicas
    options = LinkOptions(connect_timeout=2.0, command_timeout=10.0, backoff_initial=0.2)
    with contextlib.ExitStack() as stack:
        targets: dict[str, FlashTarget] = {}
        for i in range(K + M):
            flash, log = tmp_path / f"t{i}.flash", tmp_path / f"t{i}.log"
            running = stack.enter_context(
                spawn_target("--flash", str(flash), *FLASH_ARGS, log_path=log)
            )
            targets[f"t{i}"] = FlashTarget(running, flash, log)
        async with ClusterKV.open(_map(targets), options=options) as cluster:
            for key, value in values.items():
                result = await cluster.put(key, value)
                assert result.stored == result.width
                expected = Scheme.REPLICA if key == "small" else Scheme.CODED
                assert result.scheme is expected

            def ranked(key: str) -> list[str]:
                return [link.name for link in cluster.placement(object_id(key))]

            # Later two targets are killed: the other two holders of the small value's replicas,
            # so that the one corrupted (its rank 0) is the only copy left. Every coded value has
            # a fragment on each of the six targets; corrupt one that a get reads (among the
            # first k asked) and, of another value, one that a get does not read while all
            # targets are up (past the first k), both on targets that stay up.
            killed = ranked("small")[1 : M + 1]
            read_target = next(n for n in ranked("coded-0")[:K] if n not in killed)
            unread_key, unread_target = next(
                (key, n)
                for key in ("coded-1", "coded-2", "coded-3")
                for n in ranked(key)[K:]
                if n not in killed
            )
            victims = [
                Victim(key, target, await _fragment(cluster, target, key))
                for key, target in (
                    ("coded-0", read_target),
                    ("small", ranked("small")[0]),
                    (unread_key, unread_target),
                )
            ]
            for v in victims:
                _corrupt_on_disk(targets[v.target].flash, object_id(v.key), v.fragment)

            # Every value reads back right. A get of coded-0 or small reads the corrupted
            # fragment: its target finds the CRC mismatch and drops the record.
            for key, value in values.items():
                assert await cluster.get(key) == value
            for v in victims[:2]:
                with pytest.raises(KeyNotFound):
                    await _fragment(cluster, v.target, v.key)
                assert DROPPED in targets[v.target].log.read_text()
            # The third was not read: its target still lists it, corrupt, until scrub reads it.
            unread = victims[2]
            assert object_id(unread.key) in await cluster.links[unread.target].list_all()

            report = await cluster.scrub()
            assert report.objects == len(values)
            # The unread one is reported corrupt: its target answers Unrecovered Error (0x88)
            # when its check fails; the two read before were already dropped (just missing).
            assert report.corrupt == 1
            assert report.rebuilt == len(victims)
            assert report.healthy == len(values) - len(victims)
            assert report.unrecoverable == []
            assert report.incomplete == 0
            assert report.skipped_targets == []
            assert report.moved == report.deleted == 0
            assert DROPPED in targets[unread.target].log.read_text()

            again = await cluster.scrub()
            assert again.healthy == len(values)
            assert again.rebuilt == again.corrupt == 0
            assert again.unrecoverable == []

            # The rebuilt fragments are the originals, stored anew: a newer record in the file.
            for v in victims:
                rebuilt = await _fragment(cluster, v.target, v.key)
                assert rebuilt == v.fragment
                parse_fragment(rebuilt, verify=True)
                records = _records(targets[v.target].flash, object_id(v.key))
                assert len(records) >= 2
                _, offset, length = records[-1]
                assert _value_at(targets[v.target].flash, offset, length) == v.fragment

            # Two targets die: coded values now need all four survivors, the corrupted-and-
            # rebuilt ones among them, and the small value has only its rebuilt replica left.
            for name in killed:
                process = targets[name].running.process
                assert process is not None
                process.kill()
                process.wait()
            for key, value in values.items():
                assert await cluster.get(key) == value
            states = {s.name: s.state for s in cluster.status()}
            assert all(states[name] is LinkState.DOWN for name in killed)

        # On disk, the corrupted records stay until their region is recycled; the flash checker
        # finds exactly them (on each victim's file, once its target has stopped).
        for name in {v.target for v in victims}:
            process = targets[name].running.process
            assert process is not None
            process.terminate()
            process.wait(10)
            found = check(str(targets[name].flash))
            assert found.crc_dropped == sum(1 for v in victims if v.target == name)
