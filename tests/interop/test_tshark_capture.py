"""Wireshark as an independent judge of our NVMe/TCP wire format.

A real target (in this process) serves a ``KVClient`` over loopback while ``dumpcap`` captures
the traffic. tshark's ``nvme-tcp`` and ``nvme`` dissectors (which share no code with ours) then
decode the capture: every PDU type we use must appear, no packet may be malformed, the NVMe/TCP
and NVMe dissectors must raise no expert info of severity warning or error, and with digests on
every header and data digest must check out as correct.

Needs tshark and dumpcap (``apt-get install tshark``) and the right to capture on ``lo`` (root).
Outside CI a missing tshark or a refused capture skips the test; in CI (``$CI`` set), which installs
tshark and runs as root, both fail it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import attrs
import pytest

from kvext.client import KVClient
from nvmeof.testing import serve_target

KiB = 1024
MiB = 1024 * KiB

TSHARK = shutil.which("tshark")
DUMPCAP = shutil.which("dumpcap") or TSHARK  # tshark captures through dumpcap anyway
IN_CI = bool(os.environ.get("CI"))

# NVMe/TCP PDU types (nvme-tcp.type)
ICREQ, ICRESP, CAPSULE_CMD, CAPSULE_RESP, H2C_DATA, C2H_DATA, R2T = 0, 1, 4, 5, 6, 7, 9
PDU_NAMES = {
    ICREQ: "ICReq",
    ICRESP: "ICResp",
    CAPSULE_CMD: "CapsuleCommand",
    CAPSULE_RESP: "CapsuleResponse",
    H2C_DATA: "H2CData",
    C2H_DATA: "C2HData",
    R2T: "R2T",
}
FLAG_HDGST, FLAG_DDGST = 0x01, 0x02
# nvme-tcp.{hdgst,ddgst}.status: 0 Bad, 1 Good, 2 Unverified, 3 Not present, 4 Illegal
DIGEST_GOOD = 1
# _ws.expert.severity values (epan/proto.h PI_CHAT .. PI_ERROR)
SEVERITY = {0x00200000: "chat", 0x00400000: "note", 0x00600000: "warning", 0x00800000: "error"}
PI_WARN = 0x00600000
# Expert items raised by these protocols only say something about the capture, not about our PDUs:
# on loopback the TCP layer legitimately reports flow-control events under load ("TCP window full",
# "zero window", ...). Everything else (nvme-tcp, nvme, and any malformed packet) is judged.
TOLERATED_EXPERT_PROTOCOLS = {"tcp"}


def _missing_tools_reason() -> str | None:
    if TSHARK and DUMPCAP:
        return None
    return "tshark/dumpcap not installed (apt-get install tshark)"


@pytest.fixture
def tshark() -> str:
    reason = _missing_tools_reason()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"{reason}, but CI must install it")
        pytest.skip(reason)
    assert TSHARK is not None
    return TSHARK


# -- capture ---------------------------------------------------------------------------------------
@attrs.define
class Capture:
    path: Path
    log: Path
    received: int = -1
    dropped: int = -1


@contextlib.asynccontextmanager
async def capture_loopback(port: int, workdir: Path) -> AsyncIterator[Capture]:
    """Capture TCP port ``port`` on ``lo`` into a pcapng file until the block exits."""
    assert DUMPCAP is not None
    cap = Capture(workdir / f"nvme-tcp-{port}.pcapng", workdir / "dumpcap.log")
    # -B: a 64 MiB kernel buffer, so that a 3 MiB burst over loopback is not dropped.
    cmd = [DUMPCAP, "-i", "lo", "-f", f"tcp port {port}", "-B", "64", "-w", str(cap.path)]
    with cap.log.open("wb") as log:
        proc = await anyio.open_process(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        # dumpcap prints "Capturing on" before it starts capturing, so that line proves nothing;
        # it writes the file header only once the interface is open and the filter set.
        with anyio.fail_after(20):
            while not (cap.path.exists() and cap.path.stat().st_size > 0):
                if proc.returncode is not None:
                    break
                await anyio.sleep(0.02)
        if proc.returncode is not None or not cap.path.exists():
            await proc.wait()
            text = cap.log.read_text(errors="replace")
            if not IN_CI and ("permission" in text.lower() or "not permitted" in text.lower()):
                pytest.skip(f"cannot capture on lo (needs root or CAP_NET_RAW): {text.strip()}")
            pytest.fail(f"dumpcap did not start (rc={proc.returncode}):\n{text}")
        await anyio.sleep(0.2)  # settle
        yield cap
        await anyio.sleep(0.3)  # let the last segments (FINs) reach the capture buffer
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # dumpcap flushes and writes its statistics
            with anyio.move_on_after(10) as scope:
                await proc.wait()
            if scope.cancelled_caught:
                proc.kill()
                await proc.wait()
        await proc.aclose()
    text = cap.log.read_text(errors="replace")
    stats = re.search(r"received/dropped on interface '[^']*': (\d+)/(\d+)", text)
    assert stats, f"no capture statistics from dumpcap:\n{text}"
    cap.received, cap.dropped = int(stats[1]), int(stats[2])


# -- traffic ---------------------------------------------------------------------------------------
async def generate_traffic(address: tuple[str, int], nqn: str, digests: bool) -> int:
    """Every transfer shape of the KV command set; returns the in-capsule data limit used."""
    async with KVClient.connect(
        address, nqn, io_queues=2, queue_depth=8, header_digest=digests, data_digest=digests
    ) as kv:
        # Framed values (a small header precedes each): 1 B and 100 B travel in the command
        # capsule; 8 KiB and more exceed the in-capsule limit, so R2T + H2CData; 3 MiB exceeds
        # MAXH2CDATA too, so several H2CData PDUs per R2T and several C2HData PDUs per read.
        sizes = [1, 100, 8 * KiB, 9 * KiB, 300 * KiB, 3 * MiB]
        for size in sizes:
            value = os.urandom(size)
            await kv.put(f"value-{size}", value)
            assert await kv.get(f"value-{size}") == value
        # Raw values at the in-capsule boundary: exactly the limit in the capsule, one byte more
        # through R2T.
        raw = KVClient(kv.controller, framing=False)
        in_capsule = kv.controller.identify.ioccsz * 16 - 64
        for size in (in_capsule, in_capsule + 1):
            value = os.urandom(size)
            await raw.put(f"raw-{size}".encode(), value)
            assert await raw.get(f"raw-{size}".encode(), out=bytearray(size)) == value
        # Several commands in flight on both I/O queues at once.
        batch = [(f"batch-{i}", os.urandom(20 * KiB)) for i in range(12)]
        await kv.put_many(batch)
        assert await kv.get_many([k for k, _ in batch]) == [v for _, v in batch]
        assert await kv.exists("value-1")
        assert not await kv.exists("absent")  # KV status 0x87, Key Does Not Exist
        assert len(await kv.list()) == len(sizes) + 2 + len(batch)
        await kv.delete("value-1")
        assert not await kv.exists("value-1")
        return in_capsule


# -- analysis --------------------------------------------------------------------------------------
@attrs.frozen
class ExpertItem:
    frame: int
    protocol: str
    severity: int
    group: str
    message: str
    abbrev: str

    def __str__(self) -> str:
        sev = SEVERITY.get(self.severity, hex(self.severity))
        where = f"frame {self.frame}: [{self.protocol}]"
        return f"{where} {sev}/{self.group}: {self.message} ({self.abbrev})"


def _tshark_args(tshark: str, pcap: Path, port: int) -> list[str]:
    # The port is dynamic (a fixed 4420 could collide on a CI runner), so map it to the dissector;
    # the dissector's digest checks are off by default.
    return [
        tshark, "-n", "-r", str(pcap), "-d", f"tcp.port=={port},nvme-tcp",
        "-o", "nvme-tcp.check_hdgst:TRUE", "-o", "nvme-tcp.check_ddgst:TRUE",
    ]  # fmt: skip


async def _run(cmd: list[str]) -> str:
    result = await anyio.run_process(cmd, check=False)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{stderr}"
    return result.stdout.decode(errors="replace")


async def expert_items(tshark: str, pcap: Path, port: int) -> list[ExpertItem]:
    """Every expert item, with the top-level protocol of the tree it sits in (PDML keeps that)."""
    pdml = await _run(
        [*_tshark_args(tshark, pcap, port), "-T", "pdml", "-Y", "_ws.expert || _ws.malformed"]
    )
    items: list[ExpertItem] = []
    for packet in ET.fromstring(pdml).iter("packet"):
        frame = 0
        for proto in packet.iter("proto"):
            if proto.get("name") == "geninfo":
                num = proto.find("field[@name='num']")
                frame = int(num.get("show", "0")) if num is not None else 0
        for proto in packet.findall("proto"):
            for expert in proto.iter("field"):
                if expert.get("name") != "_ws.expert":
                    continue
                fields = {f.get("name"): f.get("show", "") for f in expert.findall("field")}
                abbrev = next((n for n in fields if n and not n.startswith("_ws.expert.")), "")
                items.append(
                    ExpertItem(
                        frame,
                        proto.get("name", "?"),
                        int(fields.get("_ws.expert.severity") or 0),
                        fields.get("_ws.expert.group", ""),
                        fields.get("_ws.expert.message", ""),
                        abbrev,
                    )
                )
    return items


@attrs.frozen
class Pdu:
    frame: int
    type: int
    flags: int
    hlen: int
    pdo: int
    plen: int
    data_offset: int | None = None  # H2CData / C2HData only

    @property
    def data_length(self) -> int:
        if self.pdo == 0:
            return 0
        return self.plen - self.pdo - (4 if self.flags & FLAG_DDGST else 0)


# Present once in every PDU header, so their occurrences in a frame line up PDU by PDU.
PDU_FIELDS = ["nvme-tcp.type", "nvme-tcp.flags", "nvme-tcp.hlen", "nvme-tcp.pdo", "nvme-tcp.plen"]
# Collected as flat lists of every occurrence.
VALUE_FIELDS = [
    "nvme-tcp.hdgst.status", "nvme-tcp.ddgst.status", "nvme-tcp.icreq.digest",
    "nvme-tcp.icresp.digest", "nvme.fabrics.cmd.connect.qid",
    "nvme.fabrics.cmd.connect.data.subnqn", "nvme.cqe.status.sct", "nvme.cqe.status.sc",
    "_ws.malformed",
]  # fmt: skip
FIELDS = ["frame.number", *PDU_FIELDS, "nvme-tcp.data.offset", *VALUE_FIELDS]


@attrs.define
class Decoded:
    pdus: list[Pdu] = attrs.Factory(list)
    values: dict[str, list[str]] = attrs.Factory(dict)  # every other field, all occurrences


async def decode(tshark: str, pcap: Path, port: int) -> Decoded:
    fmt = ["-E", "separator=/t", "-E", "aggregator=;", "-E", "occurrence=a"]
    fields = [arg for f in FIELDS for arg in ("-e", f)]
    filt = ["-Y", "nvme-tcp || _ws.malformed"]
    out = await _run([*_tshark_args(tshark, pcap, port), *filt, "-T", "fields", *fmt, *fields])
    decoded = Decoded(values={f: [] for f in VALUE_FIELDS})
    for line in out.splitlines():
        cols = dict(zip(FIELDS, line.split("\t"), strict=True))
        # One frame may carry several PDUs (and a PDU span several frames: it shows in the last).
        per_pdu = [cols[f].split(";") if cols[f] else [] for f in PDU_FIELDS]
        assert len({len(v) for v in per_pdu}) == 1, f"unaligned PDU fields: {line}"
        frame = [
            Pdu(int(cols["frame.number"]), int(t), int(fl, 0), int(hl), int(pdo), int(plen))
            for t, fl, hl, pdo, plen in zip(*per_pdu, strict=True)
        ]
        # A frame goes one way, so its data PDUs are all H2CData or all C2HData, in order.
        offsets = [int(o) for o in cols["nvme-tcp.data.offset"].split(";") if o]
        data_pdus = [i for i, p in enumerate(frame) if p.type in (H2C_DATA, C2H_DATA)]
        assert len(offsets) == len(data_pdus), f"unaligned data offsets: {line}"
        for i, offset in zip(data_pdus, offsets, strict=True):
            frame[i] = attrs.evolve(frame[i], data_offset=offset)
        decoded.pdus += frame
        for f in VALUE_FIELDS:
            decoded.values[f] += [v for v in cols[f].split(";") if v]
    return decoded


def judge(experts: list[ExpertItem], decoded: Decoded) -> list[str]:
    """What tshark objects to: malformed packets, warnings and errors, digests not Good."""
    problems = [f"malformed packet in frames {decoded.values['_ws.malformed']}"] * bool(
        decoded.values["_ws.malformed"]
    )
    problems += [
        str(e)
        for e in experts
        if e.protocol == "_ws.malformed"
        or (e.severity >= PI_WARN and e.protocol not in TOLERATED_EXPERT_PROTOCOLS)
    ]
    for kind in ("hdgst", "ddgst"):
        status = Counter(decoded.values[f"nvme-tcp.{kind}.status"])
        if set(status) - {str(DIGEST_GOOD)}:
            problems.append(f"{kind} status (0 Bad, 1 Good, 2 Unverified, 4 Illegal): {status}")
    return problems


# -- the tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("digests", [False, True], ids=["no-digests", "hdgst+ddgst"])
@pytest.mark.anyio
async def test_tshark_decodes_kv_traffic_cleanly(
    tshark: str, digests: bool, tmp_path: Path
) -> None:
    async with serve_target() as target, capture_loopback(target.port, tmp_path) as cap:
        in_capsule = await generate_traffic(target.address, target.nqn, digests)
    port = target.port
    assert cap.dropped == 0, f"the capture dropped {cap.dropped} of {cap.received} packets"

    summary = await _run([*_tshark_args(tshark, cap.path, port), "-q", "-z", "expert"])
    print(summary)  # shown by pytest on failure (and with -s)
    experts = await expert_items(tshark, cap.path, port)
    decoded = await decode(tshark, cap.path, port)
    pdus = decoded.pdus
    values = decoded.values
    context = f"\ntshark -z expert:\n{summary}"

    # Nothing malformed, no warning or error except the tolerated TCP ones, no digest but Good.
    problems = judge(experts, decoded)
    assert not problems, "\n".join(problems) + context

    # Every PDU type we use was seen and decoded, and nothing else (no TermReq).
    types = Counter(p.type for p in pdus)
    missing = [PDU_NAMES[t] for t in PDU_NAMES if not types[t]]
    assert not missing, f"PDU types not seen: {missing}; seen {dict(types)}{context}"
    assert set(types) <= set(PDU_NAMES), f"unexpected PDU types {dict(types)}"
    assert types[ICREQ] == types[ICRESP] == 3  # admin queue + 2 I/O queues
    assert types[CAPSULE_CMD] == types[CAPSULE_RESP]  # every command answered

    # The Connect commands as tshark reads them.
    assert sorted(int(q) for q in values["nvme.fabrics.cmd.connect.qid"]) == [0, 1, 2]
    assert set(values["nvme.fabrics.cmd.connect.data.subnqn"]) == {target.nqn}

    # Transfer shapes: a command carrying exactly the in-capsule limit, data in several PDUs.
    capsule_data = {p.data_length for p in pdus if p.type == CAPSULE_CMD}
    assert in_capsule in capsule_data
    assert max(capsule_data) == in_capsule
    # The 3 MiB value exceeds MAXH2CDATA: several H2CData PDUs answer one R2T, and the target
    # sends the value back in several C2HData PDUs as well.
    assert types[H2C_DATA] > types[R2T]
    assert any(p.type == H2C_DATA and p.data_offset for p in pdus)
    assert any(p.type == C2H_DATA and p.data_offset for p in pdus)

    # The KV "Key Does Not Exist" completion: generic status type, status code 0x87.
    statuses = set(zip(values["nvme.cqe.status.sct"], values["nvme.cqe.status.sc"], strict=True))
    assert ("0x0000", "0x0087") in statuses, statuses

    # Digests: negotiated in ICReq/ICResp, present on every later PDU, and correct.
    want = "3" if digests else "0"
    assert values["nvme-tcp.icreq.digest"] == [want] * 3
    assert values["nvme-tcp.icresp.digest"] == [want] * 3
    after_ic = [p for p in pdus if p.type not in (ICREQ, ICRESP)]
    with_data = [p for p in after_ic if p.pdo]
    hdgst, ddgst = values["nvme-tcp.hdgst.status"], values["nvme-tcp.ddgst.status"]
    if digests:
        assert all(p.flags & FLAG_HDGST for p in after_ic)
        assert all(p.flags & FLAG_DDGST for p in with_data)
        assert not any(p.flags & FLAG_DDGST for p in after_ic if not p.pdo)
        assert len(hdgst) == len(after_ic), "a PDU header digest was not checked"
        assert len(ddgst) == len(with_data), "a PDU data digest was not checked"
        assert set(hdgst) == {str(DIGEST_GOOD)}, f"header digests: {Counter(hdgst)}"
        assert set(ddgst) == {str(DIGEST_GOOD)}, f"data digests: {Counter(ddgst)}"
    else:
        assert not any(p.flags & (FLAG_HDGST | FLAG_DDGST) for p in pdus)
        assert not hdgst
        assert not ddgst


def _pcap_from_pdus(text2pcap: str, pdus: list[tuple[str, bytes]], path: Path) -> None:
    """A TCP stream 40000 <-> 4420, one PDU a segment ("I": host to target, "O": back)."""
    # The direction goes on each packet's first line only: text2pcap 4.0 reads a direction on a
    # continuation line as the start of the next packet's and shifts every later packet by one.
    lines = [
        (f"{direction} " if off == 0 else "")
        + f"{off:06x} "
        + " ".join(f"{b:02x}" for b in pdu[off : off + 16])
        for direction, pdu in pdus
        for off in range(0, len(pdu), 16)
    ]
    text = path.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n")
    subprocess.run(
        [text2pcap, "-q", "-D", "-T", "40000,4420", str(text), str(path)],
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_judge_catches_bad_digest_and_malformed_pdu(tshark: str, tmp_path: Path) -> None:
    """The checks above are not vacuous: a wrong header digest and a truncated PDU, fed through the
    same tshark analysis, are both reported."""
    text2pcap = shutil.which("text2pcap")
    if text2pcap is None:
        pytest.skip("text2pcap not installed")  # comes with tshark (wireshark-common)
    from nvmeof.tcp.pdu import crc32c_of

    def header(pdu_type: int, flags: int, hlen: int, pdo: int, plen: int) -> bytes:
        return struct.pack("<BBBBI", pdu_type, flags, hlen, pdo, plen)

    icreq = header(ICREQ, 0, 128, 0, 128) + struct.pack("<HBBI", 0, 0, 3, 0) + bytes(112)
    icresp = header(ICRESP, 0, 128, 0, 128) + struct.pack("<HBBI", 0, 0, 3, 1 << 20) + bytes(112)
    sqe = bytearray(64)
    sqe[0], sqe[2], sqe[40] = 0x06, 5, 1  # Identify Controller, CID 5
    cmd = header(CAPSULE_CMD, FLAG_HDGST, 72, 0, 76) + sqe
    good_digest = struct.pack("<I", crc32c_of([cmd]))
    bad_digest = struct.pack("<I", crc32c_of([cmd]) ^ 1)
    # A header digest flagged, but PLEN (20) short of HLEN (24) + digest: the dissector runs off the
    # PDU's end. (Without the digest flag tshark 4.0.17 quietly shows such a PDU as "Unknown Data".)
    short = header(CAPSULE_RESP, FLAG_HDGST, 24, 0, 20) + bytes(16)

    cases = {
        "good": ([cmd + good_digest], []),
        "bad-hdgst": ([cmd + bad_digest], ["hdgst status"]),
        "malformed": ([cmd + good_digest, short], ["malformed", "Malformed Packet"]),
    }
    for name, (tail, expected) in cases.items():
        pcap = tmp_path / f"{name}.pcap"
        pdus = [("I", icreq), ("O", icresp), ("I", tail[0]), *(("O", p) for p in tail[1:])]
        _pcap_from_pdus(text2pcap, pdus, pcap)
        decoded = await decode(tshark, pcap, 4420)
        problems = judge(await expert_items(tshark, pcap, 4420), decoded)
        assert [p.type for p in decoded.pdus][:3] == [ICREQ, ICRESP, CAPSULE_CMD], name
        for word in expected:
            assert any(word in p for p in problems), (name, problems)
        if not expected:
            assert not problems, (name, problems)
