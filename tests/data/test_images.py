"""Chest X-ray reading and preprocessing (radialog-format.md §7).

Expected values are computed by hand, or independently with Pillow/numpy, never with the module's
helpers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radialog_rl.data.images import (
    collect_image_paths,
    load_chest_xray,
    load_chest_xrays,
    make_synthetic_chest_xray,
    preprocess_chest_xray,
    read_image_array,
)
from radialog_rl.errors import ConfigError, ImageError


def _stretch(array: np.ndarray) -> np.ndarray:
    """Independent min-max stretch: floor((x - min) / (max - min) * 255)."""
    a = array.astype(np.float64)
    lo, hi = a.min(), a.max()
    return np.floor((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _tensor_from_gray(gray: np.ndarray) -> torch.Tensor:
    t = torch.tensor(gray.astype(np.float32) / np.float32(255.0))
    return t.unsqueeze(0).expand(3, -1, -1)


# --------------------------------------------------------------------------------------------------
# Known values through the pipeline
# --------------------------------------------------------------------------------------------------


def test_known_values_gradient_no_resampling() -> None:
    # 8 rows x 4 columns, value 100 + 20*k with k = row*4 + col: min 100, max 720.
    array = (100 + 20 * np.arange(32)).reshape(8, 4).astype(np.uint16)
    out = preprocess_chest_xray(array, resize=4, crop=2)
    # Shorter side (width 4) already equals resize -> no resampling; 8x4 stays 8x4.
    # Crop 2x2: top = round((8-2)/2) = 3, left = round((4-2)/2) = 1 -> k in {13, 14, 17, 18}.
    # floor(k * 255 / 31): 13 -> 106.93, 14 -> 115.16, 17 -> 139.83, 18 -> 148.06.
    expected = torch.tensor([[106, 115], [139, 148]], dtype=torch.float32) / 255.0
    assert out.shape == (3, 2, 2)
    assert out.dtype == torch.float32
    for channel in range(3):
        torch.testing.assert_close(out[channel], expected, rtol=0, atol=0)


def test_known_values_with_bilinear_resize() -> None:
    array = np.array([[0, 10, 20, 30], [40, 50, 60, 70], [80, 90, 100, 110],
                      [120, 130, 140, 150], [160, 170, 180, 190], [200, 210, 220, 250]],
                     dtype=np.float64)
    out = preprocess_chest_xray(array, resize=2, crop=2)
    # Width 4 is shorter -> width 2, height int(2 * 6 / 4) = 3. Crop 2x2: top = round(0.5) = 0
    # (Python rounds half to even), left = 0.
    stretched = np.floor(array / 250.0 * 255.0).astype(np.uint8)
    resized = np.asarray(Image.fromarray(stretched).resize((2, 3), Image.Resampling.BILINEAR))
    torch.testing.assert_close(out, _tensor_from_gray(resized[0:2, 0:2]), rtol=0, atol=0)


@pytest.mark.parametrize(("height", "top"), [(5, 0), (6, 1), (7, 2), (9, 2), (11, 4)])
def test_center_crop_offset_uses_python_round(height: int, top: int) -> None:
    # Row r holds value r, so the first output row tells the crop offset; width 4 = resize, so there
    # is no resampling.
    array = np.repeat(np.arange(height, dtype=np.float64)[:, None], 4, axis=1)
    out = preprocess_chest_xray(array, resize=4, crop=4)
    stretched = _stretch(array)
    assert top == int(round((height - 4) / 2.0))
    torch.testing.assert_close(out, _tensor_from_gray(stretched[top : top + 4]), rtol=0, atol=0)


def test_crop_larger_than_image_pads_with_zeros() -> None:
    # 3x3 image (resize=3 keeps it) cropped to 5: pad (5-3)//2 = 1 before, (5-3+1)//2 = 1 after.
    array = np.arange(1, 10, dtype=np.uint8).reshape(3, 3)
    out = preprocess_chest_xray(array, resize=3, crop=5)
    expected = np.zeros((5, 5), dtype=np.uint8)
    expected[1:4, 1:4] = _stretch(array)
    torch.testing.assert_close(out, _tensor_from_gray(expected), rtol=0, atol=0)
    # Odd padding: crop 4 from 3 -> 0 before, 1 after (torchvision puts the extra pixel last).
    out = preprocess_chest_xray(array, resize=3, crop=4)
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[0:3, 0:3] = _stretch(array)
    torch.testing.assert_close(out, _tensor_from_gray(expected), rtol=0, atol=0)


@pytest.mark.parametrize("orientation", ["portrait", "landscape"])
def test_non_square_center_crop(orientation: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 4096, size=(60, 40)).astype(np.uint16)
    if orientation == "landscape":
        array = array.T.copy()
    out = preprocess_chest_xray(array, resize=20, crop=16)
    stretched = _stretch(array)
    h, w = stretched.shape
    new_w, new_h = (20, int(20 * h / w)) if w <= h else (int(20 * w / h), 20)
    assert sorted((new_w, new_h)) == [20, 30]
    resized = np.asarray(
        Image.fromarray(stretched).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = int(round((new_h - 16) / 2.0)), int(round((new_w - 16) / 2.0))
    assert (top, left) == ((7, 2) if orientation == "portrait" else (2, 7))
    expected = resized[top : top + 16, left : left + 16]
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, _tensor_from_gray(expected), rtol=0, atol=0)


@pytest.mark.parametrize("value", [0, 7, 255, 40000])
def test_constant_image_gives_zeros(value: int) -> None:
    array = np.full((10, 12), value, dtype=np.uint16)
    out = preprocess_chest_xray(array, resize=8, crop=6)
    assert torch.equal(out, torch.zeros(3, 6, 6))
    rgb = np.full((10, 12, 3), 0.25, dtype=np.float32)
    assert torch.equal(preprocess_chest_xray(rgb, resize=8, crop=6), torch.zeros(3, 6, 6))


def test_default_output_shape_range_dtype_and_channels() -> None:
    image = make_synthetic_chest_xray(1)
    out = preprocess_chest_xray(image)
    assert out.shape == (3, 448, 448)
    assert out.dtype == torch.float32
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    assert out.max().item() == 1.0  # full range after the stretch (the max survives the crop)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    # Values are k / 255: no mean/std normalisation.
    scaled = out * 255
    torch.testing.assert_close(scaled, scaled.round(), rtol=0, atol=1e-4)


def test_pil_and_array_inputs_agree() -> None:
    image = make_synthetic_chest_xray(2, size=64)
    assert torch.equal(preprocess_chest_xray(image, resize=40, crop=32),
                       preprocess_chest_xray(np.asarray(image), resize=40, crop=32))


def test_bad_sizes_and_arrays() -> None:
    with pytest.raises(ConfigError, match="crop"):
        preprocess_chest_xray(np.zeros((4, 4)), resize=4, crop=0)
    with pytest.raises(ConfigError, match="resize"):
        preprocess_chest_xray(np.zeros((4, 4)), resize=-1, crop=2)
    with pytest.raises(ImageError, match="NaN"):
        preprocess_chest_xray(np.array([[0.0, np.nan], [1.0, 2.0]]), resize=2, crop=2)
    with pytest.raises(ImageError, match="shape"):
        preprocess_chest_xray(np.zeros((3, 8, 8)), resize=2, crop=2)  # channels-first is rejected
    with pytest.raises(ImageError, match="no pixels"):
        preprocess_chest_xray(np.zeros((0, 4)), resize=2, crop=2)


# --------------------------------------------------------------------------------------------------
# PNG / JPEG reading
# --------------------------------------------------------------------------------------------------


def test_16bit_png_round_trip_matches_8bit_stretched(tmp_path: Path) -> None:
    image16 = make_synthetic_chest_xray(3, size=96, bit_depth=16)
    assert image16.mode == "I;16"
    path16 = tmp_path / "xray16.png"
    image16.save(path16)
    array16 = read_image_array(path16)
    assert array16.dtype == np.uint16 and array16.shape == (96, 96)
    np.testing.assert_array_equal(array16, np.asarray(image16))

    path8 = tmp_path / "xray8.png"
    Image.fromarray(_stretch(array16)).save(path8)
    assert read_image_array(path8).dtype == np.uint8
    out16 = load_chest_xray(path16, resize=64, crop=48)
    out8 = load_chest_xray(path8, resize=64, crop=48)
    assert torch.equal(out16, out8)


def test_gray_content_in_l_rgb_rgba_la_p_i_modes_is_equivalent(tmp_path: Path) -> None:
    gray = np.asarray(make_synthetic_chest_xray(4, size=50))[:, 5:45]  # 50 x 40, not square
    gray = (gray // 2 + 30).astype(np.uint8)  # not already full range: the stretch matters
    rng = np.random.default_rng(1)
    alpha = rng.integers(0, 256, size=gray.shape, dtype=np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    palette_image = Image.fromarray(gray).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    files = {
        "l.png": Image.fromarray(gray),
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, alpha])),
        "la.png": Image.fromarray(np.dstack([gray, alpha])),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    assert read_image_array(tmp_path / "rgba.png").shape == (50, 40, 4)
    assert read_image_array(tmp_path / "la.png").shape == (50, 40, 2)
    reference = load_chest_xray(tmp_path / "l.png", resize=32, crop=24)
    for name in files:
        assert torch.equal(load_chest_xray(tmp_path / name, resize=32, crop=24), reference), name
    # Mode I (int32) and a gray palette image (expanded through the palette, not read as indices).
    as_int = Image.fromarray(gray.astype(np.int32) * 100 - 7)
    assert as_int.mode == "I"
    assert torch.equal(preprocess_chest_xray(as_int, resize=32, crop=24), reference)
    palette_rgb = np.asarray(palette_image.convert("L"))
    assert torch.equal(preprocess_chest_xray(palette_image, resize=32, crop=24),
                       preprocess_chest_xray(palette_rgb, resize=32, crop=24))


def test_rgb_uses_pil_luma_after_joint_stretch() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # pure-ish red on black
    rgb[0, 0] = 0
    out = preprocess_chest_xray(rgb, resize=4, crop=4)
    # Joint stretch: min 0, max 200 -> red 255; PIL's L of (255, 0, 0) is 76 (0.299 * 255 = 76.2).
    assert out[0, 0, 0].item() == 0.0
    assert out[0, 1, 1].item() == pytest.approx(76 / 255)


def test_jpeg_is_read(tmp_path: Path) -> None:
    path = tmp_path / "x.JPG"
    make_synthetic_chest_xray(5, size=64).save(path, quality=95)
    array = read_image_array(path)
    assert array.shape == (64, 64) and array.dtype == np.uint8
    assert load_chest_xray(path, resize=40, crop=32, dtype=torch.bfloat16).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------


def _write_dicom(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2",
                 transfer_syntax: str | None = None, pixel_bytes: bytes | None = None,
                 **elements: object) -> None:
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, UID, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    if pixel_bytes is None:
        ds.PixelData = stored.astype("<u2").tobytes()
    else:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([pixel_bytes])
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def stored() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 4096, size=(30, 20)).astype(np.uint16)


def test_dicom_monochrome2_applies_rescale(tmp_path: Path, stored: np.ndarray) -> None:
    path = tmp_path / "m2.dcm"
    _write_dicom(path, stored, RescaleSlope=2, RescaleIntercept=-1000)
    array = read_image_array(path)
    np.testing.assert_array_equal(array, stored.astype(np.float64) * 2 - 1000)
    out = load_chest_xray(path, resize=20, crop=16)
    assert torch.equal(out, preprocess_chest_xray(stored, resize=20, crop=16))


def test_dicom_monochrome1_is_inverted(tmp_path: Path, stored: np.ndarray) -> None:
    path1 = tmp_path / "m1.dcm"
    _write_dicom(path1, stored, photometric="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1000)
    modality = stored.astype(np.float64) * 2 - 1000
    array = read_image_array(path1)
    np.testing.assert_array_equal(array, modality.max() + modality.min() - modality)
    # The brightest stored pixel (least attenuation in MONOCHROME1 terms) becomes the darkest.
    brightest = np.unravel_index(np.argmax(stored), stored.shape)
    assert array[brightest] == array.min()
    # Same picture as a MONOCHROME2 file whose stored values are mirrored.
    path2 = tmp_path / "m2.dcm"
    mirrored = (int(stored.max()) + int(stored.min()) - stored.astype(np.int64)).astype(np.uint16)
    _write_dicom(path2, mirrored, RescaleSlope=2, RescaleIntercept=-1000)
    assert torch.equal(load_chest_xray(path1, resize=20, crop=16),
                       load_chest_xray(path2, resize=20, crop=16))


def test_dicom_window_is_applied(tmp_path: Path, stored: np.ndarray) -> None:
    path = tmp_path / "window.dcm"
    _write_dicom(path, stored, WindowCenter=2048, WindowWidth=1024)
    array = read_image_array(path)
    # Linear window [1536, 2560): below -> output minimum, above -> maximum, monotonic between.
    assert np.all(array[stored < 1500] == array.min())
    assert np.all(array[stored > 2600] == array.max())
    inside = (stored > 1600) & (stored < 2500)
    order = np.argsort(stored[inside], kind="stable")
    assert np.all(np.diff(array[inside][order]) >= 0)


def test_dicom_by_magic_without_suffix(tmp_path: Path, stored: np.ndarray) -> None:
    path = tmp_path / "IM000001"
    _write_dicom(path, stored)
    np.testing.assert_array_equal(read_image_array(path), stored)


def test_compressed_dicom_without_decoder_names_the_extras(tmp_path: Path,
                                                           stored: np.ndarray) -> None:
    path = tmp_path / "jpeg.dcm"
    # JPEG Baseline with garbage fragments: no installed decoder can make pixels of it.
    _write_dicom(path, stored, transfer_syntax="1.2.840.10008.1.2.4.50",
                 pixel_bytes=b"not a jpeg" * 8, BitsStored=8, HighBit=7, BitsAllocated=8)
    with pytest.raises(ImageError) as info:
        read_image_array(path)
    message = str(info.value)
    assert str(path) in message
    assert "pylibjpeg" in message and "gdcm" in message
    assert "\n" not in message  # the CLI prints errors as one line


def test_dicom_without_pydicom_says_how_to_install(tmp_path: Path, stored: np.ndarray,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m2.dcm"
    _write_dicom(path, stored)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    with pytest.raises(ImageError, match=r"radialog-rl\[dicom\]") as info:
        read_image_array(path)
    assert str(path) in str(info.value)


def test_not_a_dicom_with_dcm_suffix(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"hello, this is not DICOM at all" * 10)
    with pytest.raises(ImageError, match="fake.dcm"):
        read_image_array(path)


# --------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------


def _truncated_png(tmp_path: Path) -> Path:
    path = tmp_path / "full.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(64, 64), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    return truncated


@pytest.mark.parametrize("kind", ["missing", "empty", "folder", "text_as_png", "truncated"])
def test_bad_files_raise_image_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    if kind == "missing":
        path = tmp_path / "nope.png"
    elif kind == "empty":
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
    elif kind == "folder":
        path = tmp_path / "folder.png"
        path.mkdir()
    elif kind == "text_as_png":
        path = tmp_path / "notes.png"
        path.write_text("findings: none\n")
    else:
        path = _truncated_png(tmp_path)
    with pytest.raises(ImageError) as info:
        read_image_array(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError):
        load_chest_xray(path)


# --------------------------------------------------------------------------------------------------
# Batches and paths
# --------------------------------------------------------------------------------------------------


def test_load_chest_xrays_stacks(tmp_path: Path) -> None:
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"{seed}.png")
        make_synthetic_chest_xray(seed, size=64).save(paths[-1])
    batch = load_chest_xrays(paths, resize=48, crop=32)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch[1], load_chest_xray(paths[1], resize=48, crop=32))
    assert load_chest_xrays([], resize=48, crop=32).shape == (0, 3, 32, 32)


def test_collect_image_paths_folder(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ["b.PNG", "a.jpg", "c.JpEg", "sub/d.dcm", "notes.txt", ".hidden.png", "e.tif"]:
        (folder / name).write_bytes(b"x")
    found = collect_image_paths(folder)
    relative = [p.relative_to(folder).as_posix() for p in found]
    assert relative == ["a.jpg", "b.PNG", "c.JpEg", "sub/d.dcm"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="no images"):
        collect_image_paths(empty)


def test_collect_image_paths_single_file_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"x")
    assert collect_image_paths(path) == [path]
    assert collect_image_paths(str(path)) == [path]
    with pytest.raises(ImageError, match="not found"):
        collect_image_paths(tmp_path / "missing.png")


def test_collect_image_paths_list_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for name in ["data/one.png", "two.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    absolute = tmp_path / "abs.dcm"
    absolute.write_bytes(b"x")
    lists = tmp_path / "lists"
    lists.mkdir()
    list_file = lists / "images.txt"
    list_file.write_text(f"# test images\n\n../data/one.png\n  ../two.jpg  \n{absolute}\n")
    expected = [lists / "../data/one.png", lists / "../two.jpg", absolute]
    assert collect_image_paths(list_file) == expected


def test_collect_image_paths_list_file_bad_line(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(b"x")
    list_file = tmp_path / "images.txt"
    list_file.write_text("ok.png\n# comment\n\nmissing.png\n")
    with pytest.raises(ImageError, match=r"line 4.*missing\.png") as info:
        collect_image_paths(list_file)
    assert str(list_file) in str(info.value)
    only_comments = tmp_path / "empty.txt"
    only_comments.write_text("# nothing\n\n")
    with pytest.raises(ImageError, match="lists no images"):
        collect_image_paths(only_comments)


# --------------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------------


def test_synthetic_image_is_deterministic_and_chest_like() -> None:
    a = make_synthetic_chest_xray(11)
    b = make_synthetic_chest_xray(11)
    c = make_synthetic_chest_xray(12)
    assert a.mode == "L" and a.size == (512, 512)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    pixels = np.asarray(a).astype(np.float64)
    spine = pixels[100:250, 250:262].mean()
    left_lung = pixels[150:250, 150:190].mean()
    right_lung = pixels[150:250, 322:362].mean()
    air = pixels[0:20, 0:20].mean()
    assert spine > left_lung + 60 and spine > right_lung + 60
    assert air < left_lung  # air outside the body is darkest

    wide = make_synthetic_chest_xray(11, size=64, bit_depth=16)
    assert wide.mode == "I;16" and wide.size == (64, 64)
    assert np.asarray(wide).max() > 255
    assert make_synthetic_chest_xray(11, size=64, bit_depth=16).tobytes() == wide.tobytes()
    with pytest.raises(ConfigError):
        make_synthetic_chest_xray(0, bit_depth=12)


def test_synthetic_8_and_16_bit_agree_after_preprocessing() -> None:
    out8 = preprocess_chest_xray(make_synthetic_chest_xray(6, size=96), resize=64, crop=48)
    image16 = make_synthetic_chest_xray(6, size=96, bit_depth=16)
    out16 = preprocess_chest_xray(image16, resize=64, crop=48)
    # Same picture at two bit depths: after the 8-bit stretch they differ by at most a rounding step
    # (plus what bilinear resampling carries of it).
    assert (out8 - out16).abs().max().item() <= 2 / 255 + 1e-6
    assert math.isclose(out8.mean().item(), out16.mean().item(), abs_tol=1e-2)
