"""End-to-end tests of ``radialog-rl generate`` (and ``radialog-rl demo``) on the tiny release."""

from __future__ import annotations

import json

import pytest

from radialog_rl.cli import main
from radialog_rl.data.images import make_synthetic_chest_xray

KEYS = {"image", "prompt", "text", "num_tokens", "finished_by", "seconds"}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Three synthetic chest X-ray PNGs (one 16-bit) in a folder."""
    folder = tmp_path_factory.mktemp("cxr")
    for seed in range(3):
        make_synthetic_chest_xray(seed, size=160, bit_depth=16 if seed == 2 else 8).save(folder / f"cxr{seed}.png")
    return folder


def _model_args(release) -> list[str]:
    # fp32 on CPU: bf16 matmuls of tiny shapes are slow on CPUs.
    return ["--model-path", str(release.model_path), "--model-base", str(release.model_base),
            "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "4"]


def _read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_folder_to_jsonl_file(tiny_release, image_dir, tmp_path, capsys):
    out = tmp_path / "reports.jsonl"
    code = main(["generate", *_model_args(tiny_release), "--image", str(image_dir), "--batch-size", "2",
                 "--findings", "Edema, cardiomegaly", "--output", str(out)])
    assert code == 0
    rows = _read_jsonl(out.read_text())
    assert [r["image"] for r in rows] == [str(image_dir / f"cxr{i}.png") for i in range(3)]
    for row in rows:
        assert set(row) == KEYS
        assert "Predicted Findings: edema, cardiomegaly." in row["prompt"]
        assert row["prompt"].endswith(" ASSISTANT:")
        assert 1 <= row["num_tokens"] <= 4 and row["seconds"] >= 0
    assert capsys.readouterr().out == ""  # everything went to the file


def test_list_file_to_stdout_matches_library(tiny_release, image_dir, tmp_path, capsys):
    listing = tmp_path / "images.txt"
    listing.write_text(f"# two images\n{image_dir / 'cxr1.png'}\n\ncxr0.png\n")
    (tmp_path / "cxr0.png").write_bytes((image_dir / "cxr0.png").read_bytes())
    assert main(["generate", *_model_args(tiny_release), "--image", str(listing), "--no-lora"]) == 0
    rows = _read_jsonl(capsys.readouterr().out)
    assert [r["image"] for r in rows] == [str(image_dir / "cxr1.png"), str(tmp_path / "cxr0.png")]

    # The CLI is a thin layer over the library: same tokens as generate_reports on the same images.
    import torch

    from radialog_rl.data.images import load_chest_xray
    from radialog_rl.generation import generate_reports
    from radialog_rl.loading.release import load_baseline_llava_model_with_vision_modules

    model = load_baseline_llava_model_with_vision_modules(
        tiny_release.model_path, tiny_release.model_base, device="cpu", dtype="fp32")
    crop = model.config.image_size
    images = torch.stack([load_chest_xray(image_dir / name, resize=round(crop * 512 / 448), crop=crop)
                          for name in ("cxr1.png", "cxr0.png")])
    expected = generate_reports(model, None, images, max_new_tokens=4)
    assert [r["text"] for r in rows] == [r.text for r in expected]
    assert [r["num_tokens"] for r in rows] == [r.num_tokens for r in expected]


def test_lora_is_applied_by_default(tiny_release, image_dir, capsys):
    args = ["generate", *_model_args(tiny_release), "--image", str(image_dir / "cxr0.png")]
    assert main(args) == 0
    with_lora = _read_jsonl(capsys.readouterr().out)
    assert main([*args, "--no-lora"]) == 0
    without = _read_jsonl(capsys.readouterr().out)
    assert main([*args, "--lora", str(tiny_release.model_path), "--precision", "8bit"]) == 0
    explicit_8bit = _read_jsonl(capsys.readouterr().out)
    assert main([*args, "--no-lora", "--precision", "8bit"]) == 0
    without_8bit = _read_jsonl(capsys.readouterr().out)
    assert with_lora[0]["text"] != without[0]["text"]
    # At 8 bit the adapter stays unmerged (merging would re-quantize), and it still changes the text.
    assert len(explicit_8bit) == 1 and explicit_8bit[0]["text"] != without_8bit[0]["text"]


def test_custom_prompt_gets_an_image_placeholder_and_seeded_sampling_repeats(tiny_release, image_dir, capsys):
    args = ["generate", *_model_args(tiny_release), "--image", str(image_dir), "--batch-size", "2",
            "--prompt", "Is there edema?", "--do-sample", "--seed", "0", "--top-k", "20"]
    assert main(args) == 0
    first = _read_jsonl(capsys.readouterr().out)
    assert "USER: <image>\nIs there edema? ASSISTANT:" in first[0]["prompt"]
    assert main(args) == 0
    second = _read_jsonl(capsys.readouterr().out)
    assert [(r["text"], r["num_tokens"]) for r in first] == [(r["text"], r["num_tokens"]) for r in second]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def test_missing_image_is_a_one_line_error(tiny_release, tmp_path, capsys):
    code = main(["generate", *_model_args(tiny_release), "--image", str(tmp_path / "nope.png")])
    assert code == 1
    line = _one_line_error(capsys)
    assert line.startswith("radialog-rl generate: error:") and "nope.png" in line


def test_bad_model_path_is_a_one_line_error(tiny_release, image_dir, tmp_path, capsys):
    args = _model_args(tiny_release)
    args[1] = str(tmp_path / "no-such-release")
    code = main(["generate", *args, "--image", str(image_dir)])
    assert code == 1
    assert "no-such-release" in _one_line_error(capsys)


def test_findings_with_prompt_is_refused(tiny_release, image_dir, capsys):
    code = main(["generate", *_model_args(tiny_release), "--image", str(image_dir),
                 "--prompt", "<image> hi", "--findings", "edema"])
    assert code == 1
    assert "--findings" in _one_line_error(capsys)


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "radialog-rl generate --model-path" in text
    for option in ("--image", "--findings", "--prompt", "--precision", "--batch-size", "--output"):
        assert option in text


def test_demo_runs_and_prints_its_table(tiny_release, capsys):
    code = main(["demo", "--out", str(tiny_release.root), "--precisions", "16bit,4bit", "--images", "2",
                 "--max-new-tokens", "4", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "## Generation" in out and "tokens/s" in out and "peak MB" in out
    rows = [line for line in out.splitlines() if line.startswith("| 16bit") or line.startswith("| 4bit")]
    assert len(rows) == 2
    for title in ("## Adapters and merge", "## SFT", "## PPO"):  # the sections later issues added
        assert title in out
    assert "max |logit(merged) - logit(unmerged)|" in out


def test_demo_refuses_counts_below_one(tmp_path, capsys):
    for option in ("--images", "--max-new-tokens"):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--out", str(tmp_path / "tiny"), option, "0"])
        assert exit_info.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()  # refused before anything was built


def test_demo_sections_can_be_chosen(tiny_release, capsys):
    assert main(["demo", "--out", str(tiny_release.root), "--sections", "release", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "## Tiny release" in out and "## Generation" not in out
    assert main(["demo", "--out", str(tiny_release.root), "--sections", "nope"]) == 1
    assert "unknown demo section(s) nope" in capsys.readouterr().err


def test_demo_sections_are_extensible(tiny_release, capsys, monkeypatch):
    from radialog_rl.cli import demo

    seen = []
    monkeypatch.setattr(demo, "DEMO_SECTIONS", [lambda ctx: seen.append(ctx)])
    assert main(["demo", "--out", str(tiny_release.root), "--images", "1", "--device", "cpu"]) == 0
    (ctx,) = seen
    assert ctx.release.root == tiny_release.root and ctx.images.shape == (1, 3, 128, 128)
    ctx.table("T", ["a", "b"], [[1, 2.0]])
    assert "| 1 | 2.00 |" in capsys.readouterr().out
