"""``radialog-rl score`` end to end (unigram F1; GREEN against the local stub), its output read by
``radialog-rl evaluate``, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from radialog_rl.cli import main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_writes_accuracies_that_evaluate_reads(tmp_path, capsys):
    data = _write(tmp_path / "reports.jsonl", [
        {"reference": "The heart is normal.", "text": 'Heart normal. {"confidence": 7}', "id": 1},
        {"reference": "No effusion.", "text": 'Large effusion. {"confidence": 3}', "id": 2},
    ])
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(data), "--output", str(out), "--scorer", "unigram_f1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # The confidence statement is not scored: "heart normal" vs "the heart is normal" -> F1 2/3.
    assert [r["accuracy"] for r in rows] == [pytest.approx(2 / 3), pytest.approx(0.5)]
    assert rows[0]["id"] == 1 and rows[0]["text"] == 'Heart normal. {"confidence": 7}'
    assert "scored 2 of 2 reports with unigram_f1" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # Brier of (0.7, 2/3) and (0.3, 0.5) by hand.
    assert report["brier"] == pytest.approx(((0.7 - 2 / 3) ** 2 + (0.3 - 0.5) ** 2) / 2)


def test_score_with_green_nulls_failures_and_uses_the_cache(tmp_path, stub_server, capsys):
    stub_server.script = [(200, {"choices": [{"text": "not GREEN"}]})]
    data = _write(tmp_path / "r.jsonl", [{"reference": "a", "generated": "b"}, {"reference": "c", "generated": "d"}])
    out, cache = tmp_path / "s.jsonl", tmp_path / "green.sqlite"
    args = ["score", str(data), "-o", str(out), "--server-url", stub_server.url, "--max-concurrency", "1",
            "--cache", str(cache)]
    assert main(args) == 0
    assert [json.loads(line)["accuracy"] for line in out.read_text().splitlines()] == [None, 0.75]
    assert "scored 1 of 2 reports with green (1 failed: accuracy null; 0 from the cache)" in capsys.readouterr().out
    assert main(args) == 0  # again: the scored row comes from the cache, the failed one is retried
    assert "scored 2 of 2 reports with green (0 failed: accuracy null; 1 from the cache)" in capsys.readouterr().out
    assert len(stub_server.requests) == 3


def test_score_errors_are_one_line(tmp_path, capsys):
    data = _write(tmp_path / "r.jsonl", [{"reference": "a", "generated": "b"}])
    (tmp_path / "bad.jsonl").write_text('{"reference": "a"}\nnot json\n')
    cases = [
        (["score", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--scorer", "unigram_f1"],
         "2 bad row(s)"),
        (["score", str(data), "-o", str(tmp_path / "o.jsonl"), "--server-url", "http://127.0.0.1:9"],
         "no OpenAI-compatible server answers at http://127.0.0.1:9/v1"),
        (["score", str(data), "-o", str(tmp_path / "o.jsonl"), "--scorer", "bleu"], "unknown accuracy_scorer 'bleu'"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("radialog-rl score: error:") and message in err[0], err
    assert not (tmp_path / "o.jsonl").exists()
