"""A Key-Value namespace (CSI 0x01): the KV command set served from a ``KeyValueEngine``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

from kvext.engine.base import EngineError, KeyValueEngine
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

    async def execute(self, request: Request, channel: ControllerChannel) -> CommandResult:
        cmd = request.command
        fields = KvCommandFields.from_command(cmd)
        opcode = cmd.opcode
        try:
            if opcode == KvOpcode.STORE:
                return await self._store(request, channel, fields)
            if opcode == KvOpcode.RETRIEVE:
                key = self._key(fields)
                value = await self.engine.retrieve_async(key)
                length = min(fields.size, len(value))
                return CommandResult(dw0=len(value), data=[value[:length]] if length else ())
            if opcode == KvOpcode.EXIST:
                if not self.engine.exists(self._key(fields)):
                    raise _status(KvStatus.KEY_DOES_NOT_EXIST)
                return CommandResult()
            if opcode == KvOpcode.DELETE:
                existed = await self.engine.delete_async(self._key(fields))
                if not existed and self.error_on_delete_of_missing_key:
                    raise _status(KvStatus.KEY_DOES_NOT_EXIST)
                return CommandResult()
            if opcode == KvOpcode.LIST:
                start = self._key(fields, allow_empty=True)
                limit = max(0, (fields.size - 4) // _ENTRY_MIN)
                keys = self.engine.list_keys(start, limit)
                return CommandResult(data=[encode_key_list(keys, fields.size)])
            if opcode == KvOpcode.FLUSH:
                await self.engine.flush()
                return CommandResult()
        except EngineError as exc:
            raise CommandError(kv_status(exc.kv_status), str(exc)) from exc
        raise CommandError(
            Status.generic(GenericStatus.INVALID_OPCODE), f"KV opcode 0x{opcode:02x}"
        )

    async def _store(
        self, request: Request, channel: ControllerChannel, fields: KvCommandFields
    ) -> CommandResult:
        key = self._key(fields)
        size = fields.size
        options = StoreOption(fields.options & 0x7)
        if StoreOption.MUST_EXIST in options and StoreOption.MUST_NOT_EXIST in options:
            raise _invalid_field("store options: must-exist and must-not-exist together")
        if size > self.engine.limits.max_value_length:
            raise _status(KvStatus.INVALID_VALUE_SIZE)
        if request.command.dptr.length < size:
            raise CommandError(
                Status.generic(GenericStatus.DATA_SGL_LENGTH_INVALID),
                f"SGL length {request.command.dptr.length} < value size {size}",
            )
        # Check the options before moving data, so a refused Store costs no transfer.
        if StoreOption.MUST_EXIST in options and not self.engine.exists(key):
            raise _status(KvStatus.KEY_DOES_NOT_EXIST)
        if StoreOption.MUST_NOT_EXIST in options and self.engine.exists(key):
            raise _status(KvStatus.KEY_EXISTS)
        if request.in_capsule is not None and len(request.in_capsule) == size:
            value = request.in_capsule  # the connection's own buffer: keep it, no copy
        else:
            value = self.engine.allocate(size)
            if size:
                await channel.pull(request, value)
        await self.engine.store_async(
            key,
            value,
            must_exist=StoreOption.MUST_EXIST in options,
            must_not_exist=StoreOption.MUST_NOT_EXIST in options,
        )
        return CommandResult()
