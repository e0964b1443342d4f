"""A small blocking JSON-RPC 2.0 client for a target's Unix socket (what ``spdk-rpc`` does, for
the ``gpucache`` commands that ask a running target: ``gpucache stats``)."""

from __future__ import annotations

import itertools
import json
import socket

from nvmeof.target.rpc import JsonStream, JsonStreamError

_ids = itertools.count(1)


class RpcCallError(Exception):
    """The target answered with a JSON-RPC error (``code``, ``message``), or not as JSON-RPC."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message


def rpc_call(path: str, method: str, params: object = None, *, timeout: float = 10.0) -> object:
    """Call ``method`` on the JSON-RPC server at the Unix socket ``path``; its result.

    ``OSError`` when nothing listens there (or it hangs up, or ``timeout`` passes),
    ``RpcCallError`` when the server answers with an error.
    """
    request_id = next(_ids)
    request: dict[str, object] = {"jsonrpc": "2.0", "method": method, "id": request_id}
    if params is not None:
        request["params"] = params
    framer = JsonStream()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode())
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError(f"{path}: the server closed the connection")
            try:
                for reply in framer.feed(data):
                    if isinstance(reply, dict) and reply.get("id") == request_id:
                        return _result(reply)
            except JsonStreamError as exc:
                raise RpcCallError(-32700, f"reply is not JSON: {exc}") from exc


def _result(reply: dict[str, object]) -> object:
    error = reply.get("error")
    if error is not None:
        if isinstance(error, dict):
            raise RpcCallError(int(error.get("code", 0)), str(error.get("message", "")))
        raise RpcCallError(0, str(error))
    return reply.get("result")


__all__ = ["RpcCallError", "rpc_call"]
