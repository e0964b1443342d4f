"""LLM serving traffic: multi-turn sessions over shared system prompts, cut into LMCache chunks.

A prompt is a run of token *pieces* (a shared system prompt, then each turn's user message and the
model's answer). It is cut into chunks of ``chunk_tokens`` (LMCache's default: 256) and each full
chunk gets a key chained from the key before it (``key_i = H(key_{i-1}, content of chunk i)``), as
LMCache keys a chunk by the hash of the whole prefix up to it. Two prompts share a chunk key exactly
when they share every token up to that chunk's end, so sessions on one system prompt share its
chunks, and turn ``k+1`` of a session reuses every chunk of turn ``k``. The partial last chunk is
not cached (recomputed), as in LMCache's default ``save_unfull_chunk=False``.

Keys are 63-bit integers from Python's tuple hash of integers, which is the same in every process
(only ``str``/``bytes`` hashing is salted); ``key_bytes`` gives the 8-byte KV key the protocol mode
stores.

KV bytes per token = 2 (K and V) x layers x KV heads x head dim x bytes per element; the
architectures are from each model's published ``config.json``.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import heapq
import itertools
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import attrs

CHUNK_TOKENS = 256
_MASK = (1 << 63) - 1


class Dtype(enum.Enum):
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"

    @property
    def bytes(self) -> int:
        return 1 if self is Dtype.FP8 else 2


@attrs.frozen
class ModelSpec:
    name: str
    params: float  # parameters active per token (prefill FLOPs ~ 2 x this per token)
    layers: int
    kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, dtype: Dtype) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype.bytes


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("llama-3-8b", 8.0e9, 32, 8, 128),  # 128 KiB/token at fp16
        ModelSpec("llama-3-70b", 70.6e9, 80, 8, 128),  # 320 KiB/token at fp16
        ModelSpec("llama-3.1-405b", 405.9e9, 126, 8, 128),  # 504 KiB/token at fp16
        ModelSpec("llama-2-7b", 6.7e9, 32, 32, 128),  # MHA: 512 KiB/token at fp16
        ModelSpec("mistral-7b", 7.2e9, 32, 8, 128),
        ModelSpec("mixtral-8x7b", 12.9e9, 32, 8, 128),  # 12.9B of 46.7B active per token
        ModelSpec("qwen2-72b", 72.7e9, 80, 8, 128),
    )
}


def model_named(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})") from None


@attrs.frozen
class Request:
    """One prefill: at ``time`` session ``session`` sends a prompt of ``prompt_tokens``."""

    time: float
    session: int
    prompt_tokens: int
    chunk_keys: tuple[int, ...]  # the prompt's full chunks, in prefix order
    output_tokens: int = 0


def key_bytes(key: int) -> bytes:
    return key.to_bytes(8, "big")


class ChunkChain:
    """A growing token sequence and the chained keys of its full chunks."""

    def __init__(self, chunk_tokens: int = CHUNK_TOKENS, keys: tuple[int, ...] = ()) -> None:
        self.chunk_tokens = chunk_tokens
        self.keys: list[int] = list(keys)
        self.tokens = len(keys) * chunk_tokens
        self._partial: list[tuple[int, int, int]] = []  # (source, start, length) in the open chunk
        self._partial_len = 0

    def copy(self) -> ChunkChain:
        other = ChunkChain(self.chunk_tokens, tuple(self.keys))
        other.tokens = self.tokens
        other._partial = list(self._partial)
        other._partial_len = self._partial_len
        return other

    def extend(self, source: int, length: int) -> None:
        """Append ``length`` tokens of content ``source`` (a unique id per token run)."""
        start = 0
        size = self.chunk_tokens
        while length > 0:
            take = min(length, size - self._partial_len)
            self._partial.append((source, start, take))
            self._partial_len += take
            start += take
            length -= take
            self.tokens += take
            if self._partial_len == size:
                prev = self.keys[-1] if self.keys else 0
                self.keys.append(hash((prev, *itertools.chain(*self._partial))) & _MASK)
                self._partial = []
                self._partial_len = 0


@attrs.frozen
class SessionWorkload:
    """Chat sessions: Poisson arrivals, each on a Zipf-popular system prompt, several turns."""

    duration: float = 600.0
    session_rate: float = 2.0  # new sessions per second, fleet-wide
    system_prompts: int = 50
    system_prompt_tokens: int = 1500
    zipf: float = 1.1
    turns_mean: float = 4.0
    user_tokens_mean: float = 150.0
    output_tokens_mean: float = 250.0
    think_time_mean: float = 20.0
    chunk_tokens: int = CHUNK_TOKENS

    def requests(self, seed: int) -> Iterator[Request]:
        """The requests in time order (ties in the order they were drawn)."""
        rng = random.Random(f"workload:{seed}")
        weights = list(
            itertools.accumulate(1.0 / (i + 1) ** self.zipf for i in range(self.system_prompts))
        )
        prefixes: dict[int, ChunkChain] = {}
        heap: list[tuple[float, int, int]] = []  # (time, seq, session)
        sessions: dict[int, tuple[ChunkChain, int]] = {}  # chain, turns left
        seq = itertools.count()
        ids = itertools.count(1 << 40)  # content ids of user and model token runs
        next_session = 0
        next_arrival = rng.expovariate(self.session_rate)
        while True:
            if heap and heap[0][0] <= next_arrival:
                time, _, session = heapq.heappop(heap)
            elif next_arrival < self.duration:
                time, session = next_arrival, next_session
                next_session += 1
                next_arrival += rng.expovariate(self.session_rate)
                prompt = bisect.bisect(weights, rng.random() * weights[-1])
                if prompt not in prefixes:
                    chain = ChunkChain(self.chunk_tokens)
                    chain.extend(prompt, self.system_prompt_tokens)
                    prefixes[prompt] = chain
                turns = 1 + int(rng.expovariate(1.0 / max(self.turns_mean - 1, 1e-9)))
                sessions[session] = (prefixes[prompt].copy(), turns)
            else:
                return
            if time >= self.duration:
                continue
            chain, turns = sessions[session]
            chain.extend(next(ids), _tokens(rng, self.user_tokens_mean))
            output = _tokens(rng, self.output_tokens_mean)
            yield Request(time, session, chain.tokens, tuple(chain.keys), output)
            chain.extend(next(ids), output)
            if turns > 1:
                sessions[session] = (chain, turns - 1)
                heapq.heappush(
                    heap, (time + rng.expovariate(1.0 / self.think_time_mean), next(seq), session)
                )
            else:
                del sessions[session]


def _tokens(rng: random.Random, mean: float) -> int:
    return max(1, round(rng.expovariate(1.0 / mean)))


def replay(path: str | Path, *, chunk_tokens: int = CHUNK_TOKENS) -> Iterator[Request]:
    """Requests from a JSONL trace, one object a line, in the file's order (times non-decreasing).

    ``{"time": 12.5, "session": "s1", "tokens": 2048, "output_tokens": 200, "system": "sp3",
    "system_tokens": 1500}``: the prompt is the session's context so far (its system prompt, if the
    first line of a session names one, then every earlier turn and answer) followed by new tokens
    up to ``tokens``; a ``tokens`` shorter than the context starts the context afresh.
    ``{"time": 12.5, "session": "s1", "chunk_keys": ["9f2c...", ...], "tokens": 600}`` gives the
    chunk keys outright (hex or any strings; hashed to the simulator's 63-bit keys).
    """
    contexts: dict[str, ChunkChain] = {}
    systems: dict[str, ChunkChain] = {}
    session_ids: dict[str, int] = {}
    last = -math.inf
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                time = float(rec["time"])
                session = str(rec["session"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a trace record: {exc}") from None
            if time < last:
                raise ValueError(f"{path}:{lineno}: time goes backwards ({time} < {last})")
            last = time
            sid = session_ids.setdefault(session, len(session_ids))
            output = int(rec.get("output_tokens", 0))
            if "chunk_keys" in rec:
                keys = tuple(_string_key(str(k)) for k in rec["chunk_keys"])
                tokens = int(rec.get("tokens", len(keys) * chunk_tokens))
                yield Request(time, sid, tokens, keys, output)
                continue
            tokens = int(rec["tokens"])
            chain = contexts.get(session)
            if chain is None or tokens < chain.tokens:
                chain = ChunkChain(chunk_tokens)
                if "system" in rec:
                    name = str(rec["system"])
                    if name not in systems:
                        systems[name] = ChunkChain(chunk_tokens)
                        systems[name].extend(_string_key(name), int(rec.get("system_tokens", 0)))
                    chain = systems[name].copy()
            chain.extend(_string_key(f"{session}:{lineno}:in"), tokens - chain.tokens)
            yield Request(time, sid, chain.tokens, tuple(chain.keys), output)
            chain.extend(_string_key(f"{session}:{lineno}:out"), output)
            contexts[session] = chain


def _string_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") & _MASK
