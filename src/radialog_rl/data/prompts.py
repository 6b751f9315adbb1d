"""RaDialog's conversation template and report prompt (``docs/checkpoint-format.md`` §8).

Pure string functions; no tokenizer or torch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from radialog_rl.constants import DEFAULT_IMAGE_TOKEN

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant acting as an "
    "experienced radiologist. The assistant gives professional, detailed, and polite answers to "
    "the user's questions."
)
#: Separator after a finished assistant turn (vicuna v1 ``sep2``).
EOS_TEXT = "</s>"

REPORT_INSTRUCTION = (
    "You are to act as a radiologist and write the finding section of a chest x-ray radiology "
    "report for this X-ray image and the given predicted findings. Write in the style of a "
    "radiologist, write one fluent text without enumeration, be concise and don't provide "
    "explanations or reasons."
)

#: The 14 CheXpert observation names, in CheXpert's order.
CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)


def format_findings(findings: Iterable[str] | str | None) -> str:
    """Lower-cased finding names joined by ", "; "no common findings" when there are none.

    A string is taken as a comma-separated list ("Edema, Cardiomegaly").
    """
    if isinstance(findings, str):
        findings = [f for f in (s.strip() for s in findings.split(",")) if f]
    names = [f.strip().lower() for f in (findings or []) if f and f.strip()]
    return ", ".join(names) if names else "no common findings"


def report_prompt(findings: Iterable[str] | str | None = None) -> str:
    """RaDialog's report-generation user message (with the ``<image>`` placeholder first)."""
    return f"{DEFAULT_IMAGE_TOKEN}. Predicted Findings: {format_findings(findings)}. {REPORT_INSTRUCTION}"


def render_conversation(
    turns: Sequence[tuple[str, str | None]],
    system: str = SYSTEM_PROMPT,
) -> str:
    """Render (role, text) turns with the vicuna-v1 template RaDialog used.

    ``role`` is "user" or "assistant". A finished assistant turn ends with ``</s>``; an assistant
    turn whose text is ``None`` is the open slot the model completes (the string then ends with
    ``" ASSISTANT:"``). Example: ``SYSTEM USER: hi ASSISTANT: hello</s>USER: ...``.
    """
    out = system
    for i, (role, text) in enumerate(turns):
        role_l = role.lower()
        if role_l in ("user", "human"):
            out += (" " if i == 0 or not out.endswith(EOS_TEXT) else "") + f"USER: {text}"
        elif role_l in ("assistant", "gpt"):
            out += " ASSISTANT:"
            if text is not None:
                out += f" {text}{EOS_TEXT}"
        else:
            raise ValueError(f"unknown conversation role {role!r}; use 'user' or 'assistant'")
    return out


def build_prompt(user_message: str, system: str = SYSTEM_PROMPT) -> str:
    """A single-turn prompt ready for generation: ``SYSTEM USER: msg ASSISTANT:``."""
    return render_conversation([("user", user_message), ("assistant", None)], system=system)
