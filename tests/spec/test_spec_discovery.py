"""The discovery log page codecs (REFERENCE 8.1): golden bytes and round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmeof.spec.discovery import (
    DISCOVERY_LOG_ENTRY_SIZE,
    DISCOVERY_LOG_HEADER_SIZE,
    AddressFamily,
    DiscoveryEntry,
    DiscoveryLogError,
    DiscoveryLogHeader,
    EntryFlags,
    SubsystemType,
    TransportType,
    entries_offset,
    pack_discovery_log,
    tcp_tsas,
    unpack_discovery_log,
)

NQN = "nqn.2024-01.io.gpucache:kv0"


def test_entry_golden_bytes() -> None:
    entry = DiscoveryEntry(
        trtype=TransportType.TCP,
        adrfam=AddressFamily.IPV4,
        subtype=SubsystemType.NVM,
        treq=0x04,
        portid=2,
        cntlid=0xFFFF,
        asqsz=32,
        eflags=EntryFlags.NONE,
        trsvcid="4420",
        subnqn=NQN,
        traddr="10.0.2.2",
        tsas=tcp_tsas(),
    )
    raw = entry.pack()
    assert len(raw) == DISCOVERY_LOG_ENTRY_SIZE
    assert raw[:12] == bytes([3, 1, 2, 4, 2, 0, 0xFF, 0xFF, 32, 0, 0, 0])
    assert raw[12:32] == bytes(20)
    assert raw[32:64] == b"4420" + bytes(28)  # NUL-padded, as Linux nvmet
    assert raw[64:256] == bytes(192)
    assert raw[256:512] == NQN.encode() + bytes(256 - len(NQN))
    assert raw[512:768] == b"10.0.2.2" + bytes(248)
    assert raw[768:1024] == bytes(256)  # TCP SECTYPE 0: no security
    assert DiscoveryEntry.unpack(raw) == entry


def test_space_padded_trsvcid_is_trimmed() -> None:
    # SPDK space-pads TRSVCID and TRADDR; hosts trim both paddings.
    raw = bytearray(DiscoveryEntry(subnqn=NQN, traddr="1.2.3.4", trsvcid="4420").pack())
    raw[32:64] = b"4420".ljust(32, b" ")
    raw[512:768] = b"1.2.3.4".ljust(256, b" ")
    entry = DiscoveryEntry.unpack(raw)
    assert (entry.trsvcid, entry.traddr) == ("4420", "1.2.3.4")


def test_header_golden_bytes() -> None:
    raw = DiscoveryLogHeader(genctr=0x0102030405060708, numrec=3).pack()
    assert len(raw) == DISCOVERY_LOG_HEADER_SIZE
    assert raw[:8] == bytes.fromhex("0807060504030201")
    assert struct.unpack_from("<Q", raw, 8)[0] == 3
    assert raw[16:18] == b"\0\0"  # RECFMT 0
    assert raw[18:] == bytes(1024 - 18)
    # hosts read only the first 20 bytes of the header
    assert DiscoveryLogHeader.unpack(raw[:20]) == DiscoveryLogHeader(0x0102030405060708, 3)


def test_log_layout() -> None:
    a = DiscoveryEntry(subnqn="nqn.2024-01.io.a:x", traddr="127.0.0.1", trsvcid="4420")
    b = DiscoveryEntry(subnqn="nqn.2024-01.io.b:y", traddr="127.0.0.1", trsvcid="4421")
    page = pack_discovery_log(7, [a, b])
    assert len(page) == 1024 + 2 * 1024
    assert page[entries_offset(1) + 256 : entries_offset(1) + 274] == b"nqn.2024-01.io.b:y"
    header, entries = unpack_discovery_log(page)
    assert header == DiscoveryLogHeader(7, 2)
    assert entries == [a, b]


def test_truncated_log_is_refused() -> None:
    page = pack_discovery_log(1, [DiscoveryEntry(subnqn=NQN, traddr="h", trsvcid="1")])
    with pytest.raises(DiscoveryLogError):
        unpack_discovery_log(page[:-4])
    with pytest.raises(DiscoveryLogError):
        DiscoveryLogHeader.unpack(page[:16])


def test_oversized_fields_are_refused() -> None:
    with pytest.raises(DiscoveryLogError):
        DiscoveryEntry(subnqn="n" * 256, traddr="h", trsvcid="1").pack()
    with pytest.raises(DiscoveryLogError):
        DiscoveryEntry(subnqn=NQN, traddr="h", trsvcid="1" * 32).pack()
    with pytest.raises(DiscoveryLogError):
        DiscoveryEntry(subnqn=NQN, traddr="h", trsvcid="1", tsas=b"\0")


_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64
)

entries = st.builds(
    DiscoveryEntry,
    subnqn=_text,
    traddr=_text,
    trsvcid=st.text(
        alphabet=st.characters(min_codepoint=0x30, max_codepoint=0x39), min_size=1, max_size=31
    ),
    trtype=st.sampled_from(list(TransportType)),
    adrfam=st.sampled_from(list(AddressFamily)),
    subtype=st.sampled_from(list(SubsystemType)),
    treq=st.integers(0, 7),
    portid=st.integers(0, 0xFFFF),
    cntlid=st.integers(0, 0xFFFF),
    asqsz=st.integers(0, 0xFFFF),
    eflags=st.integers(0, 7),
    tsas=st.binary(min_size=256, max_size=256),
)


@given(entries)
def test_entry_round_trip(entry: DiscoveryEntry) -> None:
    assert DiscoveryEntry.unpack(entry.pack()) == entry


@given(st.integers(0, 2**64 - 1), st.lists(entries, max_size=5))
def test_log_round_trip(genctr: int, records: list[DiscoveryEntry]) -> None:
    header, out = unpack_discovery_log(pack_discovery_log(genctr, records))
    assert header == DiscoveryLogHeader(genctr, len(records))
    assert out == records
