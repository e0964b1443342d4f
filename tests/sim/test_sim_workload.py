"""Traffic generators and trace replay."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from simulator.scenario import prefill_seconds_per_token
from simulator.workload import (
    MODELS,
    ChunkChain,
    Dtype,
    SessionWorkload,
    replay,
)

SCENARIOS = Path(__file__).parents[2] / "simulator" / "scenarios"


def test_kv_bytes_per_token() -> None:
    assert MODELS["llama-3-70b"].kv_bytes_per_token(Dtype.FP16) == 320 * 1024
    assert MODELS["llama-3-70b"].kv_bytes_per_token(Dtype.FP8) == 160 * 1024
    assert MODELS["llama-3-8b"].kv_bytes_per_token(Dtype.BF16) == 128 * 1024
    assert MODELS["llama-2-7b"].kv_bytes_per_token(Dtype.FP16) == 512 * 1024


def test_prefill_cost_matches_the_seed_figure() -> None:
    per_1000 = 1000 * prefill_seconds_per_token(MODELS["llama-3-70b"], "H100")
    assert per_1000 == pytest.approx(0.3, rel=0.01)
    assert prefill_seconds_per_token(MODELS["llama-3-8b"], "A100") > prefill_seconds_per_token(
        MODELS["llama-3-8b"], "H100"
    )


def test_chunk_keys_are_prefix_hashes() -> None:
    system = ChunkChain(256)
    system.extend(1, 600)  # two full chunks and 88 tokens
    a, b = system.copy(), system.copy()
    a.extend(100, 300)
    b.extend(200, 300)
    assert len(system.keys) == 2
    assert a.keys[:2] == b.keys[:2] == system.keys  # the shared prompt's chunks
    assert a.keys[2] != b.keys[2]  # the third chunk mixes in each session's own tokens
    whole = ChunkChain(256)
    whole.extend(1, 600)
    whole.extend(100, 300)
    assert whole.keys == a.keys  # keys depend on content, not on how it was appended


def test_sessions_reuse_their_history_and_share_system_prompts() -> None:
    workload = SessionWorkload(duration=120, session_rate=2, system_prompts=3)
    requests = list(workload.requests(seed=5))
    assert requests == list(workload.requests(seed=5))
    assert requests != list(workload.requests(seed=6))
    assert [r.time for r in requests] == sorted(r.time for r in requests)
    by_session: dict[int, list[tuple[int, ...]]] = {}
    for r in requests:
        by_session.setdefault(r.session, []).append(r.chunk_keys)
        assert len(r.chunk_keys) == r.prompt_tokens // 256
    multi = [turns for turns in by_session.values() if len(turns) > 1]
    assert multi
    for turns in multi:
        for earlier, later in itertools.pairwise(turns):
            assert later[: len(earlier)] == earlier
    firsts = {turns[0][:5] for turns in by_session.values()}
    assert len(firsts) <= 3  # 1500-token system prompts: five shared chunks each


def test_replay_of_the_bundled_trace() -> None:
    requests = list(replay(SCENARIOS / "trace-example.jsonl"))
    assert len(requests) == 7
    a1, b1, a2 = requests[0], requests[1], requests[2]
    assert a1.chunk_keys[:5] == b1.chunk_keys[:5]  # same system prompt
    assert a2.chunk_keys[: len(a1.chunk_keys)] == a1.chunk_keys  # the session's history
    assert len(requests[-1].chunk_keys) == 3  # given outright


def test_replay_rejects_time_going_backwards(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "\n".join(json.dumps({"time": t, "session": "s", "tokens": 10}) for t in (2, 1))
    )
    with pytest.raises(ValueError, match="backwards"):
        list(replay(trace))
