"""SPDK-compatible JSON-RPC 2.0: framing, errors, parameter decoding, the method registry, and
the Unix-socket server, so SPDK's own client (``spdk-rpc`` / ``rpc.py``) drives a GPUCache target.

The methods themselves live with what they act on: the target's (bdev, nvmf, framework) in
``nvmeof.target.rpc_methods``, the KV bdevs' in ``kvext.rpc``, which extends a registry from
``core_methods()`` (the target core never imports the KV command set).

Errors use SPDK's codes and messages (``lib/jsonrpc`` and each module's ``rpc_*.c``): the code and
message a client sees are SPDK's; the detail SPDK would log goes to our log and, for a config
file, into the error that names the bad entry.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import os
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
import attrs

if TYPE_CHECKING:
    from nvmeof.target.app import TargetApp

log = logging.getLogger("nvmeof.target.rpc")

DEFAULT_RPC_SOCKET = "/var/tmp/spdk.sock"
MAX_REQUEST_BYTES = 32 << 20


class RpcErrorCode(enum.IntEnum):
    """JSON-RPC 2.0 codes, and SPDK's "invalid state" (``SPDK_JSONRPC_ERROR_INVALID_STATE``)."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    INVALID_STATE = -1


class RpcError(Exception):
    """A JSON-RPC error response: SPDK's ``code`` and ``message``; ``detail`` is for logs."""

    def __init__(self, code: int, message: str, detail: str = "") -> None:
        super().__init__(f"{message}: {detail}" if detail else message)
        self.code = int(code)
        self.message = message
        self.detail = detail

    @classmethod
    def errno(cls, err: int, detail: str = "") -> RpcError:
        """SPDK's ``spdk_jsonrpc_send_error_response(request, -errno, spdk_strerror(errno))``."""
        return cls(-err, os.strerror(err), detail)

    @classmethod
    def invalid_params(cls, detail: str = "", message: str = "Invalid parameters") -> RpcError:
        return cls(RpcErrorCode.INVALID_PARAMS, message, detail)

    @classmethod
    def decode_failed(cls, detail: str = "") -> RpcError:
        """What SPDK's bdev modules answer when the parameters do not decode."""
        return cls(RpcErrorCode.INTERNAL_ERROR, "spdk_json_decode_object failed", detail)

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class RpcState(enum.Flag):
    """SPDK's RPC states: before ``framework_start_init`` (``--wait-for-rpc``), and after."""

    STARTUP = enum.auto()
    RUNTIME = enum.auto()


BOTH_STATES = RpcState.STARTUP | RpcState.RUNTIME

Handler = Callable[["TargetApp", object], Awaitable[object]]


@attrs.frozen
class RpcMethod:
    name: str
    handler: Handler
    states: RpcState = RpcState.RUNTIME


class RpcMethods:
    """Method name -> handler. ``core_methods()`` gives the target's; others add theirs."""

    def __init__(self, methods: Mapping[str, RpcMethod] | None = None) -> None:
        self._methods: dict[str, RpcMethod] = dict(methods or {})

    def register(self, name: str, handler: Handler, *, states: RpcState = RpcState.RUNTIME) -> None:
        if name in self._methods:
            raise ValueError(f"RPC method {name} is already registered")
        self._methods[name] = RpcMethod(name, handler, states)

    def method(
        self, name: str, *, states: RpcState = RpcState.RUNTIME
    ) -> Callable[[Handler], Handler]:
        def decorate(handler: Handler) -> Handler:
            self.register(name, handler, states=states)
            return handler

        return decorate

    def get(self, name: str) -> RpcMethod | None:
        return self._methods.get(name)

    def names(self, state: RpcState | None = None) -> list[str]:
        return [m.name for m in self._methods.values() if state is None or state & m.states]

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def copy(self) -> RpcMethods:
        return RpcMethods(self._methods)


def state_error(state: RpcState) -> RpcError:
    if state == RpcState.STARTUP:
        message = (
            "Method may only be called after framework is initialized "
            "using framework_start_init RPC."
        )
    else:
        message = (
            "Method may only be called before framework is initialized. "
            "Use --wait-for-rpc command line parameter and then issue this RPC "
            "before the framework_start_init RPC."
        )
    return RpcError(RpcErrorCode.INVALID_STATE, message)


# --- parameter decoding (SPDK's spdk_json_decode_object: unknown keys fail, as do wrong types) ---
T = TypeVar("T")


def decode_params(cls: type[T], params: object, *, error: Callable[[str], RpcError]) -> T:
    """Decode a ``params`` object into the attrs class ``cls``, or raise ``error(detail)``."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise error("params must be an object")
    return _decode_object(cls, params, "", error)


def _decode_object(
    cls: type[T], params: Mapping[str, object], path: str, error: Callable[[str], RpcError]
) -> T:
    fields = attrs.fields_dict(cls)  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise error(f"unknown parameter {path}{unknown[0]}")
    kwargs: dict[str, object] = {}
    for name, field in fields.items():
        if name in params:
            kwargs[name] = _convert(hints[name], params[name], f"{path}{name}", error)
        elif field.default is attrs.NOTHING:
            raise error(f"missing parameter {path}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise error(str(exc)) from exc


def _convert(tp: Any, value: object, path: str, error: Callable[[str], RpcError]) -> object:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        last: RpcError | None = None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path, error)
            except RpcError as exc:
                last = exc
        assert last is not None
        raise last
    if tp is Any or tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp) or (Any,)
            return [_convert(item, v, f"{path}[{i}]", error) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    elif attrs.has(tp):
        if isinstance(value, dict):
            return _decode_object(tp, value, f"{path}.", error)
    else:  # pragma: no cover - a parameter class with a type this decoder lacks
        raise TypeError(f"cannot decode {path} as {tp!r}")
    name = getattr(tp, "__name__", str(tp))
    raise error(f"parameter {path} must be {name}, got {type(value).__name__}")


def no_params(method: str, params: object) -> None:
    """SPDK's answer to parameters given to a method that takes none."""
    if params not in (None, {}):
        raise RpcError(RpcErrorCode.INVALID_PARAMS, f"{method} method requires no parameters")


# --- JSON-RPC 2.0 framing -----------------------------------------------------------------------
class JsonStreamError(ValueError):
    pass


class JsonStream:
    """Splits a byte stream into top-level JSON values (SPDK's server takes them back to back,
    with or without whitespace between, as ``spdk-rpc`` sends them). Sans-IO."""

    def __init__(self, limit: int = MAX_REQUEST_BYTES) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> Iterator[object]:
        """The complete values ``data`` finishes; ``JsonStreamError`` if the stream is not JSON."""
        self._buf += data
        while True:
            start = 0
            while start < len(self._buf) and self._buf[start] in b" \t\r\n":
                start += 1
            del self._buf[:start]
            if not self._buf:
                return
            end = _value_end(self._buf)
            if end is None:
                if len(self._buf) > self._limit:
                    raise JsonStreamError("request too large")
                return
            raw = bytes(self._buf[:end])
            del self._buf[:end]
            try:
                yield json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise JsonStreamError(str(exc)) from exc


def _value_end(buf: bytearray) -> int | None:
    """The end of the object or array ``buf`` starts with, or None while it is incomplete."""
    if buf[0] not in b"{[":
        raise JsonStreamError(f"a request must be an object or an array, not {chr(buf[0])!r}")
    depth = 0
    in_string = escaped = False
    for i, byte in enumerate(buf):
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"{[":
            depth += 1
        elif byte in b"}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def response(request_id: object, result: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_response(request_id: object, error: RpcError) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_json()}


Dispatch = Callable[[str, object], Awaitable[object]]


async def answer(message: object, dispatch: Dispatch) -> object | None:
    """The response to one request or batch (None: only notifications, nothing to send)."""
    if isinstance(message, list):
        if not message:
            return error_response(None, RpcError(RpcErrorCode.INVALID_REQUEST, "Invalid request"))
        answers = [await _answer_one(item, dispatch) for item in message]
        kept = [a for a in answers if a is not None]
        return kept or None
    return await _answer_one(message, dispatch)


async def _answer_one(request: object, dispatch: Dispatch) -> dict[str, object] | None:
    invalid = RpcError(RpcErrorCode.INVALID_REQUEST, "Invalid request")
    if not isinstance(request, dict):
        return error_response(None, invalid)
    request_id = request.get("id")
    method = request.get("method")
    if (
        request.get("jsonrpc") != "2.0"
        or not isinstance(method, str)
        or not isinstance(request_id, str | int | float | type(None))
        or isinstance(request_id, bool)
        or not set(request) <= {"jsonrpc", "method", "params", "id"}
    ):
        return error_response(request_id if isinstance(request_id, str | int) else None, invalid)
    try:
        result = await dispatch(method, request.get("params"))
    except RpcError as exc:
        level = logging.DEBUG if exc.code == RpcErrorCode.METHOD_NOT_FOUND else logging.WARNING
        log.log(level, "rpc %s failed: %s", method, exc)
        reply = error_response(request_id, exc)
    except Exception:
        log.exception("rpc %s crashed", method)
        reply = error_response(request_id, RpcError(RpcErrorCode.INTERNAL_ERROR, "Internal error"))
    else:
        reply = response(request_id, result)
    return reply if "id" in request else None


def encode(message: object) -> bytes:
    return (json.dumps(message, indent=2) + "\n").encode()


# --- the Unix socket server ---------------------------------------------------------------------
class RpcSocketInUse(OSError):
    pass


@contextlib.contextmanager
def rpc_socket_lock(path: str) -> Iterator[None]:
    """Hold ``<path>.lock`` as SPDK does, so two targets never share one RPC socket, and a stale
    socket file left by a dead one is replaced."""
    lock_path = path + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RpcSocketInUse(
                errno.EADDRINUSE, f"RPC Unix domain socket path {path} in use. Specify another."
            ) from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def rpc_listener(path: str) -> AsyncIterator[anyio.abc.SocketListener]:
    with rpc_socket_lock(path):
        listener = await anyio.create_unix_listener(path)
        try:
            yield listener
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()


async def serve_rpc(listener: anyio.abc.SocketListener, dispatch: Dispatch) -> None:
    """Answer requests on every connection to ``listener`` until cancelled."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await serve_rpc_connection(stream, dispatch)

    await listener.serve(handle)


async def serve_rpc_connection(stream: anyio.abc.ByteStream, dispatch: Dispatch) -> None:
    """Requests on one connection are answered in order, one at a time (as SPDK does)."""
    framer = JsonStream()
    while True:
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        try:
            for message in framer.feed(data):
                reply = await answer(message, dispatch)
                if reply is not None:
                    await stream.send(encode(reply))
        except JsonStreamError as exc:
            log.warning("rpc: parse error, closing the connection: %s", exc)
            error = RpcError(RpcErrorCode.PARSE_ERROR, "Parse error", str(exc))
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(encode(error_response(None, error)))
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
