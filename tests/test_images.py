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


def _photo(reference_image, path: Path, orientation: int) -> Path:
    """A JPEG as a phone writes it: pixels stored sideways, an EXIF orientation tag saying how to turn them."""
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    reference_image.save(path, format="JPEG", quality=95, exif=exif)
    return path


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "LA", "CMYK"])
def test_references_load_as_diffusers_load_image(mode, tmp_path, reference_image):
    from diffusers.utils import load_image

    from fluxexport.runtime.images import load_reference

    path = tmp_path / f"reference.{'jpg' if mode == 'CMYK' else 'png'}"
    source = reference_image.convert("RGBA") if mode == "LA" else reference_image
    (source.convert(mode) if mode != "I;16" else Image.fromarray(np.array(source.convert("L"), np.uint16) * 257)).save(
        path
    )
    assert Image.open(path).mode == (mode if mode != "I;16" else "I;16")
    ours, theirs = load_reference(path), load_image(str(path))
    assert ours.mode == "RGB" and ours.size == theirs.size == reference_image.size
    assert np.array_equal(np.array(ours), np.array(theirs))


def test_a_phone_photo_is_turned_upright(tmp_path, reference_image):
    from diffusers.utils import load_image

    from fluxexport.runtime.images import load_reference

    path = _photo(reference_image, tmp_path / "photo.jpg", orientation=6)  # stored 300×200, shown 200×300
    ours = load_reference(path)
    assert Image.open(path).size == (300, 200) and ours.size == (200, 300)
    assert np.array_equal(np.array(ours), np.array(load_image(str(path))))


def test_an_unreadable_reference_is_refused_in_one_line(tmp_path):
    from fluxexport.errors import FluxExportError
    from fluxexport.runtime.images import load_reference

    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(FluxExportError) as error:
        load_reference(path)
    assert str(error.value) == f"cannot read --image {path}: cannot identify image file {str(path)!r}"


def _diffusers_uint8(pipeline, **kwargs) -> np.ndarray:
    images = pipeline(generator=torch.Generator().manual_seed(kwargs.pop("seed")), output_type="np", **kwargs).images
    return (images * 255).round().astype(np.uint8)


@pytest.mark.slow
def test_run_with_a_phone_photo_equals_diffusers(tmp_path, flux2_sources, flux2_pipelines, reference_image):
    """`fluxexport run --image photo.jpg` on FLUX.2 [klein]: the photo upright, the output its size, the image
    diffusers' Flux2KleinPipeline draws from `load_image(path)`."""
    from click.testing import CliRunner
    from diffusers.utils import load_image

    from fluxexport.cli import main

    photo = _photo(reference_image.resize((240, 160)), tmp_path / "photo.jpg", orientation=8)
    out = tmp_path / "out.png"
    args = ["run", "--model", "tiny-klein", "--prompt", "a cat", "--image", photo, "--steps", 2, "--seed", 5,
            "--backend", "torch", "--output", out]  # fmt: skip
    result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    theirs = _diffusers_uint8(
        flux2_pipelines["tiny-klein"], prompt="a cat", image=[load_image(str(photo))], num_inference_steps=2, seed=5,
        text_encoder_out_layers=flux2_sources["tiny-klein"].text_encoder_layers,
    )[0]  # fmt: skip
    ours = np.array(Image.open(out))
    assert ours.shape == theirs.shape == (240, 160, 3)  # upright: the photo's shown size, not its stored one
    assert np.array_equal(ours, theirs)


@pytest.mark.slow
def test_two_references_without_a_size_take_the_first_ones(flux2_sources, flux2_pipelines, reference_image):
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    source = flux2_sources["tiny-klein"]
    first, second = reference_image.resize((160, 96)), reference_image.rotate(90, expand=True).resize((112, 144))
    request = GenerationRequest("a cat", image=[first, second], seed=2, num_inference_steps=2)
    ours = generate(TorchBackend(source, device="cpu"), source, request).images
    theirs = _diffusers_uint8(
        flux2_pipelines["tiny-klein"], prompt="a cat", image=[first, second], num_inference_steps=2, seed=2,
        text_encoder_out_layers=source.text_encoder_layers,
    )  # fmt: skip
    assert ours.shape == theirs.shape == (1, 96, 160, 3)  # the first reference's size, as diffusers takes it
    assert np.array_equal(ours, theirs)
