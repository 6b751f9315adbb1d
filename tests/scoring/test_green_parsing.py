"""GREEN prompt, parser and score, on real GREEN-RadLlama2-7b answers (see data/green_outputs.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radialog_rl.scoring.green import (
    GREEN_MAX_WORDS,
    GreenCounts,
    build_green_prompt,
    green_completion_prompt,
    green_score,
    parse_green_output,
)

DATA = json.loads((Path(__file__).parent / "data" / "green_outputs.json").read_text())
OUTPUTS = {o["row"]: o for o in DATA["outputs"]}

# Scores computed by hand from the quoted answers: matched / (matched + significant errors).
HAND_SCORES = {0: 1 / 5, 1: 1 / 5, 2: 2 / 5, 3: 1 / 3, 4: 1 / 5, 5: 0.0, 6: 1 / 4, 8: 1.0}


@pytest.mark.parametrize("row", sorted(HAND_SCORES))
def test_real_green_answers_parse_to_the_hand_counted_numbers(row):
    quoted = OUTPUTS[row]
    counts = parse_green_output(quoted["text"])
    assert counts is not None
    assert list(counts.significant) == quoted["significant"]
    assert counts.matched == quoted["matched"]
    assert green_score(counts) == pytest.approx(HAND_SCORES[row], abs=1e-12)


def test_insignificant_errors_do_not_enter_the_score():
    # Row 2 says "[Clinically Insignificant Errors]:\nNone." ; give it insignificant errors instead.
    text = OUTPUTS[2]["text"].replace(
        "[Clinically Insignificant Errors]:\nNone.",
        "[Clinically Insignificant Errors]:\n(a) False report of a finding in the candidate: 3. x; y; z.",
    )
    counts = parse_green_output(text)
    assert counts.insignificant == (3, 0, 0, 0, 0, 0)
    assert parse_green_output(OUTPUTS[2]["text"]).insignificant == (0,) * 6
    assert green_score(counts) == pytest.approx(2 / 5)


def test_numbered_categories_and_no_errors_sections():
    text = (
        "[Explanation]:\nok\n\n[Clinically Significant Errors]:\n(1) False report: 1. a\n"
        "(6) Omitting a comparison: 2. b; c\n\n[Clinically Insignificant Errors]:\nNo errors.\n\n"
        "[Matched Findings]:\n3. x; y; z"
    )
    assert parse_green_output(text) == GreenCounts((1, 0, 0, 0, 0, 2), (0,) * 6, 3)
    assert green_score(parse_green_output(text)) == pytest.approx(3 / 6)
    none_matched = text.replace("3. x; y; z", "None.")
    assert parse_green_output(none_matched).matched == 0
    assert green_score(parse_green_output(none_matched)) == 0.0


@pytest.mark.parametrize("text", [
    "",
    "the heart is normal size",  # no GREEN layout at all
    "[Clinically Significant Errors]:\n(a) False report: 1. x\n",  # no matched section
    "[Matched Findings]:\n2. a; b",  # no significant section
    "[Clinically Significant Errors]:\nNone.\n\n[Matched Findings]:\nsome findings",  # no count
])
def test_unparsable_answers_give_none(text):
    assert parse_green_output(text) is None


def test_prompt_truncates_each_report_to_300_words_and_wraps_greens_turn():
    reference = " ".join(f"r{i}" for i in range(400))
    candidate = "Heart   size\n normal."
    prompt = build_green_prompt(reference, candidate)
    assert GREEN_MAX_WORDS == 300
    assert "r299" in prompt and "r300" not in prompt
    assert "3. Candidate Report:\n    Heart size normal.\n\n" in prompt
    assert prompt.startswith("Objective: Evaluate the accuracy of a candidate radiology report")
    assert "    f) Omitting a comparison detailing a change from a prior study.\n" in prompt
    assert build_green_prompt(reference, candidate, max_words=2).count("r1") == 1
    wrapped = green_completion_prompt("a", "b")
    assert wrapped == "<|user|>\n" + build_green_prompt("a", "b") + "</s>\n<|assistant|>\n"
