"""The PNG writer and the line plots, checked by decoding the files here (no Pillow): the
signature, every chunk's CRC, the header, the zlib stream, and the pixels drawn."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from shared.plotting import (
    PALETTE,
    Reference,
    Series,
    encode_png,
    line_plot,
    pr_plot,
    roc_plot,
    text_width,
    write_png,
)

Pixels = npt.NDArray[np.uint8]


def decode_png(data: bytes) -> tuple[dict[str, int], Pixels]:
    """A minimal decoder for what encode_png writes: 8-bit RGB, no interlace, filter 0 rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "PNG signature"
    chunks: list[tuple[bytes, bytes]] = []
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), f"CRC of {kind!r}"
        chunks.append((kind, body))
        at += 12 + length
    assert at == len(data), "nothing after the last chunk"
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    width, height, depth, color, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    header = {"width": width, "height": height, "depth": depth, "color": color}
    assert (compression, filtering, interlace) == (0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + width * 3)
    assert (rows[:, 0] == 0).all(), "every scanline uses filter type 0"
    return header, rows[:, 1:].reshape(height, width, 3).copy()


def count(image: Pixels, color: tuple[int, int, int]) -> int:
    return int((image == np.array(color, dtype=np.uint8)).all(axis=2).sum())


def test_an_image_round_trips_through_the_png_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    write_png(tmp_path / "x.png", image)
    header, pixels = decode_png((tmp_path / "x.png").read_bytes())
    assert header == {"width": 11, "height": 7, "depth": 8, "color": 2}
    np.testing.assert_array_equal(pixels, image)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4), dtype=np.uint8),
        np.zeros((4, 4, 4), dtype=np.uint8),
        np.zeros((4, 4, 3), dtype=np.float64),
        np.zeros((0, 4, 3), dtype=np.uint8),
    ],
)
def test_anything_but_an_rgb_byte_image_is_refused(bad: Pixels) -> None:
    with pytest.raises(ValueError):
        encode_png(bad)


def test_a_roc_plot_draws_each_curve_in_its_colour_with_a_diagonal_and_a_legend() -> None:
    x = np.linspace(0.0, 1.0, 500)
    curves = [Series("live", x, np.sqrt(x)), Series("offline", x, x**0.7)]
    header, image = decode_png(encode_png(roc_plot(curves)))
    assert (header["width"], header["height"]) == image.shape[1::-1]
    live, offline = PALETTE[0], PALETTE[1]
    # Curves several hundred pixels long, 2 pixels wide, plus a legend swatch each.
    assert count(image, live) > 600
    assert count(image, offline) > 600
    assert count(image, (150, 150, 150)) > 100  # the dashed diagonal and its swatch
    assert count(image, (0, 0, 0)) > 1000  # axes, ticks and text
    # sqrt(x) is above the diagonal: the live curve's pixels are up and to the left.
    ys, xs = np.nonzero((image == np.array(live, dtype=np.uint8)).all(axis=2))
    in_plot = xs < image.shape[1] - 280  # the legend is to the right of the plot area
    assert np.median(ys[in_plot]) < np.median(xs[in_plot])


def test_a_custom_colour_and_markers_are_drawn_where_the_data_says() -> None:
    colour = (1, 2, 3)
    image = line_plot(
        [Series("point", [0.5], [0.5], color=colour, markers=True)],
        width=400,
        height=300,
        legend_width=100,
    )
    ys, xs = np.nonzero((image == np.array(colour, dtype=np.uint8)).all(axis=2))
    # A 7x7 marker in the middle of the plot area (64..284 by 14..252) and a 7x7 swatch.
    assert len(xs) == 2 * 49
    marker = xs < 284
    assert abs(xs[marker].mean() - (64 + 284) / 2) <= 1
    assert abs(ys[marker].mean() - (14 + 252) / 2) <= 1


def test_a_precision_recall_plot_draws_the_fraud_rate_as_the_chance_line() -> None:
    base = pr_plot([Series("s", [0.0, 1.0], [1.0, 0.0])])
    with_rate = pr_plot([Series("s", [0.0, 1.0], [1.0, 0.0])], base_rate=0.25)
    grey = (150, 150, 150)
    assert count(with_rate, grey) > count(base, grey) + 100


def test_text_is_drawn_in_the_built_in_font() -> None:
    # A blank title still makes room for one, so only the text differs.
    blank = line_plot([], title=" ", width=400, height=300, legend_width=100)
    titled = line_plot([], title="ROC 0.87", width=400, height=300, legend_width=100)
    # The title is at scale 2 across the top: black pixels appear only there.
    diff = (titled != blank).any(axis=2)
    ys, xs = np.nonzero(diff)
    assert ys.size > 50
    assert ys.max() < 30
    assert xs.max() - xs.min() + 1 == text_width("ROC 0.87", scale=2)
    assert text_width("") == 0


def test_many_points_and_odd_values_are_drawn_without_fuss() -> None:
    x = np.linspace(0.0, 1.0, 1_000_000)
    y = x.copy()
    y[::1000] = np.nan  # dropped
    image = line_plot([Series("big", x, y), Series("outside", [-1.0, 2.0], [0.5, 0.5])])
    assert count(image, PALETTE[0]) > 500
    assert count(image, PALETTE[1]) > 500  # clipped to the axes, not dropped


def test_bad_series_and_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="points"):
        Series("s", [0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="range"):
        line_plot([], x_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="ticks"):
        line_plot([], ticks=0)
    with pytest.raises(ValueError, match="room"):
        line_plot([], width=200, height=100)
    assert Reference((0.0, 0.0), (1.0, 1.0)).label == ""
