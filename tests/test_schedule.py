import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from fluxexport.errors import FluxExportError
from fluxexport.runtime.schedule import euler_step, flow_match_sigmas, model_timestep, resolution_shift

STATIC = [{"shift": 1.0, "use_dynamic_shifting": False}, {"shift": 3.0, "use_dynamic_shifting": False}]
DYNAMIC = [
    {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }
]
TOKENS = [64, 255, 256, 1024, 2107, 4096, 9800]


def diffusers_sigmas(config, steps, tokens):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas, scheduler.timesteps


@pytest.mark.parametrize("config", STATIC + DYNAMIC)
@pytest.mark.parametrize("tokens", TOKENS)
def test_sigmas_equal_diffusers_for_1_to_50_steps(config, tokens):
    for steps in range(1, 51):
        expected, timesteps = diffusers_sigmas(config, steps, tokens)
        ours = flow_match_sigmas(steps, tokens, config)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, expected), (steps, tokens)
        # the transformer's timestep input is diffusers' t/1000, bit for bit
        assert torch.equal(model_timestep(ours[0], 2), (timesteps[0].expand(2) / 1000))


def test_dynamic_shift_depends_on_tokens_static_does_not():
    dynamic = [flow_match_sigmas(4, n, DYNAMIC[0])[1].item() for n in (256, 4096)]
    static = [flow_match_sigmas(4, n, STATIC[1])[1].item() for n in (256, 4096)]
    assert dynamic[0] < dynamic[1]
    assert static[0] == static[1]
    assert resolution_shift(256) == pytest.approx(0.5)
    assert resolution_shift(4096) == pytest.approx(1.15)


def test_euler_step_is_diffusers_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    x, v = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    expected = scheduler.step(v, scheduler.timesteps[0], x, return_dict=False)[0]
    sigmas = flow_match_sigmas(4, 16, {"shift": 1.0})
    assert torch.equal(euler_step(x, v, sigmas[0], sigmas[1]), expected)


def test_bad_steps_and_unsupported_options():
    from fluxexport.cli import command_line_terms

    with pytest.raises(FluxExportError) as error:
        flow_match_sigmas(0, 256, {})
    assert error.value.render(command_line_terms()) == "steps must be at least 1, got 0 (--steps)"
    with pytest.raises(FluxExportError, match="use_karras_sigmas"):
        flow_match_sigmas(4, 256, {"use_karras_sigmas": True})
