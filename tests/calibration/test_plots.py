"""Reliability diagram and confidence histogram PNGs."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from radialog_rl.calibration.plots import confidence_histogram, reliability_diagram
from radialog_rl.errors import RadialogError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CONF = [2, 2, 8, 8, 8, None, 5, 10, 0]
ACC = [0.1, 0.3, 1.0, 0.7, 0.4, 1.0, None, 1.0, 0.0]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    # The first chunk is IHDR: length (4 bytes), type, then width and height as big-endian uint32.
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_reliability_diagram_png_size(tmp_path):
    pytest.importorskip("matplotlib")
    path = reliability_diagram(CONF, ACC, tmp_path / "sub" / "rel.png", figsize=(4, 3), dpi=50)
    assert path.is_file()
    assert _png_size(path) == (200, 150)  # figsize * dpi


def test_reliability_diagram_granular_and_empty(tmp_path):
    pytest.importorskip("matplotlib")
    path = reliability_diagram([72, 68, 5, 99], [1, 0, 0.2, 0.9], tmp_path / "g.png", scale=100,
                               figsize=(5, 5), dpi=40)
    assert _png_size(path) == (200, 200)
    # nothing valid still renders (an empty diagram, ECE n/a)
    path = reliability_diagram([None], [None], tmp_path / "e.png", figsize=(3, 3), dpi=30)
    assert _png_size(path) == (90, 90)


def test_confidence_histogram_png_size(tmp_path):
    pytest.importorskip("matplotlib")
    path = confidence_histogram(CONF, tmp_path / "hist.png", figsize=(6, 2), dpi=40)
    assert _png_size(path) == (240, 80)


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(RadialogError, match=r"pip install 'radialog-rl\[plots\]'"):
        reliability_diagram(CONF, ACC, tmp_path / "x.png")
    with pytest.raises(RadialogError, match="radialog-rl"):
        confidence_histogram(CONF, tmp_path / "y.png")
