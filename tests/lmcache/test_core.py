"""kvext.lmcache without LMCache: the URL, the chunk store, prefetch and the MP-mode client."""

from __future__ import annotations

import os
import select

import attrs
import pytest
from _target import thread_target

from kvext.lmcache.native import GPUCacheL2Client
from kvext.lmcache.store import ChunkStore, Prefetcher, chunk_key
from kvext.lmcache.url import TargetURL
from nvmeof.testing import serve_target
from nvmeof.transport import sockets


def test_url_parses_every_parameter() -> None:
    url = TargetURL.parse(
        "nvmeof://10.0.0.5:4421/nqn.2024-01.io.gpucache:kv1"
        "?queues=8&depth=64&timeout=2.5&nsid=1&prefetch=4&salt=tenantA&digest=1&poll_us=50"
    )
    assert url == TargetURL(
        host="10.0.0.5", port=4421, subnqn="nqn.2024-01.io.gpucache:kv1", queues=8, depth=64,
        timeout=2.5, nsid=1, prefetch=4, salt="tenantA", digest=True, poll_us=50.0,
    )  # fmt: skip
    assert TargetURL.parse(str(url)) == url
    plain = TargetURL.parse("nvmeof://[::1]")
    assert (plain.host, plain.port, plain.subnqn, plain.queues, plain.poll_us) == (
        "::1", 4420, "nqn.2024-01.io.gpucache:kv0", 1, None
    )  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    ["redis://h:1/x", "nvmeof:///nqn", "nvmeof://h/n?queues=0", "nvmeof://h/n?bogus=1",
     "nvmeof://h/n?depth=x", "nvmeof://h/n?poll_us=-1", "nvmeof://h/n?poll_us=soon"],
)  # fmt: skip
def test_url_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match=r"URL|names no host|must|unknown"):
        TargetURL.parse(bad)


def test_chunk_key_keeps_modes_and_tenants_apart() -> None:
    k = "model@1@0@abc@bfloat16"
    keys = {chunk_key("v1", "", k), chunk_key("v1", "a", k), chunk_key("mp", "", k)}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="salt"):
        chunk_key("v1", "a/b", k)


def _url(running: object) -> TargetURL:
    return TargetURL(host=running.host, port=running.port, subnqn=running.nqn, queues=2)  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_chunk_store_reads_into_caller_buffer() -> None:
    async with serve_target() as running:
        store = ChunkStore(_url(running))
        try:
            full, part = os.urandom(4096), os.urandom(1000)
            await store.put("chunk/0", full)
            await store.put("chunk/1", part)
            dest = bytearray(4096)
            assert await store.get_into("chunk/0", memoryview(dest)) == 4096
            assert dest == full
            # a shorter (partial) chunk fills a prefix of the buffer, in the same one read
            assert await store.get_into("chunk/1", memoryview(dest)) == 1000
            assert dest[:1000] == part
            assert await store.get_into("chunk/missing", memoryview(dest)) is None
            # a value larger than the buffer is a miss, not an overrun
            assert await store.get_into("chunk/0", memoryview(bytearray(100))) is None
            keys = ["chunk/0", "chunk/1", "chunk/missing", "chunk/0"]
            assert await store.exists_many(keys) == [True, True, False, True]
            assert await store.prefix_hits(keys) == 2
            assert await store.prefix_hits(keys[:2]) == 2
        finally:
            await store.close()


@pytest.mark.anyio
async def test_the_url_sets_how_long_the_queues_poll() -> None:
    async with serve_target() as running:
        for poll_us, expected in ((0.0, 0.0), (350.0, 350e-6), (None, sockets.POLL)):
            store = ChunkStore(attrs.evolve(_url(running), poll_us=poll_us))
            try:
                await store.put("chunk/0", b"x")  # works either way
                client = await store.client()
                for queue in client.controller.io_queues:
                    assert queue.channel._sock.poll == expected  # type: ignore[attr-defined]
            finally:
                await store.close()


@pytest.mark.anyio
async def test_prefetch_serves_the_next_chunks_of_a_chain() -> None:
    async with serve_target() as running:
        store = ChunkStore(_url(running))
        prefetch = Prefetcher(store, window=3)
        try:
            chain = [f"p/{i}" for i in range(8)]
            data = {k: os.urandom(512) for k in chain}
            for k, v in data.items():
                await store.put(k, v)
            prefetch.learn(chain)
            for k in chain:
                dest = bytearray(512)
                assert await prefetch.get_into(k, memoryview(dest)) == 512
                assert dest == data[k]
            assert prefetch.stats.hits == 7  # every chunk after the first came from the buffer
            assert prefetch.stats.misses == 1
            # a missing chunk in the chain reads as a miss through the buffer too
            await store.delete("p/2")
            prefetch.learn(chain)
            assert await prefetch.get_into("p/1", memoryview(bytearray(512))) == 512
            assert await prefetch.get_into("p/2", memoryview(bytearray(512))) is None
        finally:
            await prefetch.close()
            await store.close()


def _wait(client: GPUCacheL2Client) -> list[tuple[int, bool, str, list[bool] | None]]:
    poller = select.poll()
    poller.register(client.event_fd(), select.POLLIN)
    done: list[tuple[int, bool, str, list[bool] | None]] = []
    while not done:
        assert poller.poll(10_000), "no completion"
        done = client.drain_completions()
    return done


def test_native_client_protocol() -> None:
    """The MP-mode connector as LMCache's NativeConnectorL2Adapter drives it."""
    with thread_target() as target:
        alice = GPUCacheL2Client(target.url())
        bob = GPUCacheL2Client(target.url("salt=bob"))
        try:
            keys = [f"m@00000000@0@{i:016x}" for i in range(4)]
            values = [bytearray(os.urandom(256)) for _ in keys]
            fid = alice.submit_batch_set(keys, [memoryview(v) for v in values])
            assert _wait(alice) == [(fid, True, "", [True] * 4)]
            fid = alice.submit_batch_exists([*keys, "m@00000000@0@ffff"])
            assert _wait(alice) == [(fid, True, "", [True] * 4 + [False])]
            fid = bob.submit_batch_exists(keys)
            assert _wait(bob) == [(fid, True, "", [False] * 4)]  # another tenant's salt
            outs = [bytearray(256) for _ in keys]
            fid = alice.submit_batch_get(keys, [memoryview(o) for o in outs])
            assert _wait(alice) == [(fid, True, "", [True] * 4)]
            assert outs == values
            fid = alice.submit_batch_delete(keys[:2])
            assert _wait(alice) == [(fid, True, "", [True, True])]
            fid = alice.submit_batch_get(keys, [memoryview(o) for o in outs])
            assert _wait(alice) == [(fid, True, "", [False, False, True, True])]
        finally:
            alice.close()
            bob.close()
