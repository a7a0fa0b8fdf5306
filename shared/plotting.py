"""Line plots as PNG files with numpy, zlib and struct only (no matplotlib, no Pillow).

Just enough for `fraudstream evaluate`: ROC and precision-recall curves on [0, 1] axes, with
tick marks, faint grid lines, straight reference lines (the ROC diagonal, the PR base rate),
several series in distinct colours (lines, or squares for single operating points), a legend of
coloured swatches to the right of the plot area, and text in a built-in 5x7 bitmap font
(upper-case letters, digits and a little punctuation; lower case is drawn upper case).

Images are numpy arrays of shape (height, width, 3), dtype uint8, RGB. `encode_png` writes them
as 8-bit truecolour PNG with one IDAT chunk and filter type 0 on every row: the simplest file
every viewer reads, and small for plots, which are mostly white.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "PALETTE",
    "Color",
    "Image",
    "Reference",
    "Series",
    "encode_png",
    "line_plot",
    "pr_plot",
    "roc_plot",
    "text_width",
    "write_png",
]

Color = tuple[int, int, int]
Image = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float64]

# Tableau's ten colours: distinct from each other and readable on white.
PALETTE: Final[tuple[Color, ...]] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (127, 127, 127),
)
WHITE: Final[Color] = (255, 255, 255)
BLACK: Final[Color] = (0, 0, 0)
GRID: Final[Color] = (228, 228, 228)
REFERENCE: Final[Color] = (150, 150, 150)

# 5x7 glyphs: seven rows of five bits (bit 4 is the leftmost column), as 14 hex digits.
_GLYPHS: Final[dict[str, str]] = {
    "0": "0e11131519110e", "1": "040c040404040e", "2": "0e11010204081f", "3": "1f02040201110e",
    "4": "02060a121f0202", "5": "1f101e0101110e", "6": "0608101e11110e", "7": "1f010204080808",
    "8": "0e11110e11110e", "9": "0e11110f01020c", "A": "0e1111111f1111", "B": "1e11111e11111e",
    "C": "0e11101010110e", "D": "1c12111111121c", "E": "1f10101e10101f", "F": "1f10101e101010",
    "G": "0e11101711110f", "H": "1111111f111111", "I": "0e04040404040e", "J": "0702020202120c",
    "K": "11121418141211", "L": "1010101010101f", "M": "111b1515111111", "N": "11111915131111",
    "O": "0e11111111110e", "P": "1e11111e101010", "Q": "0e11111115120d", "R": "1e11111e141211",
    "S": "0f10100e01011e", "T": "1f040404040404", "U": "1111111111110e", "V": "11111111110a04",
    "W": "1111111515150a", "X": "11110a040a1111", "Y": "1111110a040404", "Z": "1f01020408101f",
    " ": "00000000000000", ".": "00000000000c0c", ",": "000000000c0408", "-": "0000001f000000",
    ":": "000c0c000c0c00", "(": "02040808080402", ")": "08040202020408", "/": "00010204081000",
    "@": "0e11010d15150e", "%": "18190204081303", "_": "0000000000001f", "=": "00001f001f0000",
    "+": "0004041f040400", "#": "0a0a1f0a1f0a0a", "?": "0e110102040004", "'": "04040800000000",
}  # fmt: skip
_GLYPH_W: Final = 5
_GLYPH_H: Final = 7
_ADVANCE: Final = _GLYPH_W + 1  # one column of space between characters


def _glyph_bits(code: str) -> npt.NDArray[np.bool_]:
    rows = [int(code[i : i + 2], 16) for i in range(0, 14, 2)]
    return np.array([[(r >> (4 - c)) & 1 for c in range(_GLYPH_W)] for r in rows], dtype=np.bool_)


_FONT: Final[dict[str, npt.NDArray[np.bool_]]] = {ch: _glyph_bits(g) for ch, g in _GLYPHS.items()}


def text_width(text: str, scale: int = 1) -> int:
    """Pixels `text` takes horizontally (no trailing gap)."""
    return max(0, len(text) * _ADVANCE - 1) * scale


def _text_mask(text: str, scale: int) -> npt.NDArray[np.bool_]:
    mask = np.zeros((_GLYPH_H, max(1, len(text) * _ADVANCE)), dtype=np.bool_)
    for i, ch in enumerate(text.upper()):
        glyph = _FONT.get(ch, _FONT["?"])
        mask[:, i * _ADVANCE : i * _ADVANCE + _GLYPH_W] = glyph
    return np.kron(mask, np.ones((scale, scale), dtype=np.bool_)).astype(np.bool_)


def _paint(image: Image, mask: npt.NDArray[np.bool_], left: int, top: int, color: Color) -> None:
    """Set the pixels of `mask` placed at (left, top), clipped to the image."""
    h, w = image.shape[:2]
    mh, mw = mask.shape
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + mw, w), min(top + mh, h)
    if x0 >= x1 or y0 >= y1:
        return
    sub = mask[y0 - top : y1 - top, x0 - left : x1 - left]
    image[y0:y1, x0:x1][sub] = color


def _draw_text(
    image: Image,
    text: str,
    left: int,
    top: int,
    color: Color = BLACK,
    scale: int = 1,
    vertical: bool = False,
) -> None:
    mask = _text_mask(text, scale)
    if vertical:  # reads bottom to top, like a y-axis label
        mask = np.rot90(mask)
    _paint(image, mask, left, top, color)


def _fill(image: Image, left: int, top: int, width: int, height: int, color: Color) -> None:
    _paint(image, np.ones((height, width), dtype=np.bool_), left, top, color)


def _polyline(
    image: Image,
    points: FloatArray,
    color: Color,
    thickness: int = 2,
    dashed: bool = False,
) -> None:
    """Draw straight segments through `points` (pixel coordinates, shape (n, 2) of x, y).

    Every segment is sampled at least once per pixel along its longer side, all segments at
    once, so a curve of a million points costs one vectorised pass, not a Python loop."""
    pts = points[np.isfinite(points).all(axis=1)]
    if pts.size == 0:
        return
    # Consecutive points on the same pixel add nothing: drop them first.
    pixel = np.rint(pts)
    keep = np.r_[True, np.any(np.diff(pixel, axis=0) != 0, axis=1)]
    pts = pts[keep]
    if len(pts) > 1:
        delta = np.diff(pts, axis=0)
        steps = np.maximum(np.ceil(np.abs(delta).max(axis=1)), 1).astype(np.int64)
        segment = np.repeat(np.arange(len(delta)), steps)
        offset = np.arange(int(steps.sum())) - np.repeat(np.cumsum(steps) - steps, steps)
        t = (offset / steps[segment])[:, None]
        samples = np.vstack([pts[segment] + delta[segment] * t, pts[-1:]])
    else:
        samples = pts
    if dashed:  # samples are about one pixel apart: 6 on, 4 off
        samples = samples[(np.arange(len(samples)) % 10) < 6]
    xy = np.rint(samples).astype(np.int64)
    h, w = image.shape[:2]
    for dx in range(thickness):
        for dy in range(thickness):
            x, y = xy[:, 0] + dx - thickness // 2, xy[:, 1] + dy - thickness // 2
            inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            image[y[inside], x[inside]] = color


@dataclass(frozen=True, eq=False)
class Series:
    """One curve. `markers=True` draws each point as a small square instead of joining them
    (a detector with a single operating point, like a rule)."""

    label: str
    x: npt.ArrayLike
    y: npt.ArrayLike
    color: Color | None = None
    markers: bool = False
    xs: FloatArray = field(init=False, repr=False)
    ys: FloatArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        xs = np.asarray(self.x, dtype=np.float64).ravel()
        ys = np.asarray(self.y, dtype=np.float64).ravel()
        if xs.shape != ys.shape:
            raise ValueError(f"series {self.label!r}: x has {xs.size} points but y has {ys.size}")
        object.__setattr__(self, "xs", xs)
        object.__setattr__(self, "ys", ys)


@dataclass(frozen=True)
class Reference:
    """A dashed grey guide line between two points in data coordinates."""

    start: tuple[float, float]
    end: tuple[float, float]
    label: str = ""


def _tick_label(value: float) -> str:
    return f"{round(value, 6):g}"


def line_plot(
    series: Sequence[Series],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    references: Sequence[Reference] = (),
    x_range: tuple[float, float] = (0.0, 1.0),
    y_range: tuple[float, float] = (0.0, 1.0),
    ticks: int = 5,
    width: int = 820,
    height: int = 540,
    legend_width: int = 260,
) -> Image:
    """Render the series onto a new image; colours come from `PALETTE` in order unless set.

    The legend lists the series, then the labelled references, to the right of the plot area;
    labels too long for it are cut with a trailing '.'."""
    if ticks < 1:
        raise ValueError(f"ticks must be at least 1, got {ticks}")
    (xmin, xmax), (ymin, ymax) = x_range, y_range
    if not (xmax > xmin and ymax > ymin):
        raise ValueError(f"empty axis range x={x_range} y={y_range}")
    image = np.full((height, width, 3), WHITE, dtype=np.uint8)
    left, top = 64, 34 if title else 14
    right, bottom = width - legend_width - 16, height - 48
    if right - left < 50 or bottom - top < 50:
        raise ValueError(f"{width}x{height} leaves no room for the plot area")

    def to_pixels(x: FloatArray, y: FloatArray) -> FloatArray:
        px = left + (np.clip(x, xmin, xmax) - xmin) / (xmax - xmin) * (right - left)
        py = bottom - (np.clip(y, ymin, ymax) - ymin) / (ymax - ymin) * (bottom - top)
        return np.column_stack([px, py])

    # Grid and ticks first, so that curves are drawn over them.
    for i in range(ticks + 1):
        fx = left + round(i * (right - left) / ticks)
        fy = bottom - round(i * (bottom - top) / ticks)
        _fill(image, fx, top, 1, bottom - top, GRID)
        _fill(image, left, fy, right - left, 1, GRID)
        _fill(image, fx, bottom, 1, 5, BLACK)
        _fill(image, left - 5, fy, 5, 1, BLACK)
        x_text = _tick_label(xmin + i * (xmax - xmin) / ticks)
        y_text = _tick_label(ymin + i * (ymax - ymin) / ticks)
        _draw_text(image, x_text, fx - text_width(x_text) // 2, bottom + 9)
        _draw_text(image, y_text, left - 9 - text_width(y_text), fy - _GLYPH_H // 2)
    _fill(image, left, top, 1, bottom - top + 1, BLACK)  # the axes
    _fill(image, left, bottom, right - left + 1, 1, BLACK)

    for ref in references:
        xs = np.array([ref.start[0], ref.end[0]], dtype=np.float64)
        ys = np.array([ref.start[1], ref.end[1]], dtype=np.float64)
        _polyline(image, to_pixels(xs, ys), REFERENCE, thickness=1, dashed=True)

    colors = [s.color or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    for s, color in zip(series, colors, strict=True):
        points = to_pixels(s.xs, s.ys)
        if s.markers:
            for px, py in np.rint(points[np.isfinite(points).all(axis=1)]).astype(int).tolist():
                _fill(image, px - 3, py - 3, 7, 7, color)
        else:
            _polyline(image, points, color)

    if title:
        _draw_text(image, title, left + (right - left - text_width(title, 2)) // 2, 8, scale=2)
    if x_label:
        _draw_text(image, x_label, left + (right - left - text_width(x_label)) // 2, bottom + 26)
    if y_label:
        y_mid = top + (bottom - top + text_width(y_label)) // 2
        _draw_text(image, y_label, 14, y_mid - text_width(y_label), vertical=True)

    entries: list[tuple[str, Color, bool]] = [
        (s.label, c, s.markers) for s, c in zip(series, colors, strict=True)
    ]
    entries += [(r.label, REFERENCE, False) for r in references if r.label]
    legend_left = right + 20
    max_chars = max(1, (width - legend_left - 22) // _ADVANCE)
    for i, (label, color, markers) in enumerate(entries):
        y = top + 4 + i * 18
        if markers:
            _fill(image, legend_left + 2, y + 1, 7, 7, color)
        else:
            _fill(image, legend_left, y + 2, 12, 4, color)
        text = label if len(label) <= max_chars else label[: max_chars - 1] + "."
        _draw_text(image, text, legend_left + 18, y)
    return image


def roc_plot(series: Sequence[Series], title: str = "ROC curve") -> Image:
    """ROC curves (x: false positive rate, y: true positive rate) with the chance diagonal."""
    return line_plot(
        series,
        title=title,
        x_label="False positive rate",
        y_label="True positive rate",
        references=[Reference((0.0, 0.0), (1.0, 1.0), "chance")],
    )


def pr_plot(
    series: Sequence[Series], base_rate: float | None = None, title: str = "Precision-recall"
) -> Image:
    """Precision (y) against recall (x); `base_rate`, the fraud share, is what chance gets."""
    references = []
    if base_rate is not None and np.isfinite(base_rate):
        references.append(Reference((0.0, base_rate), (1.0, base_rate), "chance (fraud rate)"))
    return line_plot(
        series, title=title, x_label="Recall", y_label="Precision", references=references
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    # The CRC covers the chunk type and data, not the length.
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: npt.ArrayLike) -> bytes:
    """An (h, w, 3) uint8 RGB array as PNG bytes (8-bit truecolour, filter 0, one IDAT)."""
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 array, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    if height < 1 or width < 1:
        raise ValueError("an image needs at least one pixel")
    # Each scanline is preceded by its filter type byte: 0 (None).
    raw = np.zeros((height, width * 3 + 1), dtype=np.uint8)
    raw[:, 1:] = pixels.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)),
            _chunk(b"IEND", b""),
        ]
    )


def write_png(path: str | os.PathLike[str], image: npt.ArrayLike) -> None:
    Path(path).write_bytes(encode_png(image))
