"""The runtime, quantize and triton parts of each family (`families/<f>/{runtime,quantize,triton}.py`): every
family defines what the generic code asks, with the Protocol's signatures, and the generic Euler loop runs true CFG
as diffusers combines it."""

from __future__ import annotations

import inspect

import pytest
import torch

from fluxexport.families import FAMILIES
from fluxexport.families.family import PART_NAMES
from fluxexport.runtime.family_part import RUNTIME_NAMES, FamilyRuntime
from fluxexport.runtime.pipeline import denoise
from fluxexport.runtime.schedule import euler_step, model_timestep


def test_the_runtime_protocol_is_what_the_registry_lists():
    assert sorted(RUNTIME_NAMES) == sorted(PART_NAMES["runtime"])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_each_family_runtime_part_has_the_protocol_s_signatures(family):
    part = family.part("runtime")
    for name in RUNTIME_NAMES:
        wanted = list(inspect.signature(getattr(FamilyRuntime, name)).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(part, name)).parameters) == wanted, f"{family.name}.runtime.{name}"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_each_family_has_its_quantize_and_triton_parts(family):
    for layer in ("quantize", "triton"):
        part = family.part(layer)
        assert [name for name in PART_NAMES[layer] if not hasattr(part, name)] == [], f"{family.name}.{layer}"
    kept = family.part("quantize").KEEP_HIGH_PRECISION
    assert "proj_out" in kept and "x_embedder" in kept  # embedders and output stay in the base dtype
    names = [tensor.name for tensor in family.part("triton").pipeline_inputs()]
    assert names[0] == "prompt" and len(names) == len(set(names))


def _velocity(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stand-in transformer: the velocity depends on the text and the step (and carries reference tokens)."""
    hidden = feeds["hidden_states"]
    return {"latent": hidden * feeds["encoder_hidden_states"].mean() + feeds["timestep"][:, None, None]}


def test_denoise_combines_true_cfg_as_diffusers_does():
    latents = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([1.0, 0.6, 0.0])
    positive = {"encoder_hidden_states": torch.full((2, 3, 5), 0.7)}
    negative = {"encoder_hidden_states": torch.full((2, 3, 5), -0.2)}
    calls, steps = [], []

    def transformer(feeds):
        calls.append(float(feeds["encoder_hidden_states"].mean()))
        return _velocity(feeds)

    result = denoise(transformer, latents, sigmas, positive, negative, 4.0, on_step=lambda i, n: steps.append((i, n)))
    expected = latents
    for index in range(2):
        timestep = model_timestep(sigmas[index], 2)
        cond = _velocity({"hidden_states": expected, "timestep": timestep} | positive)["latent"]
        uncond = _velocity({"hidden_states": expected, "timestep": timestep} | negative)["latent"]
        expected = euler_step(expected, uncond + 4.0 * (cond - uncond), sigmas[index], sigmas[index + 1])
    assert torch.equal(result, expected)
    assert calls == pytest.approx([0.7, -0.2, 0.7, -0.2]) and steps == [(1, 2), (2, 2)]
    without = denoise(_velocity, latents, sigmas, positive)  # no negative: one run a step, no combination
    alone = latents
    for index in range(2):
        feeds = {"hidden_states": alone, "timestep": model_timestep(sigmas[index], 2)} | positive
        velocity = _velocity(feeds)["latent"]
        alone = euler_step(alone, velocity, sigmas[index], sigmas[index + 1])
    assert torch.equal(without, alone)
