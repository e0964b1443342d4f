"""Eviction policies, as data.

A DRAM engine keeps its entries in one ordered map, oldest first; a policy only says which
operations move an entry to the young end and whether the engine may evict at all. That covers LRU
(every use refreshes), FIFO (only a store, which is a new insertion of a new value, refreshes) and
"none" (capacity is a hard limit). A new policy is a new row, not new engine code.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import attrs


@attrs.frozen
class EvictionPolicy:
    """How an ordered engine ages its entries and whether it may drop them to make room."""

    name: str
    refresh_on_store: bool  # an overwrite moves the key to the young end
    refresh_on_retrieve: bool  # a hit moves the key to the young end
    evicts: bool  # False: a store that does not fit raises CapacityExceeded


LRU = EvictionPolicy("lru", refresh_on_store=True, refresh_on_retrieve=True, evicts=True)
FIFO = EvictionPolicy("fifo", refresh_on_store=True, refresh_on_retrieve=False, evicts=True)
NO_EVICTION = EvictionPolicy("none", refresh_on_store=True, refresh_on_retrieve=False, evicts=False)

POLICIES: Mapping[str, EvictionPolicy] = MappingProxyType(
    {policy.name: policy for policy in (LRU, FIFO, NO_EVICTION)}
)


def policy_named(name: str) -> EvictionPolicy:
    """The registered policy called ``name``; ValueError listing the known names otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown eviction policy {name!r} (known: {known})") from None
