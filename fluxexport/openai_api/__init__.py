"""An OpenAI-compatible images API (`POST /v1/images/generations`, `/v1/images/edits`, `GET /v1/models`) in
front of a Triton repository's flux_pipeline: `fluxexport serve REPO --openai-port PORT`."""
