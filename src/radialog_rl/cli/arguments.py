"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a one-line message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_config_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    """``KEY=VALUE`` overrides and ``--print-config``, shared by the training subcommands."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"config overrides (dotted for nested keys; values read as YAML), e.g. {example}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults and documentation included) and exit")
