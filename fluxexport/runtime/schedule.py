"""Flow-match sigma schedule and Euler step, number for number as FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fluxexport.errors import FluxExportError, RequestError

NUM_TRAIN_TIMESTEPS = 1000
# Scheduler options that change the sigmas and that no FLUX.1 checkpoint sets; we refuse rather than ignore.
_UNSUPPORTED_OPTIONS = (
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def resolution_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu: the shift grows linearly with the number of image tokens (diffusers' calculate_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift: fitted on token count and step count (diffusers' compute_empirical_mu, same constants)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    at_200_steps = a2 * image_seq_len + b2
    at_10_steps = a1 * image_seq_len + b1
    slope = (at_200_steps - at_10_steps) / 190.0
    return float(slope * num_steps + (at_200_steps - 200.0 * slope))


MAX_STEPS = NUM_TRAIN_TIMESTEPS  # more steps than the scheduler's training timesteps repeat sigmas' resolution


def check_steps(num_steps: int) -> int:
    """Refuse a step count that is not a whole number in 1..MAX_STEPS (the one-line error every caller shows)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise RequestError("num_inference_steps", f"{{name}} must be a whole number, got {num_steps!r}")
    if num_steps < 1:
        raise RequestError("num_inference_steps", f"{{name}} must be at least 1, got {num_steps}")
    if num_steps > MAX_STEPS:
        raise RequestError("num_inference_steps", f"{{name}} must be at most {MAX_STEPS}, got {num_steps}")
    return num_steps


def scheduler_settings(scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler config as FlowMatchEulerDiscreteScheduler reads it: the file's keys, else its defaults."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return dict(FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config)).config)


def flow_match_sigmas(
    num_steps: int, image_seq_len: int, scheduler_config: Mapping[str, Any], mu: float | None = None
) -> torch.Tensor:
    """Sigmas [num_steps+1] float32 ending in 0, shifted statically or by resolution (mu; FLUX.2 passes its own)."""
    check_steps(num_steps)
    config = scheduler_settings(scheduler_config)
    for option in _UNSUPPORTED_OPTIONS:
        if config[option]:
            raise FluxExportError(f"scheduler option {option}={config[option]!r} is not supported")
    # float32 from here on, in the order diffusers computes, so that every sigma matches bit for bit.
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if config["use_dynamic_shifting"]:
        if mu is None:
            mu = resolution_shift(
                image_seq_len,
                config["base_image_seq_len"],
                config["max_image_seq_len"],
                config["base_shift"],
                config["max_shift"],
            )
        if config["time_shift_type"] == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    else:
        shift = config["shift"]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def model_timestep(sigma: torch.Tensor, batch: int) -> torch.Tensor:
    """The transformer's `timestep` input [B]: sigma as float32, via t = 1000·sigma and t/1000 as diffusers does."""
    t = sigma * NUM_TRAIN_TIMESTEPS
    return (t / NUM_TRAIN_TIMESTEPS).expand(batch).to(torch.float32)


def euler_step(
    latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One flow-match Euler step in float32: x ← x + (σ_next − σ)·v."""
    return latents.to(torch.float32) + (sigma_next - sigma) * velocity.to(torch.float32)
