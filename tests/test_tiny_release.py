"""The tiny release: real layout, deterministic, and written by the CLI."""

from __future__ import annotations

import hashlib
import json

import torch

from radialog_rl.cli import main


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_tiny_cli_is_deterministic_and_in_the_real_layout(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "a")]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert main(["make-tiny", str(tmp_path / "b")]) == 0
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")

    files = set(_digests(tmp_path / "a"))
    assert {
        "llava-v1.5-tiny/config.json", "llava-v1.5-tiny/pytorch_model.bin.index.json",
        "llava-v1.5-tiny/pytorch_model-00001-of-00002.bin", "llava-v1.5-tiny/pytorch_model-00002-of-00002.bin",
        "llava-v1.5-tiny/tokenizer.model", "llava-v1.5-tiny/tokenizer_config.json",
        "llava-v1.5-tiny/special_tokens_map.json",
        "RaDialog-tiny/config.json", "RaDialog-tiny/adapter_config.json", "RaDialog-tiny/adapter_model.bin",
        "RaDialog-tiny/non_lora_trainables.bin", "biovil_t_image_model_proj_size_128.pt",
    } <= files
    config = json.loads((tmp_path / "a/RaDialog-tiny/config.json").read_text())
    assert config["model_type"] == "llava" and config["mm_vision_tower"] == "biovil"
    adapter = torch.load(tmp_path / "a/RaDialog-tiny/adapter_model.bin", weights_only=True)
    assert all(k.startswith("base_model.model.model.layers.") and ".default." not in k for k in adapter)
    assert len(adapter) == 2 * 7 * 2
    non_lora = torch.load(tmp_path / "a/RaDialog-tiny/non_lora_trainables.bin", weights_only=True)
    assert all(k.startswith("base_model.model.model.") for k in non_lora)
    assert non_lora["base_model.model.model.vision_tower.encoder.encoder.bn1.num_batches_tracked"].dtype == torch.int64
    assert paths["model_path"].endswith("RaDialog-tiny")
