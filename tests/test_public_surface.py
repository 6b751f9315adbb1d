"""The public surface stays put: every name the README's code imports from ``radialog_rl`` exists,
every lazily exported name resolves, and every subcommand's ``--help`` runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import radialog_rl
from radialog_rl.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_imports() -> set[str]:
    """Names in ``from radialog_rl import ...`` statements of the README's code blocks."""
    text = README.read_text(encoding="utf-8")
    names: set[str] = set()
    for match in re.finditer(r"from radialog_rl import \(([^)]*)\)|from radialog_rl import ([^\n(]+)", text):
        block = match.group(1) or match.group(2)
        for line in block.splitlines():
            line = line.split("#", 1)[0]
            names.update(n.strip() for n in line.split(",") if n.strip())
    return names


def test_readme_names_are_exported():
    names = _readme_imports()
    assert {"load_model", "ModelSpec", "load_pretrained_llava_model_for_sft_training"} <= names
    missing = [n for n in sorted(names) if not hasattr(radialog_rl, n)]
    assert not missing, f"README imports names radialog_rl does not export: {missing}"


@pytest.mark.parametrize("name", sorted(radialog_rl._EXPORTS))
def test_every_export_resolves(name):
    assert getattr(radialog_rl, name) is not None


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(prefix + (name,))
                found.extend(_subcommands(sub, prefix + (name,)))
    return found


@pytest.mark.parametrize("command", _subcommands(build_parser()), ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: radialog-rl " + " ".join(command))
