"""The parts of the pyverbs backend that need no RDMA device: finding the descriptor a pyverbs
channel opened (pyverbs does not expose it, and its blocking waits keep the GIL), so completions
and CM events are waited for in the event loop."""

from __future__ import annotations

import errno
import os

from nvmeof.transport import pyverbs_backend as backend


def test_the_one_new_descriptor_is_found_and_made_non_blocking() -> None:
    fd, found = backend._with_new_fd(lambda: os.open("/dev/null", os.O_RDONLY), "/dev/null")
    try:
        assert found == fd
        assert not os.get_blocking(fd)
    finally:
        os.close(fd)


def test_two_new_descriptors_are_not_guessed_between() -> None:
    def two() -> tuple[int, int]:
        return os.open("/dev/null", os.O_RDONLY), os.open("/dev/null", os.O_RDONLY)

    fds, found = backend._with_new_fd(two, "/dev/null")
    try:
        assert found is None
    finally:
        for fd in fds:
            os.close(fd)


def test_would_block_reads_pyverbs_error_codes() -> None:
    class PyverbsRDMAError(Exception):
        def __init__(self, code: int) -> None:
            super().__init__("Failed to get CQ event")
            self.error_code = code

    assert backend._would_block(PyverbsRDMAError(errno.EAGAIN))
    assert not backend._would_block(PyverbsRDMAError(errno.EBADF))
    assert not backend._would_block(ValueError())
