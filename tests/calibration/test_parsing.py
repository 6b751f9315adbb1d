"""Confidence / yes-no parsing and the exploration trick (ppo-and-calibration.md §B)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from radialog_rl.calibration.parsing import (
    find_confidence_span,
    parse_confidence,
    parse_yes_no,
    replace_confidences,
    strip_confidence,
)

CONFIDENCE_CASES = [
    # (text, scale, expected)
    ('{"confidence": 7}', 10, 7),
    ('Yes {"confidence": 0}', 10, 0),
    ('No {"confidence": 10}', 10, 10),
    ("Confidence: 4", 10, 4),
    ("CONFIDENCE:9", 10, 9),
    ("{'confidence': 3}", 10, 3),
    ('{confidence: "6"}', 10, 6),
    ('{"Confidence" :  8 }', 10, 8),
    ("My confidence: 7.", 10, 7),  # sentence full stop, not a decimal
    ('{"confidence": 7.0}', 10, 7),  # integral decimal
    ('{"confidence": 7.5}', 10, None),  # not an integer
    ('{"confidence": 11}', 10, None),  # above the scale
    ('{"confidence": -1}', 10, None),  # below the scale
    ('{"confidence": 85}', 100, 85),
    ('{"confidence": 100}', 100, 100),
    ('{"confidence": 101}', 100, None),
    ("Confidence: 85%", 100, 85),
    ('{"confidence": 3} and {"confidence": 3}', 10, None),  # exactly one match required
    ('{"confidence": 3} {"confidence": 8}', 10, None),
    ("I am fairly confident.", 10, None),
    ("confidence level: 8", 10, None),  # key must be `confidence` followed by a colon
    ("overconfidence: 5", 10, None),  # whole word only
    ('{"confidence_score": 5}', 10, None),
    ('{"confidence": }', 10, None),
    ("", 10, None),
    (None, 10, None),
    ('{"answer": "yes", "confidence": 2}', 10, 2),
]


@pytest.mark.parametrize(("text", "scale", "expected"), CONFIDENCE_CASES)
def test_parse_confidence_table(text, scale, expected):
    assert parse_confidence(text, scale) == expected


SPAN_CASES = [
    ('Yes {"confidence": 7}', '{"confidence": 7}'),
    ('No. { "confidence" : 3 } thanks', '{ "confidence" : 3 }'),
    ("Confidence: 4 because", "Confidence: 4"),
    ('Normal heart. {"confidence": 11}', '{"confidence": 11}'),  # out of range still has a span
    ('{"answer": "no", "confidence": 2}', '"confidence": 2}'),  # opening brace not adjacent
]


@pytest.mark.parametrize(("text", "statement"), SPAN_CASES)
def test_find_confidence_span(text, statement):
    span = find_confidence_span(text)
    assert span is not None
    assert text[span[0] : span[1]] == statement


@pytest.mark.parametrize("text", ["Yes", "", None, '{"confidence": 1} {"confidence": 2}'])
def test_find_confidence_span_none(text):
    assert find_confidence_span(text) is None


def test_span_position_is_exact():
    # "Yes " is 4 characters, the statement 17.
    assert find_confidence_span('Yes {"confidence": 7}') == (4, 21)


def test_strip_confidence():
    assert strip_confidence('No acute findings. {"confidence": 8}') == "No acute findings."
    assert strip_confidence('Yes {"confidence": 3} indeed') == "Yes indeed"


YES_NO_CASES = [
    ("Yes", True),
    ("yes.", True),
    ("No", False),
    ("NO.", False),
    ("No.", False),
    ("Yes, there is a pleural effusion.", True),
    ("No, there is no pneumothorax.", False),
    ('Yes {"confidence": 8}', True),
    ('No {"confidence": 2}', False),
    ("**No**", False),
    ('"Yes"', True),
    ("The answer is no.", False),
    ("Answer: yes", True),
    ("Yes, but there is no effusion.", True),  # determiner "no" is not an answer
    ("There is no pneumothorax.", None),  # no answer word at all
    ("Nodule in the right upper lobe.", None),  # substring, not a word
    ("I do not know.", None),
    ("Not present.", None),
    ("Yesterday's film was normal.", None),
    ("Knowledge is limited.", None),
    ("Yes and no.", None),  # both answers
    ("Yes. No.", None),
    ("I cannot say yes or no", None),
    ("Heart size is normal. No pleural effusion.", False),  # sentence-leading "No"
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("text", "expected"), YES_NO_CASES)
def test_parse_yes_no_table(text, expected):
    assert parse_yes_no(text) is expected


def test_replace_confidences_prob_one_changes_every_parsed_value():
    texts = ['Yes {"confidence": 7}', "No answer here", 'No {"confidence": 0}', 'Yes {"confidence": 10}']
    new, values = replace_confidences(texts, 1.0, np.random.default_rng(0), scale=10)
    assert new[1] == texts[1] and values[1] is None
    for i in (0, 2, 3):
        assert values[i] is not None and 0 <= values[i] <= 10
        assert values[i] != parse_confidence(texts[i])
        assert parse_confidence(new[i]) == values[i]
        # only the number changed
        assert new[i].split("{")[0] == texts[i].split("{")[0]


def test_replace_confidences_prob_zero_keeps_texts():
    texts = ['Yes {"confidence": 7}', "No"]
    new, values = replace_confidences(texts, 0.0, np.random.default_rng(0))
    assert new == texts
    assert values == [7, None]


def test_replace_confidences_is_seeded():
    texts = [f'Yes {{"confidence": {i}}}' for i in range(11)]
    a = replace_confidences(texts, 0.5, np.random.default_rng(123))
    b = replace_confidences(texts, 0.5, np.random.default_rng(123))
    assert a == b


def test_replace_confidences_uniform_over_other_values():
    rng = np.random.default_rng(7)
    counts: Counter[int] = Counter()
    for _ in range(5000):
        _, values = replace_confidences(['{"confidence": 4}'], 1.0, rng, scale=10)
        counts[values[0]] += 1
    assert 4 not in counts
    assert set(counts) == set(range(11)) - {4}
    # 10 values, 500 expected each; a 5-sigma band is about ±106.
    assert all(390 < c < 610 for c in counts.values())


def test_replace_confidences_batch_probability():
    rng = np.random.default_rng(1)
    changed = sum(
        replace_confidences(['{"confidence": 4}'], 0.4, rng)[1][0] != 4 for _ in range(4000)
    )
    assert abs(changed / 4000 - 0.4) < 0.04


def test_replace_confidences_granular_scale():
    new, values = replace_confidences(['{"confidence": 55}'], 1.0, np.random.default_rng(0), scale=100)
    assert values[0] != 55 and 0 <= values[0] <= 100
    assert parse_confidence(new[0], 100) == values[0]


def test_replace_confidences_rejects_bad_probability():
    with pytest.raises(ValueError):
        replace_confidences(["x"], 1.5, np.random.default_rng(0))


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (1, True), (0, False), (1.0, True), (0.0, False),
    ("yes", True), (" No ", False), ("TRUE", True), ("false", False), ("1", True), ("0", False),
    ("1.0", True), ("0.0", False),
    (2, None), (0.5, None), ("maybe", None), ("", None), (None, None), ([1], None),
])
def test_parse_truth_reads_data_labels_only(value, expected):
    from radialog_rl.calibration.parsing import parse_truth

    assert parse_truth(value) is expected
