"""The lightweight runtime: pure functions for latents, schedule and images, the Backend protocol, requests, the
step caches and `generate` (one loop for every family; each family's runtime part, `families/<f>/runtime.py`,
encodes its prompts and references and builds its transformer inputs)."""
