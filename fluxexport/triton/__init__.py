"""Triton Inference Server: a model repository from exported graphs or engines, and a local server helper."""
