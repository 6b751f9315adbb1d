"""Scorer interface, failure accounting, cache, client retries (against a scripted local stub),
the unigram-F1 scorer and the PPO reward wiring. The real-server tests are in test_llama_server.py."""

from __future__ import annotations

import threading

import pytest

from radialog_rl.calibration.rewards import get_reward
from radialog_rl.errors import ConfigError, DataError
from radialog_rl.scoring import (
    GreenScorer,
    ReportScorer,
    ScorerFailureError,
    ScorerUnavailableError,
    UnigramF1Scorer,
    build_scorer,
    unigram_f1,
)
from radialog_rl.scoring.cache import ScoreCache
from radialog_rl.scoring.green import build_green_prompt


class _Scripted(ReportScorer):
    name = "scripted"

    def __init__(self, values, **kw):
        super().__init__(**kw)
        self.values = values

    def _score_batch(self, references, candidates, stats):
        stats.last_failure = "boom"
        return list(self.values)


def test_unigram_f1_by_hand():
    assert unigram_f1("The heart is normal.", "heart normal") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert unigram_f1("a a b", "a c") == pytest.approx(0.4)  # common 1: P 1/2, R 1/3
    assert unigram_f1("", "") == 1.0 and unigram_f1("x", "") == 0.0
    assert UnigramF1Scorer().score_pairs(["a b"], ["b a"]) == [1.0]


def test_failures_are_none_and_counted_and_too_many_stop_with_the_target_named():
    scorer = _Scripted([0.5, None, 1.0, None], max_failure_fraction=0.5)
    assert scorer.score_pairs(["r"] * 4, ["c"] * 4) == [0.5, None, 1.0, None]  # 2/4 is not > 0.5
    assert scorer.last_stats.failures == 2 and scorer.last_stats.scored == 2
    assert scorer.last_stats.as_metrics()["scorer/failures"] == 2
    scorer.values = [None, None, None, 1.0]
    with pytest.raises(ScorerFailureError, match=r"scripted scorer at scripted: 3 of 4 pairs failed.*boom"):
        scorer.score_pairs(["r"] * 4, ["c"] * 4)
    assert scorer.total_failures == 5
    never_stop = _Scripted([None, None], max_failure_fraction=1.0)
    assert never_stop.score_pairs(["r", "r"], ["c", "c"]) == [None, None]


def test_scorer_as_ppo_accuracy_scorer_reads_the_reference_field():
    scorer = UnigramF1Scorer(reference_key="report")
    assert scorer([{"report": "a b"}], ["a"]) == [pytest.approx(2 / 3)]
    with pytest.raises(DataError, match="'report'"):
        scorer([{"reference": "a b"}], ["a"])


def test_build_scorer_rejects_unknown_names_and_options():
    assert isinstance(build_scorer("green", server_url="http://127.0.0.1:1"), GreenScorer)
    with pytest.raises(ConfigError, match="unknown accuracy_scorer 'bleu'"):
        build_scorer("bleu")
    with pytest.raises(ConfigError, match="no option.*sever_url"):
        build_scorer("green", sever_url="http://x")
    with pytest.raises(ConfigError, match="http"):
        build_scorer("green", server_url="localhost:8080")


def test_cache_round_trip_keys_and_concurrent_writers(tmp_path):
    path = tmp_path / "c" / "scores.sqlite"
    key = ScoreCache.key
    assert key("n", "ab", "c") != key("n", "a", "bc") != key("m", "ab", "c")
    errors = []

    def writer(t):
        try:
            cache = ScoreCache(path)  # every writer its own instance, as separate processes would
            for i in range(40):
                cache.put_many({key("n", f"r{t}", str(i)): i / 40})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cache = ScoreCache(path)
    assert len(cache) == 240
    found = cache.get_many([key("n", "r3", "10"), key("n", "r3", "missing")])
    assert found == {key("n", "r3", "10"): 0.25}


def test_green_scorer_against_a_stub_retries_caches_and_sends_greens_prompt(stub_server, tmp_path):
    stub_server.script = [(503, {"error": "busy"})]  # the first POST fails once, then succeeds
    scorer = GreenScorer(stub_server.url, model="green-7b", retries=2, backoff=0.01,
                         max_concurrency=1, cache=str(tmp_path / "cache.sqlite"))
    assert scorer.score_pairs(["No effusion."], ["Small effusion."]) == [pytest.approx(3 / 4)]
    stats = scorer.last_stats
    assert (stats.requests, stats.retries, stats.failures) == (2, 1, 0)
    sent = stub_server.requests[-1]
    assert sent["path"] == "/v1/completions" and sent["model"] == "green-7b" and sent["temperature"] == 0
    assert sent["prompt"] == "<|user|>\n" + build_green_prompt("No effusion.", "Small effusion.") + "</s>\n<|assistant|>\n"
    # Second time: from the cache, no request; a new pair is requested.
    before = len(stub_server.requests)
    assert scorer.score_pairs(["No effusion.", "x"], ["Small effusion.", "y"]) == [pytest.approx(0.75)] * 2
    assert scorer.last_stats.cache_hits == 1 and len(stub_server.requests) == before + 1


def test_green_scorer_chat_endpoint_api_key_and_non_retried_errors(stub_server, monkeypatch):
    monkeypatch.setenv("GREEN_KEY", "s3cret")
    stub_server.default = (200, {"choices": [{"message": {"content": "nonsense"}}]})
    stub_server.script = [(400, {"error": "context too long"})]
    scorer = GreenScorer(stub_server.url + "/v1/", endpoint="chat", api_key_env="GREEN_KEY",
                         retries=3, backoff=0.01, max_concurrency=1, max_failure_fraction=1.0)
    assert scorer.score_pairs(["a", "b"], ["c", "d"]) == [None, None]
    stats = scorer.last_stats
    assert stats.requests == 2 and stats.retries == 0  # HTTP 400 is not retried
    assert stats.failures == 2 and stats.unparsable == 1
    assert "unparsable GREEN answer: 'nonsense'" in stats.last_failure
    first = stub_server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer s3cret"
    assert first["messages"] == [{"role": "user", "content": build_green_prompt("a", "c")}]


def test_rejected_api_key_and_missing_server_are_one_clear_error(stub_server):
    stub_server.models_status = 401
    with pytest.raises(ScorerUnavailableError, match=f"server at {stub_server.url}/v1 rejected the API key"):
        GreenScorer(stub_server.url).score_pairs(["a"], ["b"])
    stub_server.close()
    with pytest.raises(ScorerUnavailableError, match=f"no OpenAI-compatible server answers at {stub_server.url}/v1"):
        GreenScorer(stub_server.url, retries=5).score_pairs(["a"], ["b"])


def test_report_reward_skips_unscored_samples_never_zero(stub_server):
    stub_server.script = [(200, {"choices": [{"text": "gibberish"}]})]
    scorer = GreenScorer(stub_server.url, max_concurrency=1, max_failure_fraction=1.0)
    reward = get_reward("quadratic_blend", accuracy_scorer=scorer)
    out = reward([{"reference": "r1"}, {"reference": "r2"}],
                 ['report one {"confidence": 8}', 'report two {"confidence": 8}'])
    assert out.accuracies == [None, pytest.approx(0.75)]
    assert out.scores[0] is None  # skipped, not scored as accuracy 0
    assert out.scores[1] == pytest.approx(2.0 * -(0.8 - 0.75) ** 2)
    # The scorer saw the reports without their confidence statement.
    assert "2. Reference Report:\n    r2\n\n    3. Candidate Report:\n    report two\n\n" in stub_server.requests[1]["prompt"]


def test_ppo_config_accepts_scorer_keys(tmp_path):
    from radialog_rl.training.ppo.config import PPOConfig

    config = PPOConfig.from_dict({"accuracy_scorer": "green", "scorer": {"server_url": "http://127.0.0.1:8080",
                                  "cache": "cache/green.sqlite"}}, base_dir=tmp_path)
    assert config.scorer["cache"] == str(tmp_path / "cache" / "green.sqlite")
    with pytest.raises(ConfigError, match="accuracy_scorer must be one of"):
        PPOConfig(accuracy_scorer="gren")


def test_cache_set_up_retries_a_lock_deadlock_and_still_rejects_a_corrupt_file(tmp_path, monkeypatch):
    # Two processes creating one file can deadlock on the switch to WAL; sqlite then answers
    # "database is locked" at once (no busy wait), as a CI run once hit. Simulate it.
    import sqlite3

    calls = {"n": 0}
    real_set_up = ScoreCache._set_up

    def flaky_set_up(self):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise sqlite3.OperationalError("database is locked")
        real_set_up(self)

    monkeypatch.setattr(ScoreCache, "_set_up", flaky_set_up)
    cache = ScoreCache(tmp_path / "s.sqlite")
    assert calls["n"] == 3 and len(cache) == 0
    monkeypatch.undo()
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="not a usable sqlite file"):
        ScoreCache(bad)
