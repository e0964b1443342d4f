"""A Key-Value namespace (CSI 0x01): the KV command set served from a ``KeyValueEngine``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

from kvext.engine.base import EngineError, KeyValueEngine
from kvext.engine.memory import MemoryEngine
from kvext.spec import (
    KV_CSI,
    KV_IO_COMMAND_EFFECTS,
    MAX_KEY_LENGTH,
    KvCommandFields,
    KvFormat,
    KvIdentifyController,
    KvIdentifyNamespace,
    KvOpcode,
    KvStatus,
    StoreOption,
    encode_key_list,
    kv_status,
)
from nvmeof.errors import CommandError
from nvmeof.spec.features import FeatureId
from nvmeof.spec.identify import IdentifyNamespace, LbaFormat
from nvmeof.spec.status import GenericStatus, Status
from nvmeof.target.namespace import CommandResult
from nvmeof.transport.base import ControllerChannel, Request

log = logging.getLogger("kvext.namespace")

_BLOCK = 4096  # the NVM-shaped CNS 0 page reports capacity in 4 KiB units
_ENTRY_MIN = 4  # smallest List entry: u16 length + key, padded to 4 bytes


def _status(code: int) -> CommandError:
    return CommandError(kv_status(code), KvStatus(code).name)


def _invalid_field(message: str) -> CommandError:
    return CommandError(Status.generic(GenericStatus.INVALID_FIELD), message)


class KeyValueNamespace:
    """Serves Store, Retrieve, Delete, Exist and List over an engine (DRAM or flash)."""

    csi = KV_CSI

    def __init__(
        self, engine: KeyValueEngine, *, name: str = "kv0", ns_uuid: uuid.UUID | None = None
    ):
        self.engine = engine
        self.name = name
        self.nsid = 0
        self.uuid = ns_uuid or uuid.uuid4()
        self.error_on_delete_of_missing_key = False  # Feature 0x20 EDNEK
        # A DRAM engine never waits: its commands can complete inside the receive loop.
        self._synchronous = isinstance(engine, MemoryEngine)

    def allocate_in_capsule(self, sqe: memoryview, size: int) -> bytearray | memoryview:
        """Where a command's in-capsule data lands: a Store's value goes straight into the
        engine's own (pooled, for DRAM) buffer, which the Store then keeps without a copy."""
        if sqe[0] != KvOpcode.STORE:
            return bytearray(size)
        try:
            return self.engine.allocate(size)
        except (EngineError, ValueError):
            return bytearray(size)  # the Store itself then fails with the status that says why

    # --- identify ---------------------------------------------------------------------------
    def identify_namespace(self) -> bytes:
        blocks = max(1, self.engine.limits.capacity_bytes // _BLOCK)
        return IdentifyNamespace(
            nsze=blocks,
            ncap=blocks,
            nuse=min(blocks, -(-self.engine.used_bytes // _BLOCK)),
            nlbaf=0,
            nmic=1,
            nguid=self.uuid.bytes,
            lbaf=(LbaFormat(ms=0, lbads=12, rp=0),),
        ).pack()

    def identify_csi_namespace(self) -> bytes:
        limits = self.engine.limits
        return KvIdentifyNamespace(
            nsze=limits.capacity_bytes,
            nuse=self.engine.used_bytes,
            nmic=1,
            nguid=self.uuid.bytes,
            formats=(
                KvFormat(
                    max_key_length=min(limits.max_key_length, MAX_KEY_LENGTH),
                    max_value_length=limits.max_value_length,
                    max_num_keys=limits.max_keys,
                ),
            ),
        ).pack()

    def identify_csi_controller(self) -> bytes:
        return KvIdentifyController().pack()

    def io_command_effects(self) -> Mapping[int, int]:
        return KV_IO_COMMAND_EFFECTS

    def get_feature(self, fid: int) -> int | None:
        if fid == FeatureId.KEY_VALUE_CONFIGURATION:
            return int(self.error_on_delete_of_missing_key)
        return None

    def set_feature(self, fid: int, value: int) -> bool:
        if fid == FeatureId.KEY_VALUE_CONFIGURATION:
            self.error_on_delete_of_missing_key = bool(value & 1)
            return True
        return False

    def describe(self) -> dict[str, object]:
        limits = self.engine.limits
        return {
            "nsid": self.nsid,
            "name": self.name,
            "csi": self.csi,
            "uuid": str(self.uuid),
            "capacity_bytes": limits.capacity_bytes,
            "used_bytes": self.engine.used_bytes,
            "keys": len(self.engine),
            "max_value_length": limits.max_value_length,
        }

    # --- I/O --------------------------------------------------------------------------------
    def _key(self, fields: KvCommandFields, *, allow_empty: bool = False) -> bytes:
        if fields.key_length > MAX_KEY_LENGTH:
            raise _invalid_field(f"key length {fields.key_length} > {MAX_KEY_LENGTH}")
        if fields.key_length == 0 and allow_empty:
            return b""
        if fields.key_length == 0 or fields.key_length > self.engine.limits.max_key_length:
            raise _status(KvStatus.INVALID_KEY_SIZE)
        return fields.key

    def execute_now(self, request: Request) -> CommandResult | None:
        """Execute a command that needs no waiting, synchronously; None if it needs ``execute``.

        On a DRAM engine every command but a Store whose data is not in the capsule completes
        here, so the target answers it from its receive loop without a task per command.
        """
        if not self._synchronous:
            return None
        cmd = request.command
        fields = KvCommandFields.from_command(cmd)
        opcode = cmd.opcode
        if opcode == KvOpcode.STORE and fields.size and not _carries_value(request, fields):
            return None  # the value still has to come (R2T and H2CData)
        engine = self.engine
        assert isinstance(engine, MemoryEngine)
        try:
            if opcode == KvOpcode.STORE:
                key, options = self._check_store(request, fields)
                value = request.in_capsule if fields.size else engine.allocate(0)
                assert value is not None
                engine.store(key, value, **options)
                return CommandResult()
            if opcode == KvOpcode.RETRIEVE:
                return _retrieved(engine.retrieve(self._key(fields)), fields)
            if opcode == KvOpcode.DELETE:
                return self._deleted(engine.delete(self._key(fields)))
            if opcode == KvOpcode.FLUSH:
                return CommandResult()  # DRAM: nothing is more durable than it already is
            return self._index_command(opcode, fields)
        except EngineError as exc:
            raise CommandError(kv_status(exc.kv_status), str(exc)) from exc

    async def execute(self, request: Request, channel: ControllerChannel) -> CommandResult:
        done = self.execute_now(request)
        if done is not None:
            return done
        cmd = request.command
        fields = KvCommandFields.from_command(cmd)
        opcode = cmd.opcode
        try:
            if opcode == KvOpcode.STORE:
                key, options = self._check_store(request, fields)
                if _carries_value(request, fields):
                    value = request.in_capsule  # the connection's own buffer: keep it, no copy
                else:
                    value = self.engine.allocate(fields.size)
                    if fields.size:
                        await channel.pull(request, value)
                assert value is not None
                await self.engine.store_async(key, value, **options)
                return CommandResult()
            if opcode == KvOpcode.RETRIEVE:
                return _retrieved(await self.engine.retrieve_async(self._key(fields)), fields)
            if opcode == KvOpcode.DELETE:
                return self._deleted(await self.engine.delete_async(self._key(fields)))
            if opcode == KvOpcode.FLUSH:
                await self.engine.flush()
                return CommandResult()
            return self._index_command(opcode, fields)
        except EngineError as exc:
            raise CommandError(kv_status(exc.kv_status), str(exc)) from exc

    def _index_command(self, opcode: int, fields: KvCommandFields) -> CommandResult:
        """Exist and List: every engine keeps its index in memory."""
        if opcode == KvOpcode.EXIST:
            if not self.engine.exists(self._key(fields)):
                raise _status(KvStatus.KEY_DOES_NOT_EXIST)
            return CommandResult()
        if opcode == KvOpcode.LIST:
            start = self._key(fields, allow_empty=True)
            limit = max(0, (fields.size - 4) // _ENTRY_MIN)
            keys = self.engine.list_keys(start, limit)
            return CommandResult(data=[encode_key_list(keys, fields.size)])
        raise CommandError(
            Status.generic(GenericStatus.INVALID_OPCODE), f"KV opcode 0x{opcode:02x}"
        )

    def _deleted(self, existed: bool) -> CommandResult:
        if not existed and self.error_on_delete_of_missing_key:
            raise _status(KvStatus.KEY_DOES_NOT_EXIST)
        return CommandResult()

    def _check_store(
        self, request: Request, fields: KvCommandFields
    ) -> tuple[bytes, dict[str, bool]]:
        """Validate a Store before any data moves, so a refused Store costs no transfer."""
        key = self._key(fields)
        size = fields.size
        options = StoreOption(fields.options & 0x7)
        must_exist = StoreOption.MUST_EXIST in options
        must_not_exist = StoreOption.MUST_NOT_EXIST in options
        if must_exist and must_not_exist:
            raise _invalid_field("store options: must-exist and must-not-exist together")
        if size > self.engine.limits.max_value_length:
            raise _status(KvStatus.INVALID_VALUE_SIZE)
        if request.command.dptr.length < size:
            raise CommandError(
                Status.generic(GenericStatus.DATA_SGL_LENGTH_INVALID),
                f"SGL length {request.command.dptr.length} < value size {size}",
            )
        if must_exist and not self.engine.exists(key):
            raise _status(KvStatus.KEY_DOES_NOT_EXIST)
        if must_not_exist and self.engine.exists(key):
            raise _status(KvStatus.KEY_EXISTS)
        return key, {"must_exist": must_exist, "must_not_exist": must_not_exist}


def _carries_value(request: Request, fields: KvCommandFields) -> bool:
    return request.in_capsule is not None and len(request.in_capsule) == fields.size


def _retrieved(value: memoryview, fields: KvCommandFields) -> CommandResult:
    # As much as the host's buffer holds; DW0 tells the host the whole size.
    length = min(fields.size, len(value))
    return CommandResult(dw0=len(value), data=[value[:length]] if length else ())
