"""A lean, pipelined NVMe/TCP KV load generator: what redis-benchmark is to Redis.

``bench.scaling`` measures what a target's cores buy. Our own initiator (``KVClient``) spends
about as much CPU per command as the target does, so on a small machine its client processes
take the cores a second target worker would use. This generator spends as little as Python
allows per command, so nearly all the CPU goes to the target:

- the connection setup is ordinary NVMe/TCP (ICReq/ICResp, admin Connect with KATO 0, CC.EN,
  Identify, Number of Queues, one TCP connection per I/O queue with its own Connect), done with
  blocking sockets and the sans-IO codecs of ``nvmeof.spec``/``nvmeof.tcp.pdu``;
- it reads the shard map (``kvext.sharding``) and opens a controller on every worker, so each key
  goes to the worker that owns it (nothing is forwarded);
- every command capsule is built once (a Store of a value that fits the capsule carries it
  in-capsule; a larger one is a transport SGL that the target pulls with R2T, answered with
  H2CData views of the value); ``inflight`` commands stay outstanding; a completed command is
  sent again at once;
- non-blocking sockets, one ``poll`` per round, many PDUs per ``sendmsg``, ``recv_into`` a
  preallocated buffer parsed in place (CapsuleResp, C2HData, R2T); Retrieve data is counted (and
  with ``verify`` CRC-checked against the value stored) but not kept: without ``verify``, the
  rest of each C2HData of a large value is dropped in the kernel (``recv_into(..., MSG_TRUNC)``,
  which TCP sockets read as "discard"), so a large get costs the client almost no copy.

Every completion's status is checked: a failed command, a short or misplaced C2HData, an R2T
outside the value, a TermReq or a closed connection raise ``LoadError`` (the run fails, nothing
is counted). Keys are the bytes ``{prefix}.{size:x}.{n}`` (at most 16, so the wire key is the
key itself); slot ``i`` of a connection stores ``value[8*i : 8*i + size]`` of one random buffer,
so every key has its own value.

    python -m bench.loadgen 127.0.0.1:4420 --nqn NQN --sizes 4KiB --seconds 2 --inflight 32
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import attrs

from bench.raw_tcp import tune
from kvext.sharding import ShardMap, owner
from kvext.spec import KV_CSI, KvStatus, retrieve_command, store_command
from nvmeof.spec.command import Command
from nvmeof.spec.fabrics import (
    CONNECT_AUTHREQ_ASCR,
    CONNECT_AUTHREQ_ATR,
    DYNAMIC_CNTLID,
    ConnectData,
    connect_command,
    property_get_command,
    property_set_command,
)
from nvmeof.spec.features import (
    FeatureId,
    decode_number_of_queues,
    encode_number_of_queues,
    set_features_command,
)
from nvmeof.spec.identify import Cns, IdentifyController, identify_command
from nvmeof.spec.properties import (
    CommandSetSelection,
    ControllerCapabilities,
    ControllerConfiguration,
    ControllerStatus,
    PropertyOffset,
)
from nvmeof.spec.sgl import SglDescriptor, SglIdentifier
from nvmeof.spec.status import Status
from nvmeof.tcp.pdu import (
    IC_PDU_SIZE,
    CapsuleCmdHeader,
    H2CDataHeader,
    ICReq,
    ICResp,
    PduFlags,
    PduType,
    build_header,
)
from nvmeof.units import parse_size

_CH = struct.Struct("<BBBBI")  # PDU type, flags, HLEN, PDO, PLEN
_CQE = struct.Struct("<IIHHHH")  # DW0, DW1, SQHD, SQID, CID, status
_XFER = struct.Struct("<HHII")  # CCCID, TTAG, DATAO/R2TO, DATAL/R2TL
_CAPSULE_RESP = int(PduType.CAPSULE_RESP)
_C2H_DATA = int(PduType.C2H_DATA)
_R2T = int(PduType.R2T)
_C2H_TERM_REQ = int(PduType.C2H_TERM_REQ)
_LAST_PDU = int(PduFlags.LAST_PDU)
_SUCCESS = int(PduFlags.SUCCESS)
_STATUS_MASK = 0x0FFE  # SC and SCT; bit 0 is the phase tag, the top bits are hints
_IOV_MAX = 512
_RECV_BUFFER = 1 << 20
_DISCARD_MIN = 16384  # Retrieve data left to come from which it is discarded in the kernel
_HEADER_READ = 1024  # bytes read at a PDU boundary of a large get (the rest is dropped)
_SLOT_STRIDE = 8  # slot i's value starts 8*i bytes into the shared random buffer
NSID = 1


class LoadError(RuntimeError):
    """A command failed or the target broke the protocol: the run is void."""


def describe_status(field: int) -> str:
    """A CQE status field in words, with the KV command set's own codes by name."""
    status = Status.from_field(field)
    if status.sct == 0 and status.sc in KvStatus._value2member_map_:
        return f"{KvStatus(status.sc).name} ({status})"
    return str(status)


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise LoadError("the target closed the connection during setup")
        got += n
    return buf


# --- setup: one blocking NVMe/TCP connection ------------------------------------------------------
@attrs.define
class Link:
    """One NVMe/TCP connection (ICReq done), used synchronously: one command at a time."""

    sock: socket.socket
    cpda: int
    maxh2cdata: int

    @classmethod
    def open(cls, host: str, port: int, *, timeout: float = 30.0) -> Link:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            tune(sock)
            sock.sendall(ICReq().to_bytes())
            raw = _recv_exact(sock, IC_PDU_SIZE)
            if raw[0] != PduType.IC_RESP:
                raise LoadError(f"expected ICResp, got PDU type 0x{raw[0]:02x}")
            resp = ICResp.unpack_from(raw)
            if resp.header_digest or resp.data_digest:
                raise LoadError("the target enabled a digest that was not asked for")
        except BaseException:
            sock.close()
            raise
        return cls(sock, resp.cpda, resp.maxh2cdata)

    def execute(
        self, command: Command, *, data: bytes = b"", read: int = 0, what: str = "command"
    ) -> tuple[int, bytearray]:
        """Send ``command`` (``data`` in the capsule); return (DW1:DW0, the C2H data read)."""
        sqe = bytearray(64)
        command.pack_into(sqe)
        header = build_header(CapsuleCmdHeader(sqe), data_length=len(data), pda=self.cpda)
        self.sock.sendall(bytes(header) + data)
        into = bytearray(read)
        while True:
            ch = _recv_exact(self.sock, 8)
            ptype, flags, _hlen, pdo, plen = _CH.unpack(ch)
            rest = _recv_exact(self.sock, plen - 8)
            if ptype == _C2H_DATA:
                _cccid, _ttag, datao, datal = _XFER.unpack_from(rest, 0)
                if datao + datal > read:
                    raise LoadError(f"{what}: C2HData {datao}+{datal} beyond {read} bytes")
                into[datao : datao + datal] = rest[pdo - 8 : pdo - 8 + datal]
                if flags & _SUCCESS:
                    return 0, into
            elif ptype == _CAPSULE_RESP:
                dw0, dw1, _sqhd, _sqid, _cid, field = _CQE.unpack_from(rest, 0)
                if field & _STATUS_MASK:
                    status = describe_status(field)
                    raise LoadError(f"{what} failed: {status} (dw0 0x{dw0:x})")
                return dw0 | dw1 << 32, into
            else:
                raise LoadError(f"{what}: unexpected PDU type 0x{ptype:02x} during setup")

    def connect(
        self, subnqn: str, host: HostIdentity, *, qid: int, depth: int, cntlid: int, cattr: int = 0
    ) -> int:
        data = ConnectData(hostid=host.hostid, cntlid=cntlid, subnqn=subnqn, hostnqn=host.hostnqn)
        command = connect_command(qid=qid, sqsize=depth - 1, kato_ms=0, cattr=cattr)
        result, _ = self.execute(command, data=data.pack(), what=f"connect qid {qid}")
        dw0 = result & 0xFFFFFFFF
        if dw0 >> 16 & (CONNECT_AUTHREQ_ATR | CONNECT_AUTHREQ_ASCR) >> 16:
            raise LoadError("the target requires authentication; the load generator has none")
        return dw0 & 0xFFFF


@attrs.frozen
class HostIdentity:
    hostnqn: str
    hostid: bytes

    @classmethod
    def new(cls) -> HostIdentity:
        hostid = uuid.uuid4()
        return cls(f"nqn.2014-08.org.nvmexpress:uuid:{hostid}", hostid.bytes)


@attrs.define
class ControllerSetup:
    """An enabled controller on one worker: its admin link, CNTLID and queue limits."""

    host: str
    port: int
    admin: Link
    cntlid: int
    queues: int  # I/O queues granted
    depth: int  # entries per I/O queue (MQES/MAXCMD honoured)
    max_in_capsule: int


def open_controller(
    host: str, port: int, subnqn: str, identity: HostIdentity, *, queues: int, depth: int
) -> ControllerSetup:
    admin = Link.open(host, port)
    try:
        cntlid = admin.connect(subnqn, identity, qid=0, depth=32, cntlid=DYNAMIC_CNTLID)
        cap, _ = admin.execute(property_get_command(PropertyOffset.CAP, size=8), what="get CAP")
        caps = ControllerCapabilities.from_int(cap)
        css = (
            CommandSetSelection.ALL_IO
            if caps.io_command_sets_supported
            else CommandSetSelection.NVM
        )
        cc = ControllerConfiguration(en=False, css=css, iosqes=6, iocqes=4)
        admin.execute(property_set_command(PropertyOffset.CC, cc.to_int()), what="set CC")
        cc = attrs.evolve(cc, en=True)
        admin.execute(property_set_command(PropertyOffset.CC, cc.to_int()), what="enable")
        deadline = time.monotonic() + max((caps.to + 1) / 2, 5.0)
        while True:
            csts_raw, _ = admin.execute(property_get_command(PropertyOffset.CSTS), what="CSTS")
            csts = ControllerStatus.from_int(csts_raw)
            if csts.cfs:
                raise LoadError(f"controller {cntlid} reports fatal status on enable")
            if csts.rdy:
                break
            if time.monotonic() > deadline:
                raise LoadError(f"controller {cntlid} did not become ready")
            time.sleep(0.01)
        _, page = admin.execute(identify_command(Cns.CONTROLLER), read=4096, what="identify")
        ident = IdentifyController.unpack(page)
        result, _ = admin.execute(
            set_features_command(
                FeatureId.NUMBER_OF_QUEUES, encode_number_of_queues(queues - 1, queues - 1)
            ),
            what="number of queues",
        )
        nsqa, ncqa = decode_number_of_queues(result & 0xFFFFFFFF)
        granted = min(queues, nsqa + 1, ncqa + 1)
        depth = min(depth, caps.mqes + 1, ident.maxcmd or depth)
        return ControllerSetup(
            host, port, admin, cntlid, granted, depth, max(0, ident.ioccsz * 16 - 64)
        )
    except BaseException:
        admin.sock.close()
        raise


def read_shard_map(setup: ControllerSetup) -> ShardMap | None:
    command = identify_command(Cns.CSI_NAMESPACE, nsid=NSID, csi=KV_CSI)
    _, page = setup.admin.execute(command, read=4096, what="identify KV namespace")
    return ShardMap.unpack(page)


# --- the hot loop: one I/O queue ------------------------------------------------------------------
class Stream:
    """One I/O queue connection driven without an event loop: slots, prebuilt capsules, a parser.

    Slot ``i`` is CID ``i`` and always names the same key. ``begin(op)`` queues every slot's
    command; ``on_readable`` parses what arrived, re-queues each completed slot while
    ``self.running``, and returns how many completed.
    """

    def __init__(
        self,
        sock: socket.socket,
        link: Link,
        keys: Sequence[bytes],
        value: memoryview,
        size: int,
        max_in_capsule: int,
        *,
        verify: bool = False,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.cpda = link.cpda
        self.maxh2cdata = link.maxh2cdata
        self.keys = list(keys)
        self.size = size
        self.verify = verify
        slots = len(keys)
        self.values = [value[_SLOT_STRIDE * i : _SLOT_STRIDE * i + size] for i in range(slots)]
        self.crcs = [zlib.crc32(v) for v in self.values] if verify else []
        in_capsule = size <= max_in_capsule
        self.put_pdus: list[list[Any]] = []
        self.get_pdus: list[list[Any]] = []
        sqe = bytearray(64)
        for i, key in enumerate(keys):
            if in_capsule:
                sgl = SglDescriptor(length=size, identifier=SglIdentifier.DATA_BLOCK_OFFSET)
                store_command(NSID, key, size, cid=i, dptr=sgl).pack_into(sqe)
                head = build_header(CapsuleCmdHeader(sqe), data_length=size, pda=self.cpda)
                self.put_pdus.append([bytes(head), self.values[i]] if size else [bytes(head)])
            else:
                store_command(NSID, key, size, cid=i).pack_into(sqe)
                self.put_pdus.append([bytes(build_header(CapsuleCmdHeader(sqe)))])
            retrieve_command(NSID, key, size, cid=i).pack_into(sqe)
            self.get_pdus.append([bytes(build_header(CapsuleCmdHeader(sqe)))])
        self.pdus = self.put_pdus
        self.op = "put"
        self.recv_size = 0
        self.running = False
        self.outstanding = 0
        self.out: list[Any] = []
        self.buf = bytearray(_RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.busy = [False] * slots
        self.received = [0] * slots  # Retrieve: data bytes so far
        self.crc = [0] * slots
        self.skip = 0  # payload bytes of the current C2HData still to come
        self.skip_cid = 0
        self.skip_flags = 0

    # -- sending -----------------------------------------------------------------------------------
    def begin(self, op: str) -> None:
        self.op = op
        self.pdus = self.put_pdus if op == "put" else self.get_pdus
        # Large gets without verify: read little past each PDU header, so that most of the
        # data is dropped uncopied (MSG_TRUNC) rather than read into the buffer.
        large = op == "get" and self.size >= 4 * _DISCARD_MIN and not self.verify
        self.recv_size = _HEADER_READ if large else 0  # 0: as much as fits
        self.running = True
        for cid in range(len(self.keys)):
            self._issue(cid)

    def _issue(self, cid: int) -> None:
        self.busy[cid] = True
        self.received[cid] = 0
        self.crc[cid] = 0
        self.outstanding += 1
        self.out += self.pdus[cid]

    def flush(self) -> None:
        """Send as much of the queued output as the socket takes now."""
        out = self.out
        while out:
            try:
                n = self.sock.sendmsg(out[:_IOV_MAX])
            except BlockingIOError:
                return
            i = 0
            while i < len(out) and n >= len(out[i]):
                n -= len(out[i])
                i += 1
            del out[:i]
            if n:
                out[0] = memoryview(out[0])[n:]
                return

    # -- receiving ---------------------------------------------------------------------------------
    def on_readable(self) -> int:
        buf, view = self.buf, self.view
        if self.skip >= _DISCARD_MIN and self.start == self.end and not self.verify:
            # Only Retrieve data comes next: let the kernel drop it uncopied (TCP MSG_TRUNC).
            try:
                n = self.sock.recv_into(view, min(self.skip, len(view)), socket.MSG_TRUNC)
            except BlockingIOError:
                return 0
            if n == 0:
                raise LoadError("the target closed an I/O connection")
            self.skip -= n
            if not self.skip and self.skip_flags & _SUCCESS:
                return self._complete(self.skip_cid, self.size)
            return 0
        if self.end == len(buf):
            if self.start == 0:
                raise LoadError("a PDU header does not fit the receive buffer")
            buf[: self.end - self.start] = buf[self.start : self.end]
            self.end -= self.start
            self.start = 0
        try:
            limit = self.end + self.recv_size if self.recv_size else len(buf)
            n = self.sock.recv_into(view[self.end : limit])
        except BlockingIOError:
            return 0
        if n == 0:
            raise LoadError("the target closed an I/O connection")
        end = self.end + n
        pos = self.start
        done = 0
        size = self.size
        getting = self.op == "get"
        busy, received, pdus, out = self.busy, self.received, self.pdus, self.out
        slots = len(busy)
        while pos < end:
            if self.skip:  # C2HData payload
                take = min(self.skip, end - pos)
                cid = self.skip_cid
                if self.verify:
                    self.crc[cid] = zlib.crc32(view[pos : pos + take], self.crc[cid])
                pos += take
                self.skip -= take
                if not self.skip and self.skip_flags & _SUCCESS:
                    done += self._complete(cid, size)
                continue
            if end - pos < 8:
                break
            ptype, flags, _hlen, pdo, plen = _CH.unpack_from(buf, pos)
            if ptype == _CAPSULE_RESP:  # the common case, inlined: check, count, send again
                if end - pos < plen:
                    break
                dw0, _dw1, _sqhd, _sqid, cid, field = _CQE.unpack_from(buf, pos + 8)
                pos += plen
                if field & _STATUS_MASK:
                    raise LoadError(
                        f"{self.op} of key {self._key(cid)!r} failed: {describe_status(field)}"
                    )
                if cid >= slots or not busy[cid]:
                    raise LoadError(f"completion for command {cid}, which is not outstanding")
                if getting:
                    if dw0 != size or received[cid] != size or self.verify:
                        self._check_get(cid, dw0)
                    received[cid] = 0
                done += 1
                if self.running:
                    out += pdus[cid]
                else:
                    busy[cid] = False
                    self.outstanding -= 1
            elif ptype == _C2H_DATA:
                if end - pos < pdo:
                    break
                cid, _ttag, datao, datal = _XFER.unpack_from(buf, pos + 8)
                if not getting or cid >= slots or not busy[cid]:
                    raise LoadError(f"C2HData for command {cid}, which is not reading")
                if datao != received[cid] or datao + datal > size or plen - pdo != datal:
                    raise LoadError(f"C2HData {datao}+{datal} out of order or beyond {size}")
                if flags & _SUCCESS and not flags & _LAST_PDU:
                    raise LoadError("C2HData with SUCCESS but not LAST_PDU")
                received[cid] = datao + datal
                if end - pos >= plen:  # the whole PDU is here (a small value): done with it
                    if self.verify:
                        self.crc[cid] = zlib.crc32(view[pos + pdo : pos + plen], self.crc[cid])
                    pos += plen
                    if flags & _SUCCESS:
                        done += self._complete(cid, size)
                else:
                    pos += pdo
                    self.skip, self.skip_cid, self.skip_flags = datal, cid, flags
            elif ptype == _R2T:
                if end - pos < plen:
                    break
                cid, ttag, r2to, r2tl = _XFER.unpack_from(buf, pos + 8)
                pos += plen
                self._answer_r2t(cid, ttag, r2to, r2tl)
            elif ptype == _C2H_TERM_REQ:
                raise LoadError("the target terminated the connection (C2HTermReq)")
            else:
                raise LoadError(f"unexpected PDU type 0x{ptype:02x}")
        if pos == end:
            self.start = self.end = 0
        else:
            self.start, self.end = pos, end
        return done

    def _key(self, cid: int) -> bytes:
        return self.keys[cid] if cid < len(self.keys) else b"?"

    def _check_get(self, cid: int, dw0: int) -> None:
        if dw0 != self.size:
            raise LoadError(f"get of {self._key(cid)!r}: value size {dw0} != {self.size}")
        self._check_read(cid)

    def _check_read(self, cid: int) -> None:
        if self.received[cid] != self.size:
            raise LoadError(f"get of {self._key(cid)!r}: {self.received[cid]} of {self.size} bytes")
        if self.verify:
            if self.crc[cid] != self.crcs[cid]:
                raise LoadError(f"get of {self._key(cid)!r}: the value read back differs")
            self.crc[cid] = 0

    def _complete(self, cid: int, dw0: int) -> int:
        """A completion by the SUCCESS flag of the last C2HData."""
        if cid >= len(self.busy) or not self.busy[cid]:
            raise LoadError(f"completion for command {cid}, which is not outstanding")
        self._check_read(cid)
        self.received[cid] = 0
        if self.running:
            self.out += self.pdus[cid]
        else:
            self.busy[cid] = False
            self.outstanding -= 1
        return 1

    def _answer_r2t(self, cid: int, ttag: int, r2to: int, r2tl: int) -> None:
        if self.op != "put" or cid >= len(self.busy) or not self.busy[cid]:
            raise LoadError(f"R2T for command {cid}, which is not writing")
        if r2tl == 0 or r2to + r2tl > self.size:
            raise LoadError(f"R2T {r2to}+{r2tl} outside the {self.size}-byte value")
        value = self.values[cid]
        offset, stop = r2to, r2to + r2tl
        while offset < stop:
            k = min(self.maxh2cdata, stop - offset)
            head = build_header(
                H2CDataHeader(cid, ttag, offset, k),
                flags=_LAST_PDU if offset + k == stop else 0,
                data_length=k,
                pda=self.cpda,
            )
            self.out += (head, value[offset : offset + k])
            offset += k


def run_op(streams: Sequence[Stream], op: str, end: float) -> tuple[int, float]:
    """Keep every stream's slots busy with ``op`` until ``end`` (time.time()), then drain.

    Returns (commands completed, seconds from the first send to the last completion)."""
    poller = select.poll()
    by_fd = {s.fd: s for s in streams}
    t0 = time.time()
    for s in streams:
        s.begin(op)
        s.flush()
    ops = 0
    running = True
    now = t0
    while True:
        for s in streams:
            poller.register(s.fd, select.POLLIN | (select.POLLOUT if s.out else 0))
        for fd, events in poller.poll(1000):
            s = by_fd[fd]
            if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) and not (
                events & select.POLLIN
            ):
                raise LoadError("an I/O connection failed")
            if events & select.POLLIN:
                ops += s.on_readable()
            if s.out:
                s.flush()
        now = time.time()
        if running and now >= end:
            running = False
            for s in streams:
                s.running = False
        if not running and not any(s.outstanding for s in streams):
            return ops, now - t0


# --- one client: controllers on every worker, streams, the phases ------------------------------
@attrs.define
class Client:
    """Controllers on every worker of a (possibly sharded) KV target, with their I/O queues."""

    setups: list[ControllerSetup]
    shard_map: ShardMap | None
    sockets: list[tuple[int, socket.socket, Link]]  # (worker, I/O queue socket, its link)
    stack: ExitStack

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        subnqn: str,
        *,
        queues: int = 1,
        depth: int = 64,
        sq_flow_control: bool = True,
    ) -> Client:
        """``sq_flow_control=False`` sets Connect CATTR bit 2 on the I/O queues, which lets the
        target fold a Retrieve's completion into its last C2HData (the SUCCESS flag)."""
        identity = HostIdentity.new()
        stack = ExitStack()
        try:
            first = open_controller(host, port, subnqn, identity, queues=queues, depth=depth)
            stack.callback(first.admin.sock.close)
            shard_map = read_shard_map(first)
            setups = [first]
            if shard_map is not None and shard_map.workers > 1:
                setups = [first] * shard_map.workers
                for w, wport in enumerate(shard_map.ports):
                    if w == shard_map.index:
                        continue
                    setup = open_controller(
                        host, wport, subnqn, identity, queues=queues, depth=depth
                    )
                    stack.callback(setup.admin.sock.close)
                    setups[w] = setup
            else:
                shard_map = None
            sockets: list[tuple[int, socket.socket, Link]] = []
            for w, setup in enumerate(setups):
                for qid in range(1, setup.queues + 1):
                    link = Link.open(setup.host, setup.port)
                    stack.callback(link.sock.close)
                    link.connect(subnqn, identity, qid=qid, depth=setup.depth, cntlid=setup.cntlid)
                    sockets.append((w, link.sock, link))
        except BaseException:
            stack.close()
            raise
        return cls(setups, shard_map, sockets, stack)

    @property
    def workers(self) -> int:
        return 1 if self.shard_map is None else self.shard_map.workers

    def streams(
        self, prefix: str, size: int, inflight: int, value: memoryview, *, verify: bool = False
    ) -> list[Stream]:
        """Streams with ``inflight`` slots in all, each key on a queue of the worker owning it."""
        per_worker: dict[int, list[int]] = {}
        for i, (w, _, _) in enumerate(self.sockets):
            per_worker.setdefault(w, []).append(i)
        count = len(self.sockets)
        wanted = [inflight // count + (1 if i < inflight % count else 0) for i in range(count)]
        depth_cap = [self.setups[w].depth - 1 for w, _, _ in self.sockets]
        wanted = [max(1, min(n, cap)) for n, cap in zip(wanted, depth_cap, strict=True)]
        keys: list[list[bytes]] = [[] for _ in self.sockets]
        cursor = dict.fromkeys(per_worker, 0)
        n = 0
        while any(len(k) < w for k, w in zip(keys, wanted, strict=True)):
            key = f"{prefix}.{size:x}.{n}".encode()
            n += 1
            if len(key) > 16:
                raise ValueError(f"key {key!r} is longer than 16 bytes: use a shorter prefix")
            w = owner(key, self.workers) if self.shard_map is not None else 0
            queues = per_worker[w]
            # the next queue of this worker that still wants keys
            for step in range(len(queues)):
                i = queues[(cursor[w] + step) % len(queues)]
                if len(keys[i]) < wanted[i]:
                    keys[i].append(key)
                    cursor[w] = (cursor[w] + step + 1) % len(queues)
                    break
        out = []
        for (w, sock, link), ks in zip(self.sockets, keys, strict=True):
            sock.setblocking(False)
            max_icd = self.setups[w].max_in_capsule
            out.append(Stream(sock, link, ks, value, size, max_icd, verify=verify))
        return out

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def random_value(size: int, slots: int) -> memoryview:
    """One random buffer from which every slot's value is a view (``_SLOT_STRIDE`` apart)."""
    return memoryview(os.urandom(size + _SLOT_STRIDE * max(slots, 1)))


def run(
    address: tuple[str, int],
    subnqn: str,
    *,
    sizes: Sequence[int],
    seconds: float,
    inflight: int = 32,
    queues: int = 1,
    prefix: str = "lg",
    ops: Sequence[str] = ("put", "get"),
    start_at: float | None = None,
    gap: float = 0.0,
    verify: bool = False,
) -> dict[str, dict[str, float]]:
    """Per size, each op for ``seconds`` (starting at ``start_at``, then ``seconds + gap`` apart,
    as ``bench.scaling``'s clients agree). Returns ``{"put 4096": {"ops", "seconds"}, ...}``."""
    results: dict[str, dict[str, float]] = {}
    with Client.connect(*address, subnqn, queues=queues, depth=inflight + 1) as client:
        start = time.time() if start_at is None else start_at
        for size in sizes:
            value = random_value(size, inflight)
            streams = client.streams(prefix, size, inflight, value, verify=verify)
            for op in ops:
                if op == "get" and "put" not in ops:
                    _fill(streams)
                time.sleep(max(0.0, start - time.time()))
                count, took = run_op(streams, op, start + seconds)
                results[f"{op} {size}"] = {"ops": count, "seconds": took}
                start = max(start + seconds + gap, time.time())
            for s in streams:
                s.sock.setblocking(True)
    return results


def _fill(streams: Sequence[Stream]) -> None:
    """Store every slot's key once (a get-only run needs the values there)."""
    run_op(streams, "put", 0.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("address", help="host:port of the target")
    parser.add_argument("--nqn", required=True, help="subsystem NQN")
    parser.add_argument("--sizes", default="4KiB")
    parser.add_argument("--ops", default="put,get")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--queues", type=int, default=1, help="I/O queues per worker")
    parser.add_argument("--prefix", default="lg")
    parser.add_argument("--verify", action="store_true", help="CRC-check every value read back")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    results = run(
        (host, int(port)),
        args.nqn,
        sizes=[parse_size(s) for s in args.sizes.split(",")],
        seconds=args.seconds,
        inflight=args.inflight,
        queues=args.queues,
        prefix=args.prefix,
        ops=args.ops.split(","),
        verify=args.verify,
    )
    for r in results.values():
        r["ops_per_s"] = r["ops"] / r["seconds"] if r["seconds"] else 0.0
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
