"""Admin commands without data or parameters worth a record: Keep Alive, AER, Abort."""

from __future__ import annotations

from nvmeof.spec.command import AdminOpcode, Command

# Abort DW0 bit 0: the command was not aborted (Linux nvmet always answers so).
ABORT_NOT_ABORTED = 1 << 0


def keep_alive_command(cid: int = 0) -> Command:
    return Command(opcode=AdminOpcode.KEEP_ALIVE, cid=cid)


def async_event_request_command(cid: int = 0) -> Command:
    return Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST, cid=cid)


def abort_command(sqid: int, cid_to_abort: int, *, cid: int = 0) -> Command:
    return Command(
        opcode=AdminOpcode.ABORT, cid=cid, cdw10=(sqid & 0xFFFF) | (cid_to_abort & 0xFFFF) << 16
    )


def decode_abort(cmd: Command) -> tuple[int, int]:
    """(SQID, CID) named by an Abort command."""
    return cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
