"""Chest X-ray reading and preprocessing as RaDialog fed BioViL-T (``docs/checkpoint-format.md`` §7).

Reading (:func:`read_image_array`) returns the pixels at their original bit depth:

* PNG/JPEG (and anything else Pillow decodes) through Pillow. Modes ``L``/``I;16``/``I``/``F``
  give a 2-D array of their own dtype (uint8/uint16/int32/float32); ``RGB``/``RGBA``/``LA`` give
  ``HxWxC`` uint8. Palette (``P``/``PA``) images are expanded through their palette (the indices
  mean nothing), bilevel ``1`` becomes ``L`` (0/255), other colour spaces (CMYK, YCbCr, ...) become
  ``RGB``. EXIF orientation is *not* applied (RaDialog did not apply it either).
* DICOM (``.dcm``/``.dicom`` suffix or the ``DICM`` magic at byte 128) through pydicom, imported
  lazily (optional extra ``radialog-rl[dicom]``): stored values → modality LUT (rescale
  slope/intercept or Modality LUT Sequence) → VOI LUT / window centre-width → ``MONOCHROME1``
  inverted so that bone is bright. Compressed transfer syntaxes need a pydicom decoder plugin
  (pylibjpeg or gdcm).

Preprocessing (:func:`preprocess_chest_xray`) applies, in this order, RaDialog's steps:

1. per-image min-max stretch to uint8: ``floor((x - min) / (max - min) * 255)`` in float64, the
   truncating ``astype(uint8)`` RaDialog used (a constant image gives zeros instead of NaNs);
2. grayscale: colour images have their alpha dropped, are stretched jointly over R, G and B
   (step 1), then converted with Pillow's ``L`` conversion (ITU-R 601-2 luma);
3. resize so the *shorter* side equals ``resize`` with Pillow's bilinear filter, keeping the aspect
   ratio (the longer side is ``int(resize * long / short)``, torchvision's ``Resize(int)`` rule);
4. centre crop ``crop`` x ``crop`` with torchvision's ``CenterCrop`` convention (zero padding first
   when the image is smaller than ``crop``; offset ``int(round((h - crop) / 2))``, Python's round);
5. scale to [0, 1] by dividing by 255 in float32 (``ToTensor``);
6. repeat the single channel to 3 channels.

There is **no** mean/std normalisation. The result is a ``[3, crop, crop]`` float32 tensor in
[0, 1].

Why stretch before grayscale for colour images: this is the order RaDialog's loader used (stretch
the decoded array, then ``convert("L")``); Pillow's ``L`` conversion only accepts 8-bit RGB, so
stretching first also handles 16-bit or float colour arrays; and for gray content (R = G = B) the
``L`` conversion is exact, so RGB, RGBA, LA and L encodings of the same gray picture give identical
tensors. Alpha is dropped *before* the stretch so that an alpha channel (e.g. all 255) cannot widen
the min-max range.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from radialog_rl.errors import ConfigError, ImageError

__all__ = [
    "DEFAULT_CROP",
    "DEFAULT_RESIZE",
    "IMAGE_EXTENSIONS",
    "ImageLimits",
    "ImageSizes",
    "collect_image_paths",
    "image_header_size",
    "image_limits",
    "load_chest_xray",
    "load_chest_xrays",
    "make_synthetic_chest_xray",
    "preprocess_chest_xray",
    "read_image_array",
    "set_image_limits",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike[str]]

#: File name endings picked up when a folder is given (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm")
#: Endings that mark a DICOM file regardless of content.
_DICOM_SUFFIXES = (".dcm", ".dicom")
#: Endings that mark a list file (one image path per line) in :func:`collect_image_paths`.
_LIST_SUFFIXES = (".txt", ".lst", ".list")
#: A DICOM Part 10 file has a 128-byte preamble followed by these four bytes.
_DICOM_MAGIC = b"DICM"
_DICOM_MAGIC_OFFSET = 128

_DICOM_INSTALL_HINT = "pip install 'radialog-rl[dicom]'"
_DICOM_DECODER_HINT = (
    "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg  (or: pip install python-gdcm)"
)

#: RaDialog's defaults: shorter side to 512, then a 448 x 448 centre crop (BioViL-T's input size).
DEFAULT_RESIZE = 512
DEFAULT_CROP = 448


@dataclass(frozen=True)
class ImageSizes:
    """Preprocessing sizes in pixels: shorter side resized to ``resize``, then a ``crop`` square."""

    resize: int
    crop: int

    @classmethod
    def for_crop(cls, crop: int) -> "ImageSizes":
        """RaDialog's 512 -> 448 ratio at any tower input size (``crop`` = the config's
        ``image_size``): 448 -> 512, 128 -> 146."""
        crop = int(crop)
        return cls(resize=round(crop * DEFAULT_RESIZE / DEFAULT_CROP), crop=crop)


# --------------------------------------------------------------------------------------------------
# Size limits, checked from the header before any pixel is decoded
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLimits:
    """Image sizes refused before decoding (a 102-byte PNG can declare 1 x 20000 pixels and cost
    gigabytes once decoded and resized to a 512-px shorter side).

    Each limit can be changed per process with :func:`set_image_limits` or the environment
    variables ``RADIALOG_MAX_IMAGE_PIXELS``, ``RADIALOG_MAX_IMAGE_ASPECT``, ``RADIALOG_MIN_IMAGE_SIDE``.
    """

    max_pixels: int = 50_000_000
    """Width x height; radiograph detectors are below 20 megapixels."""
    max_aspect: float = 8.0
    """Long side / short side; chest radiographs are below 2."""
    min_side: int = 16
    """Shorter side in pixels: below it an image is no radiograph (a 1 x 1 image preprocesses
    to all zeros)."""


_limits = ImageLimits()
_LIMIT_ENV = {"max_pixels": "RADIALOG_MAX_IMAGE_PIXELS", "max_aspect": "RADIALOG_MAX_IMAGE_ASPECT",
              "min_side": "RADIALOG_MIN_IMAGE_SIDE"}


def set_image_limits(**changes: float) -> ImageLimits:
    """Change the process-wide :class:`ImageLimits` (e.g. ``max_pixels=200_000_000``); returns them."""
    global _limits
    _limits = dataclasses.replace(_limits, **changes)
    return _limits


def image_limits() -> ImageLimits:
    """The limits in force: :func:`set_image_limits` values, overridden by the environment."""
    limits = _limits
    for name, var in _LIMIT_ENV.items():
        if os.environ.get(var):
            kind = type(getattr(limits, name))
            try:
                limits = dataclasses.replace(limits, **{name: kind(float(os.environ[var]))})
            except ValueError:
                raise ConfigError(f"{var}={os.environ[var]!r} is not a number") from None
    return limits


def image_header_size(path: PathLike) -> tuple[int, int]:
    """``(width, height)`` read from the file's header (no pixel data decoded).

    Raises:
        ImageError: missing/empty/unreadable file, or a size outside :func:`image_limits`.
    """
    path = Path(path)
    _check_file(path)
    if _is_dicom(path):
        pydicom, _ = _import_pydicom(path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            width, height = int(ds.Columns), int(ds.Rows)
        except Exception as e:  # pydicom raises many kinds for a bad header
            raise ImageError(f"cannot read the DICOM header of {path}: {_one_line(e)}") from e
    else:
        try:
            with Image.open(path) as image:  # lazy: reads the header only
                width, height = image.size
        except Exception as e:
            raise ImageError(f"cannot read {path} as an image: {_one_line(e)}. Expected a PNG/JPEG or "
                             f"DICOM chest X-ray") from e
    _check_limits(path, width, height)
    return width, height


def _check_limits(path: Path, width: int, height: int) -> None:
    limits = image_limits()
    short, long = min(width, height), max(width, height)
    how = "raise the limit with {} (or radialog_rl.data.images.set_image_limits) if the image is genuine"
    if width * height > limits.max_pixels:
        raise ImageError(f"image {path} is {width} x {height} px, above the limit of {limits.max_pixels} "
                         f"pixels (decoding it would need gigabytes); " + how.format(_LIMIT_ENV["max_pixels"]))
    if long / max(short, 1) > limits.max_aspect:
        raise ImageError(f"image {path} is {width} x {height} px: aspect ratio {long / max(short, 1):.0f}:1 is above "
                         f"{limits.max_aspect:g}:1; " + how.format(_LIMIT_ENV["max_aspect"]))
    if short < limits.min_side:
        raise ImageError(f"image {path} is {width} x {height} px, below the {limits.min_side}-px minimum "
                         f"side of a radiograph; " + how.format(_LIMIT_ENV["min_side"]).replace("raise", "lower"))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    """A third-party exception's text on one line (the CLI prints errors as a single line)."""
    return " ".join(str(error).split()) or type(error).__name__


def _check_file(path: Path) -> None:
    """Raise :class:`ImageError` unless ``path`` is an existing, non-empty regular file."""
    if not path.exists():
        where = "" if path.is_absolute() else f"; relative paths are resolved against {Path.cwd()}"
        raise ImageError(f"image file not found: {path} (check the path{where})")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image file; pass one image file "
                         f"({', '.join(IMAGE_EXTENSIONS)}), or give the folder where a folder of "
                         f"images is accepted")
    if not path.is_file():
        raise ImageError(f"{path} is not a regular file; pass a PNG/JPEG or DICOM image file")
    if path.stat().st_size == 0:
        raise ImageError(f"image file {path} is empty (0 bytes); re-export or re-download it")


def _has_dicom_magic(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 ``DICM`` marker at byte 128."""
    try:
        with path.open("rb") as f:
            f.seek(_DICOM_MAGIC_OFFSET)
            return f.read(len(_DICOM_MAGIC)) == _DICOM_MAGIC
    except OSError:
        return False


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in _DICOM_SUFFIXES or _has_dicom_magic(path)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """Pixels of a Pillow image at their original bit depth.

    Returns a 2-D array (``L`` uint8, ``I;16*`` uint16, ``I`` int32, ``F`` float32) or ``HxWxC``
    uint8 (``LA`` C=2, ``RGB`` C=3, ``RGBA`` C=4). Modes whose raw values are not intensities are
    converted first: palette images through their palette, ``1`` to ``L``, other colour spaces to
    ``RGB``.
    """
    mode = image.mode
    if mode in ("P", "PA"):
        # Palette indices are not intensities; expand through the palette, keeping transparency.
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode in ("RGBa", "RGBX"):
        image = image.convert("RGBA" if mode == "RGBa" else "RGB")
    elif mode == "La":
        image = image.convert("LA")
    elif mode not in ("L", "LA", "RGB", "RGBA", "I", "F") and not mode.startswith("I;16"):
        # CMYK, YCbCr, LAB, HSV, ...: only their RGB rendering is meaningful as a picture.
        image = image.convert("RGB")
    array = np.array(image)
    if array.dtype.byteorder not in ("=", "|"):
        # I;16B and friends decode as big-endian arrays; make them native for torch and numpy.
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _read_pil(path: Path, draft_shorter_side: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if draft_shorter_side and image.format == "JPEG":
                # JPEG can decode at 1/2, 1/4 or 1/8 scale: Pillow picks the smallest scale that
                # still covers the resize target, so a 10000-px JPEG never decodes at full size.
                target = _resized_size(*image.size, draft_shorter_side)
                if image.size[0] >= 2 * target[0] and image.size[1] >= 2 * target[1]:
                    image.draft(image.mode, target)
            # Image.open is lazy: load() is where truncated or corrupt pixel data is detected.
            image.load()
            array = _pil_to_array(image)
            fmt = image.format
            mode = image.mode
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad files
        raise ImageError(
            f"cannot read {path} as an image: {_one_line(e)}. Expected a PNG/JPEG or DICOM chest "
            f"X-ray; check that the file is complete (not truncated) and really is the format its "
            f"name says"
        ) from e
    logger.debug("read %s: %s mode %s -> array %s %s", path, fmt, mode, array.shape, array.dtype)
    return array


def _import_pydicom(path: Path) -> tuple[Any, Any]:
    """Import pydicom lazily (the optional ``dicom`` extra); returns (pydicom, pydicom.pixels)."""
    try:
        import pydicom
        import pydicom.pixels
    except ImportError as e:
        raise ImageError(
            f"{path} is a DICOM file but pydicom is not installed; install it with "
            f"{_DICOM_INSTALL_HINT}"
        ) from e
    return pydicom, pydicom.pixels


def _read_dicom(path: Path) -> np.ndarray:
    pydicom, pixels = _import_pydicom(path)
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as e:
        raise ImageError(f"cannot read {path} as DICOM: {_one_line(e)}. Check that the file is a "
                         f"complete DICOM Part 10 file") from e
    if "PixelData" not in ds:
        raise ImageError(f"DICOM file {path} holds no image (no PixelData element); pass an image "
                         f"object, not a report, structured report or DICOMDIR")

    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        stored = ds.pixel_array
    except MemoryError:
        raise
    except Exception as e:  # pydicom raises RuntimeError/NotImplementedError/ValueError per plugin
        if transfer_syntax is not None and transfer_syntax.is_compressed:
            raise ImageError(
                f"cannot decode the compressed pixel data of DICOM file {path} (transfer syntax "
                f"{transfer_syntax.name}, {transfer_syntax}): {_one_line(e)}. Install a pydicom "
                f"decoder: {_DICOM_DECODER_HINT}; if one is installed, the pixel data may be "
                f"corrupt"
            ) from e
        raise ImageError(
            f"cannot decode the pixel data of DICOM file {path}: {_one_line(e)}. The file may be "
            f"truncated or its image attributes (Rows, Columns, BitsAllocated) inconsistent"
        ) from e

    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        raise ImageError(f"DICOM file {path} holds {frames} frames; a chest X-ray is a single "
                         f"frame. Export the frame you want as its own file")
    if samples > 1:
        # Colour DICOM (pydicom already converted YBR to RGB): LUTs and MONOCHROME1 do not apply.
        logger.debug("read %s: colour DICOM %s %s", path, stored.shape, stored.dtype)
        return stored

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    # Stored values -> physical values (slope/intercept) -> displayed values (window / VOI LUT):
    # this is what a reading station shows and what a PNG export of the study would contain.
    array = pixels.apply_modality_lut(stored, ds)
    array = pixels.apply_voi_lut(array, ds)
    if photometric == "MONOCHROME1":
        # MONOCHROME1: the minimum value is displayed white. Mirror within the image's own range so
        # bone is bright like every PNG/JPEG chest X-ray; (max - x) + min cannot overflow the dtype.
        array = (array.max() - array) + array.min()
    logger.debug("read %s: DICOM %s %s %s", path, photometric, array.shape, array.dtype)
    return np.asarray(array)


def read_image_array(path: PathLike, *, draft_shorter_side: int | None = None) -> np.ndarray:
    """Read an image file's pixels at their original bit depth.

    Args:
        path: a PNG/JPEG (8- or 16-bit; any Pillow-readable raster) or DICOM file.

    Returns:
        ``[H, W]`` for grayscale (uint8, uint16, int32 or float32; DICOM: the dtype after the
        modality and VOI LUTs, usually float64, MONOCHROME1 already inverted) or ``[H, W, C]``
        uint8 for ``LA`` (C=2), ``RGB`` (C=3) and ``RGBA`` (C=4).

    Args:
        draft_shorter_side: the shorter side the caller will resize to; a JPEG at least twice as
            large is decoded at a reduced scale (JPEG draft mode) that still covers it.

    Raises:
        ImageError: the file is missing, empty, a folder, not an image, truncated or undecodable,
            outside :func:`image_limits` (checked from the header, before decoding), or is DICOM
            while pydicom (or the decoder for its compressed transfer syntax) is not installed.
            The message names the file.
    """
    path = Path(path)
    image_header_size(path)
    array = _read_dicom(path) if _is_dicom(path) else _read_pil(path, draft_shorter_side)
    if array.size == 0:
        raise ImageError(f"image file {path} has no pixels (shape {array.shape})")
    return array


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def _min_max_to_uint8(array: np.ndarray) -> np.ndarray:
    """RaDialog's per-image stretch: ``floor((x - min) / (max - min) * 255)`` as uint8.

    Computed in float64 in the same order RaDialog did (subtract min, divide by max, times 255,
    truncate), so a full-range uint8 image comes back unchanged. A constant image has no range; it
    maps to zeros rather than to NaN garbage.
    """
    stretched = array.astype(np.float64)  # a copy: the caller's array is not modified
    stretched -= stretched.min()
    top = stretched.max()
    if top > 0:
        stretched /= top
        stretched *= 255.0
    # Values are in [0, 255]; astype truncates toward zero, matching RaDialog's astype(np.uint8).
    return stretched.astype(np.uint8)


def _to_gray_uint8(array: np.ndarray) -> np.ndarray:
    """Steps 1-2: min-max stretch to uint8, then grayscale. ``[H,W(,C)]`` -> ``[H,W]`` uint8."""
    if array.ndim == 3:
        channels = array.shape[2]
        if channels == 1:
            array = array[:, :, 0]
        elif channels == 2:  # gray + alpha: drop alpha
            array = array[:, :, 0]
        elif channels == 4:  # RGBA: drop alpha before the stretch (alpha would widen the range)
            array = array[:, :, :3]
        elif channels != 3:
            raise ImageError(f"expected an image array of shape [H, W] or [H, W, C] with C in "
                             f"1..4, got {array.shape} (transpose channels-first arrays to HWC)")
    elif array.ndim != 2:
        raise ImageError(f"expected an image array of shape [H, W] or [H, W, C], "
                         f"got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image has no pixels (shape {array.shape})")
    numeric = np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    if not numeric or np.iscomplexobj(array):
        raise ImageError(f"image array has non-numeric dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageError("image contains NaN or infinite values; fix the source image")

    stretched = _min_max_to_uint8(array)
    if stretched.ndim == 3:
        # Stretched jointly over R, G, B (RaDialog's order); Pillow's L = .299R + .587G + .114B.
        stretched = np.asarray(Image.fromarray(np.ascontiguousarray(stretched)).convert("L"))
    return stretched


def _resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(new_width, new_height): shorter side ``resize``, longer ``int(resize * long / short)``."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def _center_crop(gray: np.ndarray, crop: int) -> np.ndarray:
    """torchvision ``CenterCrop`` on ``[H, W]``: zero-pad up to ``crop`` if needed, then crop."""
    height, width = gray.shape
    if crop > height or crop > width:
        # Same split as torchvision: the extra odd pixel of padding goes to the bottom/right.
        pad_top = (crop - height) // 2 if crop > height else 0
        pad_bottom = (crop - height + 1) // 2 if crop > height else 0
        pad_left = (crop - width) // 2 if crop > width else 0
        pad_right = (crop - width + 1) // 2 if crop > width else 0
        gray = np.pad(gray, ((pad_top, pad_bottom), (pad_left, pad_right)), constant_values=0)
        height, width = gray.shape
    # Python's round (half to even), as torchvision uses: an offset of 1.5 gives 2, 0.5 gives 0.
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return gray[top : top + crop, left : left + crop]


def _check_sizes(resize: int, crop: int) -> None:
    for name, value in (("resize", resize), ("crop", crop)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be a positive integer number of pixels, got {value!r}")


def preprocess_chest_xray(
    image: np.ndarray | Image.Image,
    *,
    resize: int = DEFAULT_RESIZE,
    crop: int = DEFAULT_CROP,
) -> torch.Tensor:
    """RaDialog's image transform (``docs/checkpoint-format.md`` §7; steps listed in the module docstring).

    Args:
        image: ``[H, W]`` or ``[H, W, C]`` (C in 1..4, channels last) array of any numeric dtype,
            or a Pillow image of any mode.
        resize: length in pixels the shorter side is resized to (bilinear, aspect kept).
        crop: side in pixels of the square centre crop.

    Returns:
        ``[3, crop, crop]`` float32 tensor in [0, 1] (three identical channels; no mean/std
        normalisation).

    Raises:
        ImageError: the array is empty, has an unsupported shape/dtype, or holds NaN/inf.
        ConfigError: ``resize`` or ``crop`` is not a positive integer.
    """
    _check_sizes(resize, crop)
    array = _pil_to_array(image) if isinstance(image, Image.Image) else np.asarray(image)
    gray = _to_gray_uint8(array)

    height, width = gray.shape
    new_width, new_height = _resized_size(width, height, int(resize))
    pil = Image.fromarray(gray)
    if (new_width, new_height) != (width, height):
        pil = pil.resize((new_width, new_height), Image.Resampling.BILINEAR)
    cropped = _center_crop(np.asarray(pil), int(crop))

    # ToTensor: uint8 -> float32 / 255 (float32 division, like torchvision), then 1 -> 3 channels.
    tensor = torch.from_numpy(np.ascontiguousarray(cropped, dtype=np.float32)).div_(255.0)
    return tensor.unsqueeze(0).repeat(3, 1, 1)


def load_chest_xray(
    path: PathLike,
    *,
    resize: int = DEFAULT_RESIZE,
    crop: int = DEFAULT_CROP,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Read one image file and preprocess it: ``[3, crop, crop]`` in [0, 1], cast to ``dtype``.

    Raises:
        ImageError: the file cannot be read or its pixels are unusable (the message names the file).
    """
    array = read_image_array(path, draft_shorter_side=resize)
    try:
        tensor = preprocess_chest_xray(array, resize=resize, crop=crop)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from e
    return tensor.to(dtype)


def load_chest_xrays(
    paths: Iterable[PathLike],
    *,
    resize: int = DEFAULT_RESIZE,
    crop: int = DEFAULT_CROP,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Load several image files as one batch ``[N, 3, crop, crop]`` (``N = 0`` for no paths)."""
    tensors = [load_chest_xray(p, resize=resize, crop=crop, dtype=dtype) for p in paths]
    if not tensors:
        _check_sizes(resize, crop)
        return torch.empty((0, 3, crop, crop), dtype=dtype)
    return torch.stack(tensors)


# --------------------------------------------------------------------------------------------------
# Finding image files
# --------------------------------------------------------------------------------------------------


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by their path relative to ``folder``."""
    found: list[Path] = []
    for candidate in folder.rglob("*"):
        # Hidden files are skipped: macOS "._x.png" resource forks and similar are not images.
        if not candidate.is_file() or _is_hidden(candidate, folder):
            continue
        suffix = candidate.suffix.lower()
        # Extension-less files are clinical DICOM exports (IM000001, ...) when they carry the magic.
        if suffix in IMAGE_EXTENSIONS or (suffix == "" and _has_dicom_magic(candidate)):
            found.append(candidate)
    found.sort(key=lambda p: p.relative_to(folder).as_posix())
    if not found:
        raise ImageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {folder}")
    return found


def _looks_like_text(path: Path) -> bool:
    """True for a small UTF-8 text file (no NUL bytes), i.e. plausibly a list of paths."""
    with path.open("rb") as f:
        head = f.read(8192)
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte character cut at the 8 KiB boundary is still text.
        return e.start >= len(head) - 3
    return True


def _list_file_images(list_file: Path) -> list[Path]:
    """Paths listed one per line; relative entries are resolved against the list file's folder."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError(f"cannot read image list {list_file}: {_one_line(e)}") from e
    found: list[Path] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        entry = raw.strip()
        # Only whole-line comments: '#' is a legal character inside a file name.
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        if not path.exists():
            raise ImageError(f"{list_file}, line {number}: {entry!r} does not exist (looked for "
                             f"{path}); fix or remove the line")
        if not path.is_file():
            raise ImageError(f"{list_file}, line {number}: {entry!r} is not a file ({path}); list "
                             f"one image file per line")
        found.append(path)
    if not found:
        raise ImageError(f"image list {list_file} lists no images (only blank lines or "
                         f"# comments)")
    return found


def collect_image_paths(spec: PathLike) -> list[Path]:
    """Expand an image argument into image file paths.

    Args:
        spec: one of
            * an image file (``.png .jpg .jpeg .dcm``, any case, or a file with the DICOM magic);
            * a folder: every image under it, recursively, sorted by relative path; hidden files and
              folders are skipped, extension-less files are included when they are DICOM;
            * a text file (``.txt``/``.lst``/``.list``, or any other UTF-8 text file) listing one
              path per line; relative paths are resolved against the text file's folder, blank
              lines and whole-line ``#`` comments are ignored.

    Returns:
        The image paths (entries are checked to exist, not yet decoded).

    Raises:
        ImageError: ``spec`` does not exist, a folder holds no images, a list is empty, or a
            listed entry is missing (the message gives the list file and line number).
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise ImageError(f"image path not found: {path} (give an image file, a folder of images, "
                         f"or a text file listing one image path per line)")
    if path.is_dir():
        images = _folder_images(path)
        logger.debug("found %d images in %s", len(images), path)
        return images
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or _has_dicom_magic(path):
        return [path]
    if suffix in _LIST_SUFFIXES or (path.stat().st_size > 0 and _looks_like_text(path)):
        images = _list_file_images(path)
        logger.debug("read %d image paths from %s", len(images), path)
        return images
    # A binary file with an unusual extension: treat it as an image; reading it says if it is not.
    return [path]


# --------------------------------------------------------------------------------------------------
# Synthetic images (demo and tests)
# --------------------------------------------------------------------------------------------------


def _soft_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
                  edge: float) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a smooth boundary ``edge`` (normalised units) wide."""
    radius = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((radius - 1.0) / edge, -50.0, 50.0)))


def make_synthetic_chest_xray(seed: int, size: int = 512, bit_depth: int = 8) -> Image.Image:
    """A deterministic picture that looks roughly like a frontal chest X-ray.

    Dark air around a brighter body, two dark lung fields, a bright spine/mediastinum column and
    heart shadow, faint rib arcs over the lungs, and Gaussian noise. Geometry and noise vary with
    ``seed``; the same ``seed``/``size``/``bit_depth`` always gives the same pixels.

    Args:
        seed: random seed (any non-negative int).
        size: width and height in pixels.
        bit_depth: 8 (mode ``L``, uint8) or 16 (mode ``I;16``, full 0..65535 range).

    Returns:
        A ``size`` x ``size`` Pillow grayscale image.
    """
    if bit_depth not in (8, 16):
        raise ConfigError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ConfigError(f"size must be an integer of at least 8 pixels, got {size!r}")
    rng = np.random.default_rng(seed)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres in [0, 1]
    x, y = np.meshgrid(coords, coords)  # x: left -> right, y: top -> bottom
    edge = 0.02

    def jitter(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    # Body: a broad ellipse of soft tissue, brighter than the air around it.
    body = _soft_ellipse(x, y, 0.5 + jitter(0.01), 0.62, 0.46 + jitter(0.02), 0.62, edge)
    picture = 0.06 + 0.52 * body

    # Lungs: two tall ellipses either side of the midline, much darker (air-filled).
    lung_gap = 0.17 + jitter(0.015)
    lung_rx, lung_ry, lung_cy = 0.13 + jitter(0.015), 0.27 + jitter(0.02), 0.47 + jitter(0.02)
    lungs = np.maximum(
        _soft_ellipse(x, y, 0.5 - lung_gap, lung_cy, lung_rx, lung_ry, edge),
        _soft_ellipse(x, y, 0.5 + lung_gap, lung_cy, lung_rx, lung_ry, edge),
    )
    picture -= 0.34 * lungs

    # Ribs: faint bright arcs across the lung fields, sagging towards the sides.
    n_ribs = 9
    rib_top = lung_cy - lung_ry + 0.02
    rib_step = (2 * lung_ry - 0.06) / n_ribs
    thickness = 0.012 + jitter(0.003)
    for k in range(n_ribs):
        centre = rib_top + k * rib_step + 0.9 * (x - 0.5) ** 2
        ribs = np.exp(-(((y - centre) / thickness) ** 2))
        picture += 0.07 * ribs * lungs

    # Spine and mediastinum: a bright vertical column; the heart shadow bulges to the image right.
    spine = 1.0 / (1.0 + np.exp(np.clip((np.abs(x - 0.5) - 0.045) / 0.012, -50.0, 50.0)))
    picture = np.maximum(picture, 0.80 * spine * body)
    heart = _soft_ellipse(x, y, 0.56 + jitter(0.02), 0.66 + jitter(0.02), 0.14, 0.12, 2.5 * edge)
    picture = np.maximum(picture, 0.60 * heart)

    picture += rng.normal(0.0, 0.02, size=picture.shape)
    picture = np.clip(picture, 0.0, 1.0)

    if bit_depth == 8:
        return Image.fromarray(np.round(picture * 255.0).astype(np.uint8))
    return Image.fromarray(np.round(picture * 65535.0).astype(np.uint16))  # mode I;16
