"""The simulated verbs layer, driven sans-IO with explicit virtual time."""

from __future__ import annotations

import anyio
import pytest

from simulator.clock import run_virtual
from simulator.fabric import Fabric, LinkSpec
from simulator.verbs import (
    CQ,
    MR,
    PD,
    QP,
    SGE,
    WC,
    Access,
    Context,
    QPInitAttr,
    QPState,
    RecvWR,
    SendWR,
    VerbsError,
    VerbsFabric,
    WcOpcode,
    WcStatus,
    WrOpcode,
)

LATENCY = 2e-6
BANDWIDTH = 10e9
RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ


class Side:
    def __init__(self, verbs: VerbsFabric, name: str) -> None:
        self.ctx = Context(verbs, name)
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 64)
        self.qp = QP(self.pd, QPInitAttr(send_cq=self.cq, recv_cq=self.cq))
        self.mr = MR(self.pd, 1 << 20, RW)

    def sge(self, offset: int, length: int, mr: MR | None = None) -> SGE:
        mr = mr or self.mr
        return SGE(mr.addr + offset, length, mr.lkey)

    def poll(self) -> list[WC]:
        return self.cq.poll(64)[1]


def pair(seed: int = 0) -> tuple[VerbsFabric, Side, Side]:
    verbs = VerbsFabric(Fabric(seed, LinkSpec(latency=LATENCY, bandwidth=BANDWIDTH)))
    a, b = Side(verbs, "gpu0"), Side(verbs, "tgt0")
    a.qp.connect(b.qp)
    return verbs, a, b


def test_rdma_write_lands_and_completes_after_one_round_trip() -> None:
    verbs, a, b = pair()
    a.mr.write(b"hello", 5, 100)
    a.qp.post_send(
        SendWR(7, WrOpcode.RDMA_WRITE, [a.sge(100, 5)], remote_addr=b.mr.addr + 64, rkey=b.mr.rkey)
    )
    assert a.poll() == []  # nothing completes before time moves
    verbs.run_until_idle()
    assert a.poll() == [WC(7, WcStatus.SUCCESS, WcOpcode.RDMA_WRITE, 5, a.qp.qp_num)]
    assert b.mr.read(5, 64) == b"hello"
    assert b.poll() == []  # a plain WRITE is invisible to the responder's CQ
    assert verbs.now == pytest.approx(2 * LATENCY + (5 + 2 * 58) / BANDWIDTH)


def test_rdma_read_copies_remote_memory() -> None:
    verbs, a, b = pair()
    b.mr.write(b"x" * 4096, 4096, 0)
    a.qp.post_send(SendWR(1, WrOpcode.RDMA_READ, [a.sge(0, 4096)], b.mr.addr, b.mr.rkey))
    verbs.run_until_idle()
    assert a.poll() == [WC(1, WcStatus.SUCCESS, WcOpcode.RDMA_READ, 4096, a.qp.qp_num)]
    assert a.mr.read(4096) == b"x" * 4096


def test_send_needs_a_posted_receive_and_retries_rnr_until_one_comes() -> None:
    verbs, a, b = pair()
    a.mr.write(b"capsule", 7, 0)
    a.qp.post_send(SendWR(2, WrOpcode.SEND_WITH_IMM, [a.sge(0, 7)], imm_data=0xABC))
    verbs.run_until_idle(limit=0.01)
    assert a.poll() == []
    assert b.poll() == []
    b.qp.post_recv(RecvWR(9, [b.sge(500, 64)]))
    verbs.run_until_idle(limit=0.02)
    assert b.poll() == [WC(9, WcStatus.SUCCESS, WcOpcode.RECV, 7, b.qp.qp_num, 0xABC)]
    assert a.poll() == [WC(2, WcStatus.SUCCESS, WcOpcode.SEND, 7, a.qp.qp_num)]
    assert b.mr.read(7, 500) == b"capsule"


def test_rnr_retry_exhausted() -> None:
    verbs = VerbsFabric(Fabric(0))
    a, b = Side(verbs, "h"), Side(verbs, "t")
    a.qp = QP(a.pd, QPInitAttr(a.cq, a.cq, rnr_retry=2))
    a.qp.connect(b.qp)
    a.qp.post_send(SendWR(3, WrOpcode.SEND, [a.sge(0, 8)]))
    verbs.run_until_idle()
    assert [wc.status for wc in a.poll()] == [WcStatus.RNR_RETRY_EXC_ERR]
    assert a.qp.state is QPState.ERR


@pytest.mark.parametrize(
    ("access", "rkey_delta", "offset"),
    [
        (Access.LOCAL_WRITE, 0, 0),  # no REMOTE_WRITE on the region
        (RW, 1, 0),  # a wrong rkey
        (RW, 0, (1 << 20) - 2),  # runs past the end of the region
    ],
    ids=["no-remote-write", "bad-rkey", "out-of-bounds"],
)
def test_remote_access_errors(access: Access, rkey_delta: int, offset: int) -> None:
    verbs, a, b = pair()
    region = MR(b.pd, 1 << 20, access)
    a.qp.post_send(
        SendWR(
            4, WrOpcode.RDMA_WRITE, [a.sge(0, 8)], region.addr + offset, region.rkey + rkey_delta
        )
    )
    a.qp.post_send(SendWR(5, WrOpcode.RDMA_WRITE, [a.sge(0, 8)], b.mr.addr, b.mr.rkey))
    verbs.run_until_idle()
    wcs = a.poll()
    assert [(wc.wr_id, wc.status) for wc in wcs] == [
        (4, WcStatus.REM_ACCESS_ERR),
        (5, WcStatus.WR_FLUSH_ERR),  # the QP is in error: what follows is flushed
    ]
    assert a.qp.state is QPState.ERR
    assert region.read(8, 0) == bytes(8)


def test_deregistered_region_refuses_remote_reads() -> None:
    verbs, a, b = pair()
    rkey = b.mr.rkey
    b.mr.close()
    a.qp.post_send(SendWR(1, WrOpcode.RDMA_READ, [a.sge(0, 8)], b.mr.addr, rkey))
    verbs.run_until_idle()
    assert [wc.status for wc in a.poll()] == [WcStatus.REM_ACCESS_ERR]


def test_local_protection_error_for_a_foreign_lkey() -> None:
    verbs, a, _b = pair()
    other_pd = PD(a.ctx)
    foreign = MR(other_pd, 4096, RW)
    a.qp.post_send(SendWR(1, WrOpcode.SEND, [a.sge(0, 8, foreign)]))
    verbs.run_until_idle()
    assert [wc.status for wc in a.poll()] == [WcStatus.LOC_PROT_ERR]


def test_receive_too_small() -> None:
    verbs, a, b = pair()
    b.qp.post_recv(RecvWR(1, [b.sge(0, 4)]))
    a.qp.post_send(SendWR(2, WrOpcode.SEND, [a.sge(0, 16)]))
    verbs.run_until_idle()
    assert [wc.status for wc in b.poll()] == [WcStatus.LOC_LEN_ERR]
    assert [wc.status for wc in a.poll()] == [WcStatus.REM_INV_REQ_ERR]


def test_write_with_immediate_consumes_a_receive() -> None:
    verbs, a, b = pair()
    b.qp.post_recv(RecvWR(8))
    a.mr.write(b"data", 4, 0)
    a.qp.post_send(
        SendWR(1, WrOpcode.RDMA_WRITE_WITH_IMM, [a.sge(0, 4)], b.mr.addr, b.mr.rkey, imm_data=5)
    )
    verbs.run_until_idle()
    assert b.poll() == [WC(8, WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, 4, b.qp.qp_num, 5)]
    assert b.mr.read(4) == b"data"


def test_link_cut_errors_in_flight_work_and_flushes_the_rest() -> None:
    verbs, a, b = pair()
    b.qp.post_recv(RecvWR(1, [b.sge(0, 64)]))
    for i in range(3):
        a.qp.post_send(
            SendWR(10 + i, WrOpcode.RDMA_READ, [a.sge(0, 1 << 19)], b.mr.addr, b.mr.rkey)
        )
    verbs.advance(LATENCY / 2)
    verbs.fabric.link("gpu0", "tgt0").cut()
    verbs.run_until_idle()
    assert [(wc.wr_id, wc.status) for wc in a.poll()] == [
        (10, WcStatus.RETRY_EXC_ERR),
        (11, WcStatus.WR_FLUSH_ERR),
        (12, WcStatus.WR_FLUSH_ERR),
    ]
    assert [(wc.wr_id, wc.status) for wc in b.poll()] == [(1, WcStatus.WR_FLUSH_ERR)]
    with pytest.raises(VerbsError):
        QP(a.pd, QPInitAttr(a.cq, a.cq)).post_send(SendWR(1))  # RESET: refused synchronously


def test_stalled_link_delays_until_resumed() -> None:
    verbs, a, b = pair()
    link = verbs.fabric.link("gpu0", "tgt0")
    link.stall()
    a.qp.post_send(SendWR(1, WrOpcode.RDMA_WRITE, [a.sge(0, 8)], b.mr.addr, b.mr.rkey))
    verbs.run_until_idle()
    verbs.advance(1.0)
    assert a.poll() == []
    link.resume()
    verbs.run_until_idle()
    assert [wc.status for wc in a.poll()] == [WcStatus.SUCCESS]
    assert verbs.now >= 1.0


def test_keys_depend_on_the_seed_only() -> None:
    keys = [(pair(seed)[1].mr.lkey, pair(seed)[2].mr.rkey) for seed in (1, 1, 2)]
    assert keys[0] == keys[1] != keys[2]


def test_async_wait_in_virtual_time() -> None:
    async def main() -> float:
        verbs = VerbsFabric(Fabric(0, LinkSpec(latency=1e-3)), clock=anyio.current_time)
        a, b = Side(verbs, "h"), Side(verbs, "t")
        a.qp.connect(b.qp)
        a.qp.post_send(SendWR(1, WrOpcode.RDMA_READ, [a.sge(0, 8)], b.mr.addr, b.mr.rkey))
        wcs = await a.cq.wait()
        assert wcs[0].status is WcStatus.SUCCESS
        return anyio.current_time()

    assert run_virtual(main) == pytest.approx(2e-3, rel=1e-3)
