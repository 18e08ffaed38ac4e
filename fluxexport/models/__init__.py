"""Checkpoints: tiny random FLUX models, diffusers folders, hub ids and BFL single-file transformers."""
