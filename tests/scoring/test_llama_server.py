"""The GREEN scorer against a real llama.cpp server (``python -m llama_cpp.server``) serving the
tiny release's random-weight LLaMA as GGUF on 127.0.0.1. Skipped, with the reason, when
llama-cpp-python is not installed (``.ci/run`` installs it).

A random model does not write GREEN's layout: its free answers are unparsable (-> None). For the
success path a llama.cpp ``grammar`` (sent through ``request_params``) constrains it to GREEN's
layout with digits it picks itself, so the scores are real parses of real server answers.
"""

from __future__ import annotations

import json
import socket

import pytest

from radialog_rl.scoring import GreenScorer, ScorerFailureError, ScorerUnavailableError
from radialog_rl.scoring.green import green_score, parse_green_output

pytestmark = pytest.mark.slow

GREEN_GRAMMAR = r'''
root ::= "[Explanation]:\nok\n\n[Clinically Significant Errors]:\n(a) x: " d ".\n(b) x: " d ".\n\n[Matched Findings]:\n" d ". y\n"
d ::= [0-9]
'''

REFERENCES = ["The heart size is normal.", "Small left pleural effusion.", "No pneumothorax.",
              "Mild cardiomegaly.", "Lungs are clear.", "Right lower lobe opacity."]
CANDIDATES = ["Normal heart size.", "Left effusion.", "Pneumothorax on the right.",
              "Heart is enlarged.", "Clear lungs.", "Opacity in the left lung."]


def _scorer(server, **kw) -> GreenScorer:
    options = dict(model="tiny", max_tokens=200, retries=1, backoff=0.05, timeout=60,
                   request_params={"grammar": GREEN_GRAMMAR, "seed": 0})
    options.update(kw)
    return GreenScorer(server.url, **options)


def test_grammar_constrained_answers_are_parsed_and_scored(llama_server):
    scorer = _scorer(llama_server, max_concurrency=3)
    scores = scorer.score_pairs(REFERENCES, CANDIDATES)
    stats = scorer.last_stats
    assert stats.failures == 0 and stats.scored == 6 and stats.requests == 6
    # At most max_concurrency requests were in flight, and the pool did use that many.
    assert stats.max_in_flight == 3
    raw = scorer.score_texts(REFERENCES, CANDIDATES)  # greedy: the same answers again
    assert scores == [green_score(parse_green_output(text)) for text in raw]
    assert all(0.0 <= s <= 1.0 for s in scores)
    serial = _scorer(llama_server, max_concurrency=1)
    assert serial.score_pairs(REFERENCES, CANDIDATES) == scores  # order kept under concurrency
    assert serial.last_stats.max_in_flight == 1
    chat = _scorer(llama_server, endpoint="chat")  # /v1/chat/completions, the server's template
    assert 0.0 <= chat.score_pairs(REFERENCES[:1], CANDIDATES[:1])[0] <= 1.0


def test_random_model_answers_are_unparsable_none_and_counted(llama_server):
    scorer = _scorer(llama_server, request_params=None, max_tokens=24, max_concurrency=2,
                     max_failure_fraction=1.0)
    assert scorer.score_pairs(REFERENCES[:3], CANDIDATES[:3]) == [None, None, None]
    stats = scorer.last_stats
    assert stats.failures == 3 and stats.unparsable == 3 and stats.retries == 0
    assert stats.last_failure.startswith("unparsable GREEN answer")
    strict = _scorer(llama_server, request_params=None, max_tokens=24)
    with pytest.raises(ScorerFailureError, match=f"green scorer at {llama_server.url}/v1: 3 of 3 pairs failed.*unparsable"):
        strict.score_pairs(REFERENCES[:3], CANDIDATES[:3])


def test_tiny_timeout_fails_each_request_after_its_retries(llama_server):
    scorer = _scorer(llama_server, timeout=0.001, retries=1, max_concurrency=2, max_failure_fraction=1.0)
    assert scorer.score_pairs(REFERENCES[:2], CANDIDATES[:2]) == [None, None]
    stats = scorer.last_stats
    assert stats.failures == 2 and stats.requests == 4 and stats.retries == 2
    assert "timed out after 0.001 s (after 2 attempts)" in stats.last_failure
    with pytest.raises(ScorerFailureError, match=f"{llama_server.url}/v1.*timed out"):
        _scorer(llama_server, timeout=0.001, retries=0).score_pairs(REFERENCES[:2], CANDIDATES[:2])


def test_server_killed_mid_batch_retries_then_skips_or_stops(own_llama_server, monkeypatch):
    def run(max_failure_fraction):
        scorer = _scorer(own_llama_server, retries=2, max_concurrency=1,
                         max_failure_fraction=max_failure_fraction)
        real_post, answered = scorer.client._post_once, []

        def post_then_kill(path, body):
            data = real_post(path, body)
            answered.append(1)
            if len(answered) == 2:
                own_llama_server.stop()  # dies after two answers, with four pairs still to go
            return data

        monkeypatch.setattr(scorer.client, "_post_once", post_then_kill)
        return scorer

    scorer = run(max_failure_fraction=1.0)
    scores = scorer.score_pairs(REFERENCES, CANDIDATES)
    assert [s is None for s in scores] == [False, False, True, True, True, True]
    stats = scorer.last_stats
    assert stats.failures == 4 and stats.retries == 4 * 2 and stats.requests == 2 + 4 * 3
    assert "cannot connect" in stats.last_failure and "after 3 attempts" in stats.last_failure
    # The next batch cannot reach the server at all: one clear error naming the URL.
    with pytest.raises(ScorerUnavailableError, match=f"GREEN server at {own_llama_server.url}/v1 is not reachable"):
        scorer.score_pairs(REFERENCES[:2], CANDIDATES[:2])


def test_server_killed_mid_batch_stops_the_step_when_too_many_fail(own_llama_server, monkeypatch):
    scorer = _scorer(own_llama_server, retries=1, max_concurrency=1, max_failure_fraction=0.5)
    real_post = scorer.client._post_once

    def post_then_kill(path, body):
        data = real_post(path, body)
        own_llama_server.stop()
        return data

    monkeypatch.setattr(scorer.client, "_post_once", post_then_kill)
    with pytest.raises(ScorerFailureError, match=f"{own_llama_server.url}/v1: 5 of 6 pairs failed.*cannot connect"):
        scorer.score_pairs(REFERENCES, CANDIDATES)


def test_server_not_running_is_one_clear_error_naming_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ScorerUnavailableError, match=f"no OpenAI-compatible server answers at {url}/v1") as info:
        GreenScorer(url, retries=3, backoff=5.0).score_pairs(REFERENCES, CANDIDATES)
    assert "Connection refused" in str(info.value)


TOO_LONG = " ".join(["жжжжжжжжжж"] * 300)  # 300 words (kept whole by GREEN), ~6000 byte tokens


def test_a_prompt_over_the_context_is_a_failed_sample_not_retried(llama_server):
    scorer = _scorer(llama_server, retries=3, max_failure_fraction=1.0)
    assert scorer.score_pairs([TOO_LONG, REFERENCES[0]], ["x", CANDIDATES[0]])[0] is None
    stats = scorer.last_stats
    assert stats.failures == 1 and stats.retries == 0 and "HTTP 400" in stats.last_failure


def _report_rows(tmp_path):
    """The binary-QA tiny rows turned into report rows; rows 1 and 6 get a reference so long in
    tokens that the server rejects the prompt (HTTP 400: context exceeded), a real failure."""
    from radialog_rl.testing.data import make_binary_qa_jsonl

    path = make_binary_qa_jsonl(tmp_path / "data", n=8)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["prompt"] = "Write the findings section of the report."
        row["reference"] = TOO_LONG if i in (1, 6) else REFERENCES[i % len(REFERENCES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class _WithConfidence:
    """Appends a confidence statement to every response (the random policy never writes one), so
    every sample reaches the accuracy: a scorer failure must then show as a skipped sample."""

    def __init__(self, reward):
        self.reward, self.accuracy_scorer, self.scale = reward, reward.accuracy_scorer, reward.scale

    def __call__(self, samples, responses):
        texts = [f'{r} {{"confidence": 7}}' for r in responses]
        out = self.reward(samples, texts)
        out.texts = texts
        return out


def test_report_ppo_run_with_green_skips_and_counts_failures(llama_server, tiny_release, tmp_path):
    from radialog_rl.training.ppo.config import PPOConfig
    from radialog_rl.training.ppo.trainer import PPOTrainer

    config = PPOConfig(
        model_path=str(tiny_release.model_path), model_base=str(tiny_release.model_base),
        train_file=str(_report_rows(tmp_path)), dtype="fp32", device="cpu", tensorboard=False,
        batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, max_new_tokens=6, steps=2,
        save_every=1000, output_dir=str(tmp_path / "run"),
        reward="report_loglik", accuracy_scorer="green",
        scorer={"server_url": llama_server.url, "model": "tiny", "max_tokens": 200, "retries": 1,
                "backoff": 0.05, "max_concurrency": 2, "max_failure_fraction": 0.5,
                "request_params": {"grammar": GREEN_GRAMMAR}, "cache": str(tmp_path / "green.sqlite")},
    )
    trainer = PPOTrainer(config)
    assert isinstance(trainer.reward_fn.accuracy_scorer, GreenScorer)
    trainer.reward_fn = _WithConfidence(trainer.reward_fn)
    history = trainer.train()
    assert len(history) == 2
    failures = [m["scorer/failures"] for m in history]
    skipped = [m["env/skipped_samples"] for m in history]
    assert sum(failures) == 2 and skipped == failures  # the two over-long rows, one epoch of 8 rows
    assert all(m["scorer/scored"] + m["scorer/failures"] == 4 for m in history)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["scorer/failures"] for m in logged] == failures
