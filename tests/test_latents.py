import pytest
import torch
from diffusers import FluxPipeline
from diffusers.utils.torch_utils import randn_tensor

from fluxexport.errors import FluxExportError
from fluxexport.runtime.latents import (
    check_image_size,
    image_ids,
    latent_grid,
    noise,
    pack_latents,
    text_ids,
    unpack_latents,
)

SIZES = [(144, 272), (256, 256), (512, 320), (1024, 1024), (672, 1568)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_pack_matches_diffusers_and_unpack_inverts(height, width):
    h, w = latent_grid(height, width)
    latents = torch.randn(2, 16, h, w)
    packed = pack_latents(latents)
    assert packed.shape == (2, (h // 2) * (w // 2), 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, h, w))
    assert torch.equal(unpack_latents(packed, h, w), latents)
    assert torch.equal(unpack_latents(packed, h, w), FluxPipeline._unpack_latents(packed, height, width, 8))


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_image_ids_match_diffusers(height, width):
    h, w = latent_grid(height, width)
    expected = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    assert torch.equal(image_ids(h, w), expected)
    kontext = image_ids(h, w, domain=1)
    assert torch.equal(kontext[:, 0], torch.ones(len(expected)))
    assert torch.equal(kontext[:, 1:], expected[:, 1:])
    assert torch.equal(text_ids(7), torch.zeros(7, 3))


@pytest.mark.parametrize(("batch", "seed"), [(1, 0), (2, 42), (3, 1234)])
def test_noise_is_diffusers_draw(batch, seed):
    expected = randn_tensor((batch, 16, 18, 34), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    assert torch.equal(noise(batch, 16, 144, 272, seed), expected)


def test_latent_grid():
    assert latent_grid(1024, 1024) == (128, 128)
    assert latent_grid(144, 272) == (18, 34)


@pytest.mark.parametrize(
    ("height", "width", "message"),
    [
        (250, 256, "height 250 is not a multiple of 16: use 240 or 256 (--height)"),
        (256, 100, "width 100 is not a multiple of 16: use 96 or 112 (--width)"),
        (8, 256, "height 8 is not a multiple of 16: use 16 (--height)"),
    ],
)
def test_bad_sizes_name_the_nearest_valid_ones(height, width, message):
    with pytest.raises(FluxExportError) as error:
        check_image_size(height, width)
    from fluxexport.cli import command_line_terms

    assert error.value.render(command_line_terms()) == message  # as the CLI words it
