"""Labelled samples on the tiny release for the confidence tests."""

from __future__ import annotations

import json

import pytest

from radialog_rl.data.images import make_synthetic_chest_xray

#: (prompt, given response or None = generate, label). Prompts differ in length so batches pad.
ROWS = [
    ("Is there edema?", 'Yes {"confidence": 8}', "yes"),
    ("Does the image show cardiomegaly? Answer yes or no.", 'No {"confidence": 3}', "yes"),
    ("Is there a pleural effusion in this chest X-ray?", 'No, there is none. {"confidence": 9}', "no"),
    ("Is there a fracture?", 'Yes {"confidence": 2}', "no"),
    ("Pneumothorax?", "Yes", "yes"),
    ("Can you see signs of consolidation on this X-ray image here?", 'No {"confidence": 6}', "no"),
    ("Is there edema?", None, "yes"),
    ("Is the heart enlarged in this image?", None, "no"),
]


def write_labelled(folder) -> str:
    """Write the images and ``labelled.jsonl`` into ``folder``; returns the JSONL path."""
    rows = []
    for i, (prompt, response, answer) in enumerate(ROWS):
        make_synthetic_chest_xray(i, size=160).save(folder / f"cxr{i}.png")
        row = {"id": f"s{i}", "image": f"cxr{i}.png", "prompt": prompt, "answer": answer}
        if response is not None:
            row["response"] = response
        rows.append(row)
    path = folder / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def labelled_path(tmp_path_factory) -> str:
    return write_labelled(tmp_path_factory.mktemp("labelled"))


@pytest.fixture(scope="session")
def samples(labelled_path):
    from radialog_rl.confidence.samples import load_labelled_jsonl

    return load_labelled_jsonl(labelled_path)
