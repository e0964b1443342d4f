"""Tenant isolation.

Two models, both here (docs/security.md):
- a shared KV namespace with a per-tenant salt (``KVClient(tenant=...)``, LMCache's cache_salt):
  the tenant is part of every key's identity, so tenant B can neither read nor detect A's entries;
- a subsystem per tenant, each with its own KV namespace (its own capacity: the tenant's quota),
  reachable only by the tenant's host NQN (and, with DH-HMAC-CHAP, only with its secret).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import anyio
import pytest

from kvext.client import KVClient
from kvext.engine.base import EngineLimits
from kvext.engine.memory import MemoryEngine
from kvext.keys import key_bytes, wire_key
from kvext.namespace import KeyValueNamespace
from kvext.spec import KvStatus, exist_command, retrieve_command
from nvmeof.errors import KeyNotFound, NvmeError
from nvmeof.initiator.controller import Controller
from nvmeof.spec.status import FabricsStatus, StatusCodeType
from nvmeof.target.discovery import discovery_entries
from nvmeof.target.subsystem import Subsystem, Target, TargetLimits
from nvmeof.testing import make_kv_target, serve_target

pytestmark = pytest.mark.anyio

HOST_A = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-4000-8000-000000000002"
PROMPT = "system: you are helpful | user: the same prompt, token block 0"


def test_no_tenant_is_byte_identical() -> None:
    assert wire_key(b"short") == b"short"
    assert wire_key("k") == hashlib.blake2b(b"k", digest_size=16, person=b"gpucache-str").digest()
    assert key_bytes("k") == b"k"
    assert wire_key("k", "A") != wire_key("k", "B") != wire_key("k")
    assert wire_key(b"k", "A") != wire_key("k", "A")  # str and bytes keys stay apart
    assert key_bytes("k", "A") != key_bytes("k", "B")
    with pytest.raises(ValueError, match="empty"):
        wire_key("k", "")


def engine_of(target: Target) -> MemoryEngine:
    namespace = next(iter(target.subsystems.values())).namespaces[1]
    assert isinstance(namespace, KeyValueNamespace)
    engine = namespace.engine
    assert isinstance(engine, MemoryEngine)
    return engine


async def test_tenant_cannot_read_or_detect_another() -> None:
    target = make_kv_target(capacity=16 << 20)
    engine = engine_of(target)
    with anyio.fail_after(20):
        async with serve_target(target) as rt, Controller.connect(rt.address, rt.nqn) as ctrl:
            a = KVClient(ctrl, tenant="tenant-a")
            b = KVClient(ctrl, tenant="tenant-b")
            await a.put(PROMPT, b"A's KV cache")
            assert not await b.exists(PROMPT)
            with pytest.raises(KeyNotFound):
                await b.get(PROMPT)
            await b.put(PROMPT, b"B's KV cache")
            assert len(engine) == 2  # the same prompt under two tenants: two entries
            assert await a.get(PROMPT) == b"A's KV cache"
            assert await b.get(PROMPT) == b"B's KV cache"
            await b.delete(PROMPT)
            assert await a.get(PROMPT) == b"A's KV cache"  # B's delete never touches A's entry

            # The code path: what B sends names a key the target does not hold, so the target
            # does exactly what it does for a key nobody ever stored (same lookup, same miss).
            foreign = wire_key(PROMPT, "tenant-b")
            absent = wire_key("never stored", "tenant-b")
            assert foreign not in engine
            assert absent not in engine
            looked_up: list[bytes] = []
            spy(engine, "exists", looked_up)
            spy(engine, "retrieve", looked_up)
            answers = []
            for key in (foreign, absent):
                for cmd in (exist_command(1, key), retrieve_command(1, key, 4096)):
                    buf = bytearray(4096)
                    completion = await ctrl.execute_io(cmd, into=[memoryview(buf)], check=False)
                    answers.append((completion.status, completion.dw0, completion.dw1, bytes(buf)))
            assert looked_up == [foreign, foreign, absent, absent]
            assert answers[0] == answers[2]
            assert answers[1] == answers[3]
            assert answers[0][0].sc == KvStatus.KEY_DOES_NOT_EXIST


def spy(engine: MemoryEngine, name: str, seen: list[bytes]) -> None:
    original: Callable[[bytes], object] = getattr(engine, name)

    def wrapped(key: bytes) -> object:
        seen.append(bytes(key))
        return original(key)

    setattr(engine, name, wrapped)


async def fill(client: KVClient) -> None:
    for i in range(64):
        await client.put(f"a-{i}", bytes(16 << 10))


def tenant_subsystem(nqn: str, host: str, capacity: int) -> Subsystem:
    subsystem = Subsystem(nqn=nqn, allow_any_host=False, hosts={host})
    engine = MemoryEngine(
        EngineLimits(capacity_bytes=capacity, max_value_length=1 << 20), policy="none"
    )
    subsystem.add_namespace(KeyValueNamespace(engine))
    return subsystem


async def test_subsystem_per_tenant_quota_and_access() -> None:
    target = Target(TargetLimits())
    nqn_a, nqn_b = "nqn.2024-01.io.gpucache:tenant-a", "nqn.2024-01.io.gpucache:tenant-b"
    target.add_subsystem(tenant_subsystem(nqn_a, HOST_A, capacity=256 << 10))
    target.add_subsystem(tenant_subsystem(nqn_b, HOST_B, capacity=4 << 20))
    with anyio.fail_after(20):
        async with serve_target(target) as rt:
            async with KVClient.connect(rt.address, nqn_b, hostnqn=HOST_B) as b:
                await b.put("b-entry", b"x" * 1000)
            async with KVClient.connect(rt.address, nqn_a, hostnqn=HOST_A) as a:
                with pytest.raises(NvmeError) as full:  # A's quota is its namespace's capacity
                    await fill(a)
                assert full.value.status.sct == StatusCodeType.GENERIC
            async with KVClient.connect(rt.address, nqn_b, hostnqn=HOST_B) as b:
                assert await b.get("b-entry") == b"x" * 1000  # B unaffected by A running out
                await b.put("b-more", bytes(512 << 10))  # and still has its own room
            with pytest.raises(NvmeError) as refused:
                async with KVClient.connect(rt.address, nqn_b, hostnqn=HOST_A):
                    pass
            assert refused.value.status.sc == FabricsStatus.CONNECT_INVALID_HOST
            # discovery shows each host only its own subsystem
            assert {e.subnqn for e in discovery_entries(target, HOST_A)} == {nqn_a}
            assert {e.subnqn for e in discovery_entries(target, HOST_B)} == {nqn_b}
