"""The lightweight runtime: pure functions for latents, schedule, images and Kontext, and `generate`."""
