"""The discovery service through the real initiator (REFERENCE 8.1, 9.1)."""

from __future__ import annotations

import functools
import struct

import anyio
import pytest

from nvmeof.errors import NvmeError
from nvmeof.initiator.controller import Controller
from nvmeof.initiator.discovery import discover, discovery_controller, read_discovery_log
from nvmeof.spec.discovery import (
    DISCOVERY_LOG_HEADER_SIZE,
    DiscoveryEntry,
    DiscoveryLogHeader,
    SubsystemType,
    TransportType,
    unpack_discovery_log,
)
from nvmeof.spec.fabrics import DISCOVERY_NQN
from nvmeof.spec.features import (
    FeatureId,
    LogPageId,
    encode_number_of_queues,
    get_log_page_command,
    set_features_command,
)
from nvmeof.spec.identify import Cns, ControllerType, IdentifyController, identify_command
from nvmeof.spec.status import GenericStatus, StatusCodeType
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import ListenAddress, Subsystem
from nvmeof.testing import TEST_NQN, make_kv_target, serve_target

pytestmark = pytest.mark.anyio

HOST_A = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-00000000000a"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-00000000000b"
TIMEOUT = 20.0


async def _log_bytes(ctrl: Controller, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await ctrl.admin.execute(
        get_log_page_command(LogPageId.DISCOVERY, length, offset=offset), into=[memoryview(buf)]
    )
    return bytes(buf)


async def test_discover_lists_the_subsystem_on_its_listener() -> None:
    with anyio.fail_after(TIMEOUT):
        async with serve_target() as rt:
            entries = await discover(rt.address, hostnqn=HOST_A)
    assert entries == [
        DiscoveryEntry(
            subnqn=TEST_NQN,
            traddr="127.0.0.1",
            trsvcid=str(rt.port),
            trtype=TransportType.TCP,
            subtype=SubsystemType.NVM,
            treq=0x4,
            portid=1,
            cntlid=0xFFFF,
            asqsz=32,
        )
    ]


async def test_discovery_controller_identify() -> None:
    with anyio.fail_after(TIMEOUT):
        async with serve_target() as rt, discovery_controller(rt.address) as ctrl:
            buf = bytearray(4096)
            await ctrl.admin.execute(identify_command(Cns.CONTROLLER), into=[memoryview(buf)])
            ident = IdentifyController.unpack(buf)
            assert ident.cntrltype == ControllerType.DISCOVERY
            assert ident.oaes == 0  # no events advertised that it never sends
            assert ident.subnqn == DISCOVERY_NQN
            assert ident.cntlid == ctrl.cntlid
            assert ident.nn == 0
            assert ident.lpa & 0x4, "extended Get Log Page (LPO) supported"
            assert ident.kas != 0
            assert ident.sgls & 0x3 == 0x1
            # no namespaces behind a discovery controller
            completion = await ctrl.admin.execute(
                identify_command(Cns.ACTIVE_NAMESPACES), into=[memoryview(buf)], check=False
            )
            assert completion.status.sc == GenericStatus.INVALID_FIELD


async def test_discovery_controller_has_no_io_queues() -> None:
    with anyio.fail_after(TIMEOUT):
        async with serve_target() as rt, discovery_controller(rt.address) as ctrl:
            completion = await ctrl.admin.execute(
                set_features_command(FeatureId.NUMBER_OF_QUEUES, encode_number_of_queues(0, 0)),
                check=False,
            )
            assert not completion.status.success
            with pytest.raises(NvmeError):
                await Controller._connect_queue(ctrl.options, qid=1, depth=8, cntlid=ctrl.cntlid)


async def test_log_page_arbitrary_dword_offsets() -> None:
    target = make_kv_target()
    target.add_subsystem(Subsystem(nqn="nqn.2024-01.io.gpucache:second"))
    with anyio.fail_after(TIMEOUT):
        async with serve_target(target) as rt, discovery_controller(rt.address) as ctrl:
            whole = await _log_bytes(ctrl, 0, 3 * 1024)
            header, entries = unpack_discovery_log(whole)
            assert header.numrec == 2
            assert [e.subnqn for e in entries] == sorted(target.subsystems)
            for offset, length in [(4, 16), (1020, 8), (1028, 2040), (2044, 4), (3068, 4)]:
                assert await _log_bytes(ctrl, offset, length) == whole[offset : offset + length]
            # past the end: zeros (as nvmet)
            assert await _log_bytes(ctrl, 3 * 1024, 8) == bytes(8)
            bad = await ctrl.admin.execute(
                get_log_page_command(LogPageId.DISCOVERY, 8, offset=2), check=False
            )
            assert (bad.status.sct, bad.status.sc) == (
                StatusCodeType.GENERIC,
                GenericStatus.INVALID_FIELD,
            )
            other = await ctrl.admin.execute(
                get_log_page_command(LogPageId.SMART, 512), check=False
            )
            assert not other.status.success


async def test_generation_counter_bumps_on_every_change() -> None:
    target = make_kv_target()
    with anyio.fail_after(TIMEOUT):
        async with serve_target(target) as rt, discovery_controller(rt.address) as ctrl:
            first, _ = await read_discovery_log(ctrl)
            again, _ = await read_discovery_log(ctrl)
            assert again.genctr == first.genctr, "no change, no bump"
            target.add_subsystem(Subsystem(nqn="nqn.2024-01.io.gpucache:added"))
            added, entries = await read_discovery_log(ctrl)
            assert added.genctr > first.genctr
            assert len(entries) == 2
            target.subsystems[TEST_NQN].hosts.add(HOST_B)
            target.subsystems[TEST_NQN].allow_any_host = False
            restricted, _ = await read_discovery_log(ctrl)
            assert restricted.genctr > added.genctr
            del target.subsystems["nqn.2024-01.io.gpucache:added"]
            removed, _ = await read_discovery_log(ctrl)
            assert removed.genctr > restricted.genctr


async def test_hosts_see_only_subsystems_they_may_connect_to() -> None:
    target = make_kv_target(hosts=[HOST_A])
    with anyio.fail_after(TIMEOUT):
        async with serve_target(target) as rt:
            assert [e.subnqn for e in await discover(rt.address, hostnqn=HOST_A)] == [TEST_NQN]
            assert await discover(rt.address, hostnqn=HOST_B) == []


async def test_subsystem_listeners_and_the_discovery_port() -> None:
    target = make_kv_target()
    pinned = Subsystem(nqn="nqn.2024-01.io.gpucache:pinned")
    pinned.listeners.append(ListenAddress(traddr="192.0.2.7", trsvcid="4421"))
    target.add_subsystem(pinned)
    server = TargetServer(target)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            io = server.listen("127.0.0.1", 0)
            disc = server.listen("127.0.0.1", 0)
            await tg.start(server.serve_listener, io)
            await tg.start(functools.partial(server.serve_listener, disc, discovery=True))
            entries = await discover(("127.0.0.1", disc.port))
            tg.cancel_scope.cancel()
    by_nqn = {(e.subnqn, e.subtype): e for e in entries}
    assert by_nqn[(TEST_NQN, SubsystemType.NVM)].trsvcid == str(io.port)
    assert by_nqn[("nqn.2024-01.io.gpucache:pinned", SubsystemType.NVM)].traddr == "192.0.2.7"
    current = by_nqn[(DISCOVERY_NQN, SubsystemType.CURRENT_DISCOVERY)]
    assert current.trsvcid == str(disc.port)
    assert len(entries) == 3


async def test_libnvme_read_pattern_header_prefix() -> None:
    with anyio.fail_after(TIMEOUT):
        async with serve_target() as rt, discovery_controller(rt.address) as ctrl:
            prefix = await _log_bytes(ctrl, 0, 20)
            header = DiscoveryLogHeader.unpack(prefix)
            assert header.numrec == 1
            assert struct.unpack_from("<H", prefix, 16)[0] == 0  # RECFMT
            entry = await _log_bytes(ctrl, DISCOVERY_LOG_HEADER_SIZE, 1024)
            assert DiscoveryEntry.unpack(entry).subnqn == TEST_NQN
