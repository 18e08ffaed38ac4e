import pytest
from PIL import Image

from fluxexport.families.flux1.runtime import PREFERRED_KONTEXT_RESOLUTIONS, preferred_resolution, reference_size


def test_seventeen_preferred_sizes_from_the_design():
    assert len(PREFERRED_KONTEXT_RESOLUTIONS) == 17
    assert PREFERRED_KONTEXT_RESOLUTIONS[0] == (672, 1568)
    assert PREFERRED_KONTEXT_RESOLUTIONS[-1] == (1568, 672)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in PREFERRED_KONTEXT_RESOLUTIONS)


@pytest.mark.parametrize("size", PREFERRED_KONTEXT_RESOLUTIONS)
def test_each_preferred_size_chooses_itself(size):
    assert preferred_resolution(*size) == size


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1920, 1080), (1392, 752)), ((1080, 1920), (752, 1392)), ((512, 512), (1024, 1024)), ((300, 200), (1248, 832))],
)
def test_closest_aspect_ratio(size, expected):
    assert preferred_resolution(*size) == expected


def test_reference_size_floors_to_16_first():
    image = Image.new("RGB", (300, 200))
    assert reference_size(image, auto_resize=False) == (288, 192)
    assert reference_size(image, auto_resize=True) == preferred_resolution(288, 192)
