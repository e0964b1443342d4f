"""Which event loop ``anyio.run`` gets: uvloop under asyncio when it is installed.

uvloop runs the same asyncio code with a C event loop: callbacks, futures and socket readiness
cost a fraction of the pure-Python loop's, and the target and the initiator spend most of their
per-command time there. ``GPUCACHE_UVLOOP=0`` keeps the standard loop (for comparing, or when
debugging with asyncio's debug mode).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def uvloop_enabled() -> bool:
    if os.environ.get("GPUCACHE_UVLOOP", "1") == "0":
        return False
    return importlib.util.find_spec("uvloop") is not None


def run_options(backend: str) -> dict[str, Any]:
    """Keyword arguments for ``anyio.run`` on ``backend`` ("asyncio" or "trio")."""
    if backend == "asyncio" and uvloop_enabled():
        return {"backend": backend, "backend_options": {"use_uvloop": True}}
    return {"backend": backend}
