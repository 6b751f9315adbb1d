"""Binary QA / report prompts with a confidence request and SFT targets (§B)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from radialog_rl.calibration.parsing import parse_confidence, parse_yes_no
from radialog_rl.calibration.prompts import (
    QA_TEMPLATES,
    confidence_instruction,
    qa_prompt,
    qa_questions,
    qa_sft_target,
    report_confidence_prompt,
    report_sft_target,
)
from radialog_rl.data.prompts import CHEXPERT_FINDINGS, report_prompt
from radialog_rl.errors import DataError


def test_every_finding_has_several_templates():
    assert set(QA_TEMPLATES) == set(CHEXPERT_FINDINGS)
    for finding in CHEXPERT_FINDINGS:
        questions = qa_questions(finding)
        assert len(questions) >= 3
        assert len(set(questions)) == len(questions)
        assert all(q.endswith("?") for q in questions)


def test_qa_prompt_contents():
    prompt = qa_prompt("pleural effusion", scale=10, template=1)
    assert prompt.startswith("<image>. ")
    assert qa_questions("Pleural Effusion")[1] in prompt
    assert '{"confidence": <integer from 0 to 10>}' in prompt
    assert "Yes" in prompt and "No" in prompt
    assert "0 to 100" in qa_prompt("Edema", scale=100)
    # the template index wraps around
    assert qa_prompt("Edema", template=len(qa_questions("Edema"))) == qa_prompt("Edema", template=0)


def test_unknown_finding_and_scale():
    with pytest.raises(DataError, match="unknown CheXpert finding"):
        qa_prompt("Broken Heart")
    with pytest.raises(DataError, match="scale"):
        confidence_instruction(scale=5)


def test_report_prompt_builds_on_radialog_prompt():
    prompt = report_confidence_prompt(["Edema", "Cardiomegaly"], scale=10)
    assert prompt.startswith(report_prompt(["Edema", "Cardiomegaly"]))
    assert prompt.endswith(confidence_instruction(10, "report"))


def test_qa_sft_target_format_and_round_trip():
    rng = np.random.default_rng(0)
    for answer in (True, False, "yes", "No"):
        target = qa_sft_target(answer, rng)
        assert target.startswith(("Yes {", "No {"))
        assert parse_yes_no(target) is (answer is True or str(answer).lower() == "yes")
        assert parse_confidence(target) is not None
    with pytest.raises(DataError):
        qa_sft_target("maybe", rng)


def test_sft_targets_are_seeded_and_uniform():
    a = [report_sft_target("Normal chest.", np.random.default_rng(5)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same target
    rng = np.random.default_rng(42)
    counts = Counter(parse_confidence(report_sft_target("Normal chest.", rng)) for _ in range(5500))
    assert set(counts) == set(range(11))  # 0 and 10 included
    assert all(380 < c < 620 for c in counts.values())  # 500 expected each
    target = report_sft_target("  Normal chest.  ", 3, scale=100)  # int seed accepted
    assert target.startswith('Normal chest. {"confidence": ')
    assert 0 <= parse_confidence(target, 100) <= 100


def test_calibration_package_imports_neither_torch_nor_matplotlib():
    code = (
        "import sys\n"
        "import radialog_rl.calibration.prompts, radialog_rl.calibration.parsing\n"
        "import radialog_rl.calibration.rewards, radialog_rl.calibration.metrics\n"
        "import radialog_rl.calibration.io, radialog_rl.calibration.plots, radialog_rl.cli.evaluate\n"
        "bad = [m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
