import pytest
from helpers import flux1_source

from fluxexport.errors import FluxExportError
from fluxexport.families.flux1.runtime import PREFERRED_KONTEXT_RESOLUTIONS
from fluxexport.specs import COMPONENTS, TRANSFORMER_PARTS, ExportBounds, component_specs, sample_inputs


def dims(spec, direction):
    return {t.name: (t.dtype, t.dims) for t in getattr(spec, direction)}


def test_contract_matches_the_architecture_table(tmp_path):
    specs = component_specs(flux1_source(tmp_path))
    assert tuple(specs) == COMPONENTS + TRANSFORMER_PARTS  # the five, then the transformer in parts (first-block)
    assert dims(specs["transformer_head"], "outputs") == {
        name: ("compute", ("B", axis, 3072))
        for name, axis in (
            ("first_block_residual", "N"),
            ("image_hidden", "N"),
            ("text_hidden", "L"),
            ("image_embedded", "N"),
            ("first_block_modulated", "N"),
        )
    } | {"temb": ("compute", ("B", 3072))}
    assert dims(specs["transformer_tail"], "outputs") == {"tail_hidden": ("compute", ("B", "N", 3072))}
    assert dims(specs["transformer_out"], "outputs") == {"latent": ("compute", ("B", "N", 64))}
    assert dims(specs["clip"], "inputs") == {"input_ids": ("int32", ("B", 77))}
    assert dims(specs["clip"], "outputs") == {
        "text_embeddings": ("compute", ("B", 77, 768)),
        "pooled_embeddings": ("compute", ("B", 768)),
    }
    assert dims(specs["t5"], "outputs") == {"text_embeddings": ("compute", ("B", "L", 4096))}
    assert dims(specs["transformer"], "inputs") == {
        "hidden_states": ("compute", ("B", "N", 64)),
        "encoder_hidden_states": ("compute", ("B", "L", 4096)),
        "pooled_projections": ("compute", ("B", 768)),
        "timestep": ("compute", ("B",)),
        "img_ids": ("float32", ("N", 3)),
        "txt_ids": ("float32", ("L", 3)),
        "guidance": ("float32", ("B",)),
    }
    assert dims(specs["transformer"], "outputs") == {"latent": ("compute", ("B", "N", 64))}
    assert dims(specs["vae_decoder"], "inputs") == {"latent": ("compute", ("B", 16, "h", "w"))}
    assert dims(specs["vae_decoder"], "outputs") == {"images": ("compute", ("B", 3, "H", "W"))}
    assert dims(specs["vae_encoder"], "outputs") == {  # the posterior: Kontext takes its mean, Fill/Control sample
        "latent": ("compute", ("B", 16, "h", "w")),
        "latent_std": ("compute", ("B", 16, "h", "w")),
    }


def test_schnell_has_no_guidance_input(tmp_path):
    spec = component_specs(flux1_source(tmp_path, guidance=False))["transformer"]
    assert "guidance" not in [t.name for t in spec.inputs]


def test_real_bounds_follow_the_demo_range(tmp_path):
    specs = component_specs(flux1_source(tmp_path))
    transformer = specs["transformer"]
    assert (transformer.axes["N"].min, transformer.axes["N"].opt, transformer.axes["N"].max) == (256, 4096, 7225)
    assert (transformer.axes["B"].min, transformer.axes["B"].max) == (1, 4)
    assert transformer.axes["L"].max == 512
    assert (specs["vae_decoder"].axes["h"].min, specs["vae_decoder"].axes["h"].max) == (32, 170)


def test_kontext_bounds_cover_every_preferred_reference(tmp_path):
    specs = component_specs(flux1_source(tmp_path, kontext=True))
    tokens, encoder = specs["transformer"].axes["N"], specs["vae_encoder"].axes
    for width, height in PREFERRED_KONTEXT_RESOLUTIONS:
        reference = (width // 16) * (height // 16)
        assert tokens.min <= reference + 64 * 64 <= tokens.max  # a 1024² target with this reference
        assert reference + (1360 // 16) ** 2 <= tokens.max  # and the largest target
        assert encoder["W"].min <= width <= encoder["W"].max and encoder["H"].min <= height <= encoder["H"].max


def test_export_samples_never_specialise(sources):
    for spec in component_specs(sources["tiny-kontext"]).values():
        assert all(size >= 2 for size in spec.export_sizes.values()), spec.name
        assert len(set(spec.export_sizes.values()) - {2}) == len(spec.export_sizes) - 1, spec.name


def test_sample_inputs_follow_the_spec(sources):
    spec = component_specs(sources["tiny-dev"])["transformer"]
    feeds = sample_inputs(spec, {"B": 3, "N": 40, "L": 9})
    assert [name for name in feeds] == [t.name for t in spec.inputs]
    assert feeds["hidden_states"].shape == (3, 40, 64) and feeds["img_ids"].shape == (40, 3)
    assert feeds["txt_ids"].shape == (9, 3) and feeds["timestep"].shape == (3,)
    assert feeds["timestep"].min() >= 0 and feeds["timestep"].max() <= 1
    clip = sample_inputs(component_specs(sources["tiny-dev"])["clip"], {"B": 2})
    assert str(clip["input_ids"].dtype) == "torch.int32"
    assert int(clip["input_ids"].max()) < sources["tiny-dev"].clip["vocab_size"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_resolution": 512, "max_resolution": 256}, "resolutions must satisfy 16 ≤ min ≤ opt ≤ max"),
        ({"max_resolution": 1368}, "resolutions must be multiples of 16"),
        ({"max_batch": 0}, "max batch must be at least 1, got 0 (--max-batch)"),
        ({"max_references": -1}, "max references must be at least 0, got -1 (--max-references)"),
        ({"max_reference_area": 2048 * 1024},
         "max reference area must be 4096..1048576 px (FLUX.2 pipelines scale larger references to 1 MP), got 2097152 "
         "(--max-reference-area)"),
        ({"max_reference_area": 32 * 32}, "max reference area must be 4096..1048576 px"),
        ({"max_reference_aspect": 9},
         "max reference aspect ratio must be 1..8 (FLUX.2 pipelines refuse wider), got 9 (--max-reference-aspect)"),
        ({"max_reference_aspect": 0.5}, "max reference aspect ratio must be 1..8"),
    ],
)  # fmt: skip
def test_bad_bounds(tmp_path, overrides, message):
    from fluxexport.models.source import resolve_model

    source = resolve_model("tiny-klein") if "reference" in str(overrides) else flux1_source(tmp_path)
    with pytest.raises(FluxExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ExportBounds.for_model(source, **overrides)
