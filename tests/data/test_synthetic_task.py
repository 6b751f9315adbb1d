"""The synthetic visual calibration task: images, rows, determinism, visibility vs contrast."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radialog_rl.calibration.parsing import parse_confidence, parse_yes_no
from radialog_rl.data.datasets import load_sft_jsonl
from radialog_rl.data.synthetic_task import (
    FINDINGS,
    NEGATIVE_GROUP,
    build_synthetic_task,
    read_task_rows,
    render_case,
    task_prompt,
)
from radialog_rl.errors import ConfigError, DataError
from radialog_rl.testing.data import make_binary_qa_jsonl
from radialog_rl.data.prompt_rows import load_prompt_jsonl

ROW_FIELDS = {"image", "prompt", "answer", "finding", "visibility", "visibility_group", "id"}
LEVELS = (0.15, 0.3, 0.45, 0.6, 0.8, 1.0)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    # 24 train rows: 12 positives = 4 per finding; 12 eval rows: 6 positives = 2 per finding.
    return build_synthetic_task(tmp_path_factory.mktemp("task"), n_train=24, n_eval=12, seed=3,
                                size=64)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(task, tmp_path):
    again = build_synthetic_task(tmp_path / "again", n_train=24, n_eval=12, seed=3, size=64)
    first, second = _tree_bytes(task.root), _tree_bytes(again.root)
    assert len(first) == 24 + 12 + 5
    assert first == second
    other = build_synthetic_task(tmp_path / "other", n_train=24, n_eval=12, seed=4, size=64)
    assert _tree_bytes(other.root)["images/train_00000.png"] != first["images/train_00000.png"]


def test_validation_split_is_separate_and_leaves_the_other_splits_as_they_were(task, tmp_path):
    with_val = build_synthetic_task(tmp_path / "val", n_train=24, n_eval=12, seed=3, size=64, n_val=6)
    before, after = _tree_bytes(task.root), _tree_bytes(with_val.root)
    # Train and eval files and images are byte-identical with or without a validation split.
    for name in ("ppo_train.jsonl", "ppo_eval.jsonl", "sft_train.jsonl", "sft_eval.jsonl"):
        assert after[name] == before[name]
    assert all(after[name] == data for name, data in before.items() if name.startswith("images/"))
    val = read_task_rows(with_val.ppo_val)
    assert len(val) == 6 and sum(r["answer"] == "yes" for r in val) == 3
    assert all(r["image"].startswith("images/val_") and r["id"].startswith("val-") for r in val)
    assert len(read_task_rows(with_val.sft_val)) == 6
    # No image is shared with another split (distinct random streams per split).
    images = {data for name, data in after.items() if name.startswith("images/")}
    assert len(images) == 24 + 12 + 6
    manifest = json.loads(with_val.manifest.read_text())
    assert manifest["parameters"]["n_val"] == 6 and manifest["counts"]["val"]["rows"] == 6
    assert manifest["files"]["ppo_val"] == "ppo_val.jsonl"
    assert task.ppo_val is None and not (task.root / "ppo_val.jsonl").exists()


def test_rows_fields_and_counts(task):
    manifest = json.loads(task.manifest.read_text())
    assert manifest["parameters"]["n_train"] == 24 and manifest["parameters"]["size"] == 64
    for path, n in ((task.ppo_train, 24), (task.ppo_eval, 12)):
        rows = read_task_rows(path)
        assert len(rows) == n
        assert all(set(r) == ROW_FIELDS for r in rows)
        positives = [r for r in rows if r["answer"] == "yes"]
        assert len(positives) == n // 2
        assert all(r["visibility"] in LEVELS and r["visibility_group"] == f"{r['visibility']:.2f}"
                   for r in positives)
        negatives = [r for r in rows if r["answer"] == "no"]
        assert all(r["visibility"] == 0 and r["visibility_group"] == NEGATIVE_GROUP
                   for r in negatives)
        for finding in FINDINGS:  # balanced over findings, positives and negatives alike
            assert sum(r["finding"] == finding for r in positives) == n // 6
            assert sum(r["finding"] == finding for r in negatives) == n // 6
        assert all(r["prompt"] == task_prompt(r["finding"]) for r in rows)
        assert len({r["id"] for r in rows}) == n
        with Image.open(task.root / rows[0]["image"]) as image:
            assert image.mode == "L" and image.size == (64, 64)
    train = read_task_rows(task.ppo_train)
    # Positives cycle through the levels within each finding: 4 per finding -> the 4 lowest.
    assert sorted(r["visibility"] for r in train if r["finding"] == "opacity" and r["visibility"]) \
        == [0.15, 0.3, 0.45, 0.6]
    assert manifest["counts"]["train"]["positives"] == 12
    assert manifest["counts"]["train"]["groups"]["opacity/none"] == 4
    # The PPO loader takes the rows as they are.
    assert len(load_prompt_jsonl(task.ppo_eval)) == 12


def test_splits_share_no_image(task):
    train, held_out = read_task_rows(task.ppo_train), read_task_rows(task.ppo_eval)
    assert {r["image"] for r in train}.isdisjoint(r["image"] for r in held_out)

    def digests(rows):
        return {hashlib.sha256((task.root / r["image"]).read_bytes()).hexdigest() for r in rows}

    assert len(digests(train)) == 24 and digests(train).isdisjoint(digests(held_out))


def test_sft_rows_parse_back_and_load(task):
    for ppo_path, sft_path in ((task.ppo_train, task.sft_train), (task.ppo_eval, task.sft_eval)):
        ppo_rows, sft_rows = read_task_rows(ppo_path), read_task_rows(sft_path)
        assert [{k: v for k, v in r.items() if k != "target"} for r in sft_rows] == ppo_rows
        for row in sft_rows:
            assert parse_yes_no(row["target"]) is (row["answer"] == "yes")
            assert parse_confidence(row["target"], 10) in range(11)
        examples = load_sft_jsonl(sft_path)
        assert [e.turns[-1][1] for e in examples] == [r["target"] for r in sft_rows]
    confidences = [parse_confidence(r["target"]) for r in read_task_rows(task.sft_train)]
    assert len(set(confidences)) > 3  # drawn at random, not one value


def test_granular_scale_prompt_and_targets(tmp_path):
    files = build_synthetic_task(tmp_path, n_train=3, n_eval=3, size=48, confidence_scale=100,
                                 findings=("opacity",))
    for row in read_task_rows(files.sft_train):
        assert row["prompt"].endswith("with N from 0 to 100.")
        assert parse_confidence(row["target"], 100) in range(101)


def test_prompt_matches_the_packages_binary_qa_wording(tmp_path):
    rows = read_task_rows(make_binary_qa_jsonl(tmp_path, n=4))
    pneumothorax = next(r for r in rows if "pneumothorax" in r["prompt"])
    assert task_prompt("pneumothorax") == pneumothorax["prompt"]
    assert task_prompt("opacity").startswith("Is there lung opacity in this image?")


@pytest.mark.parametrize("finding", sorted(FINDINGS))
@pytest.mark.parametrize("seed", [0, 7])
def test_contrast_increases_with_visibility(finding, seed):
    negative = render_case(seed, None, size=96)
    assert not negative.region.any()
    assert np.array_equal(render_case(seed, finding, 0.0, size=96).pixels, negative.pixels)
    full = render_case(seed, finding, 1.0, size=96)
    region = full.region  # the largest extent: size grows with visibility
    assert region.sum() >= 20
    contrasts = []
    for visibility in (0.0, *LEVELS):
        case = render_case(seed, finding, visibility, size=96)
        diff = case.pixels.astype(float) - negative.pixels.astype(float)
        contrasts.append(abs(diff[region].mean()))
    assert contrasts[0] == 0.0
    assert all(b > a for a, b in zip(contrasts, contrasts[1:])), contrasts
    assert contrasts[-1] > 25  # gray levels: obvious at visibility 1 (noise std is ~7)
    assert contrasts[1] < 0.25 * contrasts[-1]  # faint at the lowest level


def test_findings_change_only_their_region_and_keep_direction():
    negative = render_case(5, None, size=96).pixels.astype(float)
    for finding, sign in (("opacity", 1), ("effusion", 1), ("pneumothorax", -1)):
        case = render_case(5, finding, 1.0, size=96)
        diff = case.pixels.astype(float) - negative
        assert sign * diff[case.region].mean() > 20
        # Outside the region (and a margin for soft edges and the pleural line) nothing moves much.
        far = ~case.region
        assert np.abs(diff[far]).mean() < 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"findings": ("edema",)}, "unknown synthetic finding"),
        ({"findings": ()}, "findings must be distinct"),
        ({"n_train": 0}, "n_train must be a positive integer"),
        ({"n_val": -1}, "n_val must be a positive integer"),
        ({"n_val": True}, "n_val must be a positive integer"),
        ({"confidence_scale": 5}, "confidence_scale must be one of"),
        ({"visibility_levels": (0.0, 0.5)}, "visibility_levels must be distinct"),
        ({"visibility_levels": (1.5,)}, "visibility must be a number in"),
        ({"positive_fraction": 1.2}, "positive_fraction must be in"),
        ({"size": 16}, "size must be an integer of at least 32"),
    ],
)
def test_bad_arguments_raise_config_errors(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_synthetic_task(tmp_path, **{"n_train": 2, "n_eval": 2, **kwargs})


def test_read_task_rows_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n[1]\n')
    with pytest.raises(DataError, match="line 3"):
        read_task_rows(path)


def test_read_task_rows_names_bad_lines(tmp_path):
    from radialog_rl.errors import DataError

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"b": "caf\xe9"}\n')  # BOM, blank line, a Latin-1 line
    with pytest.raises(DataError, match="line 3: not UTF-8"):
        read_task_rows(path)
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n[1]\n')
    with pytest.raises(DataError, match="line 3: expected a JSON object"):
        read_task_rows(path)
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n')
    assert read_task_rows(path) == [{"a": 1}]
