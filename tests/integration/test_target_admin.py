"""The target's admin path through the real initiator (REFERENCE 3, 4, 6.1, 6.5)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator

import anyio
import pytest

from kvext.client import KVClient
from kvext.spec import KV_CSI, MAX_KEY_LENGTH, KvIdentifyNamespace, KvOpcode
from nvmeof.errors import NvmeError
from nvmeof.initiator.controller import Controller
from nvmeof.spec.admin import (
    ABORT_NOT_ABORTED,
    abort_command,
    async_event_request_command,
    keep_alive_command,
)
from nvmeof.spec.command import AdminOpcode, Command
from nvmeof.spec.completion import Completion
from nvmeof.spec.features import (
    EFFECTS_LOG_SIZE,
    FeatureId,
    LogPageId,
    decode_number_of_queues,
    encode_number_of_queues,
    get_features_command,
    get_log_page_command,
    set_features_command,
)
from nvmeof.spec.identify import (
    Cns,
    CsiIndependentNamespace,
    IdentifyController,
    IdentifyNamespace,
    NamespaceIdType,
    identify_command,
    unpack_io_command_set_vectors,
    unpack_namespace_id_descriptors,
    unpack_namespace_list,
)
from nvmeof.spec.properties import (
    ControllerCapabilities,
    ControllerStatus,
    PropertyOffset,
    ShutdownStatus,
)
from nvmeof.spec.status import CommandSpecificStatus, GenericStatus, StatusCodeType
from nvmeof.testing import RunningTarget, make_kv_target, serve_target

pytestmark = pytest.mark.anyio

MAX_VALUE = 4 << 20
IO_QUEUES = 2
TEST_TIMEOUT = 20.0


@contextlib.asynccontextmanager
async def connected(
    *, max_value: int = MAX_VALUE, **options: object
) -> AsyncIterator[tuple[RunningTarget, Controller]]:
    with anyio.fail_after(TEST_TIMEOUT):
        async with serve_target(make_kv_target(max_value_length=max_value)) as rt:
            ctrl_options: dict[str, object] = {"io_queues": IO_QUEUES, "timeout": 10.0}
            ctrl_options.update(options)
            async with Controller.connect(rt.address, rt.nqn, **ctrl_options) as ctrl:  # type: ignore[arg-type]
                yield rt, ctrl


async def admin(
    ctrl: Controller, cmd: Command, size: int = 0, *, check: bool = True
) -> tuple[Completion, bytes]:
    buf = bytearray(size)
    into = [memoryview(buf)] if size else []
    completion = await ctrl.admin.execute(cmd, into=into, check=check, timeout=10.0)
    return completion, bytes(buf)


async def identify(ctrl: Controller, cns: int, *, nsid: int = 0, csi: int = 0) -> bytes:
    _, data = await admin(ctrl, identify_command(cns, nsid=nsid, csi=csi), 4096)
    return data


def status_of(completion: Completion) -> tuple[int, int]:
    return completion.status.sct, completion.status.sc


# --------------------------------------------------------------------------------------------------
# Identify
# --------------------------------------------------------------------------------------------------
async def test_identify_controller() -> None:
    async with connected() as (rt, ctrl):
        page = await identify(ctrl, Cns.CONTROLLER)
        ident = IdentifyController.unpack(page)
        assert ident.cntlid == ctrl.cntlid, "CNTLID must equal the one Connect returned"
        assert ident.cntlid == ctrl.admin.cntlid
        assert ident.subnqn == rt.nqn
        assert page[768 + len(rt.nqn)] == 0, "SUBNQN is NUL-terminated"
        assert ident.ioccsz >= 4
        assert ident.iorcsz >= 1
        assert ident.icdoff == 0
        assert ident.kas != 0
        assert ident.sgls & 0x3 == 0x1, "SGLs supported, byte aligned"
        assert (ident.sqes, ident.cqes) == (0x66, 0x44)
        assert ident.cntrltype == 1  # I/O controller
        assert ident.nn >= 1
        assert ident.mnan == ident.nn
        assert ident.maxcmd >= 1
        assert ident.lpa & 0x2, "the Commands Supported and Effects log is there"
        assert ident.ver == await ctrl.get_property(PropertyOffset.VS)
        assert ident.sn.strip()
        assert ident.mn.strip()
        # the cached copy from bring-up says the same
        assert ctrl.identify is not None
        assert ctrl.identify.cntlid == ident.cntlid


@pytest.mark.parametrize(
    "max_value",
    [
        1 << 20,
        64 << 20,  # make_kv_target's default
        3 << 20,
        100 << 20,
    ],
)
async def test_mdts_covers_the_largest_value(max_value: int) -> None:
    """MDTS and the KV value limit agree: a maximal value fits one transfer (REFERENCE 6.5)."""
    async with connected(max_value=max_value, io_queues=1) as (_, ctrl):
        ident = IdentifyController.unpack(await identify(ctrl, Cns.CONTROLLER))
        kv = KvIdentifyNamespace.unpack(await identify(ctrl, Cns.CSI_NAMESPACE, nsid=1, csi=KV_CSI))
        advertised = kv.formats[0].max_value_length
        assert advertised == max_value
        assert ident.mdts == 0 or (4096 << ident.mdts) >= advertised


async def test_each_controller_gets_its_own_cntlid() -> None:
    async with (
        connected() as (rt, ctrl),
        Controller.connect(rt.address, rt.nqn, timeout=10.0) as other,
    ):
        assert other.cntlid != ctrl.cntlid
        ident = IdentifyController.unpack(await identify(other, Cns.CONTROLLER))
        assert ident.cntlid == other.cntlid


async def test_one_command_in_flight_still_connects() -> None:
    # SQSIZE is 0's based and 0 is invalid: a depth of 1 asks for a 2-entry queue.
    async with (
        serve_target() as rt,
        KVClient.connect(rt.address, rt.nqn, queue_depth=1, timeout=10.0) as kv,
    ):
        await kv.put("one", b"at a time")
        assert await kv.get("one") == b"at a time"


async def test_namespace_lists_and_descriptors() -> None:
    async with connected() as (_, ctrl):
        active = unpack_namespace_list(await identify(ctrl, Cns.ACTIVE_NAMESPACES))
        assert active == [1]
        assert unpack_namespace_list(await identify(ctrl, Cns.ACTIVE_NAMESPACES, nsid=1)) == []
        kv_only = await identify(ctrl, Cns.CSI_ACTIVE_NAMESPACES, csi=KV_CSI)
        assert unpack_namespace_list(kv_only) == [1]
        assert unpack_namespace_list(await identify(ctrl, Cns.CSI_ACTIVE_NAMESPACES, csi=0)) == []

        descriptors = unpack_namespace_id_descriptors(
            await identify(ctrl, Cns.NAMESPACE_ID_DESCRIPTORS, nsid=1)
        )
        csi = [d for d in descriptors if d.nidt == NamespaceIdType.CSI]
        assert len(csi) == 1
        assert csi[0].value == bytes([KV_CSI])
        for d in descriptors:
            if d.nidt in (NamespaceIdType.NGUID, NamespaceIdType.UUID):
                assert len(d.value) == 16
                assert any(d.value)
        assert ctrl.namespaces[1].csi == KV_CSI

        independent = CsiIndependentNamespace.unpack(
            await identify(ctrl, Cns.CSI_INDEPENDENT_NAMESPACE, nsid=1)
        )
        assert independent.nstat & 1, "namespace ready"

        vectors = unpack_io_command_set_vectors(await identify(ctrl, Cns.IO_COMMAND_SET))
        assert vectors[0] & 0b11 == 0b11, "NVM and KV enabled together"


async def test_kv_identify_namespace() -> None:
    async with connected() as (_, ctrl):
        kv = KvIdentifyNamespace.unpack(await identify(ctrl, Cns.CSI_NAMESPACE, nsid=1, csi=KV_CSI))
        assert kv.formats, "at least one KV format"
        fmt = kv.formats[0]
        assert fmt.max_key_length == MAX_KEY_LENGTH == 16
        assert fmt.max_value_length == MAX_VALUE
        assert kv.nsze > 0
        # KV identify controller: 4096 bytes, success
        await identify(ctrl, Cns.CSI_CONTROLLER, csi=KV_CSI)
        # CNS 0 is the NVM-shaped page hosts read: it must not look unallocated
        nvm = IdentifyNamespace.unpack(await identify(ctrl, Cns.NAMESPACE, nsid=1))
        assert nvm.ncap != 0
        assert nvm.nsze >= nvm.ncap
        assert nvm.lbaf[nvm.flbas & 0xF].lbads >= 9


async def test_kv_identify_namespace_tracks_use() -> None:
    async with connected() as (_, ctrl):
        before = KvIdentifyNamespace.unpack(
            await identify(ctrl, Cns.CSI_NAMESPACE, nsid=1, csi=KV_CSI)
        )
        client = KVClient(ctrl)
        await client.put(b"usage", bytes(100_000))
        after = KvIdentifyNamespace.unpack(
            await identify(ctrl, Cns.CSI_NAMESPACE, nsid=1, csi=KV_CSI)
        )
        assert after.nuse > before.nuse


async def test_identify_inactive_and_invalid_namespaces() -> None:
    async with connected() as (_, ctrl):
        assert await identify(ctrl, Cns.NAMESPACE, nsid=5) == bytes(4096)  # inactive: zeros
        for cns, nsid in ((Cns.NAMESPACE, 0xFFFFFFFF), (Cns.ACTIVE_NAMESPACES, 0xFFFFFFFE)):
            completion, _ = await admin(ctrl, identify_command(cns, nsid=nsid), 4096, check=False)
            assert status_of(completion) == (0, GenericStatus.INVALID_NAMESPACE_OR_FORMAT)


@pytest.mark.parametrize("cns", [0x04, 0x0A, 0x10, 0x1F, 0xFF])
async def test_identify_unknown_cns(cns: int) -> None:
    async with connected() as (_, ctrl):
        completion, _ = await admin(ctrl, identify_command(cns, nsid=1), 4096, check=False)
        assert status_of(completion) == (0, GenericStatus.INVALID_FIELD)
        assert completion.status.dnr


# --------------------------------------------------------------------------------------------------
# Features and log pages
# --------------------------------------------------------------------------------------------------
async def test_features_number_of_queues() -> None:
    async with connected() as (_, ctrl):
        current, _ = await admin(ctrl, get_features_command(FeatureId.NUMBER_OF_QUEUES))
        nsqa, ncqa = decode_number_of_queues(current.dw0)
        assert min(nsqa, ncqa) + 1 >= len(ctrl.io_queues) == IO_QUEUES
        # asking again does not change what was granted
        again, _ = await admin(
            ctrl, set_features_command(FeatureId.NUMBER_OF_QUEUES, encode_number_of_queues(7, 7))
        )
        assert decode_number_of_queues(again.dw0) == (nsqa, ncqa)
        bad, _ = await admin(
            ctrl,
            set_features_command(FeatureId.NUMBER_OF_QUEUES, encode_number_of_queues(0xFFFF, 0)),
            check=False,
        )
        assert status_of(bad) == (0, GenericStatus.INVALID_FIELD)


async def test_features_keep_alive_timer() -> None:
    async with connected(kato_ms=20_000) as (_, ctrl):
        kato, _ = await admin(ctrl, get_features_command(FeatureId.KEEP_ALIVE_TIMER))
        assert kato.dw0 == 20_000
        await admin(ctrl, set_features_command(FeatureId.KEEP_ALIVE_TIMER, 15_000))
        kato, _ = await admin(ctrl, get_features_command(FeatureId.KEEP_ALIVE_TIMER))
        assert kato.dw0 == 15_000
        await ctrl.keep_alive()


async def test_set_features_kato_restarts_the_timer() -> None:
    with anyio.fail_after(TEST_TIMEOUT):
        async with serve_target() as rt:
            assert rt.target is not None
            controllers = rt.target.subsystems[rt.nqn].controllers
            ctrl = await Controller.connect(rt.address, rt.nqn, kato_ms=0, timeout=10.0)
            try:
                await anyio.sleep(2.0)  # idle, with no keep-alive timer running
                await admin(ctrl, set_features_command(FeatureId.KEEP_ALIVE_TIMER, 2500))
                await anyio.sleep(1.6)  # well inside the new 2500 ms
                await ctrl.keep_alive()
                assert ctrl.cntlid in controllers
            finally:
                with anyio.CancelScope(shield=True):
                    await ctrl.close(shutdown=False)


async def test_features_kv_configuration_and_unknown() -> None:
    async with connected() as (_, ctrl):
        kv, _ = await admin(ctrl, get_features_command(FeatureId.KEY_VALUE_CONFIGURATION, nsid=1))
        assert kv.dw0 & 1 == 0, "EDNEK defaults to 0"
        for cmd in (
            get_features_command(0x7E),
            set_features_command(0x7E, 1),
            set_features_command(FeatureId.KEEP_ALIVE_TIMER, 1000, save=True),
        ):
            completion, _ = await admin(ctrl, cmd, check=False)
            assert not completion.status.success
        completion, _ = await admin(ctrl, get_features_command(0x7E), check=False)
        assert status_of(completion) == (0, GenericStatus.INVALID_FIELD)


async def test_commands_supported_and_effects_for_kv() -> None:
    async with connected() as (_, ctrl):
        _, page = await admin(
            ctrl,
            get_log_page_command(
                LogPageId.COMMANDS_SUPPORTED_AND_EFFECTS, EFFECTS_LOG_SIZE, csi=KV_CSI
            ),
            EFFECTS_LOG_SIZE,
        )
        acs = struct.unpack_from("<256I", page, 0)
        iocs = struct.unpack_from("<256I", page, 1024)
        assert iocs[KvOpcode.STORE] == 0x3
        assert iocs[KvOpcode.DELETE] == 0x3
        assert iocs[KvOpcode.RETRIEVE] == 0x1
        assert iocs[KvOpcode.LIST] == 0x1
        assert iocs[KvOpcode.EXIST] == 0x1
        assert iocs[KvOpcode.FLUSH] == 0x1
        assert sum(1 for e in iocs if e) == 6
        for opcode in (AdminOpcode.IDENTIFY, AdminOpcode.GET_LOG_PAGE, AdminOpcode.KEEP_ALIVE):
            assert acs[opcode] & 0x1
        # for the NVM command set there is no I/O opcode here
        _, nvm = await admin(
            ctrl,
            get_log_page_command(LogPageId.COMMANDS_SUPPORTED_AND_EFFECTS, EFFECTS_LOG_SIZE, csi=0),
            EFFECTS_LOG_SIZE,
        )
        assert not any(struct.unpack_from("<256I", nvm, 1024))
        # an offset reads the same page from there on
        _, tail = await admin(
            ctrl,
            get_log_page_command(
                LogPageId.COMMANDS_SUPPORTED_AND_EFFECTS, 1024, offset=1024, csi=KV_CSI
            ),
            1024,
        )
        assert tail == page[1024:2048]


async def test_log_page_errors() -> None:
    async with connected() as (_, ctrl):
        unknown, _ = await admin(ctrl, get_log_page_command(0x7E, 512), 512, check=False)
        assert not unknown.status.success
        assert status_of(unknown) in (
            (0, GenericStatus.INVALID_FIELD),
            (StatusCodeType.COMMAND_SPECIFIC, CommandSpecificStatus.INVALID_LOG_PAGE),
        )
        unaligned, _ = await admin(
            ctrl, get_log_page_command(LogPageId.SMART, 512, offset=2), 512, check=False
        )
        assert status_of(unaligned) == (0, GenericStatus.INVALID_FIELD)
        beyond, _ = await admin(
            ctrl, get_log_page_command(LogPageId.SMART, 512, offset=4096), 512, check=False
        )
        assert status_of(beyond) == (0, GenericStatus.INVALID_FIELD)
        smart, data = await admin(ctrl, get_log_page_command(LogPageId.SMART, 512), 512)
        assert smart.status.success
        assert len(data) == 512


# --------------------------------------------------------------------------------------------------
# Properties, shutdown, Abort, AER, unknown commands
# --------------------------------------------------------------------------------------------------
async def test_properties_after_bring_up() -> None:
    async with connected() as (_, ctrl):
        cap = ControllerCapabilities.from_int(await ctrl.get_property(PropertyOffset.CAP, size=8))
        assert cap.io_command_sets_supported, "CAP bit 43: KV needs CC.CSS = 110b"
        assert cap.mqes >= 1
        csts = ControllerStatus.from_int(await ctrl.get_property(PropertyOffset.CSTS))
        assert csts.rdy
        assert not csts.cfs
        assert csts.shst == ShutdownStatus.NORMAL_OPERATION
        assert await ctrl.get_property(PropertyOffset.VS) >= 0x00010300


async def test_shutdown_reports_complete() -> None:
    async with connected() as (_, ctrl):
        client = KVClient(ctrl)
        await client.put(b"before-shutdown", b"v")
        await ctrl.shutdown()  # CC.SHN = 01b, polls CSTS.SHST
        csts = ControllerStatus.from_int(await ctrl.get_property(PropertyOffset.CSTS))
        assert csts.shst == ShutdownStatus.COMPLETE
        # the controller no longer takes I/O
        with pytest.raises(NvmeError) as info:
            await client.get(b"before-shutdown")
        assert info.value.status.sc == GenericStatus.COMMAND_SEQUENCE_ERROR


async def test_abort_says_not_aborted() -> None:
    async with connected() as (_, ctrl):
        for sqid, cid in ((0, 5), (1, 0), (2, 0xFFFF)):
            completion, _ = await admin(ctrl, abort_command(sqid, cid))
            assert completion.status.success
            assert completion.dw0 & ABORT_NOT_ABORTED == 1


async def test_async_event_request_is_held() -> None:
    async with connected() as (_, ctrl):
        ident = IdentifyController.unpack(await identify(ctrl, Cns.CONTROLLER))
        outstanding = ident.aerl + 1
        for _ in range(outstanding):
            with anyio.move_on_after(0.2) as scope:
                await ctrl.admin.execute(async_event_request_command())
            assert scope.cancelled_caught, "an AER completes only when an event happens"
        # the admin queue keeps working with AERs held
        await ctrl.keep_alive()
        await identify(ctrl, Cns.CONTROLLER)
        # one AER more than AERL + 1 is refused at once
        completion = await ctrl.admin.execute(
            async_event_request_command(), check=False, timeout=10.0
        )
        assert status_of(completion) == (
            StatusCodeType.COMMAND_SPECIFIC,
            CommandSpecificStatus.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED,
        )


@pytest.mark.parametrize("opcode", [0x00, 0x01, 0x04, 0x05, 0x10, 0x7C, 0x80, 0x84, 0xC0])
async def test_unknown_admin_opcode(opcode: int) -> None:
    async with connected() as (_, ctrl):
        completion, _ = await admin(ctrl, Command(opcode=opcode), check=False)
        assert status_of(completion) == (0, GenericStatus.INVALID_OPCODE)
        completion, _ = await admin(ctrl, keep_alive_command())
        assert completion.status.success


async def test_kv_io_after_admin_traffic() -> None:
    """Bring-up plus all the admin traffic above leaves the I/O path intact."""
    async with connected() as (_, ctrl):
        client = KVClient(ctrl)
        for i in range(IO_QUEUES * 2):  # touch every I/O queue
            await client.put(b"k%d" % i, bytes([i]) * 5000)
        await identify(ctrl, Cns.CONTROLLER)
        for i in range(IO_QUEUES * 2):
            assert await client.get(b"k%d" % i) == bytes([i]) * 5000
