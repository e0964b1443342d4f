"""The ``nvmeof://`` URL that names a GPUCache target for LMCache.

``nvmeof://HOST[:PORT]/SUBNQN[?queues=N&depth=N&timeout=S&nsid=N&prefetch=W&salt=S&digest=B&poll_us=U]``

- ``HOST:PORT``: the target's NVMe/TCP listener (port 4420 by default; ``[v6]:port`` for IPv6).
- ``SUBNQN``: the subsystem NQN (``nqn.2024-01.io.gpucache:kv0`` if the path is empty).
- ``queues``: I/O queues (default 1: a GPUCache target process serves its queues from one
  thread; with more, small commands share the first queue with a free slot, so one send carries
  many, and large transfers of 64 KiB and up spread round robin).
- ``depth``: commands in flight per queue (default 32).
- ``timeout``: seconds for connect and per command (default 10).
- ``nsid``: the KV namespace (default: the subsystem's first KV namespace).
- ``prefetch``: KV-aware prefetch window in chunks (default 0, off): fetching chunk i of a
  prefix chain also fetches chunks i+1..i+W into a host buffer.
- ``salt``: a tenant salt mixed into every key (default empty), on top of the per-request
  ``cache_salt`` LMCache already puts in its keys; tenants with different salts never share
  entries.
- ``digest``: ``1`` turns on NVMe/TCP header and data digests (CRC32C; default off).
- ``poll_us``: microseconds a queue waiting for a completion keeps trying its socket before it
  sleeps (default: the process's, ``GPUCACHE_POLL_US`` or 200; 0 never polls): a target that
  answers within it costs no wake-up, at the price of that much CPU per wait.

Parsing needs neither LMCache nor a connection.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import attrs

SCHEME = "nvmeof"
DEFAULT_PORT = 4420
DEFAULT_NQN = "nqn.2024-01.io.gpucache:kv0"

_INT_PARAMS = ("queues", "depth", "nsid", "prefetch")
_KNOWN = {*_INT_PARAMS, "timeout", "salt", "digest", "poll_us"}


@attrs.frozen
class TargetURL:
    """A parsed ``nvmeof://`` URL."""

    host: str
    port: int = DEFAULT_PORT
    subnqn: str = DEFAULT_NQN
    queues: int = 1
    depth: int = 32
    timeout: float = 10.0
    nsid: int | None = None
    prefetch: int = 0
    salt: str = ""
    digest: bool = False
    poll_us: float | None = None  # None: the process default (nvmeof.transport.sockets.POLL)

    @classmethod
    def parse(cls, url: str) -> TargetURL:
        parts = urlsplit(url)
        if parts.scheme != SCHEME:
            raise ValueError(f"not an {SCHEME}:// URL: {url!r}")
        if not parts.hostname:
            raise ValueError(f"{url!r} names no host")
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(params) - _KNOWN
        if unknown:
            raise ValueError(f"{url!r}: unknown parameter(s) {sorted(unknown)}")
        ints: dict[str, int] = {}
        for name in _INT_PARAMS:
            if name in params:
                try:
                    ints[name] = int(params[name])
                except ValueError:
                    raise ValueError(f"{url!r}: {name} must be an integer") from None
        queues, depth = ints.get("queues", 1), ints.get("depth", 32)
        prefetch = ints.get("prefetch", 0)
        if queues < 1 or depth < 1 or prefetch < 0:
            raise ValueError(f"{url!r}: queues and depth must be >= 1, prefetch >= 0")
        poll_us: float | None = None
        if "poll_us" in params:
            try:
                poll_us = float(params["poll_us"])
            except ValueError:
                raise ValueError(f"{url!r}: poll_us must be a number") from None
            if not poll_us >= 0:  # NaN too
                raise ValueError(f"{url!r}: poll_us must be >= 0")
        return cls(
            host=parts.hostname,
            port=parts.port or DEFAULT_PORT,
            subnqn=unquote(parts.path.strip("/")) or DEFAULT_NQN,
            queues=queues,
            depth=depth,
            timeout=float(params.get("timeout", 10.0)),
            nsid=ints.get("nsid"),
            prefetch=prefetch,
            salt=params.get("salt", ""),
            digest=params.get("digest", "0").lower() in ("1", "true", "yes"),
            poll_us=poll_us,
        )

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"queues={self.queues}&depth={self.depth}&timeout={self.timeout:g}"
        if self.nsid is not None:
            query += f"&nsid={self.nsid}"
        if self.prefetch:
            query += f"&prefetch={self.prefetch}"
        if self.salt:
            query += f"&salt={self.salt}"
        if self.digest:
            query += "&digest=1"
        if self.poll_us is not None:
            query += f"&poll_us={self.poll_us:g}"
        return f"{SCHEME}://{host}:{self.port}/{self.subnqn}?{query}"
