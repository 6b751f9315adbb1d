"""``radialog-rl`` command line: one module per subcommand.

Each subcommand module defines ``register(subparsers)`` which adds its parser and sets
``func=run``; heavy imports (torch, transformers) happen inside ``run`` so ``--help`` is instant.
Errors caused by the user (:class:`~radialog_rl.errors.RadialogError`, missing files) print one
line and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = ("demo", "make_tiny", "generate", "merge", "sft", "ppo", "evaluate", "confidence", "data", "score")

logger = logging.getLogger("radialog_rl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radialog-rl",
        description=(
            "Load, adapt, fine-tune (SFT, multimodal PPO) and evaluate RaDialog "
            "(LLaVA-1.5 + BioViL-T) chest X-ray models for calibrated confidence."
        ),
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"radialog_rl.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built yet in this checkout
            if exc.name != f"radialog_rl.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # bitsandbytes logs a harmless note about an optional hub package on import (stack notes).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not debug:
        for noisy in ("transformers", "accelerate", "peft", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # transformers sets its own level when first imported (after this): tell it through its
        # variable, and directly when it is already loaded.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].set_verbosity_error()
        # peft reads a property transformers deprecated: a notice about their code, not the user's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if quiet:  # -q: no progress bars either (ours follow the log level)
        hide_library_progress_bars()


def hide_library_progress_bars() -> None:
    """No "Loading weights" bars from transformers / huggingface_hub for the rest of the process."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is imported
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()


def _end_progress_bars() -> None:
    """Close open tqdm bars so an error message starts on its own line, not after a bar."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``radialog-rl`` script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.debug, args.quiet)
    from radialog_rl.errors import RadialogError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("radialog-rl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (RadialogError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if args.debug:
            raise
        _end_progress_bars()
        msg = " ".join(str(exc).split())
        print(f"radialog-rl {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
