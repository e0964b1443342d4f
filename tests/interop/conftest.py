"""Fixtures of the kernel lab (``lab`` marker): one QEMU guest with Linux 6.12 for the session, and
our target served from a thread of this process for the guest's kernel host to reach at 10.0.2.2.

The guest image is built by ``scripts/setup.sh --with-lab`` (or here, if missing); set
``GPUCACHE_LAB=skip`` to skip these tests on a machine that cannot run QEMU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from nvmeof.cli import DEFAULT_IN_CAPSULE
from nvmeof.target.bdev.malloc import MallocBdev
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import Target, TargetLimits, transfer_size_for
from nvmeof.testing import make_kv_target
from nvmeof.units import parse_size
from tools.lab.guest import Guest, LabError, build_image, free_port

LAB_NQN = "nqn.2024-01.io.gpucache:lab"
NVMET_NQN = "nqn.2024-01.io.gpucache:nvmet-lab"
GUEST_NVMET_PORT = 4420
BLOCK_MIB = 64
BLOCK_NSID = 2
KV_NSID = 1


@attrs.frozen
class LabTarget:
    target: Target
    nqn: str
    io_port: int
    discovery_port: int
    portal: BlockingPortal


@attrs.frozen
class Lab:
    guest: Guest
    nvmet_port: int  # host port forwarded to the guest's nvmet-tcp (4420)


@pytest.fixture(scope="session")
def lab_image() -> Path:
    if os.environ.get("GPUCACHE_LAB") == "skip":
        pytest.skip("GPUCACHE_LAB=skip")
    try:
        return build_image()
    except LabError as exc:
        pytest.fail(f"the lab image could not be built: {exc}")


@pytest.fixture(scope="session")
def lab(lab_image: Path) -> Iterator[Lab]:
    nvmet_port = free_port()
    with Guest(lab_image, forwards={nvmet_port: GUEST_NVMET_PORT}) as guest:
        yield Lab(guest, nvmet_port)


@pytest.fixture(scope="session")
def lab_target() -> Iterator[LabTarget]:
    """A KV namespace (1) and a RAM block namespace (2), on 127.0.0.1 (the guest's 10.0.2.2).
    8 KiB in-capsule data, as SPDK's and Linux's targets: larger writes take R2Ts."""
    yield from _serve_lab_target(TargetLimits(max_transfer_size=transfer_size_for(1 << 20)))


@pytest.fixture(scope="session")
def big_capsule_target() -> Iterator[LabTarget]:
    """The same, with ``gpucache target``'s in-capsule data size (8 MiB + 4 KiB): the kernel
    host then sends its writes inside the command capsule."""
    yield from _serve_lab_target(
        TargetLimits(
            max_transfer_size=transfer_size_for(1 << 20),
            in_capsule_data_size=parse_size(DEFAULT_IN_CAPSULE),
        )
    )


def _serve_lab_target(limits: TargetLimits) -> Iterator[LabTarget]:
    target = make_kv_target(nqn=LAB_NQN, capacity=64 << 20, max_value_length=1 << 20, limits=limits)
    block = MallocBdev("Malloc0", BLOCK_MIB << 20 >> 9, 512)
    target.subsystems[LAB_NQN].add_namespace(block.make_namespace(), BLOCK_NSID)
    server = TargetServer(target)
    with start_blocking_portal("asyncio") as portal, contextlib.ExitStack() as stack:
        io = server.listen("127.0.0.1", 0)
        disc = server.listen("127.0.0.1", 0)
        for listener, discovery in ((io, False), (disc, True)):
            future, _ = portal.start_task(
                functools.partial(server.serve_listener, listener, discovery=discovery)
            )
            stack.callback(future.cancel)
        yield LabTarget(target, LAB_NQN, io.port, disc.port, portal)
