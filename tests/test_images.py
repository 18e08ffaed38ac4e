"""Pixels in and out: output names, PNG writes, uint8 rounding."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxexport.runtime.images import images_to_uint8, output_paths, save_png_atomic


@pytest.mark.parametrize(
    ("output", "count", "expected"),
    [
        ("flux.png", 1, ["flux.png"]),
        ("flux.PNG", 1, ["flux.PNG"]),
        ("flux", 1, ["flux.png"]),
        ("out/fox.jpg", 1, ["out/fox.jpg.png"]),
        ("flux.png", 3, ["flux_0.png", "flux_1.png", "flux_2.png"]),
        ("dir/a", 2, ["dir/a_0.png", "dir/a_1.png"]),
    ],
)
def test_output_paths(output, count, expected):
    assert output_paths(output, count) == [Path(path) for path in expected]


def test_save_png_atomic_writes_a_png_and_nothing_else(tmp_path):
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    target = tmp_path / "a.png"
    target.write_bytes(b"previous")
    save_png_atomic(image, target)
    assert np.array_equal(np.array(Image.open(target)), image)
    assert [path.name for path in tmp_path.iterdir()] == ["a.png"]


def test_save_png_atomic_keeps_the_old_file_when_encoding_fails(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"previous")
    with pytest.raises(TypeError):
        save_png_atomic(np.zeros((4, 4, 3), dtype=np.complex64), target)  # PIL cannot encode it
    assert target.read_bytes() == b"previous"
    assert [path.name for path in tmp_path.iterdir()] == ["a.png"]


def test_images_to_uint8_rounds_like_diffusers():
    images = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert images_to_uint8(images)[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]
