"""Deterministic selection: a seeded hash of identifiers decides every sampling choice.

Sorting by ``sha256(seed, purpose, ids...)`` gives an order that depends only on the seed and the
identifiers, not on the order of the input CSV rows, a dataframe's index, or a library's random
number generator, so the same files give the same subset on any machine and any Python version.
(``random.Random(seed).sample`` would depend on the input order; numpy's generators on numpy's
version policy.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

from radialog_rl.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "hash_confidence", "hash_order", "one_per_study", "parse_fractions", "partition_by_subject", "select",
    "selection_hash", "split_parts", "unit_hash",
]


def selection_hash(seed: int, *parts: object) -> int:
    """A 64-bit integer from ``sha256`` of the seed and ``parts`` (their ``str``, unit-separated)."""
    text = "\x1f".join([str(int(seed)), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def hash_confidence(seed: int, scale: int, *parts: object) -> int:
    """A format-learning SFT confidence: uniform on ``0..scale`` from the hash of ``parts`` (the bias
    of ``2**64 mod (scale + 1)`` is below 1e-17)."""
    return selection_hash(seed, "confidence", *parts) % (scale + 1)


def unit_hash(seed: int, *parts: object) -> float:
    """:func:`selection_hash` mapped to ``[0, 1)``."""
    return selection_hash(seed, *parts) / 2.0**64


def hash_order(items: Iterable[T], key: Callable[[T], Sequence[Hashable]], seed: int, purpose: str) -> list[T]:
    """``items`` sorted by the hash of ``(seed, purpose, *key(item))``; ties (equal keys) by key."""
    return sorted(items, key=lambda it: (selection_hash(seed, purpose, *key(it)), tuple(map(str, key(it)))))


def select(
    items: Sequence[T], n: int, key: Callable[[T], Sequence[Hashable]], seed: int, purpose: str
) -> tuple[list[tuple[T, int]], int]:
    """``n`` items in hash order as ``(item, repeat)`` pairs, and how many are repeats.

    The first ``min(n, len(items))`` are distinct (``repeat`` 0). When fewer than ``n`` exist the
    hash-ordered list is cycled (``repeat`` 1, 2, ...): sampling with replacement only for the
    shortfall, each item repeated at most once more than any other. No items gives ``[]``.
    """
    if n < 0:
        raise ConfigError(f"cannot select a negative number of items ({n})")
    ordered = hash_order(items, key, seed, purpose)
    if not ordered:
        return [], 0
    chosen = [(ordered[i % len(ordered)], i // len(ordered)) for i in range(n)]
    return chosen, max(0, n - len(ordered))


def parse_fractions(text: str | Mapping[str, float] | None) -> dict[str, float] | None:
    """``"sft=0.5,ppo=0.5"`` (or a mapping) -> ``{"sft": 0.5, "ppo": 0.5}``; fractions must be
    positive and sum to at most 1 (the rest of the subjects are left out)."""
    if text is None or text == "":
        return None
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"subsets must look like 'sft=0.5,ppo=0.5', got {text!r}")
            items.append((name.strip(), value.strip()))
    out: dict[str, float] = {}
    for name, value in items:
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"subset {name!r}: {value!r} is not a number") from None
        if not 0.0 < fraction <= 1.0 or name in out:
            raise ConfigError(f"subset {name!r}: fraction must be in (0, 1] and each name given once")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"subset name {name!r} may hold only letters, digits, '-' and '_'")
        out[name] = fraction
    if sum(out.values()) > 1.0 + 1e-9:
        raise ConfigError(f"subset fractions sum to {sum(out.values()):.3f} > 1")
    return out


def partition_by_subject(
    items: Iterable[T], fractions: Mapping[str, float], subject: Callable[[T], int], seed: int
) -> dict[str, list[T]]:
    """Split ``items`` into named parts by a hash of the subject id alone, so that all studies and
    images of one patient land in the same part (no patient in two parts). Each subject's
    ``unit_hash`` falls in one interval of the cumulative ``fractions``; beyond their sum it is
    left out. Parts keep the input order."""
    names = list(fractions)
    bounds, total = [], 0.0
    for name in names:
        total += fractions[name]
        bounds.append(total)
    parts: dict[str, list[T]] = {name: [] for name in names}
    for item in items:
        u = unit_hash(seed, "subset", subject(item))
        for name, bound in zip(names, bounds):
            if u < bound:
                parts[name].append(item)
                break
    return parts


def split_parts(
    images: Sequence[T], splits: Sequence[str], subsets: Mapping[str, float] | None, seed: int
) -> list[tuple[str, str, list[T]]]:
    """``(part name, split, images)`` for each official split in ``splits`` and, with ``subsets``,
    each named share of its subjects (:func:`partition_by_subject`): part names are ``train`` or
    ``train_sft``, ``train_ppo``, ... Images need ``split`` and ``subject_id`` attributes."""
    parts = []
    for name in splits:
        members = [im for im in images if im.split == name]
        if not subsets:
            parts.append((name, name, members))
            continue
        shares = partition_by_subject(members, subsets, lambda im: im.subject_id, seed)
        parts += [(f"{name}_{sub}", name, shares[sub]) for sub in subsets]
    return parts


def one_per_study(images: Iterable[T], seed: int) -> list[T]:
    """One image per study, chosen by hash (so which view is used does not depend on row order);
    in (subject, study) order. Images need a ``key`` of (subject, study, dicom)."""
    best: dict[tuple[int, int], tuple[int, T]] = {}
    for im in images:
        study = im.key[:2]
        h = selection_hash(seed, "study-image", *im.key)
        if study not in best or (h, im.key) < (best[study][0], best[study][1].key):
            best[study] = (h, im)
    return [best[k][1] for k in sorted(best)]
