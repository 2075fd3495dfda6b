"""The viewer's pixel math: DICOM's linear window function, windows read from files or the pixel
range, and zoom by cropping with whole-pixel blocks."""

from __future__ import annotations

import numpy as np
import pytest

from app.dashboard.viewer import (
    ViewerError,
    Window,
    apply_window,
    range_window,
    read_image,
    zoom_crop,
)
from tests.app.dashboard.orthanc import dicom_bytes


def test_window_maps_its_edges_to_black_and_white() -> None:
    window = Window(center=1000.0, width=400.0)
    values = np.array([0.0, 799.5, 800.0, 999.5, 1199.5, 1200.0, 4000.0])
    grey = apply_window(values, window=window)
    # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped
    expected = np.clip(np.round(((values - 999.5) / 399.0 + 0.5) * 255), 0, 255)
    assert grey.dtype == np.uint8
    assert grey.tolist() == expected.astype(np.uint8).tolist()
    assert grey[0] == 0 and grey[-1] == 255 and 126 <= grey[3] <= 129


def test_window_is_monotone_and_inverts() -> None:
    values = np.linspace(-2000, 2000, 101)
    grey = apply_window(values, window=Window(center=40.0, width=80.0))
    assert np.all(np.diff(grey.astype(int)) >= 0)
    inverted = apply_window(values, window=Window(center=40.0, width=80.0), invert=True)
    assert (inverted.astype(int) + grey == 255).all()


def test_width_one_is_a_threshold() -> None:
    values = np.array([9.0, 9.5, 9.6, 11.0])  # the step is at c - 0.5
    grey = apply_window(values, window=Window(center=10.0, width=1.0))
    assert grey.tolist() == [0, 0, 255, 255]


def test_a_window_needs_a_width_of_at_least_one() -> None:
    with pytest.raises(ValueError, match="width"):
        Window(center=0.0, width=0.5)


def test_range_window_spans_the_pixels() -> None:
    pixels = np.array([[-1024.0, 0.0], [500.0, 3071.0]])
    grey = apply_window(pixels, window=range_window(pixels))
    assert grey.min() == 0 and grey.max() == 255


def test_zoom_one_is_the_image() -> None:
    image = np.arange(12).reshape(3, 4)
    assert zoom_crop(image, zoom=1) is image


def test_zoom_repeats_pixels_of_the_centre() -> None:
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    view = zoom_crop(image, zoom=2)
    assert view.shape == (8, 8)
    assert (view[::2, ::2] == image[2:6, 2:6]).all()  # the middle quarter...
    assert (view[1::2, 1::2] == image[2:6, 2:6]).all()  # ...each pixel a 2x2 block


def test_zoom_stays_inside_the_image() -> None:
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    corner = zoom_crop(image, zoom=4, center=(1.0, 0.0))
    assert corner.shape == (8, 8)
    assert (corner[::4, ::4] == image[6:8, 0:2]).all()  # bottom-left, not padded


def test_zoom_keeps_colour_channels() -> None:
    image = np.zeros((6, 4, 3), dtype=np.uint8)
    assert zoom_crop(image, zoom=2).shape == (6, 4, 3)


@pytest.mark.parametrize(("zoom", "center"), [(0, (0.5, 0.5)), (1.5, (0.5, 0.5)), (2, (1.2, 0.5))])
def test_bad_zoom_is_refused(zoom, center) -> None:
    with pytest.raises(ValueError):
        zoom_crop(np.zeros((4, 4)), zoom=zoom, center=center)


def test_a_file_window_is_the_default() -> None:
    pixels = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32)
    image = read_image(dicom_bytes(pixels, study="1.2.3", series="1.2.3.4", window=(300, 200)))
    assert image.window == Window(center=300.0, width=200.0)
    assert image.pixels.shape == (24, 32) and image.value_range == (0.0, 767.0)
    assert not image.invert


def test_without_a_file_window_the_pixel_range_is_the_default() -> None:
    pixels = np.full((8, 8), 7, dtype=np.uint8)
    pixels[0, 0], pixels[-1, -1] = 3, 250
    image = read_image(dicom_bytes(pixels, study="1.2.3", series="1.2.3.4"))
    assert image.window == range_window(image.pixels)
    grey = apply_window(image.pixels, window=image.window)
    assert grey[0, 0] == 0 and grey[-1, -1] == 255


def test_only_dicom_images_are_shown() -> None:
    with pytest.raises(ViewerError, match="DICOM") as error:
        read_image(b"\x89PNG\r\n\x1a\n not a dicom")
    assert "Error" not in str(error.value)
