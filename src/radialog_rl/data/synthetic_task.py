"""A synthetic visual calibration task: chest-X-ray-like images with a finding of known visibility.

Each image is :func:`~radialog_rl.data.images.make_synthetic_chest_xray` (the background) with, for
positives, one finding drawn on top by a small numpy function, then per-image Gaussian noise:

* ``opacity``: a soft bright blob inside a lung field;
* ``effusion``: a bright fluid level filling a costophrenic angle, its meniscus climbing laterally;
* ``pneumothorax``: a dark crescent without lung markings (ribs) between the lateral/apical chest
  wall and the collapsed lung's pleural line, which shows as a thin bright line.

``visibility`` in [0, 1] scales the finding's contrast linearly (0 leaves the pixels untouched, so a
visibility-0 "positive" is byte-identical to the negative of the same seed) and its size a little
(``0.7 + 0.3 * visibility`` of the full size). The finding's geometry and the noise come from
separate random streams, both drawn whatever the visibility, so images of one seed differ only by
the finding. Positives take their visibility from a few discrete levels, so that per-level groups
exist for evaluation; negatives have no finding (visibility 0, group ``"none"``).

:func:`build_synthetic_task` writes a task folder::

    out_dir/
      images/train_00000.png ...   images/eval_00000.png ...   (8-bit grayscale PNG, size x size)
      ppo_train.jsonl  ppo_eval.jsonl   {"image", "prompt", "answer", "finding", "visibility",
                                         "visibility_group", "id"}
      sft_train.jsonl  sft_eval.jsonl   the same rows plus "target": "Yes {\\"confidence\\": N}" /
                                         "No {\\"confidence\\": N}", N uniform on 0..scale
      ppo_val.jsonl  sft_val.jsonl      only with n_val > 0: a validation split (images/val_*.png)
      manifest.json                     parameters, file names and counts

The SFT rows use the same images as the PPO rows of their split (SFT then PPO on the training
images, both evaluated on the held-out ones); no two splits share an image. The validation split is
for choices made while training (checkpoints, recipe settings), so that the held-out ``eval`` split
is looked at only for the final table. Each split draws from its own random streams, so adding a
validation split leaves the train and eval files byte for byte as they were. Everything is
deterministic from ``seed``: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from radialog_rl.calibration.prompts import CONFIDENCE_SCALES, qa_sft_target
from radialog_rl.data.images import make_synthetic_chest_xray
from radialog_rl.data.rows import RowErrors, jsonl_objects, require_file
from radialog_rl.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_VISIBILITY_LEVELS",
    "FINDINGS",
    "FINDING_QUESTIONS",
    "NEGATIVE_GROUP",
    "LungField",
    "RenderedCase",
    "TaskFiles",
    "build_synthetic_task",
    "draw_effusion",
    "draw_opacity",
    "draw_pneumothorax",
    "find_lung_fields",
    "read_task_rows",
    "render_case",
    "task_prompt",
    "visibility_group",
]

logger = logging.getLogger(__name__)

#: Visibility levels of positive images (one group each).
DEFAULT_VISIBILITY_LEVELS: tuple[float, ...] = (0.15, 0.3, 0.45, 0.6, 0.8, 1.0)
#: ``visibility_group`` of negative images (no finding).
NEGATIVE_GROUP = "none"
#: How each finding reads in the question ("Is there {phrase} in this image?").
FINDING_QUESTIONS: dict[str, str] = {
    "opacity": "lung opacity",
    "effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
}
#: Default standard deviation of the per-image noise, in units of the [0, 1] intensity range
#: (on top of the background's own 0.02).
DEFAULT_NOISE_STD = 0.02
#: Smallest image side the lung-field detection works at.
_MIN_SIZE = 32
_SPLITS = ("train", "eval", "val")  # the index of each is part of its random streams
_MANIFEST_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LungField:
    """One lung field of a background image, in normalised coordinates (0..1 across the image).

    Attributes:
        weight: ``[H, W]`` float in [0, 1], 1 inside the lung, soft at its border.
        cx, cy: centre of the lung's bounding box; rx, ry: its half-width and half-height.
        lateral: +1 when the lung's outer (lateral) side is towards larger x (the image's right
            lung), -1 otherwise.
    """

    weight: np.ndarray
    cx: float
    cy: float
    rx: float
    ry: float
    lateral: int


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a ``(2·radius+1)²`` window, edges replicated (``[H, W]`` -> ``[H, W]``).

    Hand-written with cumulative sums: ``scipy.ndimage.uniform_filter`` does this, but scipy is not
    a dependency and this is the only filter needed.
    """
    if radius <= 0:
        return image.astype(np.float64)
    out = image.astype(np.float64)
    width = 2 * radius + 1
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)],
                        mode="edge")
        csum = np.cumsum(padded, axis=axis)
        zero = np.zeros_like(np.take(csum, [0], axis=axis))
        csum = np.concatenate([zero, csum], axis=axis)
        n = out.shape[axis]
        out = (np.take(csum, np.arange(width, width + n), axis=axis)
               - np.take(csum, np.arange(0, n), axis=axis)) / width
    return out


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``x, y`` in [0, 1] (x left -> right, y top -> bottom)."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(coords, coords)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


def find_lung_fields(background: np.ndarray) -> tuple[LungField, LungField]:
    """The two lung fields of a synthetic background, found from its pixels.

    Lungs are the dark (air-filled) regions inside the body: after a blur that removes noise and
    ribs, pixels between the air outside the body (~0.06) and soft tissue (~0.58) that are not
    near the air (the body's soft outline passes through the same intensities). Reading them from the pixels rather than re-deriving the generator's
    random geometry keeps this independent of how
    :func:`~radialog_rl.data.images.make_synthetic_chest_xray` draws its shapes.

    Args:
        background: ``[H, W]`` float image in [0, 1] (square).

    Returns:
        ``(image-left lung, image-right lung)``.

    Raises:
        DataError: a lung field cannot be found (not a synthetic chest X-ray, or too small).
    """
    size = background.shape[0]
    x, y = _grid(size)
    smooth = _box_blur(background, max(1, round(size * 0.02)))
    # The band between air and tissue, away from the body outline: the outline passes through the
    # same band but touches the air, while the lungs lie well inside the body.
    # Outside the image counts as air: the body may be cut by the image border.
    reach = max(1, round(size * 0.05))
    air = np.pad(smooth < 0.12, reach, constant_values=True)
    near_air = _box_blur(air.astype(np.float64), reach)[reach:-reach, reach:-reach] > 0
    dark = (smooth >= 0.12) & (smooth < 0.42) & ~near_air
    weight = _box_blur(dark.astype(np.float64), max(1, round(size * 0.01)))
    fields = []
    for lateral, side in ((-1, x < 0.5), (1, x >= 0.5)):
        mask = dark & side
        if mask.sum() < 0.01 * size * size:
            raise DataError(f"no {'left' if lateral < 0 else 'right'} lung field found in the "
                            f"background image ({size} px); is it a synthetic chest X-ray?")
        xs, ys = x[mask], y[mask]
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        fields.append(LungField(weight=weight * side, cx=float((x0 + x1) / 2),
                                cy=float((y0 + y1) / 2), rx=float((x1 - x0) / 2),
                                ry=float((y1 - y0) / 2), lateral=lateral))
    return fields[0], fields[1]


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             edge_px: float, size: int) -> np.ndarray:
    """Soft ellipse indicator, its border ``edge_px`` pixels wide, and the signed border distance
    (approximate, in pixels; negative inside)."""
    rho = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    distance = (rho - 1.0) * min(rx, ry) * size
    return _sigmoid(-distance / edge_px), distance


# --------------------------------------------------------------------------------------------------
# Findings: (picture, lungs, visibility, rng) -> (picture, region)
# --------------------------------------------------------------------------------------------------
# Each draws all its random geometry first, whatever the visibility, and changes the picture by an
# amount proportional to the visibility; the region is where the finding lies (for measurements).

#: How strong each finding is at visibility 1, in [0, 1] intensity units (lungs are ~0.25).
_OPACITY_CONTRAST = 0.28
_EFFUSION_LEVEL = 0.52  # intensity of the fluid (soft tissue is ~0.58)
_EFFUSION_OPACITY = 0.8  # how much of the lung behind the fluid it hides at visibility 1
_PNEUMOTHORAX_DARK = 0.10  # intensity of the air in the crescent (lungs ~0.25 with ribs)
_PLEURAL_LINE_CONTRAST = 0.12


def _size_factor(visibility: float) -> float:
    """Size of a finding relative to its full size: 0.7 at visibility 0, 1 at visibility 1."""
    return 0.7 + 0.3 * visibility


def draw_opacity(picture: np.ndarray, lungs: Sequence[LungField], visibility: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft bright blob (two overlapping Gaussians) inside one lung field.

    ``picture``: ``[H, W]`` float in [0, 1]. Returns the new picture and the boolean region where
    the blob exceeds a fifth of its peak.
    """
    size = picture.shape[0]
    x, y = _grid(size)
    lung = lungs[int(rng.integers(0, 2))]
    angle, radius = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.0, 0.5)
    cx = lung.cx + radius * lung.rx * np.cos(angle)
    cy = lung.cy + radius * lung.ry * np.sin(angle)
    sigma = rng.uniform(0.035, 0.055) * _size_factor(visibility)
    offset = rng.normal(0.0, 0.6 * sigma, size=2)  # the second lobe makes the outline irregular
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    blob += 0.7 * np.exp(-((x - cx - offset[0]) ** 2 + (y - cy - offset[1]) ** 2)
                         / (2 * (0.8 * sigma) ** 2))
    blob = np.minimum(blob, 1.0) * lung.weight
    out = picture + _OPACITY_CONTRAST * visibility * blob
    return out, blob > 0.2


def draw_effusion(picture: np.ndarray, lungs: Sequence[LungField], visibility: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright fluid layer in the lower part of one lung field, filling its costophrenic angle.

    The fluid surface is a meniscus: lowest medially and climbing towards the lateral chest wall.
    Returns the new picture and the boolean region holding fluid.
    """
    size = picture.shape[0]
    x, y = _grid(size)
    lung = lungs[int(rng.integers(0, 2))]
    height = rng.uniform(0.3, 0.42) * 2 * lung.ry * _size_factor(visibility)
    climb = rng.uniform(0.35, 0.5)  # share of the height the meniscus gains towards the wall
    bottom = lung.cy + lung.ry
    # t: 0 at the lung's medial edge, 1 at its lateral edge.
    t = np.clip(0.5 + lung.lateral * (x - lung.cx) / (2 * lung.rx), 0.0, 1.0)
    surface = bottom - height * ((1 - climb) + climb * t**2)
    fluid = _sigmoid((y - surface) * size / 1.0) * lung.weight
    # Fluid is nearly as dense as soft tissue and hides the ribs: blend towards a flat level.
    strength = _EFFUSION_OPACITY * visibility * fluid
    out = picture * (1 - strength) + _EFFUSION_LEVEL * strength
    return out, fluid > 0.5


def draw_pneumothorax(picture: np.ndarray, lungs: Sequence[LungField], visibility: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark crescent without lung markings along the apex and lateral edge of one lung field.

    The collapsed lung is the lung's ellipse shrunk towards its medial and lower edges; between it
    and the chest wall the ribs (the synthetic lung markings) are replaced by featureless dark air,
    and the collapsed lung's edge (the visceral pleura) shows as a thin bright line. Returns the
    new picture and the boolean crescent region.
    """
    size = picture.shape[0]
    x, y = _grid(size)
    lung = lungs[int(rng.integers(0, 2))]
    depth = rng.uniform(0.12, 0.2) * _size_factor(visibility)  # crescent width / lung width
    rx_in, ry_in = lung.rx * (1 - depth), lung.ry * (1 - 0.6 * depth)
    cx_in = lung.cx - lung.lateral * (lung.rx - rx_in)  # medial edges coincide
    cy_in = lung.cy + (lung.ry - ry_in)  # lower edges coincide
    inside, distance = _ellipse(x, y, cx_in, cy_in, rx_in, ry_in, 0.7, size)
    crescent = lung.weight * (1.0 - inside)
    # weight**4: no line where the collapsed lung's edge runs along the lung's own border.
    line = np.exp(-(distance / 0.8) ** 2) * lung.weight**4
    strength = visibility * crescent
    out = picture * (1 - strength) + _PNEUMOTHORAX_DARK * strength
    out = out + _PLEURAL_LINE_CONTRAST * visibility * line
    return out, crescent > 0.5


#: Finding name -> its drawing function.
FINDINGS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "opacity": draw_opacity,
    "effusion": draw_effusion,
    "pneumothorax": draw_pneumothorax,
}


# --------------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedCase:
    """One synthetic image: ``pixels`` ``[size, size]`` uint8 and the finding's ``region`` (bool,
    all False for a negative)."""

    pixels: np.ndarray
    region: np.ndarray

    def to_image(self) -> Image.Image:
        """The pixels as a Pillow ``L`` image."""
        return Image.fromarray(self.pixels)


def _check_finding(finding: str) -> str:
    if finding not in FINDINGS:
        raise ConfigError(f"unknown synthetic finding {finding!r}; choose from "
                          f"{', '.join(FINDINGS)}")
    return finding


def _check_visibility(visibility: float) -> float:
    if isinstance(visibility, bool) or not isinstance(visibility, (int, float, np.floating)) \
            or not 0.0 <= float(visibility) <= 1.0:
        raise ConfigError(f"visibility must be a number in [0, 1], got {visibility!r}")
    return float(visibility)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ConfigError(f"size must be an integer of at least {_MIN_SIZE} pixels, got {size!r}")
    return int(size)


def render_case(seed: int, finding: str | None = None, visibility: float = 0.0, size: int = 128,
                noise_std: float = DEFAULT_NOISE_STD) -> RenderedCase:
    """One image: the background of ``seed``, ``finding`` at ``visibility`` (None: a negative), noise.

    The same ``seed`` gives the same background, finding geometry and noise for every visibility,
    so ``render_case(s, f, 0.0)`` equals ``render_case(s, None)`` and images of one seed differ
    only by the finding's contrast and (slightly) its size.

    Args:
        seed: non-negative int; background, geometry and noise all derive from it.
        finding: a key of :data:`FINDINGS`, or None for no finding.
        visibility: in [0, 1]; ignored (must still be valid) when ``finding`` is None.
        size: image side in pixels (at least 32).
        noise_std: standard deviation of the added Gaussian noise, in [0, 1] intensity units.

    Returns:
        The :class:`RenderedCase`.
    """
    size = _check_size(size)
    visibility = _check_visibility(visibility)
    if not noise_std >= 0:  # also refuses NaN
        raise ConfigError(f"noise_std must be >= 0, got {noise_std!r}")
    background = np.asarray(make_synthetic_chest_xray(int(seed), size=size), dtype=np.float64)
    picture = background / 255.0
    geometry_rng, noise_rng = (np.random.default_rng(s)
                               for s in np.random.SeedSequence(int(seed)).spawn(2))
    region = np.zeros(picture.shape, dtype=bool)
    if finding is not None:
        draw = FINDINGS[_check_finding(finding)]
        picture, region = draw(picture, find_lung_fields(picture), visibility, geometry_rng)
    picture = picture + noise_rng.normal(0.0, noise_std, size=picture.shape)
    pixels = np.round(np.clip(picture, 0.0, 1.0) * 255.0).astype(np.uint8)
    return RenderedCase(pixels=pixels, region=region)


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


def task_prompt(finding: str, scale: int = 10) -> str:
    """The question of a row, in the wording of the package's other binary-QA data
    (:func:`radialog_rl.testing.data.make_binary_qa_jsonl`); ``<image>`` is added by the loaders."""
    phrase = FINDING_QUESTIONS[_check_finding(finding)]
    return (f"Is there {phrase} in this image? Answer yes or no, then give your confidence as "
            f'{{"confidence": N}} with N from 0 to {scale}.')


def visibility_group(visibility: float) -> str:
    """The group label of a visibility: ``"none"`` for 0 (negatives), else two decimals ("0.15")."""
    return NEGATIVE_GROUP if visibility == 0 else f"{visibility:.2f}"


@dataclass(frozen=True)
class TaskFiles:
    """Where :func:`build_synthetic_task` wrote the task (all paths absolute)."""

    root: Path
    images: Path
    ppo_train: Path
    ppo_eval: Path
    sft_train: Path
    sft_eval: Path
    manifest: Path
    ppo_val: Path | None = None  # None: built without a validation split (n_val 0)
    sft_val: Path | None = None


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    levels = tuple(float(_check_visibility(v)) for v in levels)
    if not levels or any(v == 0 for v in levels) or len(set(levels)) != len(levels):
        raise ConfigError(f"visibility_levels must be distinct numbers in (0, 1], got {levels!r}")
    return levels


def _split_plan(n: int, findings: Sequence[str], levels: Sequence[float],
                positive_fraction: float, rng: np.random.Generator) -> list[tuple[str, float]]:
    """``n`` (finding, visibility) pairs in random order: ``round(n·positive_fraction)`` positives
    cycling through findings and, within each finding, through the levels; negatives (visibility
    0) cycling through findings. Balanced, so every group of a large enough split is populated."""
    n_pos = int(round(n * positive_fraction))
    k = len(findings)
    plan = [(findings[j % k], levels[(j // k) % len(levels)]) for j in range(n_pos)]
    plan += [(findings[j % k], 0.0) for j in range(n - n_pos)]
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


def _image_seed(seed: int, split: int, index: int) -> int:
    """A background seed per (task seed, split, row): distinct streams, so splits share no image."""
    return int(np.random.SeedSequence([seed, split, index]).generate_state(1)[0])


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_synthetic_task(
    out_dir: str | os.PathLike[str],
    n_train: int = 800,
    n_eval: int = 400,
    findings: Sequence[str] = ("opacity", "effusion", "pneumothorax"),
    seed: int = 0,
    size: int = 128,
    positive_fraction: float = 0.5,
    confidence_scale: int = 10,
    visibility_levels: Sequence[float] = DEFAULT_VISIBILITY_LEVELS,
    noise_std: float = DEFAULT_NOISE_STD,
    n_val: int = 0,
) -> TaskFiles:
    """Write the synthetic calibration task (layout and row formats in the module docstring).

    Args:
        out_dir: folder to write into (created; files of a previous build are overwritten, other
            files are left alone).
        n_train, n_eval: rows (= images) of the training and held-out splits.
        n_val: rows of the validation split (0: none; the other splits do not depend on it).
        findings: finding types (keys of :data:`FINDINGS`); rows cycle through them.
        seed: task seed; the same arguments give byte-identical files.
        size: image side in pixels (128 = the tiny release's crop; RaDialog's is 448).
        positive_fraction: share of positives per split (rounded to a whole number of rows).
        confidence_scale: 10 or 100; the prompt asks for N on ``0..scale`` and the SFT targets draw
            N uniformly from it.
        visibility_levels: the visibilities positives are drawn from (distinct, in (0, 1]).
        noise_std: per-image Gaussian noise (intensity units, [0, 1] range).

    Returns:
        The :class:`TaskFiles`.

    Raises:
        ConfigError: an argument is out of range or a finding is unknown.
    """
    n_train, n_eval = _check_count("n_train", n_train), _check_count("n_eval", n_eval)
    if n_val != 0:
        n_val = _check_count("n_val", n_val)
    findings = tuple(_check_finding(f) for f in findings)
    if not findings or len(set(findings)) != len(findings):
        raise ConfigError(f"findings must be distinct names from {', '.join(FINDINGS)}, "
                          f"got {findings!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    size = _check_size(size)
    if not 0.0 <= float(positive_fraction) <= 1.0:
        raise ConfigError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}")
    if confidence_scale not in CONFIDENCE_SCALES:
        raise ConfigError(f"confidence_scale must be one of {CONFIDENCE_SCALES}, "
                          f"got {confidence_scale!r}")
    levels = _check_levels(visibility_levels)
    if not float(noise_std) >= 0:
        raise ConfigError(f"noise_std must be >= 0, got {noise_std!r}")

    root = Path(out_dir).expanduser().resolve()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = TaskFiles(root=root, images=images, ppo_train=root / "ppo_train.jsonl",
                      ppo_eval=root / "ppo_eval.jsonl", sft_train=root / "sft_train.jsonl",
                      sft_eval=root / "sft_eval.jsonl", manifest=root / "manifest.json",
                      ppo_val=root / "ppo_val.jsonl" if n_val else None,
                      sft_val=root / "sft_val.jsonl" if n_val else None)
    paths = {"train": (files.ppo_train, files.sft_train), "eval": (files.ppo_eval, files.sft_eval),
             "val": (files.ppo_val, files.sft_val)}
    counts: dict[str, Any] = {}
    for split_index, (split, n) in enumerate(zip(_SPLITS, (n_train, n_eval, n_val))):
        if n == 0:
            continue
        plan_rng, target_rng = (np.random.default_rng(s) for s in
                                np.random.SeedSequence([seed, split_index]).spawn(2))
        plan = _split_plan(n, findings, levels, float(positive_fraction), plan_rng)
        ppo_rows, sft_rows = [], []
        for i, (finding, visibility) in enumerate(tqdm(plan, desc=f"synthetic {split} images", leave=False,
                                                       disable=not logger.isEnabledFor(logging.INFO))):
            name = f"{split}_{i:05d}.png"
            case = render_case(_image_seed(seed, split_index, i),
                               finding if visibility > 0 else None, visibility, size, noise_std)
            case.to_image().save(images / name)
            answer = "yes" if visibility > 0 else "no"
            row = {"image": f"images/{name}", "prompt": task_prompt(finding, confidence_scale),
                   "answer": answer, "finding": finding, "visibility": visibility,
                   "visibility_group": visibility_group(visibility), "id": f"{split}-{i:05d}"}
            ppo_rows.append(row)
            sft_rows.append({**row, "target": qa_sft_target(answer, target_rng, confidence_scale)})
        _write_jsonl(paths[split][0], ppo_rows)
        _write_jsonl(paths[split][1], sft_rows)
        groups = Counter(f"{r['finding']}/{r['visibility_group']}" for r in ppo_rows)
        counts[split] = {"rows": n, "positives": sum(r["answer"] == "yes" for r in ppo_rows),
                         "groups": dict(sorted(groups.items()))}
        logger.info("synthetic task: %d %s rows (%d positive)", n, split, counts[split]["positives"])

    manifest = {
        "task": "radialog-rl synthetic visual calibration",
        "version": _MANIFEST_VERSION,
        "parameters": {"n_train": n_train, "n_eval": n_eval, "n_val": n_val, "findings": list(findings),
                       "seed": int(seed), "size": size,
                       "positive_fraction": float(positive_fraction),
                       "confidence_scale": confidence_scale, "visibility_levels": list(levels),
                       "noise_std": float(noise_std)},
        "files": {"images": "images", "ppo_train": files.ppo_train.name,
                  "ppo_eval": files.ppo_eval.name, "sft_train": files.sft_train.name,
                  "sft_eval": files.sft_eval.name,
                  **({"ppo_val": files.ppo_val.name, "sft_val": files.sft_val.name} if n_val else {})},
        "counts": counts,
    }
    files.manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                              encoding="utf-8")
    return files


def read_task_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a task JSONL file (blank lines skipped), e.g. for the oracle.

    Raises:
        DataError: the file is missing or a line is not a JSON object (message gives the line).
    """
    path = require_file(path, "task file")
    errors = RowErrors(path)
    rows = [row.data for row in jsonl_objects(path, errors)]  # BOM and non-UTF-8 lines handled
    errors.raise_if_any()
    return rows
