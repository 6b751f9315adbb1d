"""Small synthetic datasets (chest-X-ray-like PNGs + JSONL) for tests, demos and example configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from radialog_rl.data.images import make_synthetic_chest_xray

QA_FINDINGS = ("edema", "cardiomegaly", "pleural effusion", "pneumothorax", "atelectasis", "consolidation")


def write_synthetic_images(directory: str | os.PathLike, n: int, size: int = 160, seed: int = 0) -> list[Path]:
    """``n`` deterministic synthetic chest X-ray PNGs (``xray_000.png``...) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = directory / f"xray_{i:03d}.png"
        if not path.exists():
            make_synthetic_chest_xray(seed + i, size=size).save(path)
        paths.append(path)
    return paths


def make_binary_qa_jsonl(out_dir: str | os.PathLike, n: int = 8, seed: int = 0) -> Path:
    """``out_dir/ppo_qa.jsonl``: yes/no questions with a ground-truth ``answer``, one image each."""
    out_dir = Path(out_dir)
    images = write_synthetic_images(out_dir / "images", n, seed=seed)
    path = out_dir / "ppo_qa.jsonl"
    with open(path, "w") as f:
        for i, image in enumerate(images):
            finding = QA_FINDINGS[i % len(QA_FINDINGS)]
            row = {
                "image": image.relative_to(out_dir).as_posix(),
                "prompt": f"Is there {finding} in this image? Answer yes or no, then give your "
                          'confidence as {"confidence": N} with N from 0 to 10.',
                "answer": "yes" if (i + seed) % 2 == 0 else "no",
            }
            f.write(json.dumps(row) + "\n")
    return path
